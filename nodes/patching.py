"""Putting a RunState into a clone of a MODEL, through ModelPatcher's own mechanisms only.

Three granularities: per block (the paper: every transformer block's residual is cached and
predicted through ``dit`` block-replacement patches), per stack (each run of consecutive blocks
of one type, e.g. FLUX's double and single stacks, is one residual: far less memory) and whole
model (the model's output minus its input, through an APPLY_MODEL wrapper alone, for families
without block patches).

A MODEL may already carry block patches: another node's are kept and run as the blocks, an earlier HyCa's
(Apply chained twice, Calibrate on Apply's output) are replaced, each with a log line.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension

from . import block_only_layers, run_constant_layers
from .block_patch import BlockPatch, Unit
from .families import Block, architecture, patchable_blocks
from .model_wrappers import MODEL_KEY, apply_model_wrapper, outer_sample_wrapper, whole_model_wrapper
from .run_state import OPTIONS_KEY, RunState

WRAPPERS = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.APPLY_MODEL)

GRANULARITIES = ("block", "stack", "model")


def _patches(blocks: list[Block], granularity: str) -> list[BlockPatch]:
    if granularity == "block":
        return [BlockPatch(b, Unit(b.name, 1)) for b in blocks]
    stacks = {}
    for block in blocks:
        stacks.setdefault(block.block_type, []).append(block)
    return [BlockPatch(b, Unit(f"{kind}s", len(stack)), first=i == 0, last=i == len(stack) - 1)
            for kind, stack in stacks.items() for i, b in enumerate(stack)]


def unit_widths(model, granularity: str = "block") -> dict[str, int]:
    """Width of every unit a map must cover: ``"double_block.0"`` (per block) or ``"double_blocks"``
    (per stack) -> 3072, or ``"model"`` -> latent channels."""
    if granularity == "model":
        return {MODEL_KEY.rsplit(".", 1)[0]: model.model.latent_format.latent_channels}
    patches = _patches(patchable_blocks(model.model.diffusion_model), granularity)
    return {p.unit.name: p.block.width for p in patches}


def model_architecture(model) -> str:
    return architecture(model.model.diffusion_model)


def _without_hyca(patched) -> None:
    """Take an earlier HyCa off a clone: its run-state template, wrappers and block patches (each patch
    another node had on a block before it comes back). Two HyCa patches on one model cannot compose: both
    would cache the same blocks, and each would take the other's predictions for computations."""
    options = patched.model_options["transformer_options"]
    dit = options.get("patches_replace", {}).get("dit", {})
    earlier = {key: patch.inner for key, patch in dit.items() if isinstance(patch, BlockPatch)}
    if OPTIONS_KEY not in options and not earlier:
        return
    logging.warning("HyCa: this model already has HyCa on it (an earlier HyCa Apply or Calibrate); this one "
                    "replaces it")
    for key, inner in earlier.items():
        if inner is None:
            del dit[key]
        else:
            dit[key] = inner
    options.pop(OPTIONS_KEY, None)
    for kind in WRAPPERS:
        patched.remove_wrappers_with_key(kind, OPTIONS_KEY)


def _keep_foreign(patched, patches: list[BlockPatch]) -> None:
    """Give each HyCa patch the patch another node already put on its block, to run as the block."""
    dit = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for patch in patches:
        patch.inner = dit.get((patch.block.block_type, patch.block.index))
    kept = [patch.block.name for patch in patches if patch.inner is not None]
    if kept:
        logging.info("HyCa: %d blocks carry another node's patch (%s%s); HyCa caches them as that patch "
                     "computes them", len(kept), ", ".join(kept[:4]), ", ..." if len(kept) > 4 else "")


def with_hyca(model, state: RunState, granularity: str = "block"):
    """A clone of ``model`` following ``state``; the input MODEL is left untouched."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    blocks = [] if granularity == "model" else patchable_blocks(model.model.diffusion_model)
    patches = _patches(blocks, granularity)
    patched = model.clone()
    _without_hyca(patched)
    _keep_foreign(patched, patches)
    patched.model_options["transformer_options"][OPTIONS_KEY] = state
    run_constant_layers.add(patched)
    block_only_layers.add(patched)
    for patch in patches:
        patched.set_model_patch_replace(patch, "dit", patch.block.block_type, patch.block.index)
    outer, apply_model = WRAPPERS
    patched.add_wrapper_with_key(outer, OPTIONS_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(apply_model, OPTIONS_KEY,
                                 whole_model_wrapper if granularity == "model" else apply_model_wrapper)
    return patched
