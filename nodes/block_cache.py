"""Per-run HyCa state and the patches that put it into ComfyUI's sampling.

One ``APPLY_MODEL`` wrapper decides, once per model call, whether this call computes the
blocks or predicts them (APPLY_MODEL, not DIFFUSION_MODEL: every BaseModel runs it with the same
arguments, while SD3's MMDiT never runs DIFFUSION_MODEL wrappers); the ``dit`` block-replacement
patches then either run the real block and cache its residual, or add the predicted residual to
the block input. An ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh state and drops it in
a ``finally``, so a cancelled run leaves nothing behind. State is keyed by conditioning branch and
input shape, never kept on the model.

A predicted residual that is not finite (NaN or inf, from a fitted weight or a half-precision history
that overflowed) never reaches the image: its unit is computed instead, see `apply_model_wrapper`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from ..hyca_core.predict import ResidualHistory
from ..hyca_core.schedule import AdaptiveGate
from ..hyca_core.solvers import MAX_HISTORY
from ..hyca_core.trajectories import TrajectoryRecorder
from .families import STREAMS, Block

OPTIONS_KEY = "hyca"  # transformer_options entry holding the run state
MODEL_KEY = "model.out"  # the whole model's residual (output - input), for whole-model granularity
_CALL_KEY = "hyca_call"  # transformer_options entry holding the current call's decision
# A call at a sigma within this relative tolerance of a step's evaluates that step: for flow models, ComfyUI's
# SDE samplers and DPM++ 2S evaluate a first sigma of 1 at 0.9999 (offset_first_sigma_for_snr).
ON_STEP_RTOL = 1e-3


def step_position(sample_sigmas: torch.Tensor, sigma: float) -> float:
    """The step index of ``sigma`` on the sampling schedule, fractional between two steps.

    Deciding by sigma rather than by counting calls keeps multi-call samplers (Heun, DPM++ 2S) and
    img2img schedules right: every call at the same sigma gets the same decision. A sigma within
    ``ON_STEP_RTOL`` of steps' sigmas is the nearest of those steps.
    """
    sigmas = sample_sigmas.detach().double().cpu().numpy()
    close = np.flatnonzero(np.isclose(sigmas, sigma, rtol=ON_STEP_RTOL, atol=1e-7))
    if len(close):
        return float(close[np.argmin(np.abs(sigmas[close] - sigma))])
    below = np.flatnonzero(sigmas < sigma)  # schedules decrease
    if not len(below) or below[0] == 0:
        return 0.0
    i = int(below[0]) - 1
    return i + float((sigmas[i] - sigma) / (sigmas[i] - sigmas[i + 1]))


@dataclass
class Branch:
    """Cached residuals of one conditioning branch and input shape."""

    steps: list[int] = field(default_factory=list)  # steps of the cached computations
    sigmas: list[float] = field(default_factory=list)  # and their sigmas
    histories: dict[str, ResidualHistory] = field(default_factory=dict)
    gate: AdaptiveGate | None = None
    decided: dict[int, bool] = field(default_factory=dict)  # step -> predicted: later calls there do the same

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
    undecided: bool = False  # adaptive: the first block computes and measures, then decides
    cache: bool = True  # a computed call whose residuals the history keeps (an on-grid step's newest)
    unit_inputs: dict = field(default_factory=dict)  # inputs of the unit being computed, by stream
    checks: list = field(default_factory=list)  # (unit, 0-d bool tensor: its predicted residuals are finite)
    fallback: frozenset = frozenset()  # units computed although the call predicts: their prediction was not


class RunPlan(Protocol):
    """A solver map made ready for one run: hyca_core's CompiledMap or DynamicMap."""

    def history(self, key: str) -> int: ...
    def forced(self, step: int) -> bool: ...
    def can_predict(self, step: int, history_steps: tuple[int, ...]) -> bool: ...
    def coefficients(self, key: str, step: int, history_steps, history_sigmas, sigma) -> np.ndarray: ...


