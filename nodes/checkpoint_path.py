"""The file a node's MODEL was loaded from, read from the prompt: ComfyUI keeps no path on a MODEL.

From the node, the prompt is followed upstream through each node's linked ``model`` input (LoRA
loaders, ModelSampling and other model patches) to the loader that made the MODEL. A wrong guess
costs nothing: a map found beside a file is used only if its architecture, base-weight fingerprint
and granularity match the model.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths

# class_type -> (the input naming the file, the models folder it is in)
LOADERS = {
    "UNETLoader": ("unet_name", "diffusion_models"),
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "CheckpointLoader": ("ckpt_name", "checkpoints"),
    "ImageOnlyCheckpointLoader": ("ckpt_name", "checkpoints"),
    "unCLIPCheckpointLoader": ("ckpt_name", "checkpoints"),
}
MAX_HOPS = 64  # far beyond any real chain of model patches; ends a cycle in a hand-written prompt


def model_file(prompt, node_id) -> Path | None:
    """The checkpoint or diffusion-model file feeding node ``node_id``'s ``model`` input in an API-format
    prompt, or None if the chain ends at anything but a known loader of an existing file."""
    node = prompt.get(str(node_id)) if isinstance(prompt, dict) else None
    for _ in range(MAX_HOPS):
        inputs = node.get("inputs") if isinstance(node, dict) else None
        link = inputs.get("model") if isinstance(inputs, dict) else None
        if not (isinstance(link, list) and link):  # a widget value or no model input: no loader upstream
            return None
        node = prompt.get(str(link[0]))
        loader = LOADERS.get(node.get("class_type")) if isinstance(node, dict) else None
        if loader is not None:
            name = (node.get("inputs") or {}).get(loader[0])
            # get_full_path resolves only inside the registered models folders, and only existing files
            path = folder_paths.get_full_path(loader[1], name) if isinstance(name, str) else None
            return Path(path) if path else None
    return None


def for_node(node_cls) -> Path | None:
    """`model_file` for an executing V3 node class that declares the hidden prompt and unique_id inputs;
    None when it runs outside ComfyUI's executor (no hidden inputs)."""
    hidden = node_cls.hidden
    return model_file(hidden.prompt, hidden.unique_id) if hidden is not None else None
