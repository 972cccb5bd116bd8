"""Run maps: a solver map made ready for one sampling run.

A `FixedRunMap` answers a run's three questions before the run starts (`run_map`: solvers re-selected
and fitted for the run's schedule): must this step compute, can it be predicted from the history this
run holds, and with which weights per channel.

A step is predicted only with weights whose sum of magnitudes stays within MAX_WEIGHT_NORM; other
steps compute (`stable`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import defaults
from .schedule import Schedule, calibrated_mask
from .selection import (FIT_LAMBDA, CompactSample, coefficients, gap_costs, refit, resample, single,
                        step_weights_for)
from .solvers import MAX_HISTORY, solver, warmup_pool

if TYPE_CHECKING:
    from .solver_map import SolverMap

# A prediction is sum_j w_j F_j: whatever separates the cached residuals F_j from the smooth trajectory
# the weights assume (their rounding, the trajectory's roughness) reaches it multiplied by up to
# ||w||_1. At 2^11 the rounding of an fp16 history alone (2^-11 relative) can be as large as the
# residual: computing the step costs less than such a guess. The pool's choices on the grids of the
# schedules HyCa serves (warm-up up to 4, N up to 20) stay well below, while near-repeated times grow
# slope-based members' weights like 1/d^2 (1e8 at d = 1e-4).
MAX_WEIGHT_NORM = 2.0**11


def stable(weights: np.ndarray) -> bool:
    """Whether weights (history, ...) keep every channel's sum of magnitudes within MAX_WEIGHT_NORM."""
    return bool(np.all(np.abs(weights).sum(axis=0) <= MAX_WEIGHT_NORM))


@dataclass
class FixedRunMap:
    """A map collapsed for one run: which steps compute, and per block the per-channel weights."""

    mask: np.ndarray  # (steps,) bool, True = full compute
    tables: dict[str, dict[int, np.ndarray]]  # key -> predicted step -> (m, D) float32

    def history(self, key: str) -> int:
        """Residuals to keep for block stream `key`."""
        table = self.tables.get(key)
        return next(iter(table.values())).shape[0] if table else 1

    def forced(self, step: int) -> bool:
        return step >= len(self.mask) or bool(self.mask[step])

    def can_predict(self, step: int, history_steps: tuple[int, ...]) -> bool:
        """Only with exactly the history the weights were fitted for."""
        if self.forced(step):
            return False
        computed = tuple(int(s) for s in np.flatnonzero(self.mask[:step]))
        length = min(MAX_HISTORY, len(computed))
        return length > 0 and tuple(history_steps[-length:]) == computed[-length:]

    def coefficients(self, key: str, step: int) -> np.ndarray:
        """(m, D) weights of block stream `key` at a predicted `step`, for the history `can_predict` wants."""
        return self.tables[key][step]


def run_map(solver_map: SolverMap, step_sigmas: np.ndarray, schedule: Schedule,
            fitted: bool = defaults.FITTED, per_position: bool = True, budget: int | None = None,
            single_solver: tuple[str, str] | None = None) -> FixedRunMap:
    """Re-select (and fit) every block's solvers for this run's steps and schedule.

    step_sigmas: the sigma of each sampler step (ComfyUI's sigmas without the final one).
    budget: if given, compute that many steps, placed where the probe says prediction errs most
    (`calibrated_mask`) instead of every `schedule.interval`-th; the schedule's warm-up, final steps
    and steps outside its window are computed all the same. single_solver: one (solver name, time
    variable) for every channel, the single-solver baselines (FORA = ("reuse", "step"), TaylorSeer-like =
    ("taylorseer2", "step")). Only pool members whose history fits in the warm-up are used, so the
    warm-up asked for is the warm-up run. A step whose weights are not `stable` computes instead, and
    the steps after it are refitted for the history that gives them.
    """
    step_sigmas = np.asarray(step_sigmas, dtype=np.float64)
    # a single solver computes until its history is there, whatever the warm-up asked for
    history = solver(single_solver[0]).history if single_solver is not None else 0
    pool = warmup_pool(max(schedule.warmup, history))
    if budget is None:
        mask = schedule.mask(len(step_sigmas), min_warmup=history)
    else:
        # the schedule with no every-N pattern: what it computes whatever the budget
        forced = replace(schedule, interval=len(step_sigmas) + 1).mask(len(step_sigmas), min_warmup=history)
        warmup = max(schedule.warmup, history, 1)
        mask = _calibrated_mask(solver_map, step_sigmas, budget, warmup, forced, pool)
    return for_mask(solver_map, step_sigmas, mask, pool, fitted, per_position, single_solver)


