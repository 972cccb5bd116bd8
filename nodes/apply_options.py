"""What HyCa Apply was asked to do: one options object shared by the nodes, `apply_hyca` and the run state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hyca_core import defaults, tuning
from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import SolverMap

AUTO = "auto"  # granularity: the connected map's, per block without one; placement: the map's tuning
# fixed: warm-up, then every N-th step (the paper); calibrated: the same number of full steps,
# placed where the map's probe says prediction errs most (early steps change fastest)
PLACEMENTS = tuning.PLACEMENTS
HISTORY_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ApplyOptions:
    """HyCa Apply's knobs. ``granularity`` None: the connected map's, else per block. ``target_speedup`` > 0
    replaces N by the interval whose speed-up on each run's step count reaches it. Steps outside
    ``window`` (fractions of the denoising) always compute. ``single_solver`` = (solver, time variable):
    one pool solver for every channel (the benchmark's single-solver baselines). ``placement`` AUTO and
    ``tuned_warmup``: the placement and warm-up the map's tuning chose for the run's N (or the nearest
    tuned N); fixed placement and the schedule's warm-up without tuning. ``fused``: CPU-held histories
    predict large residuals with torch.compile's single-pass kernels. ``memory_budget``: bytes the
    history may hold on a device (None: what ComfyUI reports free). ``node_id``: the node whose UI shows
    what a run did."""

    schedule: Schedule = field(default_factory=Schedule)
    fitted: bool = defaults.FITTED
    history_dtype: torch.dtype | None = None
    offload: bool = False
    single_solver: tuple[str, str] | None = None
    granularity: str | None = None
    target_speedup: float = 0.0
    window: tuple[float, float] = (0.0, 1.0)
    checkpoint: Path | None = None
    placement: str = AUTO
    tuned_warmup: bool = False
    fused: bool = False
    memory_budget: int | None = None
    node_id: str | None = None

    def __post_init__(self):
        if self.placement not in (AUTO, *PLACEMENTS):
            raise ValueError(f"placement must be one of {(AUTO, *PLACEMENTS)}, got {self.placement!r}")
        start, end = self.window
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"the window {start}..{end} must lie within 0..1, start before end")


def map_granularity(solver_map: SolverMap) -> str:
    """The granularity a map was calibrated at (maps record it in their info; older ones are per block)."""
    return solver_map.info.get("granularity", "block")


def map_warmup(solver_map: SolverMap | None) -> int:
    """The warm-up a map was calibrated for, the default without one."""
    return solver_map.probe_schedule.warmup if solver_map is not None else defaults.WARMUP


def granularity_for(options: ApplyOptions, solver_map: SolverMap | None) -> str:
    """The granularity a run uses: the map's; an explicit other one is refused in words an artist reads."""
    granularity = options.granularity or "block"
    if solver_map is not None:
        granularity = map_granularity(solver_map)
        if options.granularity not in (None, granularity):
            raise ValueError(mismatch_message(granularity, options.granularity))
    return granularity


def mismatch_message(calibrated: str, asked: str) -> str:
    return (f"The solver map was calibrated with granularity \"{calibrated}\", but HyCa Apply is set to "
            f"\"{asked}\". Set HyCa Apply's granularity to \"{AUTO}\" (it then follows the map) or to "
            f"\"{calibrated}\", or calibrate again with \"{asked}\".")