class RunState:
    """HyCa's memory for one sampling run, cloned from the template Apply/Calibrate puts on the model.

    ``make_plan(step_sigmas)`` gives the run's plan; with ``gate`` (an AdaptiveGate template) every
    predictable step first computes its first block and predicts the rest only if the map's error
    on that block is within the gate's tolerance. ``recorder`` (calibration) receives the residuals
    of every block at every step. ``fused``: predict with hyca_core's compiled single-pass kernels.
    """

    def __init__(self, make_plan: Callable[[np.ndarray], RunPlan] | None = None,
                 recorder: TrajectoryRecorder | None = None, history_dtype: torch.dtype | None = None,
                 offload_device: torch.device | None = None, gate: AdaptiveGate | None = None,
                 fused: bool = False):
        self.make_plan = make_plan
        self.recorder = recorder
        self.history_dtype = history_dtype
        self.offload_device = offload_device
        self.gate = gate
        self.fused = fused
        self.plan: RunPlan | None = None
        self.branches: dict[tuple, Branch] = {}
        self.computed = 0
        self.predicted = 0
        self.fallbacks = 0  # block calls computed because their prediction was not finite
        self.peak_bytes = 0
        self._coefficients: dict[tuple, torch.Tensor] = {}

    def clone(self) -> "RunState":
        return RunState(self.make_plan, self.recorder, self.history_dtype, self.offload_device, self.gate,
                        self.fused)

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
        branch = self.branches.get(key)
        if branch is None:
            gate = copy.copy(self.gate) if self.gate else None
            branch = self.branches[key] = Branch(gate=gate)
        if self.plan is None and self.make_plan is not None:
            self.plan = self.make_plan(sample_sigmas.detach().double().cpu().numpy()[:-1])
        # Only on-grid calls are predicted: an intermediate evaluation (DPM++ 2S) has no fitted weights and is
        # computed, uncached. Every later call at a step repeats its first decision (Heun evaluates most sigmas
        # twice, heunpp2 looks ahead and back); a repeated computation replaces the cached one if it is the
        # newest, and is not cached if a later step's already is.
        on_grid = step.is_integer()
        earlier = branch.decided.get(int(step)) if on_grid else None
        undecided = False
        if earlier is None:
            candidate = (self.plan is not None and on_grid
                         and self.plan.can_predict(int(step), tuple(branch.steps)))
            if branch.gate is not None and self.plan is not None and on_grid and not candidate:
                branch.gate.decide(None, forced=True)  # a full step: the gate starts counting anew
            undecided = candidate and branch.gate is not None
            predict = candidate and not undecided
            if on_grid and not undecided:
                branch.decided[int(step)] = predict
        else:
            predict = earlier
        replace_last = earlier is False and bool(branch.steps) and branch.steps[-1] == step
        cache = on_grid and (earlier is None or replace_last)
        record = self.recorder is not None and first_branch and on_grid and earlier is None
        return Call(branch, step, sigma, predict, replace_last, record, undecided=undecided, cache=cache)

    def decide(self, call: Call, key: str, computed: torch.Tensor) -> None:
        """Adaptive: measure the map's error on the first block's true residual, then decide."""
        predicted = self.predicted_residual(call, key, computed)
        error = float((predicted - computed).float().norm() / computed.float().norm().clamp_min(1e-12))
        call.predict = not call.branch.gate.decide(error)
        call.branch.decided[int(call.step)] = call.predict
        call.undecided = False

    def store(self, call: Call, key: str, residual: torch.Tensor) -> None:
        residual = residual.detach()  # samplers not run under no_grad (uni_pc, ipndm) must not grow a graph
        if call.record:
            self.recorder.record(key, call.sigma, residual)
        if self.plan is None or not call.cache:
            return  # the history holds the newest computation of each computed grid step, in step order
        history = call.branch.histories.get(key)
        if history is None:
            history = call.branch.histories[key] = ResidualHistory(
                self.plan.history(key), self.history_dtype, self.offload_device)
        if call.replace_last and len(history):
            history.drop_newest()
        history.push(residual)

    def end_call(self, call: Call) -> None:
        if call.predict or self.plan is None:
            return
        branch = call.branch
        if call.replace_last:
            branch.steps[-1], branch.sigmas[-1] = int(call.step), call.sigma
        elif call.cache:
            branch.steps.append(int(call.step))
            branch.sigmas.append(call.sigma)
            del branch.steps[:-MAX_HISTORY], branch.sigmas[:-MAX_HISTORY]
        self.peak_bytes = max(self.peak_bytes, sum(b.nbytes() for b in self.branches.values()))

    def faults(self, call: Call) -> frozenset[str]:
        """The units whose predicted residual in this call was not finite; the first in a run is logged.

        Each predicted block only queues its check on the device; they are read here, once the call
        has run: one sync per predicted model call, whose output the sampler waits for next anyway,
        instead of one per predicted block, each stalling the queue of the next block's kernels.
        """
        if not call.checks:
            return frozenset()
        finite = torch.stack([ok for _, ok in call.checks]).tolist()
        faults = frozenset(unit for (unit, _), ok in zip(call.checks, finite) if not ok)
        call.checks.clear()
        if faults and not self.fallbacks:  # every fault leads to counted fallbacks: none yet, none logged yet
            logging.warning("HyCa: the predicted residual of %s at step %d is not finite (NaN or inf); "
                            "computing instead. Reported once per run, counted in the summary.",
                            ", ".join(sorted(faults)[:4]), int(call.step))
        return faults

    def predicted_residual(self, call: Call, key: str, like: torch.Tensor) -> torch.Tensor:
        history = call.branch.histories[key]
        branch = call.branch
        cache_key = (key, int(call.step), tuple(branch.steps), history.device)
        coefficients = self._coefficients.get(cache_key)
        if coefficients is None:
            table = self.plan.coefficients(key, int(call.step), tuple(branch.steps), tuple(branch.sigmas), call.sigma)
            coefficients = self._coefficients[cache_key] = history.prepare(torch.from_numpy(table), self.fused)
        return history.predict(coefficients).to(like.device, like.dtype)


