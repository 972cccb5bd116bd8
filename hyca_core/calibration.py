"""One-time choosing, end to end: probe trajectories in, a solver map out.

Per block stream (paper section 3.3): ten indicators per channel, k-means over channels, each
cluster's error under every pool solver on the probe's own caching schedule, the argmin (eq. 5),
and a compact sample of the probe so that later runs can re-select and fit for their schedule.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np

from .clustering import DEFAULT_CLUSTERS, cluster_channels
from .indicators import descriptor_matrix
from .schedule import Schedule
from .selection import compact_sample, select, solver_errors, step_weights_for
from .solver_map import BlockMap, SolverMap
from .solvers import POOL, TIME_VARIABLES, warmup_pool
from .threads import single_threaded
from .trajectories import Trajectory


# Squares up to 2^64 summed over a probe's steps and rows stay far inside float32 (2^128).
_LARGEST_FOR_STATISTICS = 2.0**32


class ProbeNotFinite(ValueError):
    """The probe's residuals hold NaN or inf: nothing can be calibrated from that run."""


def calibrate(
    trajectories: Mapping[str, Trajectory],
    schedule: Schedule,
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    architecture: str = "",
    fingerprint: str = "",
    info: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SolverMap:
    """The solver map of a probe run; ``progress(done, total)`` is called after each block.

    ``trajectories``: any mapping, e.g. a TrajectoryRecorder, which converts a block only when
    it is looked up, so that at most one block per CPU core is held in float32 at a time.
    Raises ProbeNotFinite if a block's recorded residuals are not all finite.
    """
    if not len(trajectories):
        raise ValueError("no trajectories were recorded: did the probe run any patched block?")
    sigmas = trajectories[next(iter(trajectories))].sigmas
    pool = warmup_pool(schedule.warmup)
    mask = schedule.mask(len(sigmas))
    if mask.all():
        raise ValueError(f"a {len(sigmas)}-step probe with {schedule} predicts no step: nothing to choose")
    step_weights = step_weights_for(mask, sigmas, pool=pool)

    def block_map(key: str) -> BlockMap:
        trajectory = trajectories[key]  # looked up in the worker: converted only when its turn comes
        if not np.array_equal(trajectory.sigmas, sigmas):
            raise ValueError(f"block {key} was recorded on other steps than the rest")
        finite = np.isfinite(trajectory.values).reshape(len(sigmas), -1).all(axis=1)
        if not finite.all():
            where = ", ".join(f"{s:.4g}" for s in sigmas[~finite][:3])
            raise ProbeNotFinite(f"block {key} recorded NaN or inf residuals at sigma {where}: the "
                                 "model's activations were not finite on this run, so no map can be "
                                 "calibrated from it")
        values = _within_statistics_range(trajectory.values)
        return calibrate_block(values, sigmas, step_weights, pool, clusters, seed)

    keys = list(trajectories)
    blocks = {}
    # Blocks are independent, so each CPU core takes one at a time (numpy's and BLAS's loops release
    # the GIL). Within a block the linear algebra is many small products and eigendecompositions,
    # which BLAS threads slow down instead of speeding up (how much for the batched 50x50 eigh: the
    # README, "The algorithm's own costs").
    workers = min(os.cpu_count() or 1, len(keys))
    with single_threaded("blas"), ThreadPoolExecutor(workers) as executor:
        try:
            for done, (key, block) in enumerate(zip(keys, executor.map(block_map, keys)), start=1):
                blocks[key] = block
                if progress:
                    progress(done, len(keys))
        finally:  # after an error, or a cancellation raised by `progress`, start no further block
            executor.shutdown(cancel_futures=True)
    return SolverMap(architecture, fingerprint, np.asarray(sigmas, np.float64), schedule, blocks,
                     info=info or {})


def _within_statistics_range(values: np.ndarray) -> np.ndarray:
    """`values` divided by a power of two if their squares, summed in float32 by the indicators, could
    overflow. Every statistic a map keeps is relative (errors, standardized indicators; the compact sample
    only ever serves relative errors), so the scale changes no choice; a power of two loses no precision."""
    largest = float(np.abs(values).max())
    if largest <= _LARGEST_FOR_STATISTICS:
        return values
    return values * np.float32(2.0 ** -math.ceil(math.log2(largest / _LARGEST_FOR_STATISTICS)))


def calibrate_block(values, sigmas, step_weights, pool, clusters, seed) -> BlockMap:
    """One block's map: its channels clustered on their indicators, each cluster's default solver the pool
    member with the least error over the probe's predicted steps, with every member's errors kept for the
    per-position choice of a run."""
    descriptors = descriptor_matrix(values)
    labels = cluster_channels(descriptors, clusters, seed)
    count = int(labels.max()) + 1
    table = solver_errors(values, labels, step_weights, clusters=count)
    choice = select(table).default
    # every pool member's mean error, the ones not usable under this warm-up as inf
    errors = np.full((len(POOL), len(TIME_VARIABLES), count), np.inf, dtype=np.float32)
    errors[[POOL.index(s) for s in pool]] = table.errors.mean(axis=-1)
    indicators = np.stack([descriptors[labels == c].mean(axis=0) for c in range(count)])
    return BlockMap(
        labels=labels.astype(np.int32),
        series=compact_sample(table.gram, sigmas).series,
        solver=choice.solver.astype(np.int32),
        variable=choice.variable.astype(np.int32),
        errors=errors,
        indicators=indicators.astype(np.float32),
    )
