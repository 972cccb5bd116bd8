"""HyCa Apply: a clone of the MODEL that predicts block residuals between full steps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from ..hyca_core.calibration import calibrate
from ..hyca_core.schedule import AdaptiveGate, RunSchedule, Schedule, speedup
from ..hyca_core.solver_map import MIN_PROBE_STEPS, CompiledMap, DynamicMap, MapError, SolverMap
from ..hyca_core.trajectories import TrajectoryRecorder
from . import checkpoint_path, map_store
from .run_state import RunState
from .patching import GRANULARITIES, block_widths, model_architecture, with_hyca
from .types import CATEGORY, SolverMapType

# fixed: warm-up, then every N-th step (the paper); calibrated: the same number of full steps,
# placed where the map's probe says prediction errs most (early steps change fastest)
PLACEMENTS = ("fixed", "calibrated")
HISTORY_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Compiled schedules a MapSource keeps: enough for the few a session alternates between (step counts, a
# hires pass), bounded so that a long session of ever-new schedules (img2img denoise values) holds no more.
COMPILED_KEPT = 8


class MapSource:
    """The solver map a patched model predicts with, compiled once per sampling schedule.

    With no map (auto mode) the model's first complete sampling run that predicts some step is
    recorded at full compute, calibrated, and saved (beside ``checkpoint``, the model's file if known,
    and in the hyca models folder) for later runs and sessions.
    """

    def __init__(self, model, solver_map: SolverMap | None, schedule: Schedule, fitted: bool = True,
                 adaptive: bool = False, only: tuple[str, str] | None = None, granularity: str = "block",
                 target_speedup: float = 0.0, window: tuple[float, float] = (0.0, 1.0),
                 checkpoint: Path | None = None, placement: str = "fixed"):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.architecture = model_architecture(model)
        self.granularity = granularity
        self.widths = block_widths(model, granularity)
        self.fingerprint = map_store.fingerprint(model)
        self.checkpoint = checkpoint
        # Shared by every clone; during a run it holds the run's model_sampling (a ModelSampling node
        # placed after Apply included), which turns the window's percents into sigmas.
        self.base_model = model.model
        self.schedule = schedule
        self.target_speedup = target_speedup
        self.window = window
        self.fitted = fitted
        self.adaptive = adaptive
        self.only = only
        self.solver_map = None
        self._compiled: dict[tuple, CompiledMap] = {}  # runs repeat their schedules; least recent first
        if solver_map is not None:
            self.use(solver_map)

    def use(self, solver_map: SolverMap) -> None:
        solver_map.check_fits(self.architecture, self.widths)
        self.solver_map = solver_map
        self._compiled.clear()

    def plan(self, step_sigmas) -> CompiledMap | DynamicMap:
        """What a run with these step sigmas predicts with."""
        schedule = self.schedule_for(step_sigmas)
        if self.adaptive:  # its history length comes from the map: the warm-up may take in the window's lead
            return DynamicMap(self.solver_map, schedule.widened(), len(step_sigmas))
        return self.compile(tuple(float(s) for s in step_sigmas), schedule)

    def schedule_for(self, step_sigmas) -> RunSchedule:
        """The schedule of a run with these step sigmas: predicting only inside the window of the
        denoising, with the interval of the target speed-up if one is set."""
        sampling = self.base_model.model_sampling
        start, end = (float(sampling.percent_to_sigma(percent)) for percent in self.window)
        schedule = self.schedule.within(step_sigmas, start, end)
        if self.target_speedup:
            schedule = schedule.for_speedup(len(step_sigmas), self.target_speedup)
        return schedule

    def compile(self, step_sigmas: tuple[float, ...], schedule: RunSchedule) -> CompiledMap:
        """The map for one sampling schedule; compiling refits every block, so the COMPILED_KEPT most
        recently used are kept."""
        key = (step_sigmas, schedule)
        compiled = self._compiled.pop(key, None)
        if compiled is None:
            # calibrated placement: as many full steps as the every-N pattern, where the probe errs most
            budget = int(schedule.mask(len(step_sigmas)).sum()) if self.placement == "calibrated" else None
            compiled = self.solver_map.compile(np.array(step_sigmas), schedule, fitted=self.fitted, only=self.only,
                                               budget=budget)
            mask = compiled.mask
            logging.info("HyCa: %d steps, %d computed, %d predicted: %.2fx speed-up (N=%d, %s placement; first %d "
                         "and last %d steps computed)", len(mask), mask.sum(), (~mask).sum(), speedup(mask),
                         schedule.interval, self.placement, schedule.widened().warmup, schedule.final)
        self._compiled[key] = compiled  # now the most recent
        while len(self._compiled) > COMPILED_KEPT:
            del self._compiled[next(iter(self._compiled))]
        return compiled

    def calibrate_from(self, recorder: TrajectoryRecorder) -> None:
        """Calibrate from a full-compute run, for the schedule it would have predicted with. A run too
        short to choose solvers on, or whose schedule predicts no step, is passed over (it ends inside
        the sampler: raising would lose its image); the next run tries again."""
        sigmas = recorder[next(iter(recorder))].sigmas if len(recorder) else np.empty(0)
        schedule = self.schedule_for(sigmas).widened()  # a plain Schedule with the run's mask
        steps = len(sigmas)
        if steps < MIN_PROBE_STEPS or schedule.mask(steps).all():
            why = (f"calibration takes {MIN_PROBE_STEPS} steps or more" if steps < MIN_PROBE_STEPS
                   else f"at N={schedule.interval} with a warm-up of {schedule.warmup} it predicts no step")
            logging.info("HyCa: a %d-step run is too short to calibrate from (%s); the next long enough run "
                         "calibrates", steps, why)
            return
        solver_map = calibrate(recorder, schedule, architecture=self.architecture, fingerprint=self.fingerprint,
                               info={"auto": True, "granularity": self.granularity})
        self.use(solver_map)
        try:
            saved = map_store.save_for(solver_map, self.checkpoint)
            logging.info("HyCa: calibrated from this run; map saved to %s", " and ".join(map(str, saved)))
        except MapError as error:
            logging.warning("HyCa: calibrated map kept in memory only: %s", error)


class ApplyRunState(RunState):
    """A run of a HyCa-applied model: predicts with the source's map, or records to calibrate it."""

    def __init__(self, source: MapSource, history_dtype: torch.dtype | None, offload_device,
                 gate: AdaptiveGate | None = None, fused: bool = False):
        calibrated = source.solver_map is not None
        super().__init__(
            make_plan=source.plan if calibrated else None,
            recorder=None if calibrated else TrajectoryRecorder(),
            history_dtype=history_dtype, offload_device=offload_device, gate=gate if calibrated else None,
            fused=fused,
        )
        self.source = source
        self.gate_template = gate

    def clone(self) -> "ApplyRunState":
        return ApplyRunState(self.source, self.history_dtype, self.offload_device, self.gate_template, self.fused)

    def finish(self, completed: bool) -> None:
        if self.recorder is not None and completed and self.source.solver_map is None:
            self.source.calibrate_from(self.recorder)


