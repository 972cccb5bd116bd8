import itertools
from dataclasses import replace

import numpy as np
import pytest

from hyca_core import selection
from hyca_core.schedule import RunSchedule, Schedule, calibrated_mask, speedup
from hyca_core.solvers import MAX_HISTORY


def as_bits(mask):
    return "".join("1" if m else "0" for m in mask)


def test_mask_has_warmup_then_every_interval_then_final_steps():
    mask = Schedule(interval=3, warmup=2, final=2).mask(14)
    assert as_bits(mask) == "11001001001011"


def test_interval_one_computes_everything():
    assert Schedule(interval=1, warmup=0).mask(9).all()


def test_min_warmup_lengthens_the_warmup():
    assert as_bits(Schedule(interval=4, warmup=1).mask(12, min_warmup=3)) == "111000100010"


def test_step_zero_is_always_computed():
    assert as_bits(Schedule(interval=3, warmup=0).mask(7)) == "1001001"


def test_invalid_schedule_is_refused():
    with pytest.raises(ValueError):
        Schedule(interval=0)


def test_speedup_counts_full_steps():
    assert speedup(np.array([True, False, False, True])) == 2.0


# --- a run's schedule: a target speed-up, a window of sigmas ------------------------------------


def test_target_speedup_takes_the_smallest_interval_that_reaches_it():
    schedule = Schedule(interval=6, warmup=3)
    # on 20 steps N=1..5 compute 20, 11, 8, 7, 6 steps: 1, 1.82, 2.5, 2.86, 3.33x
    chosen = {target: schedule.for_speedup(20, target).interval for target in (0.5, 1.0, 1.5, 2.5, 2.6, 3.0)}
    assert chosen == {0.5: 1, 1.0: 1, 1.5: 2, 2.5: 3, 2.6: 4, 3.0: 5}
    assert schedule.for_speedup(20, 2.5000000000000004).interval == 3  # a widget's float noise
    # out of reach: the largest speed-up there is (3 warm-up steps, the rest predicted), at its smallest N
    assert schedule.for_speedup(20, 50.0).interval == 18
    assert speedup(schedule.for_speedup(20, 50.0).mask(20)) == pytest.approx(20 / 3)
    assert schedule.for_speedup(12, 2.5).interval == 5  # on 12 steps N=4 computes 5 (2.4x), N=5 computes 4


@pytest.mark.parametrize("steps", [1, 4, 9, 20, 31])
@pytest.mark.parametrize("schedule", [Schedule(4, 3), Schedule(2, 1, 2), RunSchedule(3, 2, 1, opens=5)])
def test_target_speedup_is_reached_by_no_shorter_interval(steps, schedule):
    """Closest to the target and not below it where any interval reaches it."""
    speedups = {n: speedup(replace(schedule, interval=n).mask(steps)) for n in range(1, steps + 2)}
    for target in np.linspace(0.5, 8, 31):
        chosen = schedule.for_speedup(steps, target)
        assert replace(chosen, interval=schedule.interval) == schedule  # only N changes
        reached = speedup(chosen.mask(steps))
        if max(speedups.values()) >= target:
            assert reached >= target and all(x < target for n, x in speedups.items() if n < chosen.interval)
        else:
            assert reached == max(speedups.values())


def test_default_window_keeps_every_mask_bit_for_bit():
    """start 0 / end 1 in every model_sampling's terms: inf or 999999999.9 (eps, v), 1.0 (flow) and 0."""
    rng = np.random.default_rng(0)
    for steps in (1, 2, 5, 13, 40):
        flow = np.linspace(1, 0, steps + 1, dtype=np.float32)[:-1]
        karras = np.sort(rng.uniform(0.03, 14.6, steps).astype(np.float32))[::-1]
        for sigmas, start in ((flow, 1.0), (karras, 999999999.9), (karras, np.inf)):
            for schedule in (Schedule(4, 3), Schedule(1, 1), Schedule(3, 0, 2), Schedule(6, 9)):
                run = schedule.within(sigmas, start, 0.0)
                assert np.array_equal(run.mask(steps), schedule.mask(steps))
                assert np.array_equal(run.mask(steps, min_warmup=4), schedule.mask(steps, min_warmup=4))


