"""The ComfyUI wrappers that run HyCa's state along a sampling run.

An ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh state and drops it in a ``finally``, so a
cancelled run leaves nothing behind. An ``APPLY_MODEL`` wrapper decides, once per model call, whether this
call computes the blocks or predicts them (APPLY_MODEL, not DIFFUSION_MODEL: every BaseModel runs it with the
same arguments, while SD3's MMDiT never runs DIFFUSION_MODEL wrappers); the block patches (block_patch.py)
follow that decision. For whole-model granularity the APPLY_MODEL wrapper caches the model's output instead.

A predicted residual that is not finite (NaN or inf, from a fitted weight or a half-precision history
that overflowed) never reaches the image: its unit is computed instead, see `apply_model_wrapper`.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from . import run_constant_layers
from .block_patch import BlockPatch
from .run_state import OPTIONS_KEY, Call, RunState, call_scope

MODEL_KEY = "model.out"  # the whole model's residual (output - input), for whole-model granularity


def patches_by_place(transformer_options: dict) -> dict[tuple, object]:
    """Every patch a model call runs with, by its place: ("replace", "dit", ("double_block", 3)) for a block
    replacement, ("patch", "post_input", 0) for the first patch of a list."""
    replaced, listed = transformer_options.get("patches_replace", {}), transformer_options.get("patches", {})
    places = {("replace", kind, key): patch for kind, patches in replaced.items()
              for key, patch in patches.items()}
    places.update({("patch", name, i): patch for name, patches in listed.items()
                   for i, patch in enumerate(patches)})
    return places


def _cut_units(places: dict[tuple, object]) -> list[str]:
    """Stack units some of whose blocks run another node's patch instead of HyCa's: the unit's prediction,
    added at its first block, would be added again by such a block computing, and its residual, taken
    between its first and last block, might never be taken."""
    found = Counter(patch.unit for patch in places.values() if isinstance(patch, BlockPatch))
    return sorted(unit.name for unit, count in found.items() if count < unit.size)


def begin_call(state: RunState, x: torch.Tensor, transformer_options: dict) -> Call:
    """The run state's call for a model call, with the places of the patches it changes from the sampler's.

    Nodes that call the model again at a step's sigma for their own ends (Skip Layer Guidance skips blocks,
    Self-Attention Guidance perturbs attention) do so through ComfyUI's model options with patches of their
    own on top of the run's: such a call is never the sampler's evaluation of a step (`RunState.begin_call`).
    The sampler's calls (Heun's two, DPM++ 2S's midpoint included) run with the patches of the run's first
    call, its first evaluation; taken there rather than when the run starts, as ComfyUI adds hooks' patches
    while it prepares the run. Keyed by places, not objects, another node's call gets the same branch
    whether it makes its patch once or per call; one that cuts a stack unit computes fully.
    """
    places = patches_by_place(transformer_options)
    cut = _cut_units(places)
    if not state.started:
        state.patches = places
        if cut:
            logging.warning("HyCa: a node placed after HyCa replaced blocks of %s; this run computes fully. "
                            "Place HyCa after it (HyCa then runs its patches as the blocks)", ", ".join(cut))
            state.make_run_map = state.recorder = None
    own = state.patches
    changed = frozenset(k for k in places.keys() | own.keys() if places.get(k) is not own.get(k))
    return state.begin_call(x, transformer_options, None if changed and cut else changed)


def _transformer_options(args, kwargs) -> dict:
    """The call's transformer_options: the keyword, else the positional dict that holds HyCa's state."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    return next((a for a in reversed(args) if isinstance(a, dict) and OPTIONS_KEY in a), {})


def _run_state(transformer_options: dict) -> RunState | None:
    """The run's state, None outside a sampling run (e.g. a model call from a preview or a test)."""
    if transformer_options.get("sample_sigmas") is None:
        return None
    return transformer_options.get(OPTIONS_KEY)


