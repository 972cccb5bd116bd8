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

from harness.wall_clock import amdahl_bound, block_share  # noqa: F401  (this module's measures)


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
