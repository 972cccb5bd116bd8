"""Which sampler steps run the full model ("all-time solving") and which are predicted.

Two ways to decide, both pure:
- `Schedule`: the fixed pattern of the paper (warm-up, then one full step every N), fixed for one run's
  steps by `Schedule.within` (a window of sigmas outside which every step computes) and
  `Schedule.for_speedup` (the N of a target speed-up).
- `calibrated_mask`: the same budget of full steps, placed where a probe says prediction is hardest
  (early steps change fastest, so gaps should grow along the trajectory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import defaults

# A step at a window bound is inside it: sigmas are float32 values, a bound may be computed in float64.
BOUND_RTOL = 1e-5


@dataclass(frozen=True)
class Schedule:
    """Full compute during warm-up, then every `interval`-th step, then the last `final` steps.

    After the last warm-up step, `interval - 1` steps are predicted between full ones, so
    `interval=1` computes everything. The effective warm-up is at least `min_warmup` (the history
    the map's solvers need) and at least 1: step 0 has nothing to predict from.
    """

    interval: int = defaults.INTERVAL
    warmup: int = defaults.WARMUP
    final: int = defaults.FINAL_STEPS

    def __post_init__(self):
        if self.interval < 1 or self.warmup < 0 or self.final < 0:
            raise ValueError(f"invalid schedule {self}")

    def mask(self, num_steps: int, min_warmup: int = 0) -> np.ndarray:
        """bool (num_steps,), True = full compute."""
        warmup = max(self.warmup, min_warmup, 1)
        mask = np.zeros(num_steps, dtype=bool)
        mask[:warmup] = True
        mask[warmup - 1 :: self.interval] = True
        mask[max(num_steps - self.final, 0) :] = True
        return mask

    def within(self, step_sigmas, start_sigma: float = math.inf, end_sigma: float = 0.0) -> "RunSchedule":
        """This schedule for a run with these step sigmas that predicts only steps with
        ``end_sigma <= sigma <= start_sigma``; the steps before that window compute like warm-up steps
        (the every-N pattern starts where it opens), those after it like final steps. Sigmas decrease
        along a run, so the window is one stretch of steps."""
        sigmas = np.asarray(step_sigmas, dtype=np.float64)
        inside = np.flatnonzero((sigmas <= start_sigma * (1 + BOUND_RTOL))
                                & (sigmas >= end_sigma * (1 - BOUND_RTOL)))
        opens = int(inside[0]) if len(inside) else len(sigmas)
        after = len(sigmas) - 1 - int(inside[-1]) if len(inside) else 0
        return RunSchedule(self.interval, self.warmup, max(self.final, after), opens=opens)

    def for_speedup(self, num_steps: int, target: float) -> "Schedule":
        """This schedule with the interval whose speed-up on `num_steps` steps is the smallest that
        reaches `target`, or where none does, the largest (speed-up grows with the interval)."""
        candidates = [replace(self, interval=n) for n in range(1, max(num_steps, 1) + 1)]
        speedups = [speedup(s.mask(num_steps)) for s in candidates]
        # a widget's float noise (2.5000000000000004) must not push an exact match below the target
        reaching = [s for s, x in zip(candidates, speedups) if x >= target * (1 - 1e-9)]
        return reaching[0] if reaching else candidates[int(np.argmax(speedups))]


@dataclass(frozen=True)
class RunSchedule(Schedule):
    """A schedule fixed for one run, whose first `opens` steps lie before its prediction window.

    They compute like warm-up steps, but `warmup` keeps bounding the predictors' history, and so the
    memory it holds: a late window does not make every cached residual history longer.
    """

    opens: int = 0

    def mask(self, num_steps: int, min_warmup: int = 0) -> np.ndarray:
        return super().mask(num_steps, max(min_warmup, self.opens))

    def widened(self) -> Schedule:
        """The plain schedule with this mask, the steps before the window counted as warm-up."""
        return Schedule(self.interval, max(self.warmup, self.opens), self.final)


def calibrated_mask(gap_cost: np.ndarray, budget: int, min_warmup: int) -> np.ndarray:
    """The mask with at most `budget` full steps whose total gap cost is smallest.

    gap_cost: (num_steps, max_gap + 1); gap_cost[a, g] is the error of predicting the g steps
    a+1..a+g when a is the last computed step (column 0, no gap, normally 0). Entries may be inf
    to forbid a gap; gaps longer than max_gap are never chosen. See
    `selection.gap_costs` for a table measured on a probe; tables of several blocks may be summed,
    since all blocks share one mask.

    The first `min_warmup` steps (at least 1) are always computed and count towards the budget.
    Dynamic programming over the next computed step: best[j, b] is the least cost of a mask whose
    j-th computed step after warm-up is b; O(budget * steps * max_gap).
    """
    num_steps, width = gap_cost.shape
    max_gap = width - 1
    warmup = min(max(min_warmup, 1), num_steps)
    if budget < warmup:
        raise ValueError(f"budget {budget} is smaller than the warm-up {warmup}")
    extra = min(budget, num_steps) - warmup
    last = warmup - 1

    best = np.full((extra + 1, num_steps), np.inf)
    came_from = np.zeros((extra + 1, num_steps), dtype=int)
    best[0, last] = 0.0
    for j in range(extra):
        for gap in range(max_gap + 1):
            # every earlier computed step a reaches b = a + gap + 1
            cand = best[j, : num_steps - gap - 1] + gap_cost[: num_steps - gap - 1, gap]
            target = best[j + 1, gap + 1 :]
            better = cand < target
            target[better] = cand[better]
            came_from[j + 1, gap + 1 :][better] = np.arange(num_steps - gap - 1)[better]

    # close the mask: the steps after the last computed one are predicted too
    tail = num_steps - 1 - np.arange(num_steps)
    tail_cost = np.full(num_steps, np.inf)
    reachable = tail <= max_gap
    tail_cost[reachable] = gap_cost[np.arange(num_steps)[reachable], tail[reachable]]
    total = best + tail_cost
    j, b = np.unravel_index(np.argmin(total), total.shape)
    if not np.isfinite(total[j, b]):
        raise ValueError("no mask within the budget satisfies the gap limits")

    mask = np.zeros(num_steps, dtype=bool)
    mask[:warmup] = True
    while j > 0:
        mask[b] = True
        b, j = came_from[j, b], j - 1
    return mask


def speedup(mask: np.ndarray) -> float:
    """Steps per full computation: the model-time speedup, ignoring the cost of prediction."""
    return len(mask) / max(int(np.count_nonzero(mask)), 1)

