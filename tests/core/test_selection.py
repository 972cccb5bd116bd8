import numpy as np
import pytest

from hyca_core import selection
from hyca_core.schedule import Schedule
from hyca_core.selection import Position
from hyca_core.solvers import MAX_HISTORY, POOL, TIME_VARIABLES, solver
from harness.synthetic import DYNAMICS, mixture

HELD_OUT = (11, 12, 13)


def uniform_mask(steps, interval):
    return Schedule(interval=interval, warmup=MAX_HISTORY).mask(steps)


class Case:
    """A probe (seed 0) and held-out trajectories (other seeds) under one caching schedule."""

    def __init__(self, steps=50, interval=2, shift=1.0, rows=8, channels_per_group=32):
        kw = dict(steps=steps, rows=rows, channels_per_group=channels_per_group, shift=shift)
        self.sigmas, self.values, self.labels = mixture(seed=0, **kw)
        self.mask = uniform_mask(steps, interval)
        self.step_weights = selection.step_weights_for(self.mask, self.sigmas)
        self.table = selection.solver_errors(self.values, self.labels, self.step_weights)
        self.held_out = [selection.solver_errors(*mixture(seed=s, **kw)[1:], self.step_weights)
                         for s in HELD_OUT]

    def held_out_error(self, assignment):
        return np.mean([selection.total_error(t, assignment) for t in self.held_out])


@pytest.fixture(scope="module")
def case():
    return Case()


def test_skip_steps_predict_each_step_from_its_last_computed_steps():
    sigmas = np.linspace(1, 0.1, 10)
    mask = Schedule(interval=3, warmup=4).mask(10)  # 1111001001
    skips = selection.skip_steps(mask, sigmas, "sigma", 3)
    assert [p.step for p in skips] == [4, 5, 7, 8]
    assert skips[2].history == (2, 3, 6)
    np.testing.assert_array_equal(skips[2].times, sigmas[[2, 3, 6]])
    assert skips[2].target == sigmas[7]
    # offset since the last full step, and the gaps of the last MAX_HISTORY computed steps
    assert skips[3].position == Position(2, (1, 1, 3))  # computed 1, 2, 3, 6 (MAX_HISTORY = 4)
    assert skips[0].position.offset == 1
    with pytest.raises(ValueError, match="warm-up"):
        selection.skip_steps(mask, sigmas, "step", 5)


def test_errors_are_the_direct_prediction_errors():
    rng = np.random.default_rng(1)
    steps, clusters = 14, 3
    values = rng.normal(size=(steps, 3, 12)).cumsum(axis=0).astype(np.float32)
    labels = rng.integers(0, clusters, 12)
    sigmas = np.linspace(1, 0.05, steps) ** 2
    mask = uniform_mask(steps, 3)
    table = selection.solver_errors(values, labels, selection.step_weights_for(mask, sigmas))
    for p, v, c, k in [(0, 0, 0, 0), (2, 1, 1, 3), (9, 1, 2, 5), (12, 0, 1, 2)]:
        s = POOL[p]
        skip = selection.skip_steps(mask, sigmas, TIME_VARIABLES[v], s.history)[k]
        w = s.weights(skip.times, skip.target)
        x = values[..., labels == c].astype(np.float64)
        error = np.sum((np.tensordot(w, x[list(skip.history)], 1) - x[skip.step]) ** 2)
        assert table.errors[p, v, c, k] == pytest.approx(error / (np.sum(x**2) / steps), rel=1e-7)


def test_each_group_gets_the_solver_that_is_truly_best_for_it(case):
    chosen = selection.select(case.table).default
    truth = np.mean([t.errors.mean(axis=-1) for t in case.held_out], axis=0)  # (P, V, C)
    pool_index = {s.id: i for i, s in enumerate(POOL)}
    for c in range(len(DYNAMICS)):
        error = truth[pool_index[chosen.solver[c]], chosen.variable[c], c]
        assert error <= 1.05 * truth[..., c].min() + 1e-12, DYNAMICS[c]
    # known answers: a cubic in sigma is extrapolated exactly by a cubic (in sigma, or in the step
    # index, which is affine in sigma on this uniform grid), and the best guess of a random
    # walk's next value is its last one
    poly, walk = DYNAMICS.index("polynomial"), DYNAMICS.index("random_walk")
    assert solver(chosen.solver[poly]).order >= 3
    assert truth[pool_index[chosen.solver[poly]], chosen.variable[poly], poly] < 1e-10
    assert solver(chosen.solver[walk]).name == "reuse"
    assert len(set(zip(chosen.solver, chosen.variable))) >= 3  # a hybrid indeed


def test_hybrid_map_beats_every_single_solver_on_held_out_trajectories(case):
    hybrid = case.held_out_error(selection.select(case.table))
    singles = [case.held_out_error(selection.single(s.id, v, len(DYNAMICS)))
               for s in POOL for v in TIME_VARIABLES]
    assert hybrid < 0.7 * min(singles)


