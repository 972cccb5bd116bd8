import itertools

import numpy as np
import pytest

from hyca_core import selection
from hyca_core.schedule import AdaptiveGate, Schedule, calibrated_mask, speedup
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
        table = selection.solver_errors(values, labels, selection.plan_schedule(mask, sigmas))
        return selection.total_error(table, selection.select(table)) * np.count_nonzero(~mask)

    assert probe_error(calibrated) < 0.5 * probe_error(uniform)
    # early steps change fastest, so the calibrated mask computes more of them
    half = len(sigmas) // 2
    assert calibrated[:half].sum() > uniform[:half].sum()


def test_gate_predicts_while_the_accumulated_error_stays_within_tolerance():
    gate = AdaptiveGate(tolerance=0.1, max_skip=10)
    decisions = [gate.decide(e) for e in (0.04, 0.04, 0.04, 0.01, 0.05)]
    # 0.04, 0.08 pass; 0.12 computes and resets; then 0.01, 0.06 pass
    assert decisions == [False, False, True, False, False]


def test_gate_never_skips_more_than_max_skip_in_a_row():
    gate = AdaptiveGate(tolerance=1.0, max_skip=2)
    assert [gate.decide(0.0) for _ in range(7)] == [False, False, True, False, False, True, False]


def test_gate_computes_without_a_prediction_or_when_forced_and_then_restarts():
    gate = AdaptiveGate(tolerance=0.1, max_skip=5)
    assert gate.decide(None)
    assert not gate.decide(0.09)
    assert gate.decide(0.0, forced=True)
    assert not gate.decide(0.09)  # the forced step reset the accumulated error
    assert gate.decide(float("nan"))
    gate.reset()
    assert not gate.decide(0.09)
