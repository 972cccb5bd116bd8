"""One sampling run of a HyCa-applied model: predicting with its map or recording to calibrate one."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ..hyca_core.trajectories import TrajectoryRecorder
from . import tuning_runs, ui_text
from .run_state import RunState
from .history_memory import HistoryMemory, Placement, log_fallback, moved
from .map_source import MapSource


class ApplyRunState(RunState):
    """A run of a HyCa-applied model: predicts with the source's map, or records to calibrate it; places
    each residual history where it fits (`history_memory`) and reports the run's wall-clock time."""

    def __init__(self, source: MapSource, spare_device: torch.device):
        options = source.options
        calibrated = source.solver_map is not None
        recording = not calibrated and not source.calibration_failed
        super().__init__(
            make_run_map=source.for_run if calibrated else None,
            recorder=TrajectoryRecorder() if recording else None,
            history_dtype=options.history_dtype, offload_device=spare_device if options.offload else None,
            fused=options.fused,
        )
        self.source = source
        self.spare_device = torch.device(spare_device)  # the model's offload device: a history fallback
        self.memory = HistoryMemory(None, self.spare_device, options.memory_budget)
        self.run_sigmas = None  # the run's sigmas, the final one included: what a probe must cover
        self.wall_start = time.perf_counter()  # a run's state is cloned as the run starts

    def clone(self) -> "ApplyRunState":
        return ApplyRunState(self.source, self.spare_device)

    def replay_state(self, solver_map, options) -> RunState:
        """The state of a tuning replay of this run: predicting with ``solver_map`` and ``options``, or, with
        no map, computing every step."""
        if solver_map is None:
            return RunState()
        return ApplyRunState(self.source.for_replay(solver_map, options), self.spare_device)

    def begin_call(self, x, transformer_options, variant=frozenset()):
        if self.run_sigmas is None:
            self.run_sigmas = transformer_options["sample_sigmas"].detach().double().cpu().numpy()
        return super().begin_call(x, transformer_options, variant)

    def new_history(self, key: str, residual: torch.Tensor):
        """Before a new history is allocated: the run's placement if all fit there, else the least costly
        fallback (the histories held so far move with it), else none: no more prediction in this run."""
        asked = Placement(torch.device(self.offload_device or residual.device),
                          self.history_dtype or residual.dtype)
        current = self.memory.placement or asked
        placement = self.memory.admit(self.run_map.history(key), residual, asked)
        if placement != current:
            log_fallback(placement, self.spare_device)
            self.weights.clear()  # weights are prepared for the histories' dtype
            if placement is None:
                self.run_map = self.make_run_map = None  # every later call computes; nothing more is cached
                for branch in self.branches.values():
                    branch.histories.clear()
                return None
            self.offload_device, self.history_dtype = placement.device, placement.dtype
            for branch in self.branches.values():
                branch.histories = {k: moved(history, placement) for k, history in branch.histories.items()}
        return super().new_history(key, residual)

    def finish(self, completed: bool, rerun=None) -> None:
        if self.recorder is not None and completed and self.source.solver_map is None and len(self.recorder):
            # the replays keep the run's memory options; only the user's run speaks on the node
            options = replace(self.source.options, node_id=None)
            runs = None if rerun is None else tuning_runs.ReplayRuns(rerun, self.replay_state, options)
            self.source.calibrate_from(self.recorder, self.run_sigmas, runs)
        if completed and self.predicted:
            total = self.computed + self.predicted
            text = (f"HyCa: {total / max(self.computed, 1):.2f}x fewer block computations; sampling took "
                    f"{time.perf_counter() - self.wall_start:.1f} s")
            logging.info("%s (wall clock)", text)
            ui_text.show(self.source.options.node_id, text)
