"""HyCa's memory for one sampling run, and the decision it takes for each model call.

The sampling wrappers (model_wrappers.py) clone a run state from the template Apply or Calibrate puts on the
model, ask it for a `Call` before every model call, and drop it when the run ends. Residual histories are
kept per conditioning (its rows of the call's batch) and input shape, never on the model: ComfyUI batches a
step's conditionings into one model call only while free memory allows, so the same run may call the model
with the positive and negative prompt together at one step and apart at the next.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch

from ..hyca_core.predict import ResidualHistory
from ..hyca_core.run_maps import FixedRunMap
from ..hyca_core.solvers import MAX_HISTORY
from ..hyca_core.timeline import first_rise, step_position
from ..hyca_core.trajectories import TrajectoryRecorder

OPTIONS_KEY = "hyca"  # transformer_options entry holding the run state
_CALL_KEY = "hyca_call"  # transformer_options entry holding the current call
# the same call, for layers whose forward sees no transformer_options (block_only_layers.py)
_RUNNING: contextvars.ContextVar = contextvars.ContextVar("hyca_running_call", default=None)


class Decision(Enum):
    """What one model call does; every block patch of the call follows it."""

    PREDICT = "predict"  # every unit's residual predicted from the branch's history
    CACHE = "cache"  # compute; the residuals are the step's first computation: the history keeps them
    REPLACE = "replace"  # compute the history's newest step again (Heun's correction): replace that entry
    COMPUTE = "compute"  # compute, keep nothing: off-grid, an older step again, a stack cut by another node

    @property
    def keeps(self) -> bool:
        """Whether the call's computed residuals are stored."""
        return self in (Decision.CACHE, Decision.REPLACE)


@dataclass(eq=False)  # a branch is itself: two with equal contents are still two conditionings
class Branch:
    """Cached residuals of one conditioning branch and input shape."""

    steps: list[int] = field(default_factory=list)  # steps of the cached computations
    histories: dict[str, ResidualHistory] = field(default_factory=dict)
    decided: dict[int, bool] = field(default_factory=dict)  # step -> predicted: later calls there do the same

    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.histories.values())


@dataclass
class Part:
    """The rows of one conditioning in a model call (ComfyUI stacks the call's conditionings along the batch,
    in equal shares), its branch, and what the call does for that branch."""

    branch: Branch
    index: int  # its share of the batch: rows [index * n / parts, (index + 1) * n / parts) (`Call.rows`)
    decision: Decision


@dataclass
class Call:
    """One model call: its decision, read by every block patch during the call, and what they leave for the
    call's end. The decision is PREDICT where every part predicts; otherwise the call computes and each part
    keeps its residuals as its own decision says (CACHE where some part caches)."""

    decision: Decision
    step: float
    sigma: float
    parts: tuple[Part, ...] = ()  # empty for a call that keeps nothing apart from the run's branches
    unit_inputs: dict = field(default_factory=dict)  # inputs of the unit being computed, by stream
    checks: list = field(default_factory=list)  # (unit, 0-d bool tensor: its predicted residuals are finite)
    fallback: frozenset = frozenset()  # units computed although the call predicts: their prediction was not

    @property
    def predict(self) -> bool:
        return self.decision is Decision.PREDICT

    @property
    def predicts_every_unit(self) -> bool:
        """No block computes in this call (none falls back): what only the blocks read goes unread."""
        return self.predict and not self.fallback

    def rows(self, tensor: torch.Tensor, part: Part) -> torch.Tensor:
        """``part``'s rows of a batch-first tensor of this call (a view)."""
        size = tensor.shape[0] // len(self.parts)
        return tensor[part.index * size:(part.index + 1) * size]

    @staticmethod
    def deciding(step: float, sigma: float, parts: list[Part]) -> "Call":
        """The call of these parts: it predicts only if they all do."""
        kinds = {part.decision for part in parts}
        decision = next((k for k in (Decision.CACHE, Decision.REPLACE) if k in kinds), Decision.COMPUTE)
        return Call(Decision.PREDICT if kinds == {Decision.PREDICT} else decision, step, sigma, tuple(parts))


