"""Wall-clock measures shared by the benchmarks and the demo: interleaved medians of small timed calls,
the share of a run spent inside the transformer blocks, and Amdahl's law with free prediction."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def amdahl_bound(share: float, blocks_fraction: float, passes_fraction: float, saved: float = 0.0) -> float:
    """The highest wall-clock speed-up over full compute a method can reach if what it puts in place
    of a block costs nothing: full compute's time is `share` inside the blocks and the rest outside
    (embeddings, final layer, sampler), which scales at most with the model passes kept. Fractions:
    the method's block executions and model passes over full compute's. ``saved``: the share of full
    compute's time outside the blocks that the method does not spend at equal passes (HyCa computes
    the prompt and position layers once per run)."""
    return 1 / ((1 - share - saved) * passes_fraction + share * blocks_fraction)


def block_share(run: Callable[[], object], blocks: list[torch.nn.Module],
                clock: Callable[[], float] = time.perf_counter) -> float:
    """The share of one run's time spent inside the blocks, timed by pre/post forward hooks in this
    run only (never a run whose time is reported)."""
    inside, started = [0.0], [0.0]

    def pre(*_):
        started[0] = clock()

    def post(*_):
        inside[0] += clock() - started[0]

    handles = ([b.register_forward_pre_hook(pre) for b in blocks]
               + [b.register_forward_hook(post) for b in blocks])
    try:
        start = clock()
        run()
        total = clock() - start
    finally:
        for handle in handles:
            handle.remove()
    return inside[0] / total


def round_times(fns: list[Callable[[], object]], reps: int, warmup: int = 3) -> list[list[float]]:
    """Each call's times over ``reps`` rounds, the calls taking turns within a round (so load changes on a
    shared machine touch them alike), after ``warmup`` untimed rounds (compiled kernels, allocations)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return times


def median_times(fns: list[Callable[[], object]], reps: int, warmup: int = 3) -> list[float]:
    """Each call's median time over the rounds of :func:`round_times`."""
    return [statistics.median(t) for t in round_times(fns, reps, warmup)]