@pytest.mark.parametrize("steps,interval,shift", [(30, 3, 1.0), (50, 4, 3.0)])
def test_per_position_selection_is_at_least_as_good_as_global(steps, interval, shift):
    case = Case(steps, interval, shift)
    per_position = selection.select(case.table, per_position=True)
    assert case.held_out_error(per_position) <= case.held_out_error(selection.select(case.table))
    assert {p.offset for p in per_position.by_position} == set(range(1, interval))


@pytest.mark.parametrize("steps,interval,shift,rows,channels",
                         [(50, 3, 1.0, 8, 32), (30, 3, 3.0, 2, 4), (20, 2, 1.0, 2, 4)])
def test_fitted_weights_beat_pool_selection_on_held_out_trajectories(steps, interval, shift, rows,
                                                                     channels):
    case = Case(steps, interval, shift, rows, channels)
    chosen = selection.select(case.table, per_position=True)
    assert case.held_out_error(selection.fit(case.table, chosen)) < 0.95 * case.held_out_error(chosen)


def test_shrinkage_keeps_a_small_probe_from_overfitting():
    """The default ridge strength was chosen on held-out data: on a small probe (2 rows, 4
    channels per group) the unshrunk least-squares fit is worse than the pool solver it
    corrects, the default one better."""
    case = Case(steps=20, interval=2, rows=2, channels_per_group=4)
    chosen = selection.select(case.table, per_position=True)
    pool_error = case.held_out_error(chosen)
    assert case.held_out_error(selection.fit(case.table, chosen, lam=0.0)) > pool_error
    assert case.held_out_error(selection.fit(case.table, chosen)) < pool_error
    # and a very strong ridge gives back the pool solver
    strong = selection.fit(case.table, chosen, lam=1e9)
    assert case.held_out_error(strong) == pytest.approx(pool_error, rel=1e-6)


def test_coefficients_of_a_single_cluster_map_are_the_solvers_weights():
    steps, channels = 24, 5
    sigmas = np.linspace(1, 0.04, steps) ** 1.5  # non-uniform
    mask = uniform_mask(steps, 4)
    for s in (solver("taylor2"), solver("am2"), solver("reuse")):
        single = selection.single(s.id, "sigma", 1)
        coeffs = selection.coefficients(single, np.zeros(channels, dtype=int),
                                        selection.step_weights_for(mask, sigmas))
        skips = selection.skip_steps(mask, sigmas, "sigma", s.history)
        assert sorted(coeffs) == [p.step for p in skips]
        for p in skips:
            expected = s.weights(p.times, p.target)
            assert coeffs[p.step].shape == (s.history, channels) and coeffs[p.step].dtype == np.float32
            np.testing.assert_allclose(coeffs[p.step], np.repeat(expected[:, None], channels, 1), rtol=1e-6)


def test_coefficients_predict_with_the_error_the_map_was_measured_with(case):
    """Scattering clusters to channels, positions and fitted corrections: predicting the probe
    with the coefficient matrices gives exactly the error `total_error` reports."""
    assignment = selection.fit(case.table, selection.select(case.table, per_position=True))
    coeffs = selection.coefficients(assignment, case.labels, case.step_weights)
    x = case.values.astype(np.float64)
    computed = np.flatnonzero(case.mask)
    errors = []
    for step, c in coeffs.items():
        history = computed[computed < step][-len(c):]
        errors.append(np.sum((np.einsum("md,mrd->rd", c, x[history]) - x[step]) ** 2))
    measured = np.mean(errors) / (np.sum(x**2) / len(x))
    assert measured == pytest.approx(selection.total_error(case.table, assignment), rel=1e-4)


def test_compact_sample_keeps_the_cluster_grams():
    sigmas, values, labels = mixture(steps=20, rows=4, channels_per_group=8)
    gram = selection.cluster_gram(values, labels, 4)
    full = selection.compact_sample(selection.cluster_gram(values, labels), sigmas, per_cluster=20)
    series = full.series.astype(np.float64)
    np.testing.assert_allclose(np.einsum("cnt,cnu->ctu", series, series), gram,
                               rtol=1e-4, atol=1e-4 * gram.max())
    compact = selection.compact_sample(selection.cluster_gram(values, labels), sigmas, per_cluster=6)
    assert compact.series.shape == (4, 6, 20)


@pytest.mark.parametrize("steps,interval", [(20, 2), (30, 3)])
def test_refit_from_a_50_step_probe_serves_shorter_schedules(steps, interval):
    kw = dict(rows=8, channels_per_group=32)
    sigmas, values, labels = mixture(seed=0, steps=50, **kw)
    sample = selection.compact_sample(selection.cluster_gram(values, labels), sigmas)
    direct = Case(steps, interval, **kw)  # a probe run at the new schedule itself
    chosen = selection.select(direct.table, per_position=True)
    refitted = selection.refit(sample, direct.step_weights)
    assert direct.held_out_error(refitted) <= 1.1 * direct.held_out_error(selection.fit(direct.table, chosen))
    # plain selection transfers too
    reselected = selection.refit(sample, direct.step_weights, lam=None)
    assert direct.held_out_error(reselected) <= 1.1 * direct.held_out_error(chosen)
