"""Per-run HyCa state and the patches that put it into ComfyUI's sampling.

One ``DIFFUSION_MODEL`` wrapper decides, once per model call, whether this call computes the
blocks or predicts them; the ``dit`` block-replacement patches then either run the real block and
cache its residual, or add the predicted residual to the block input. An ``OUTER_SAMPLE`` wrapper
gives every sampling run a fresh state and drops it in a ``finally``, so a cancelled run leaves
nothing behind. State is keyed by conditioning branch and input shape, never kept on the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..hyca_core.predict import ResidualHistory
from ..hyca_core.solver_map import CompiledMap
from ..hyca_core.trajectories import TrajectoryRecorder
from .families import STREAMS, Block

OPTIONS_KEY = "hyca"  # transformer_options entry holding the run state
_CALL_KEY = "hyca_call"  # transformer_options entry holding the current call's decision


def step_position(sample_sigmas: torch.Tensor, sigma: float) -> float:
    """The step index of ``sigma`` on the sampling schedule, fractional between two steps.

    Deciding by sigma rather than by counting calls keeps multi-call samplers (Heun, DPM++ 2S) and
    img2img schedules right: every call at the same sigma gets the same decision.
    """
    sigmas = sample_sigmas.detach().double().cpu().numpy()
    close = np.flatnonzero(np.isclose(sigmas, sigma, rtol=1e-5, atol=1e-7))
    if len(close):
        return float(close[0])
    below = np.flatnonzero(sigmas < sigma)  # schedules decrease
    if not len(below) or below[0] == 0:
        return 0.0
    i = int(below[0]) - 1
    return i + float((sigmas[i] - sigma) / (sigmas[i] - sigmas[i + 1]))


@dataclass
class Branch:
    """Cached residuals of one conditioning branch and input shape."""

    times: list[float] = field(default_factory=list)  # steps of the cached computations
    histories: dict[str, ResidualHistory] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.histories.values())


@dataclass
class Call:
    """The decision for one model call, read by every block patch during that call."""

    branch: Branch
    step: float
    sigma: float
    predict: bool
    replace_last: bool  # a computed call at the step already cached (Heun's second evaluation)
    record: bool


class RunState:
    """HyCa's memory for one sampling run, cloned from the template Apply/Calibrate puts on the model.

    ``compile_map(step_sigmas)`` gives the run's CompiledMap; ``recorder`` (calibration) receives
    the residuals of every block at every step instead, and nothing is predicted.
    """

    def __init__(self, compile_map: Callable[[np.ndarray], CompiledMap] | None = None,
                 recorder: TrajectoryRecorder | None = None, history_dtype: torch.dtype | None = None,
                 offload_device: torch.device | None = None):
        self.compile_map = compile_map
        self.recorder = recorder
        self.history_dtype = history_dtype
        self.offload_device = offload_device
        self.compiled: CompiledMap | None = None
        self.branches: dict[tuple, Branch] = {}
        self.computed = 0
        self.predicted = 0
        self.peak_bytes = 0
        self._coefficients: dict[tuple, torch.Tensor] = {}

    def clone(self) -> "RunState":
        return RunState(self.compile_map, self.recorder, self.history_dtype, self.offload_device)

    def __deepcopy__(self, memo) -> "RunState":
        # ModelPatcher.clone deep-copies model_options; a template holds no run data to copy
        return self.clone()

    def finish(self, completed: bool) -> None:
        """Called once when the sampling run ends; ``completed`` is False if it was cancelled or failed."""

    def begin_call(self, x: torch.Tensor, transformer_options: dict) -> Call:
        sample_sigmas = transformer_options["sample_sigmas"]
        sigma = float(transformer_options["sigmas"].flatten()[0])
        step = step_position(sample_sigmas, sigma)
        key = (tuple(str(u) for u in transformer_options.get("uuids", ())), tuple(x.shape), x.dtype, x.device)
        first_branch = not self.branches or key == next(iter(self.branches))
        branch = self.branches.setdefault(key, Branch())
        if self.compiled is None and self.compile_map is not None:
            self.compiled = self.compile_map(sample_sigmas.detach().double().cpu().numpy()[:-1])
        predict = self._can_predict(branch, step)
        replace_last = not predict and bool(branch.times) and branch.times[-1] == step
        record = self.recorder is not None and first_branch and step.is_integer() and not replace_last
        return Call(branch, step, sigma, predict, replace_last, record)

    def _can_predict(self, branch: Branch, step: float) -> bool:
        """Predict only where the compiled map has weights for exactly the history this branch holds."""
        mask = self.compiled.mask if self.compiled else None
        if mask is None or not step.is_integer() or step >= len(mask) or mask[int(step)]:
            return False
        length = min(len(branch.times), 8)
        return tuple(branch.times[-length:]) == self.compiled.expected_history(int(step), length) and length > 0

    def store(self, call: Call, key: str, residual: torch.Tensor) -> None:
        if call.record:
            self.recorder.record(key, call.sigma, residual)
        if self.compiled is None:
            return
        history = call.branch.histories.get(key)
        if history is None:
            history = call.branch.histories[key] = ResidualHistory(
                self.compiled.history(key), self.history_dtype, self.offload_device)
        if call.replace_last and len(history):
            history.drop_newest()
        history.push(residual)

    def end_call(self, call: Call) -> None:
        if call.predict or self.compiled is None:
            return
        if call.replace_last:
            call.branch.times[-1] = call.step
        else:
            call.branch.times.append(call.step)
            del call.branch.times[:-8]  # more than any solver's history
        self.peak_bytes = max(self.peak_bytes, sum(b.nbytes() for b in self.branches.values()))

    def predicted_residual(self, call: Call, key: str, like: torch.Tensor) -> torch.Tensor:
        history = call.branch.histories[key]
        cache_key = (key, int(call.step), history.device)
        coefficients = self._coefficients.get(cache_key)
        if coefficients is None:
            table = self.compiled.coefficients[key][int(call.step)]
            coefficients = self._coefficients[cache_key] = torch.from_numpy(table).to(history.device)
        return history.predict(coefficients).to(like.device, like.dtype)


def _transformer_options(args, kwargs) -> dict:
    options = kwargs.get("transformer_options")
    return options if isinstance(options, dict) else args[-1]


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Decide compute-or-predict for this call; every block patch of the call follows it."""
    transformer_options = _transformer_options(args, kwargs)
    state: RunState | None = transformer_options.get(OPTIONS_KEY)
    if state is None or transformer_options.get("sample_sigmas") is None:
        return executor(*args, **kwargs)
    call = transformer_options[_CALL_KEY] = state.begin_call(args[0], transformer_options)
    try:
        out = executor(*args, **kwargs)
    finally:
        del transformer_options[_CALL_KEY]
    state.end_call(call)
    return out


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
        state.finish(completed)
        total = state.computed + state.predicted
        if state.predicted:
            logging.info(
                "HyCa: %d block calls computed, %d predicted (%.2fx fewer block computations); "
                "residual history held %.1f MB at most",
                state.computed, state.predicted, total / max(state.computed, 1), state.peak_bytes / 2**20,
            )
        guider.model_options = original_options


class BlockPatch:
    """Replacement for one transformer block: run it and cache its residual, or predict it."""

    def __init__(self, block: Block):
        self.block = block

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        call: Call | None = options.get(_CALL_KEY)
        state: RunState | None = options.get(OPTIONS_KEY)
        if call is None or state is None:
            return extra["original_block"](args)
        if call.predict:
            state.predicted += 1
            return {s: args[s] + state.predicted_residual(call, self.block.key(s), args[s])
                    for s in STREAMS if self.block.key(s) in call.branch.histories}
        # FLUX-family blocks add their residuals in place: keep the inputs before the block runs.
        inputs = {s: args[s].clone() for s in STREAMS if isinstance(args.get(s), torch.Tensor)}
        out = extra["original_block"](args)
        state.computed += 1
        for s, before in inputs.items():
            if isinstance(out.get(s), torch.Tensor):
                state.store(call, self.block.key(s), out[s] - before)
        return out
