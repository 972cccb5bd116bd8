"""Putting a RunState into a clone of a MODEL, through ModelPatcher's own mechanisms only."""

from __future__ import annotations

import comfy.patcher_extension

from .block_cache import OPTIONS_KEY, BlockPatch, RunState, apply_model_wrapper, outer_sample_wrapper
from .families import architecture, patchable_blocks


def block_widths(model) -> dict[str, int]:
    """Hidden width of every patchable block (``"double_block.0"`` -> 3072)."""
    return {block.name: block.width for block in patchable_blocks(model.model.diffusion_model)}


def model_architecture(model) -> str:
    return architecture(model.model.diffusion_model)


def with_hyca(model, state: RunState):
    """A clone of ``model`` whose blocks follow ``state``; the input MODEL is left untouched."""
    blocks = patchable_blocks(model.model.diffusion_model)  # raises UnsupportedModel first
    patched = model.clone()
    patched.model_options["transformer_options"][OPTIONS_KEY] = state
    for block in blocks:
        patched.set_model_patch_replace(BlockPatch(block), "dit", block.block_type, block.index)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, OPTIONS_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, OPTIONS_KEY,
                                 apply_model_wrapper)
    return patched