def test_window_computes_every_step_outside_it_and_restarts_the_pattern_where_it_opens():
    sigmas = np.linspace(1, 0.05, 20, dtype=np.float32)  # 1, 0.95, ... 0.05
    run = Schedule(interval=3, warmup=2, final=1).within(sigmas, start_sigma=0.8, end_sigma=0.3)
    # steps 0-3 lie before 0.8 and 15-19 after 0.3; the float32 0.8 and 0.3 of steps 4 and 14 count as inside
    assert as_bits(run.mask(20)) == "11110010010010011111"
    assert run.opens == 4 and run.final == 5
    # the user's warm-up still bounds the predictors' history; widened() is the same mask as a plain schedule
    assert run.warmup == 2
    assert type(run.widened()) is Schedule and as_bits(run.widened().mask(20)) == as_bits(run.mask(20))


def test_window_without_a_step_in_it_computes_everything():
    sigmas = np.linspace(1, 0.05, 10)
    assert Schedule(4, 1).within(sigmas, start_sigma=0.5, end_sigma=0.6).mask(10).all()
    assert Schedule(4, 1).within(sigmas, start_sigma=0.01, end_sigma=0.0).mask(10).all()


def all_masks(steps, budget, warmup):
    for chosen in itertools.combinations(range(warmup, steps), budget - warmup):
        mask = np.zeros(steps, dtype=bool)
        mask[:warmup] = True
        mask[list(chosen)] = True
        yield mask


def mask_cost(mask, cost):
    """Total gap cost of a mask, inf when a gap is longer than the table allows."""
    computed = list(np.flatnonzero(mask)) + [len(mask)]
    gaps = [(a, b - a - 1) for a, b in zip(computed, computed[1:])]
    return sum(cost[a, g] if g < cost.shape[1] else np.inf for a, g in gaps)


def test_calibrated_mask_is_the_cheapest_within_budget():
    rng = np.random.default_rng(0)
    steps, max_gap = 11, 4
    cost = np.cumsum(rng.uniform(0, 1, (steps, max_gap + 1)), axis=1)  # longer gaps cost more
    cost[:, 0] = 0
    for budget in (4, 5, 7):
        mask = calibrated_mask(cost, budget, min_warmup=2)
        assert mask[:2].all() and mask.sum() <= budget
        best = min(mask_cost(m, cost) for m in all_masks(steps, budget, 2))
        assert mask_cost(mask, cost) == pytest.approx(best)


def test_calibrated_mask_with_full_budget_computes_everything():
    cost = np.ones((6, 3))
    cost[:, 0] = 0
    assert calibrated_mask(cost, 6, min_warmup=1).all()


def test_calibrated_mask_refuses_a_budget_below_the_warmup():
    with pytest.raises(ValueError):
        calibrated_mask(np.zeros((6, 3)), 2, min_warmup=3)


def fast_start_trajectory(steps=30, rows=4, channels=24, seed=0):
    """Residuals that change fast early (a decaying transient) and slowly later."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, steps)[:, None, None]
    rate, level, drift = (rng.uniform(6, 12, (1, rows, channels)), rng.normal(0, 1, (1, rows, channels)),
                          rng.normal(0, 1, (1, rows, channels)))
    values = level + drift * t + np.exp(-rate * t) * np.cos(9 * t + level)
    return np.linspace(1, 0.02, steps), values.astype(np.float32), np.zeros(channels, dtype=int)


def test_calibrated_mask_beats_the_uniform_one_where_early_steps_change_fast():
    sigmas, values, labels = fast_start_trajectory()
    uniform = Schedule(interval=4, warmup=MAX_HISTORY).mask(len(sigmas))
    cost = selection.gap_costs(values, labels, sigmas, MAX_HISTORY, max_gap=6)
    calibrated = calibrated_mask(cost, int(uniform.sum()), MAX_HISTORY)
    assert calibrated.sum() <= uniform.sum()

    def probe_error(mask):  # summed over predicted steps, the map selected for this mask
        table = selection.solver_errors(values, labels, selection.step_weights_for(mask, sigmas))
        return selection.total_error(table, selection.select(table)) * np.count_nonzero(~mask)

    assert probe_error(calibrated) < 0.5 * probe_error(uniform)
    # early steps change fastest, so the calibrated mask computes more of them
    half = len(sigmas) // 2
    assert calibrated[:half].sum() > uniform[:half].sum()