def _transformer_options(args, kwargs) -> dict:
    """The call's transformer_options: the keyword, else the positional dict that holds HyCa's state."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    return next((a for a in reversed(args) if isinstance(a, dict) and OPTIONS_KEY in a), {})


def apply_model_wrapper(executor, *args, **kwargs):
    """Decide compute-or-predict for this model call; every block patch of the call follows it."""
    transformer_options = _transformer_options(args, kwargs)
    state: RunState | None = transformer_options.get(OPTIONS_KEY)
    if state is None or transformer_options.get("sample_sigmas") is None:
        return executor(*args, **kwargs)
    call = transformer_options[_CALL_KEY] = state.begin_call(args[0], transformer_options)
    counts = state.computed, state.predicted
    try:
        out = executor(*args, **kwargs)
        faults = state.faults(call)
        if faults:
            # A prediction depends on the cached history only, not on the call's input: running the call
            # again with the faulty units computed gives what computing them in the first place would have.
            # Faults are rare: paying a second (mostly predicted) call for them beats a sync per block.
            state.computed, state.predicted = counts
            call.fallback = faults
            out = executor(*args, **kwargs)
    finally:
        del transformer_options[_CALL_KEY]
    state.end_call(call)
    return out


def _finite(residual: torch.Tensor) -> torch.Tensor:
    """Whether every value is finite, as a device scalar (no sync): a NaN or inf makes the sum NaN or inf.
    One reduction pass, 5-15% of a prediction's cost, where isfinite().all() writes and reads a bool
    tensor (2-7x a prediction on CPU). fp16 sums overflow at 65504, so they accumulate in fp32; the
    other float types hold any real residual's sum."""
    total = residual.sum(dtype=torch.float32) if residual.dtype == torch.float16 else residual.sum()
    return torch.isfinite(total)


