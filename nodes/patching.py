"""Putting a RunState into a clone of a MODEL, through ModelPatcher's own mechanisms only.

Three granularities: per block (the paper: every transformer block's residual is cached and
predicted through ``dit`` block-replacement patches), per stack (each run of consecutive blocks
of one type, e.g. FLUX's double and single stacks, is one residual: far less memory) and whole
model (the model's output minus its input, through an APPLY_MODEL wrapper alone, for families
without block patches).
"""

from __future__ import annotations

import comfy.patcher_extension

from .block_cache import (MODEL_KEY, OPTIONS_KEY, BlockPatch, RunState, Unit, apply_model_wrapper,
                          outer_sample_wrapper, whole_model_wrapper)
from .families import Block, architecture, patchable_blocks

GRANULARITIES = ("block", "stack", "model")


def _patches(blocks: list[Block], granularity: str) -> list[BlockPatch]:
    if granularity == "block":
        return [BlockPatch(b, Unit(b.name, 1)) for b in blocks]
    stacks = {}
    for block in blocks:
        stacks.setdefault(block.block_type, []).append(block)
    return [BlockPatch(b, Unit(f"{kind}s", len(stack)), first=i == 0, last=i == len(stack) - 1)
            for kind, stack in stacks.items() for i, b in enumerate(stack)]


def block_widths(model, granularity: str = "block") -> dict[str, int]:
    """Width of every unit a map must cover: ``"double_block.0"`` (per block) or ``"double_blocks"``
    (per stack) -> 3072, or ``"model"`` -> latent channels."""
    if granularity == "model":
        return {MODEL_KEY.rsplit(".", 1)[0]: model.model.latent_format.latent_channels}
    return {p.unit.name: p.block.width for p in _patches(patchable_blocks(model.model.diffusion_model), granularity)}


def model_architecture(model) -> str:
    return architecture(model.model.diffusion_model)


def with_hyca(model, state: RunState, granularity: str = "block"):
    """A clone of ``model`` following ``state``; the input MODEL is left untouched."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    patches = [] if granularity == "model" else _patches(patchable_blocks(model.model.diffusion_model), granularity)
    patched = model.clone()
    patched.model_options["transformer_options"][OPTIONS_KEY] = state
    for patch in patches:
        patched.set_model_patch_replace(patch, "dit", patch.block.block_type, patch.block.index)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, OPTIONS_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, OPTIONS_KEY,
                                 whole_model_wrapper if granularity == "model" else apply_model_wrapper)
    return patched