def apply_model_wrapper(executor, *args, **kwargs):
    """Decide compute-or-predict for this model call; every block patch of the call follows it."""
    transformer_options = _transformer_options(args, kwargs)
    state = _run_state(transformer_options)
    if state is None:
        return executor(*args, **kwargs)
    call = begin_call(state, args[0], transformer_options)
    counts = state.computed, state.predicted, state.fallbacks

    def again():  # the call run once more, its block counts as before it
        state.computed, state.predicted, state.fallbacks = counts
        return executor(*args, **kwargs)

    with call_scope(transformer_options, call):
        out = executor(*args, **kwargs)
        if call.predict and not state.checking and not state.output_finite(out):
            # A non-finite prediction reaches the output (one that does not reach it harms nothing): from
            # now on in this run every predicted unit checks itself, and this call runs again to find it.
            state.checking = True
            out = again()
        faults = state.faults(call)
        while faults:
            # A prediction depends on the cached history only, not on the call's input: running the call
            # again with the faulty units computed gives what computing them in the first place would have.
            # Faults are rare: paying another (mostly predicted) call for them beats a sync per block. A unit
            # after a faulty one got a non-finite input and reports nothing: the next run shows its own fault.
            call.fallback |= faults
            out = again()
            faults = state.faults(call)
    state.log_faults(call)
    state.end_call(call)
    return out


def _as_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, positions, C): latent channels play the role of hidden channels."""
    return latent.flatten(2).transpose(1, 2)


def whole_model_wrapper(executor, *args, **kwargs):
    """Whole-model granularity: the model's output minus its input is the one cached residual.

    Serves every model family, block patches or not (Lumina 2, HiDream, UNets), at the cost of
    predicting the final output rather than each block.
    """
    transformer_options = _transformer_options(args, kwargs)
    state = _run_state(transformer_options)
    if state is None:
        return executor(*args, **kwargs)
    x = args[0]
    call = begin_call(state, x, transformer_options)
    if call.predict:
        tokens = _as_tokens(x)
        out = state.predicted_output(call, MODEL_KEY, tokens)
        state.check(call, MODEL_KEY, out, tokens)
        call.fallback = state.faults(call)  # the whole model is one unit: one sync per predicted call
        if not call.fallback:
            state.predicted += 1
            return out.transpose(1, 2).reshape(x.shape)
        state.log_faults(call)
        state.fallbacks += 1
        state.computed += 1
        # not cached: the history stays what the run map fitted its weights to
        return executor(*args, **kwargs)
    out = executor(*args, **kwargs)
    state.computed += 1
    if call.decision.keeps:
        state.store(call, MODEL_KEY, _as_tokens(out), _as_tokens(x))
    state.end_call(call)
    return out


class Rerun:
    """A finished sampling run, to sample again through the same ``OUTER_SAMPLE`` chain (guider, conditioning,
    loaded model) with another run state and some of ``outer_sample``'s arguments changed: what auto mode
    tunes with. Arguments keep the places ComfyUI gave them (other wrappers read them by position)."""

    NAMES = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed")

    def __init__(self, executor, args: tuple, kwargs: dict, transformer_options: dict):
        self.executor, self.args, self.kwargs = executor, args, kwargs
        self.transformer_options = transformer_options

    def argument(self, name: str):
        index = self.NAMES.index(name)
        return self.args[index] if index < len(self.args) else self.kwargs.get(name)

    @property
    def model_sampling(self):
        return self.executor.class_obj.model_patcher.get_model_object("model_sampling")

    def __call__(self, state: RunState, **changes) -> torch.Tensor:
        """The final latent of the run sampled again with ``state``, without preview or progress bar."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for name, value in {"callback": None, "disable_pbar": True, **changes}.items():
            index = self.NAMES.index(name)
            if index < len(args):
                args[index] = value
            else:
                kwargs[name] = value
        self.transformer_options[OPTIONS_KEY] = state
        return self.executor(*args, **kwargs)


def outer_sample_wrapper(executor, *args, **kwargs):
    """Give this sampling run its own state and release it however the run ends."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    transformer_options = guider.model_options["transformer_options"]
    state = transformer_options[OPTIONS_KEY] = transformer_options[OPTIONS_KEY].clone()
    completed = False
    try:
        out = executor(*args, **kwargs)
        completed = True
        return out
    finally:
        try:
            state.finish(completed, Rerun(executor, args, kwargs, transformer_options))
            summary = state.summary()
            if summary:
                logging.info(summary)
        finally:
            run_constant_layers.forget(guider.model_patcher)
            guider.model_options = original_options
