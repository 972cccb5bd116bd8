"""Wall-clock timing, every method the same way, and the bound it must respect.

- No hooks: counting happens in a separate untimed run (:func:`measures.counting`); before every
  timed run :func:`assert_unhooked` checks that no forward hook is left on the model.
- Interleaved: each round runs full compute and every method of a group once, in an order rotated by
  one each round and reversed every other round, so a change of load on a shared machine falls on
  all of them alike. A baseline timed once, in its own window, turns that window's load into a
  factor on every speed-up divided by it (see :func:`interleaved`).
- Median of the rounds; a speed-up is full compute's median over the method's, from the same rounds.
- Threads: fixed by the caller for the whole process (torch.set_num_threads).
- The bound: Amdahl's law with free prediction (:func:`amdahl_bound`), from the share of a full run's
  time spent inside the blocks, measured in a run of its own with timing hooks (:func:`block_share`).
- The noise a speed-up may exceed its bound by: the relative spread (slowest - fastest) / median of
  full compute's runs plus that of the method's runs, both from the same rounds (the medians lie
  within these ranges, so their ratio cannot be off by much more).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def assert_unhooked(modules: list[torch.nn.Module]) -> None:
    """A timed run must not carry counting or timing hooks: their Python calls cost time per block."""
    hooked = [m for m in modules if m._forward_hooks or m._forward_pre_hooks]
    if hooked or torch.nn.modules.module._global_forward_hooks:
        raise RuntimeError(f"forward hooks left on {len(hooked)} module(s) before a timed run")


def interleaved(jobs: list[Callable[[], object]], rounds: int, before: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds of each job's runs: `rounds` rounds, each running every job once, in index order
    rotated by one every two rounds and reversed in odd rounds (for two jobs: ABBA). ``before`` runs
    ahead of every timed run, outside its time."""
    times: list[list[float]] = [[] for _ in jobs]
    for r in range(rounds):
        order = [(i + r // 2) % len(jobs) for i in range(len(jobs))]
        for i in reversed(order) if r % 2 else order:
            before()
            start = clock()
            jobs[i]()
            times[i].append(clock() - start)
    return times


def spread(runs: list[float]) -> float:
    """(slowest - fastest) / median: the relative noise of repeated runs."""
    return (max(runs) - min(runs)) / statistics.median(runs)


def amdahl_bound(share: float, blocks_fraction: float, passes_fraction: float) -> float:
    """The highest wall-clock speed-up over full compute a method can reach if what it puts in place
    of a block costs nothing: full compute's time is `share` inside the blocks and the rest outside
    (embeddings, final layer, sampler), which scales at most with the model passes kept. Fractions:
    the method's block executions and model passes over full compute's."""
    return 1 / ((1 - share) * passes_fraction + share * blocks_fraction)


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
