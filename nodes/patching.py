"""Putting a RunState into a clone of a MODEL, through ModelPatcher's own mechanisms only.

Two granularities: per block (the paper: every transformer block's residual is cached and
predicted through ``dit`` block-replacement patches) and whole model (the model's output minus
its input, through an APPLY_MODEL wrapper alone, for families without block patches).
"""

from __future__ import annotations

import comfy.patcher_extension

from .block_cache import (MODEL_KEY, OPTIONS_KEY, BlockPatch, RunState, apply_model_wrapper, outer_sample_wrapper,
                          whole_model_wrapper)
from .families import architecture, patchable_blocks

GRANULARITIES = ("block", "model")


def block_widths(model, granularity: str = "block") -> dict[str, int]:
    """Width of every unit a map must cover: ``"double_block.0"`` -> 3072, or ``"model"`` -> latent channels."""
    if granularity == "model":
        return {MODEL_KEY.rsplit(".", 1)[0]: model.model.latent_format.latent_channels}
    return {block.name: block.width for block in patchable_blocks(model.model.diffusion_model)}


def model_architecture(model) -> str:
    return architecture(model.model.diffusion_model)


def with_hyca(model, state: RunState, granularity: str = "block"):
    """A clone of ``model`` following ``state``; the input MODEL is left untouched."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    blocks = patchable_blocks(model.model.diffusion_model) if granularity == "block" else []  # raises first
    patched = model.clone()
    patched.model_options["transformer_options"][OPTIONS_KEY] = state
    for block in blocks:
        patched.set_model_patch_replace(BlockPatch(block), "dit", block.block_type, block.index)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, OPTIONS_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, OPTIONS_KEY,
                                 apply_model_wrapper if granularity == "block" else whole_model_wrapper)
    return patched
