"""The benchmark's timing rules, on a simulated machine whose load changes (no ComfyUI needed)."""

import statistics

import pytest
import torch

from benchmarks.quality import timing
from benchmarks.quality.measures import Result


class Machine:
    """A clock that a job advances by its work times the load at the time it starts."""

    def __init__(self, load):
        self.now = 0.0
        self.load = load
        self.order = []

    def clock(self) -> float:
        return self.now

    def job(self, name, work):
        def run():
            self.order.append(name)
            self.now += work * self.load(self.now)
        return run


def test_a_load_burst_at_the_start_does_not_inflate_the_baseline():
    # The defect: full compute timed once, in its own window, while the machine was 1.8x slower,
    # made every speed-up divided by it 1.8x too high. Interleaved rounds and medians must not.
    machine = Machine(lambda t: 1.8 if t < 60 else 1.0)
    full, hyca = machine.job("full", 50.0), machine.job("hyca", 20.0)
    runs = timing.interleaved([full, hyca], rounds=3, clock=machine.clock)
    speedup = statistics.median(runs[0]) / statistics.median(runs[1])
    assert speedup == pytest.approx(50 / 20, rel=0.01)


def test_two_jobs_alternate_abba_and_every_round_runs_each_once():
    machine = Machine(lambda t: 1.0)
    timing.interleaved([machine.job("A", 1), machine.job("B", 1)], rounds=4, clock=machine.clock)
    assert "".join(machine.order) == "ABBABAAB"
    machine = Machine(lambda t: 1.0)
    timing.interleaved([machine.job(c, 1) for c in "ABC"], rounds=4, clock=machine.clock)
    rounds = ["".join(machine.order[i:i + 3]) for i in range(0, 12, 3)]
    assert rounds == ["ABC", "CBA", "BCA", "ACB"]  # nobody always first or last


def test_the_check_before_each_run_is_outside_its_time():
    machine = Machine(lambda t: 1.0)
    runs = timing.interleaved([machine.job("A", 2)], rounds=2,
                              before=lambda: setattr(machine, "now", machine.now + 5), clock=machine.clock)
    assert runs == [[2, 2]]


def test_amdahl_bound_for_skipped_blocks_and_for_fewer_steps():
    # 92.2% inside the blocks, 2.78x fewer block executions, every model call kept: the bound the old
    # table's 4.28x exceeded
    assert timing.amdahl_bound(0.922, 1 / 2.78, 1.0) == pytest.approx(2.44, abs=0.01)
    # fewer steps keep a fraction of both: the bound is that fraction's inverse, whatever the share
    assert timing.amdahl_bound(0.6, 0.2, 0.2) == pytest.approx(5.0)
    # a tenth of full compute's time spent outside the blocks at every pass, no longer spent: 1 / (0.3 + 0.12)
    assert timing.amdahl_bound(0.6, 0.2, 1.0, saved=0.1) == pytest.approx(1 / 0.42)
    row = Result("HyCa fixed N=3", "HyCa fixed", 50, 108, 50, 50.0, 0.99, 1.0, "12.0", wall_x=4.28,
                 bound=2.44, noise=0.2)
    assert row.timing_fails
    row.wall_x = 2.8  # within 2.44 x (1 + 0.2)
    assert not row.timing_fails


def test_timed_runs_refuse_hooked_modules():
    block = torch.nn.Linear(2, 2)
    timing.assert_unhooked([block])
    handle = block.register_forward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="hooks left"):
        timing.assert_unhooked([block])
    handle.remove()
    timing.assert_unhooked([block])


def test_block_share_times_the_blocks_in_its_own_run_and_leaves_no_hook():
    machine = Machine(lambda t: 1.0)

    class Block(torch.nn.Module):
        def forward(self, x):
            machine.now += 3.0
            return x

    blocks = [Block(), Block()]

    def run():
        machine.now += 4.0  # outside the blocks: embeddings, sampler
        for b in blocks:
            b(torch.zeros(1))

    assert timing.block_share(run, blocks, clock=machine.clock) == pytest.approx(6 / 10)
    timing.assert_unhooked(blocks)
