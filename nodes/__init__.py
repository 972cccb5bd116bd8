"""The ComfyUI-facing layer: node schemas, per-run state, where solver maps live on disk."""
