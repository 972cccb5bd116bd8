"""Which transformer blocks of a ComfyUI diffusion model HyCa can replace, found from the model itself.

ComfyUI's DiT families look up ``patches_replace["dit"][(block_type, index)]`` inside their own
forward; the lists below name the module lists those loops run over. Families whose forward never
consults that table get a clear error instead of patches that would silently never run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Packages under comfy.ldm whose forward consults patches_replace["dit"] (ComfyUI 0.3.75).
_PATCHABLE_PACKAGES = (
    "comfy.ldm.flux.", "comfy.ldm.chroma.", "comfy.ldm.hunyuan_video.", "comfy.ldm.wan.",
    "comfy.ldm.qwen_image.", "comfy.ldm.lightricks.", "comfy.ldm.modules.diffusionmodules.mmdit",
    "comfy.ldm.aura.",
)
# Module-list attribute names per block type, in the order they are tried.
_BLOCK_LISTS = {
    "double_block": ("double_blocks", "joint_blocks", "transformer_blocks", "double_layers", "blocks"),
    "single_block": ("single_blocks", "single_layers"),
}
# Hidden-state streams a block patch receives and returns ("txt" only in dual-stream blocks).
STREAMS = ("img", "txt")


class UnsupportedModel(ValueError):
    """The model has no transformer blocks that ComfyUI lets a node replace."""


@dataclass(frozen=True)
class Block:
    block_type: str  # "double_block" | "single_block", ComfyUI's patch name
    index: int
    width: int  # hidden channels of the block's residual stream

    @property
    def name(self) -> str:
        return f"{self.block_type}.{self.index}"


def _width(block: torch.nn.Module) -> int:
    """Hidden size of a block: the input width of its first linear layer."""
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            return module.in_features
    raise UnsupportedModel(f"cannot tell the hidden width of {type(block).__name__}")


def architecture(diffusion_model: torch.nn.Module) -> str:
    cls = type(diffusion_model)
    return f"{cls.__module__}.{cls.__qualname__}"


def patchable_blocks(diffusion_model: torch.nn.Module) -> list[Block]:
    """Every block ComfyUI will route through a ``dit`` replacement patch, in execution order."""
    name = architecture(diffusion_model)
    if not name.startswith(_PATCHABLE_PACKAGES):
        raise UnsupportedModel(
            f"HyCa cannot patch {type(diffusion_model).__name__}: ComfyUI offers no transformer-block "
            "patches for this model family (supported: FLUX, Chroma, Qwen-Image, HunyuanVideo, Wan, "
            "LTX-Video, SD3, AuraFlow); use granularity 'model' to cache the whole model's output instead"
        )
    blocks = []
    for block_type, candidates in _BLOCK_LISTS.items():
        for attribute in candidates:
            modules = getattr(diffusion_model, attribute, None)
            if isinstance(modules, torch.nn.ModuleList) and len(modules):
                blocks += [Block(block_type, i, _width(m)) for i, m in enumerate(modules)]
                break
    if not blocks:
        raise UnsupportedModel(f"found no transformer blocks in {type(diffusion_model).__name__}")
    return blocks