def _as_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, positions, C): latent channels play the role of hidden channels."""
    return latent.flatten(2).transpose(1, 2)


def whole_model_wrapper(executor, *args, **kwargs):
    """Whole-model granularity: the model's output minus its input is the one cached residual.

    Serves every model family, block patches or not (Lumina 2, HiDream, UNets), at the cost of
    predicting the final output rather than each block.
    """
    transformer_options = _transformer_options(args, kwargs)
    state: RunState | None = transformer_options.get(OPTIONS_KEY)
    if state is None or transformer_options.get("sample_sigmas") is None:
        return executor(*args, **kwargs)
    x = args[0]
    call = state.begin_call(x, transformer_options)
    if call.predict:
        residual = state.predicted_residual(call, MODEL_KEY, _as_tokens(x))
        call.checks.append((MODEL_KEY, _finite(residual)))
        if not state.faults(call):  # the whole model is one unit: one sync per predicted call, as per block
            state.predicted += 1
            return x + residual.transpose(1, 2).reshape(x.shape)
        state.fallbacks += 1
        state.computed += 1
        return executor(*args, **kwargs)  # not cached: the history stays what the plan fitted its weights to
    out = executor(*args, **kwargs)
    state.computed += 1
    state.store(call, MODEL_KEY, _as_tokens(out - x))
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
        if state.predicted or state.fallbacks:
            logging.info(
                "HyCa: %d block calls computed, %d predicted (%.2fx fewer block computations); "
                "residual history held %.1f MB at most%s", state.computed, state.predicted,
                total / max(state.computed, 1), state.peak_bytes / 2**20,
                f"; {state.fallbacks} computed as their prediction was not finite" if state.fallbacks else "",
            )
        guider.model_options = original_options


@dataclass(frozen=True)
class Unit:
    """What one cached residual spans: a single block (the paper), or a stack of consecutive blocks
    that is computed or skipped as a whole (one residual per stream instead of one per block)."""

    name: str  # "double_block.3" or "double_blocks"
    size: int  # blocks in it

    def key(self, stream: str) -> str:
        """Name of one residual stream of this unit in a solver map: ``"double_block.3.img"``."""
        return f"{self.name}.{stream}"


class BlockPatch:
    """Replacement for one transformer block: run it and cache its unit's residual, or predict it."""

    def __init__(self, block: Block, unit: Unit, first: bool = True, last: bool = True):
        self.block = block
        self.unit = unit
        self.first = first  # the unit's input is this block's input
        self.last = last  # the unit's output is this block's output

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        call: Call | None = options.get(_CALL_KEY)
        state: RunState | None = options.get(OPTIONS_KEY)
        if call is None or state is None:
            return extra["original_block"](args)
        if call.predict and self.unit.name not in call.fallback:
            if not self.first:  # the unit's prediction was added at its first block
                return {s: args[s] for s in STREAMS if s in args}
            state.predicted += self.unit.size
            return {s: self._predicted(state, call, args[s], s) for s in STREAMS if s in args}
        if call.predict:  # its prediction was not finite: computed, not cached (the plan's history stays)
            state.computed += 1
            state.fallbacks += 1
            return extra["original_block"](args)
        if self.first:
            # FLUX-family blocks add their residuals in place: keep the inputs before the block runs.
            call.unit_inputs = {s: args[s].clone() for s in STREAMS if isinstance(args.get(s), torch.Tensor)}
        out = extra["original_block"](args)
        state.computed += 1
        if not self.last:
            return out
        residuals = {s: out[s] - before for s, before in call.unit_inputs.items()
                     if isinstance(out.get(s), torch.Tensor)}
        if call.undecided:  # adaptive: this first block's true residual decides the whole call
            state.decide(call, self.unit.key("img"), residuals["img"])
            if call.predict:
                return out  # exact for this block; the others will be predicted
        for s, residual in residuals.items():
            state.store(call, self.unit.key(s), residual)
        return out

    def _predicted(self, state: RunState, call: Call, x: torch.Tensor, stream: str) -> torch.Tensor | None:
        """The stream's input plus its predicted residual, its finiteness queued for `RunState.faults`. A
        stream with no history is one the block does not output (Wan/LTX-Video get the text as "txt" but
        return only "img"; SD3's last joint block returns "txt" None): None, as computed."""
        key = self.unit.key(stream)
        if key not in call.branch.histories:
            return None
        residual = state.predicted_residual(call, key, x)
        call.checks.append((self.unit.name, _finite(residual)))
        return residual.add_(x)  # a fresh tensor (never a view of the history): no new allocation
