"""The solver map a HyCa-applied model predicts with: given, or calibrated in auto mode; fitted per run."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import numpy as np

from ..hyca_core import tuning
from ..hyca_core.schedule import RunSchedule, speedup
from ..hyca_core import run_maps
from ..hyca_core.run_maps import FixedRunMap
from ..hyca_core.solver_map import MIN_PROBE_STEPS, MapError, SolverMap
from ..hyca_core.solvers import warmup_pool
from ..hyca_core.trajectories import TrajectoryRecorder
from ..hyca_core.tuning import Tuned
from . import map_store, tuning_runs, ui_text
from .apply_options import AUTO, ApplyOptions
from .patching import model_architecture, unit_widths

# Run maps a MapSource keeps, one per schedule: enough for the few a session alternates between (step
# counts, a hires pass), bounded so that a long session of ever-new schedules (img2img denoise values)
# holds no more.
RUN_MAPS_KEPT = 8
# Runs this short (few-step distilled models, 8-step schedules) take steps too far apart for cached
# residuals: on every model the benchmarks measure, plain sampling with as many full steps came closer.
FEW_STEPS = 8
# A probe covers the schedules a map serves when it starts at the model's largest sigma (flow samplers may
# offset it by 1e-4) and ends at 0.
COVER_RTOL = 1e-3


class MapSource:
    """The solver map a patched model predicts with, fitted once per sampling schedule.

    With no map (auto mode) the model's first complete sampling run that denoises fully and predicts some
    step is recorded at full compute, calibrated, and saved (beside ``options.checkpoint``, the model's file
    if known, and in the hyca models folder) for later runs and sessions.
    """

    def __init__(self, model, solver_map: SolverMap | None, options: ApplyOptions, granularity: str):
        self.options = options
        self.architecture = model_architecture(model)
        self.granularity = granularity
        self.widths = unit_widths(model, granularity)
        self.fingerprint = map_store.fingerprint(model)
        # Shared by every clone; during a run it holds the run's model_sampling (a ModelSampling node
        # placed after Apply included), which turns the window's percents into sigmas.
        self.base_model = model.model
        self.solver_map = None
        self.calibration_failed = False  # auto mode gave up: later runs compute fully, record nothing
        self._run_maps: dict[tuple, FixedRunMap] = {}  # runs repeat their schedules; least recent first
        if solver_map is not None:
            self.use(solver_map)

    def use(self, solver_map: SolverMap) -> None:
        solver_map.check_fits(self.architecture, self.widths)
        self.solver_map = solver_map
        self._run_maps.clear()

    @property
    def run_maps(self) -> list[FixedRunMap]:
        """The run maps kept, least recently used first."""
        return list(self._run_maps.values())

    def for_run(self, step_sigmas) -> FixedRunMap:
        """What a run with these step sigmas predicts with."""
        return self.run_map(tuple(float(s) for s in step_sigmas), self.schedule_for(step_sigmas))

    def schedule_for(self, step_sigmas) -> RunSchedule:
        """The schedule of a run with these step sigmas: predicting only inside the window of the
        denoising, with the interval of the target speed-up if one is set."""
        sampling = self.base_model.model_sampling
        start, end = (float(sampling.percent_to_sigma(percent)) for percent in self.options.window)
        schedule = self.options.schedule.within(step_sigmas, start, end)
        if self.options.target_speedup:
            schedule = schedule.for_speedup(len(step_sigmas), self.options.target_speedup)
        tuned = self.tuned(schedule.interval)
        if tuned is not None and self.options.tuned_warmup:
            followed = replace(schedule, warmup=tuned[1].candidate.warmup)
            steps = len(step_sigmas)
            # a tuned warm-up moves full steps and never adds one, as in the tuning; followed at another
            # N a longer one could: calibrated placement keeps the count (`budget`), fixed the asked warm-up
            if (self.placement(schedule.interval) == "calibrated"
                    or followed.mask(steps).sum() <= schedule.mask(steps).sum()):
                schedule = followed
        return schedule

    def budget(self, schedule: RunSchedule, steps: int) -> int:
        """The full steps a run may compute: its every-N schedule's, at most the asked warm-up's."""
        asked = replace(schedule, warmup=self.options.schedule.warmup)
        return int(min(schedule.mask(steps).sum(), asked.mask(steps).sum()))

    def tuned(self, interval: int) -> tuple[int, Tuned] | None:
        """The map's tuning for this interval or the nearest tuned one, None without tuning."""
        return tuning.nearest(tuning.from_info(self.solver_map.info), interval) if self.solver_map else None

    def searched(self, schedule: RunSchedule, steps: int) -> np.ndarray | None:
        """The full steps the map's tuning searched for this run (`tuning.search`): at that very N and
        warm-up, for a run of the probe's step count over the whole denoising; None for any other run."""
        if self.solver_map is None or self.options.placement != AUTO or self.options.target_speedup:
            return None
        tuned = tuning.from_info(self.solver_map.info).get(schedule.interval)
        if tuned is None or tuned.candidate.warmup != schedule.warmup or self.options.window != (0.0, 1.0):
            return None
        return tuned.mask(steps)

    def placement(self, interval: int) -> str:
        """The placement a run at this interval uses: the one asked for, else the tuned one, else fixed."""
        if self.options.placement != AUTO:
            return self.options.placement
        tuned = self.tuned(interval)
        return tuned[1].candidate.placement if tuned is not None else "fixed"

    def run_map(self, step_sigmas: tuple[float, ...], schedule: RunSchedule) -> FixedRunMap:
        """The map for one sampling schedule; fitting it to the run refits every block, so the RUN_MAPS_KEPT
        most recently used are kept."""
        key = (step_sigmas, schedule)
        run_map = self._run_maps.pop(key, None)
        if run_map is None:
            # calibrated placement: as many full steps as the every-N pattern, where the probe errs most
            placement = self.placement(schedule.interval)
            calibrated = placement == "calibrated"
            budget = self.budget(schedule, len(step_sigmas)) if calibrated else None
            searched = self.searched(schedule, len(step_sigmas))
            fitting = dict(fitted=self.options.fitted, single_solver=self.options.single_solver)
            if searched is None:
                run_map = run_maps.run_map(self.solver_map, np.array(step_sigmas), schedule, budget=budget,
                                           **fitting)
            else:
                placement = "searched"
                run_map = run_maps.for_mask(self.solver_map, np.array(step_sigmas), searched,
                                            warmup_pool(schedule.warmup), **fitting)
            mask = run_map.mask
            logging.info("HyCa: %d steps, %d computed, %d predicted: %.2fx fewer block computations (N=%d, "
                         "%s placement; first %d and last %d steps computed)", len(mask), mask.sum(),
                         (~mask).sum(), speedup(mask), schedule.interval, placement,
                         schedule.widened().warmup, schedule.final)
            self.report_few_steps(mask)
            self.report_tuning(schedule.interval, int(mask.sum()), schedule.warmup)
        self._run_maps[key] = run_map  # now the most recent
        while len(self._run_maps) > RUN_MAPS_KEPT:
            del self._run_maps[next(iter(self._run_maps))]
        return run_map

    def report_few_steps(self, mask: np.ndarray) -> None:
        """Say, for a short run that predicts, that fewer plain steps came closer wherever it was measured."""
        if len(mask) > FEW_STEPS or mask.all():
            return
        text = (f"HyCa: a {len(mask)}-step run takes steps too far apart for cached residuals: on every "
                f"model measured, plain sampling with as many full steps ({int(mask.sum())} here) gave the "
                "closer image (README, few-step models). Lower the sampler's steps instead, or set "
                "interval 1")
        logging.warning("%s", text)
        ui_text.show(self.options.node_id, text + ".")

    def report_tuning(self, interval: int, computed: int, warmup: int) -> None:
        """Log which tuning a run follows (with `warmup`), and HyCa's lead over plain sampling with as many
        full steps (``computed``) at its N; warn where that lead is under `tuning.LEAD`."""
        tuned = self.tuned(interval)
        if tuned is None:
            return
        n, result = tuned
        nearest = "" if n == interval else f" (the nearest tuned N to N={interval})"
        kept = ("" if warmup == result.candidate.warmup or not self.options.tuned_warmup else
                f"; warm-up {warmup} here, as the tuned one would compute one more full step")
        logging.info("HyCa: tuned for N=%d%s: %s, %.1f dB in calibration%s", n, nearest,
                     result.candidate.label(), result.psnr, kept)
        every = tuning.from_info(self.solver_map.info)
        found = tuning.verdict(every, interval, len(self.solver_map.probe_sigmas))
        if found is None:
            logging.info("HyCa: N=%d is not measured against plain sampling (tuned: %s)", interval,
                         ", ".join(f"N={k} {t.lead:+.1f} dB" for k, t in sorted(every.items())))
            return
        basis = " and ".join(f"N={k}'s {every[k].lead:+.1f} dB" for k in found.basis)
        how = {"measured": "", "interpolated": f", interpolated between {basis}",
               "at most": f" at most ({basis}; a larger N strays further)",
               "at least": f" at least ({basis})"}[found.kind]
        lead = f"HyCa leads plain sampling with as many full steps ({computed}) by {found.lead:+.1f} dB{how}"
        if found.recommended:
            logging.info("HyCa: at N=%d on this model %s in calibration", interval, lead)
            return
        sampler = every[min(found.basis, key=lambda k: every[k].lead)].plain_sampler
        text = (f"HyCa: at N={interval} on this model {lead} in calibration, under the {tuning.LEAD:g} dB "
                f"that shows a real lead: {computed} plain steps of {sampler} likely give as close an image. "
                "Lower the sampler's steps instead, or lower N")
        logging.warning("%s", text)
        ui_text.show(self.options.node_id, text + ".")

    def covers(self, run_sigmas: np.ndarray) -> bool:
        """Whether a run denoises fully (from the model's largest sigma to 0), as the runs a map serves do;
        a partial run (an img2img at denoise < 1, an advanced sampler's first steps) is no probe for them."""
        top = float(self.base_model.model_sampling.percent_to_sigma(0.0))
        return (len(run_sigmas) > 1 and run_sigmas[-1] == 0
                and math.isclose(run_sigmas[0], top, rel_tol=COVER_RTOL))

    def calibrate_from(self, recorder: TrajectoryRecorder, run_sigmas: np.ndarray, runs=None) -> None:
        """Calibrate from a recorded full-compute run with these sigmas (the final 0 included), for the
        schedule it would have predicted with, then tune the map on ``runs`` (`tuning_runs.ReplayRuns` of the
        run) as HyCa Calibrate does. A run that does not denoise fully, is too short to choose solvers on, or
        whose schedule predicts no step is passed over; the next run tries again. Raises only what stops
        the tuning's sampling (a cancel): it runs in the sampler's ``finally``, where an error would lose the
        run's image."""
        sigmas = recorder[next(iter(recorder))].sigmas
        schedule = self.schedule_for(sigmas).widened()  # a plain Schedule with the run's mask
        steps = len(sigmas)
        span = f"sigma {run_sigmas[0]:.3g} to {run_sigmas[-1]:.3g}"
        why = None
        if not self.covers(run_sigmas):
            why = f"it covers {span}, a map serves full denoising runs"
        elif steps < MIN_PROBE_STEPS:
            why = f"calibration takes {MIN_PROBE_STEPS} steps or more"
        elif schedule.mask(steps).all():
            why = f"at N={schedule.interval} with a warm-up of {schedule.warmup} it predicts no step"
        if why is not None:
            logging.info("HyCa: not calibrating from this %d-step run (%s); the next full run calibrates",
                         steps, why)
            ui_text.show(self.options.node_id, f"HyCa: this run was not used to calibrate ({why}). The next "
                                               "full run computes every step and calibrates.")
            return
        logging.info("HyCa: calibrating from this %d-step run (%s)", steps, span)
        from ..hyca_core.calibration import calibrate  # scikit-learn: imported when first needed

        try:
            info = {"auto": True, "granularity": self.granularity, "steps": steps}
            solver_map = calibrate(recorder, schedule, architecture=self.architecture,
                                   fingerprint=self.fingerprint, info=info)
        except ValueError as error:  # e.g. non-finite statistics: the image is kept, no retry on every run
            self.calibration_failed = True
            logging.warning("HyCa: calibrating from this run failed (%s); this HyCa Apply stops calibrating "
                            "and computes every step. Connect a map from HyCa Calibrate instead.", error)
            ui_text.show(self.options.node_id, "HyCa: calibration failed on this model; runs compute every "
                                               "step. Use HyCa Calibrate to make a map.")
            return
        self.use(solver_map)
        where = self.save()  # before tuning: a cancelled tuning keeps the probe's map
        done = "calibrated"
        if runs is not None:
            ui_text.show(self.options.node_id, f"HyCa: calibrated a solver map from this run ({where}); now "
                                               "tuning it on replays of this run (about three more runs).")
            try:
                solver_map, _ = tuning_runs.tune(runs, solver_map)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: the untuned map serves
                logging.warning("HyCa: tuning failed (%s); the map is kept untuned", error)
            else:
                self.use(solver_map)
                done, where = "calibrated and tuned", self.save()
        logging.info("HyCa: %s from this run; map %s", done, where)
        ui_text.show(self.options.node_id, f"HyCa: {done} a solver map from this run ({where}). The next "
                                           "runs compute only some steps and predict the rest.")

    def save(self) -> str:
        """Save the map for later runs and sessions; where it went, in words."""
        try:
            saved = map_store.save_for(self.solver_map, self.options.checkpoint)
            return "saved to " + " and ".join(map(str, saved))
        except MapError as error:
            logging.warning("HyCa: calibrated map kept in memory only: %s", error)
            return "kept in memory only"

    def for_replay(self, solver_map: SolverMap, options: ApplyOptions) -> MapSource:
        """A source for a tuning replay: this model's, with that map and those options and no run map yet."""
        source = copy.copy(self)
        source.options, source._run_maps = options, {}
        source.use(solver_map)
        return source
