"""Loading a diffusion-model file whose sizes ComfyUI's detection cannot all read.

``comfy.model_detection.detect_unet_config`` reads most of a FLUX file's sizes from its weights, but
fixes the rest at FLUX.1's values (24 heads of 128), so a small FLUX would be built with the wrong
shapes (Qwen-Image files are read the same way). :func:`load_diffusion_model` takes ComfyUI's
detection, overrides just those ``undetected`` entries, and then builds, loads and wraps the model as
``comfy.sd.load_diffusion_model_state_dict`` does (the UNETLoader node's path).
"""

from __future__ import annotations

from pathlib import Path

from . import comfy_runtime


def load_diffusion_model(path: Path, image_model: str, undetected: dict, model_flag: str):
    """A ModelPatcher of the ``image_model`` file at ``path``, with ``undetected`` set over the
    detected config; ``model_flag`` names the train_reference ``--model`` that makes the file."""
    comfy_runtime.load()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: train it with "
                                f"`python -m harness.train_reference --model {model_flag}`")
    state = comfy.utils.load_torch_file(str(path))
    detected = comfy.model_detection.detect_unet_config(state, "")
    if detected is None or detected.get("image_model") != image_model:
        raise ValueError(f"{path} holds no {image_model} diffusion model")
    config = comfy.model_detection.model_config_from_unet_config({**detected, **undetected}, state)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(state),
                                              supported_dtypes=list(config.supported_inference_dtypes),
                                              weight_dtype=comfy.utils.weight_dtype(state))
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
        dtype, load_device, config.supported_inference_dtypes))
    base = config.get_model(state, "").to(offload_device)
    base.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