def apply_hyca(model, solver_map: SolverMap | None, schedule: Schedule, fitted: bool = True,
               history_dtype: torch.dtype | None = None, offload: bool = False,
               adaptive_tolerance: float | None = None, only: tuple[str, str] | None = None,
               granularity: str = "block", target_speedup: float = 0.0, start_percent: float = 0.0,
               end_percent: float = 1.0, checkpoint: Path | None = None, placement: str = "fixed",
               fused: bool = False):
    """The patched clone. Without a map, the map stored for this base model is used (looked for
    first beside ``checkpoint``, the model's file if known), or the first run long enough calibrates
    one. With ``adaptive_tolerance``, steps are predicted while the map's measured relative error on
    the first block, summed since the last full step, stays within it (at most 2N - 1 steps in a
    row) instead of on the fixed every-N pattern. ``target_speedup`` > 0 replaces
    N by the interval whose speed-up on each run's step count reaches it (`Schedule.for_speedup`).
    Steps before ``start_percent`` or after ``end_percent`` of the denoising always compute fully.
    ``only`` = (solver, time variable) predicts every channel with one pool solver: the single-solver
    baselines of the benchmark. ``granularity``: "block" (per transformer block, the paper) or "model"
    (the whole model's output). ``fused``: CPU-held histories predict large residuals with torch.compile's
    single-pass kernels (hyca_core.fused).
    Raises MapError/UnsupportedModel with a clear message if they do not fit."""
    adaptive = adaptive_tolerance is not None
    if adaptive and granularity != "block":
        raise ValueError("adaptive mode measures the first block's error, so it needs block granularity")
    if adaptive and target_speedup:
        raise ValueError("adaptive mode decides each step by the measured error: it takes no target speed-up")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"the window {start_percent}..{end_percent} must lie within 0..1, start before end")
    if solver_map is None:
        try:
            solver_map = map_store.load_for(model, granularity, checkpoint)
        except MapError as error:
            logging.warning("HyCa: %s; calibrating a new map from the next run", error)
        if solver_map is None:
            logging.info("HyCa: no solver map for this model yet; the first run computes fully and calibrates")
    source = MapSource(model, solver_map, schedule, fitted, adaptive, only, granularity, target_speedup,
                       (start_percent, end_percent), checkpoint, placement)
    gate = AdaptiveGate(adaptive_tolerance, max_skip=2 * schedule.interval - 1) if adaptive else None
    state = ApplyRunState(source, history_dtype, model.offload_device if offload else None, gate, fused)
    return with_hyca(model, state, granularity)


class HyCaApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaApply",
            display_name="HyCa Apply",
            category=CATEGORY,
            description=(
                "Speeds up sampling: transformer blocks are computed fully only every N steps (or as often "
                "as a target speed-up allows) and predicted in between, each channel group with the "
                "predictor its solver map chose. "
                "Without a map connected, the map saved for this base model (beside its checkpoint or in "
                "models/hyca) is used; if there is none, the first run long enough to calibrate from "
                f"({MIN_PROBE_STEPS} steps or more, some of them predicted) computes fully and calibrates one. "
                "A saved map that cannot be used (unreadable, tampered, or made for another model shape) is "
                "skipped with a warning naming the file, and the first run calibrates a new one. A map "
                "connected here that does not fit this model stops the node with the reason. A prediction "
                "that comes out NaN or inf is computed instead (warned once per run). Outputs a patched "
                "copy; the input MODEL stays untouched."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to accelerate; chain it after LoRA loaders."),
                io.Int.Input("interval", default=4, min=1, max=20,
                             tooltip="N: one full computation every N steps after the warm-up. 1 computes every step."),
                io.Int.Input("warmup", default=2, min=1, max=100,
                             tooltip="First steps always computed. Also bounds the predictors' history length; "
                                     "2 beat 3 by 2.4-4.9 dB at N=6 and 8 on the reference model (README)."),
                io.Int.Input("final_steps", default=0, min=0, max=100,
                             tooltip="Last steps always computed, for crisper fine detail."),
                io.Boolean.Input("adaptive", default=False,
                                 tooltip="Decide per step from the map's measured error on the first block "
                                         "instead of the fixed every-N pattern (N then caps the skips at 2N-1)."),
                io.Float.Input("adaptive_tolerance", default=0.15, min=0.0, max=5.0, step=0.01,
                               tooltip="Adaptive mode: summed relative error allowed before a full step."),
                io.Boolean.Input("fitted", default=False,
                                 tooltip="Use least-squares fitted predictor weights (on) or the paper's fixed solvers "
                                         "(off; better on the trained reference model, see the README's benchmark)."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="block: predict every transformer block (the paper, best quality). stack: "
                                       "one residual per run of blocks (far less memory). model: the whole model's "
                                       "output; works for every family. Use the map's granularity."),
                io.Combo.Input("history_dtype", options=list(HISTORY_DTYPES), default="auto",
                               tooltip="Precision of cached residuals: bf16/fp16 halve their memory; auto keeps the model's."),
                io.Boolean.Input("offload_history", default=False,
                                 tooltip="Keep cached residuals on the offload device (CPU RAM) instead of the GPU."),
                # optional, after the older widgets: saved workflows and API prompts without them still load
                io.Float.Input("target_speedup", default=0.0, min=0.0, max=20.0, step=0.1, optional=True,
                               tooltip="Instead of N: the speed-up to aim for (steps per full computation). "
                                       "Each run takes the smallest N that reaches it on its own step count, "
                                       "the largest possible if none does. 0 uses interval. Not with adaptive."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the denoising before which every step is computed fully, "
                                       "as in EasyCache; prediction starts here. 0: right after the warm-up."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the denoising after which every step is computed fully, "
                                       "as in EasyCache. 1: predict up to the last step."),
                io.Combo.Input("placement", options=list(PLACEMENTS), default="fixed", optional=True,
                               tooltip="fixed: the warm-up, then every N-th step computed (the paper). calibrated: "
                                       "as many full steps, placed where the map's probe says prediction errs most "
                                       "(more early on); same speed-up, better quality on the reference model."),
                io.Boolean.Input("compile_predict", default=False, optional=True,
                                 tooltip="For histories held in CPU RAM (offload_history, or sampling on the CPU): "
                                         "predict each large block residual with one kernel built by torch.compile "
                                         "that reads each cached residual once, 1.0-1.8x the cost of an add instead "
                                         "of up to 2.6x (fp32) or 3.6x (bf16). Compiles for a few seconds on first "
                                         "use (up to half a minute on a fresh install); needs a C++ compiler, else "
                                         "warns once and predicts as usual."),
                SolverMapType.Input("solver_map", optional=True,
                                    tooltip="Solver map from HyCa Calibrate. Leave empty to use the saved map "
                                            "for this base model, or calibrate automatically on the first run."),
            ],
            outputs=[io.Model.Output(tooltip="The model with HyCa caching.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to find the checkpoint's file: maps go beside it
        )

    @classmethod
    def execute(cls, model, interval, warmup, final_steps, adaptive, adaptive_tolerance, fitted, granularity,
                history_dtype, offload_history, target_speedup=0.0, start_percent=0.0, end_percent=1.0,
                placement="fixed", compile_predict=False, solver_map=None) -> io.NodeOutput:
        schedule = Schedule(interval=interval, warmup=warmup, final=final_steps)
        return io.NodeOutput(apply_hyca(model, solver_map, schedule, fitted, HISTORY_DTYPES[history_dtype],
                                        offload_history, adaptive_tolerance if adaptive else None,
                                        granularity=granularity, target_speedup=target_speedup,
                                        start_percent=start_percent, end_percent=end_percent,
                                        checkpoint=checkpoint_path.for_node(cls), placement=placement,
                                        fused=compile_predict))
