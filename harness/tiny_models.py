"""Tiny instances of ComfyUI's real DiT classes, with seeded weights, wrapped in a real ModelPatcher.

ComfyUI builds layers without initializing them (weights normally come from a file), so a model
made from a config holds garbage until :func:`initialize` fills it.
"""

from __future__ import annotations

import torch

from . import comfy_runtime

# unet_config dicts as comfy.model_detection would infer them from a checkpoint, shrunk.
FLUX = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, hidden_size=64,
    context_in_dim=32, vec_in_dim=16, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
    axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=False,
)


def initialize(module: torch.nn.Module, seed: int) -> None:
    """Seeded standard initialization: PyTorch's defaults for linear/conv layers, ones for norm scales."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        touched = set()
        for sub in module.modules():
            for cls in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding):
                if isinstance(sub, cls):
                    cls.reset_parameters(sub)
                    touched.update(id(p) for p in sub.parameters(recurse=False))
        for name, param in module.named_parameters():
            if id(param) in touched:
                continue
            with torch.no_grad():
                if name.endswith(("scale", "weight")):
                    param.fill_(1.0)  # norm gains
                else:
                    param.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)


def build(unet_config: dict, seed: int = 0):
    """A real ComfyUI ModelPatcher around a tiny model of the given architecture."""
    comfy_runtime.load()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise ValueError(f"ComfyUI recognizes no model family for {unet_config}")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    initialize(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
