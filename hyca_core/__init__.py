"""HyCa: hybrid feature caching for diffusion transformers, as a pure library.

Nothing in this package imports ComfyUI: it knows tensors, times and solver maps only.
"""