def finite(residual: torch.Tensor) -> torch.Tensor:
    """Whether every value is finite, as a device scalar (no sync): a NaN or inf makes the sum NaN or inf.
    One reduction pass, a small part of a prediction's cost, where isfinite().all() writes and reads
    a bool tensor, which costs more than a prediction on CPU (both measured, in the README's "The
    algorithm's own costs"). fp16 sums overflow at 65504, so they accumulate in fp32; the other
    float types hold any real residual's sum."""
    total = residual.sum(dtype=torch.float32) if residual.dtype == torch.float16 else residual.sum()
    return torch.isfinite(total)


class RunState:
    """HyCa's memory for one sampling run, cloned from the template Apply/Calibrate puts on the model.

    ``make_run_map(step_sigmas)`` gives the run's map. ``recorder`` (calibration) receives the residuals
    of every block at every step of the first branch. ``fused``: predict with hyca_core's compiled
    single-pass kernels.
    """

    def __init__(self, make_run_map: Callable[[np.ndarray], FixedRunMap] | None = None,
                 recorder: TrajectoryRecorder | None = None, history_dtype: torch.dtype | None = None,
                 offload_device: torch.device | None = None, fused: bool = False):
        self.make_run_map = make_run_map
        self.recorder = recorder
        self.history_dtype = history_dtype
        self.offload_device = offload_device
        self.fused = fused
        self.started = False  # the run's first model call came: its sigmas are checked, its run map made
        self.run_map: FixedRunMap | None = None
        self.branches: dict[tuple, Branch] = {}
        self.computed = 0
        self.predicted = 0
        self.fallbacks = 0  # block calls computed because their prediction was not finite
        self.faults_logged = False
        # Predicted units check their own output only after a predicted call's output was not finite: until
        # then one check of each predicted call's output stands for them all (no pass per block).
        self.checking = False
        self.extra_calls = 0  # model calls with other nodes' patches (Skip Layer Guidance ...)
        self.peak_bytes = 0
        self.weights: dict[tuple, object] = {}  # prepared weights by (key, step, device)
        self.patches: dict[tuple, object] = {}  # the patches the sampler's own calls run with, by place
        self.recorded: tuple[Branch, ...] | None = None  # a calibration records the first call's branches

    def clone(self) -> "RunState":
        return RunState(self.make_run_map, self.recorder, self.history_dtype, self.offload_device, self.fused)

    def __deepcopy__(self, memo) -> "RunState":
        # ModelPatcher.clone deep-copies model_options; a template holds no run data to copy
        return self.clone()

    def holds_run_data(self) -> bool:
        """Whether anything of a run is here: never true of a template on a MODEL."""
        return bool(self.started or self.branches or self.weights or self.patches or self.peak_bytes
                    or self.computed or self.predicted or self.fallbacks or self.extra_calls or self.checking)

    def finish(self, completed: bool, rerun=None) -> None:
        """Called once when the sampling run ends; ``completed`` is False if it was cancelled or failed.
        ``rerun`` (`model_wrappers.Rerun`) samples the run again, e.g. to tune a map calibrated from it."""

    def begin_call(self, x: torch.Tensor, transformer_options: dict,
                   variant: frozenset | None = frozenset()) -> Call:
        """The decision for a model call. ``variant``: the places of the patches another node's call changes
        from the sampler's (`model_wrappers.begin_call`), empty for the sampler's own evaluations; such a call
        (Skip Layer Guidance's layer-skipped pass at a step's sigma) caches in a branch of its own, never
        reading or writing the sampler's. None: a call that computes fully and keeps nothing."""
        sample_sigmas = transformer_options["sample_sigmas"].detach().double().cpu().numpy()
        if not self.started:
            self._start(sample_sigmas)
        sigma = float(transformer_options["sigmas"].flatten()[0])
        step = step_position(sample_sigmas, sigma)
        if variant is None or variant:
            self.extra_calls += 1
        if variant is None:
            return Call(Decision.COMPUTE, step, sigma)
        uuids = tuple(str(u) for u in transformer_options.get("uuids", ()))
        if not uuids or x.shape[0] % len(uuids):
            uuids = (uuids,)  # no equal shares to tell apart: the batch is one part
        shape = (x.shape[0] // len(uuids), *x.shape[1:])
        branches = []
        for uuid in uuids:
            key = (uuid, shape, x.dtype, x.device, variant)
            if key not in self.branches:
                self.branches[key] = Branch()
            branches.append(self.branches[key])
        if self.recorded is None:  # the sampler's: other nodes' passes come after its first call
            self.recorded = tuple(branches)
        parts = [Part(branch, i, self._decide_step(branch, step)) for i, branch in enumerate(branches)]
        return Call.deciding(step, sigma, parts)

    def _start(self, sample_sigmas: np.ndarray) -> None:
        self.started = True
        rise = first_rise(sample_sigmas)
        if rise is not None:
            # the predictors' time grids, a map's probe and the step positions need strictly decreasing sigmas
            logging.warning("HyCa: this run's sigmas do not decrease at step %d (%.4g after %.4g); every "
                            "step computes fully and nothing is recorded", rise, sample_sigmas[rise],
                            sample_sigmas[rise - 1])
            self.make_run_map = self.recorder = None
        elif self.make_run_map is not None:
            self.run_map = self.make_run_map(sample_sigmas[:-1])

    def _decide_step(self, branch: Branch, step: float) -> Decision:
        # Only on-grid calls are predicted: an intermediate evaluation (DPM++ 2S) has no fitted weights and
        # is computed, uncached. Every later call at a step repeats its first decision (Heun evaluates most
        # sigmas twice, heunpp2 looks ahead and back); a repeated computation replaces the cached one if it
        # is the newest, and is not cached if a later step's already is.
        if not step.is_integer():
            return Decision.COMPUTE
        earlier = branch.decided.get(int(step))
        if earlier is not None:
            if earlier:
                return Decision.PREDICT
            return Decision.REPLACE if branch.steps and branch.steps[-1] == step else Decision.COMPUTE
        predict = self.run_map is not None and self.run_map.can_predict(int(step), tuple(branch.steps))
        branch.decided[int(step)] = predict
        return Decision.PREDICT if predict else Decision.CACHE

    def store(self, call: Call, key: str, after: torch.Tensor, before: torch.Tensor) -> None:
        """Keep a computed unit's residual, ``after - before``, in each part's branch whose decision keeps it:
        written straight into the history's slot, one pass over the activations."""
        if self.recorder is not None:
            self._record(call, key, after, before)
        if self.run_map is None:
            return  # the history holds the newest computation of each computed grid step, in step order
        for part in call.parts:
            if not part.decision.keeps:
                continue
            mine = call.rows(after, part)
            history = part.branch.histories.get(key)
            if history is None:
                history = self.new_history(key, mine)
                if history is None:
                    return
                part.branch.histories[key] = history
            if part.decision is Decision.REPLACE and len(history):
                history.drop_newest()
            history.push_difference(mine, call.rows(before, part))

    def _record(self, call: Call, key: str, after: torch.Tensor, before: torch.Tensor) -> None:
        """Give the recorder a step's residual rows of the recorded branches, each as its share of the step
        in the first call's order: the recorder keeps the step once all came, however calls batch them."""
        for part in call.parts:
            if part.decision is Decision.CACHE and part.branch in self.recorded:
                # samplers not run under no_grad (uni_pc, ipndm) must not grow a graph
                share = (call.rows(after, part) - call.rows(before, part)).detach()
                index = self.recorded.index(part.branch)
                self.recorder.record(key, call.sigma, share, (index, len(self.recorded)))

    def new_history(self, key: str, residual: torch.Tensor) -> ResidualHistory | None:
        """An empty history for residuals like ``residual`` of block stream ``key``; None: the run keeps no
        more."""
        return ResidualHistory(self.run_map.history(key), self.history_dtype, self.offload_device)

    def end_call(self, call: Call) -> None:
        if self.run_map is None:
            return
        for part in call.parts:
            if part.decision is Decision.REPLACE:
                part.branch.steps[-1] = int(call.step)
            elif part.decision is Decision.CACHE:
                part.branch.steps.append(int(call.step))
                del part.branch.steps[:-MAX_HISTORY]
        if call.decision.keeps:
            self.peak_bytes = max(self.peak_bytes, sum(b.nbytes() for b in self.branches.values()))

    def check(self, call: Call, unit: str, out: torch.Tensor, x: torch.Tensor) -> None:
        """Queue the check that a unit's prediction is finite: its output ``out`` (input plus predicted
        residual, formed in one pass) is, or its input ``x`` already was not, a fault upstream in the call
        that the upstream unit's own check reports. `faults` reads a call's checks at its end."""
        call.checks.append((unit, finite(out) | ~finite(x)))

    @staticmethod
    def output_finite(out) -> bool:
        """Whether a model call's output is finite (one reduction and one sync per predicted call)."""
        return not isinstance(out, torch.Tensor) or bool(finite(out))

    def faults(self, call: Call) -> frozenset[str]:
        """The units whose prediction in this call was not finite.

        Each predicted block only queues its check on the device; they are read here, once the call
        has run: one sync per predicted model call, whose output the sampler waits for next anyway,
        instead of one per predicted block, each stalling the queue of the next block's kernels.
        """
        if not call.checks:
            return frozenset()
        ok = torch.stack([finite_ for _, finite_ in call.checks]).tolist()
        faults = frozenset(unit for (unit, _), fine in zip(call.checks, ok) if not fine)
        call.checks.clear()
        return faults

    def log_faults(self, call: Call) -> None:
        """The first call of a run whose predictions were not finite is logged; the summary counts them
        all."""
        if call.fallback and not self.faults_logged:
            self.faults_logged = True
            logging.warning("HyCa: the predicted residual of %s at step %d is not finite (NaN or inf); "
                            "computing instead. Reported once per run, counted in the summary.",
                            ", ".join(sorted(call.fallback)[:4]), int(call.step))

    def _weights(self, call: Call, key: str, history: ResidualHistory):
        # a step is predicted only on the history its weights were fitted for (`can_predict`): the step
        # names them
        cache_key = (key, int(call.step), history.device)
        weights = self.weights.get(cache_key)
        if weights is None:
            table = self.run_map.coefficients(key, int(call.step))
            # with_base: every prediction is added onto the block's input, so the lerp form, which sums
            # without a base, is not derived
            weights = self.weights[cache_key] = history.prepare(table, self.fused, with_base=True)
        return weights

    def predicted_output(self, call: Call, key: str, x: torch.Tensor) -> torch.Tensor:
        """The unit's input plus its predicted residual, formed in the same passes (a new tensor), each part's
        rows from its own branch's history."""
        if len(call.parts) == 1:
            history = call.parts[0].branch.histories[key]
            return history.predict(self._weights(call, key, history), base=x)
        out = torch.empty_like(x)
        for part in call.parts:
            history = part.branch.histories[key]
            weights = self._weights(call, key, history)
            history.predict(weights, base=call.rows(x, part), out=call.rows(out, part))
        return out

    def summary(self) -> str | None:
        """The run's counts for the log, None if nothing was predicted or kept apart."""
        if not (self.predicted or self.fallbacks or self.extra_calls):
            return None
        total = self.computed + self.predicted
        text = (f"HyCa: {self.computed} block calls computed, {self.predicted} predicted "
                f"({total / max(self.computed, 1):.2f}x fewer block computations); "
                f"residual history held {self.peak_bytes / 2**20:.1f} MB at most")
        if self.fallbacks:
            text += f"; {self.fallbacks} computed as their prediction was not finite"
        if self.extra_calls:
            text += (f"; {self.extra_calls} model calls with other nodes' patches (Skip Layer Guidance ...) "
                     "kept apart")
        return text


def current_call(transformer_options: dict) -> Call | None:
    """The HyCa call a model call's block patches are running in, None outside one."""
    return transformer_options.get(_CALL_KEY)


def running_call() -> Call | None:
    """The HyCa call the model is running in, for a layer that is given no transformer_options."""
    return _RUNNING.get()


@contextlib.contextmanager
def call_scope(transformer_options: dict, call: Call):
    """Make ``call`` the current call of these options while the model runs, then restore what was there."""
    previous = transformer_options.get(_CALL_KEY)
    transformer_options[_CALL_KEY] = call
    token = _RUNNING.set(call)
    try:
        yield call
    finally:
        _RUNNING.reset(token)
        if previous is None:
            transformer_options.pop(_CALL_KEY, None)
        else:
            transformer_options[_CALL_KEY] = previous