def for_mask(solver_map: SolverMap, step_sigmas: np.ndarray, mask: np.ndarray, pool,
             fitted: bool = defaults.FITTED, per_position: bool = True,
             single_solver: tuple[str, str] | None = None) -> FixedRunMap:
    """`run_map` for a given mask (True = full compute) and pool (`warmup_pool` of the warm-up): the
    solvers re-selected (and fitted) for the steps it predicts; a step whose weights are not `stable`
    computes instead."""
    step_sigmas = np.asarray(step_sigmas, dtype=np.float64)
    while not mask.all():
        step_weights = step_weights_for(mask, step_sigmas, pool=pool)
        tables = {}
        for key, block in solver_map.blocks.items():
            if single_solver is not None:
                name, variable = single_solver
                assignment = single(solver(name).id, variable, block.clusters)
            else:
                sample = CompactSample(solver_map.probe_sigmas, block.series)
                lam = FIT_LAMBDA if fitted else None
                assignment = refit(sample, step_weights, per_position=per_position, lam=lam)
            tables[key] = coefficients(assignment, block.labels, step_weights)
        unstable = [step for step in step_weights.steps
                    if not all(stable(table[step]) for table in tables.values())]
        if not unstable:
            return FixedRunMap(mask, tables)
        mask = _computing(mask, unstable, step_weights.history.shape[1])
    return FixedRunMap(mask, {})


def _computing(mask: np.ndarray, unstable: list[int], history: int) -> np.ndarray:
    """`mask` with the `unstable` steps (ascending) computed, except those whose last `history` computed
    steps would then hold one of them: refitted on that history, they may well be stable."""
    mask, forced = mask.copy(), []
    for step in unstable:
        if forced and np.count_nonzero(mask[forced[-1] + 1 : step]) < history:
            continue
        mask[step] = True
        forced.append(step)
    return mask


def _calibrated_mask(solver_map: SolverMap, step_sigmas, budget, warmup, forced, pool) -> np.ndarray:
    """One mask for all blocks, from the summed gap costs of their resampled probes; no gap spans a
    `forced` step."""
    values, labels, offset = [], [], 0
    for block in solver_map.blocks.values():
        probes = CompactSample(solver_map.probe_sigmas, block.series)
        block_values, block_labels = resample(probes, step_sigmas)
        # relative errors: blocks weigh alike
        values.append(block_values / np.sqrt(np.mean(block_values**2) + 1e-30))
        labels.append(block_labels + offset)
        offset += block.clusters
    max_gap = min(len(step_sigmas) - 1, 2 * len(step_sigmas) // max(budget, 1) + 2)
    costs = gap_costs(np.concatenate(values, axis=2), np.concatenate(labels), step_sigmas, warmup,
                      max_gap, pool=pool)
    # cost[a, g] predicts steps a+1..a+g: forbidden when a forced step lies among them
    count = np.concatenate([[0], np.cumsum(forced)])  # forced steps before each index
    a, g = np.ogrid[: len(step_sigmas), : costs.shape[1]]
    costs[count[np.minimum(a + g + 1, len(step_sigmas))] > count[a + 1]] = np.inf
    return calibrated_mask(costs, max(budget, int(forced.sum())), max(warmup, _leading(forced)))


def _leading(mask: np.ndarray) -> int:
    """Length of the run of True at the start of `mask`."""
    return int(np.argmin(mask)) if not mask.all() else len(mask)

