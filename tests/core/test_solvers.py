import itertools
import math

import numpy as np
import pytest

from hyca_core.solvers import MAX_HISTORY, POOL, POOL_VERSION, TIME_VARIABLES, solver, time_axis

RNG_SEEDS = range(5)
DOCUMENTED_IDENTICAL = {"ab2", "rk2", "taylorseer2"}


def random_grid(rng, history, k, spacing, direction):
    """Times of `history` full steps `spacing` steps apart and a target k steps after the
    last, mapped through a random monotone (non-uniform) schedule; returns (times, target)."""
    steps = np.arange(history) * spacing
    steps = np.append(steps, steps[-1] + k)
    schedule = np.cumsum(rng.uniform(0.2, 1.8, steps[-1] + 1)) / 10
    t = direction * schedule[steps]
    return t[:-1], t[-1]


@pytest.mark.parametrize("s", POOL, ids=lambda s: s.name)
@pytest.mark.parametrize("direction", [1, -1])
def test_reproduces_polynomials_of_its_order(s, direction):
    rng = np.random.default_rng(s.id)
    for seed, k, spacing in itertools.product(RNG_SEEDS, range(1, 6), (1, 2, 5)):
        times, target = random_grid(rng, s.history, k, spacing, direction)
        w = s.weights(times, target)
        assert w.dtype == np.float64 and w.shape == (s.history,)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        poly = np.polynomial.Polynomial(rng.normal(size=s.order + 1))
        assert w @ poly(times) == pytest.approx(poly(target), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("s", [s for s in POOL if s.history > s.order + 1], ids=lambda s: s.name)
def test_order_field_is_the_exact_degree(s):
    times, target = random_grid(np.random.default_rng(1), s.history, 2, 1, 1)
    monomial = times ** (s.order + 1)
    assert abs(s.weights(times, target) @ monomial - target ** (s.order + 1)) > 1e-6


@pytest.mark.parametrize("s", [s for s in POOL if s.order > 0], ids=lambda s: s.name)
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("f", [np.exp, np.sin], ids=["exp", "sin"])
def test_converges_at_its_order(s, direction, f):
    """Local error on a smooth function shrinks like h^(order+1) under grid refinement."""
    pattern = np.cumsum(np.random.default_rng(7).uniform(0.5, 1.5, s.history + 1))
    errors = []
    for h in (0.04, 0.02, 0.01):
        t = direction * (1.1 + h * pattern)  # no derivative of exp or sin vanishes near here
        errors.append(abs(s.weights(t[:-1], t[-1]) @ f(t[:-1]) - f(t[-1])))
    observed = np.log2(np.array(errors[:-1]) / errors[1:])
    assert observed == pytest.approx(s.order + 1, abs=0.25)


def test_uniform_textbook_values():
    t = np.array([3.0, 5.0, 7.0, 9.0])  # uniform, spacing 2, one slot ahead
    w = lambda name: solver(name).weights(t[-solver(name).history:], 11.0)  # noqa: E731
    np.testing.assert_allclose(w("reuse"), [1])
    np.testing.assert_allclose(w("taylor1"), [-1, 2])
    np.testing.assert_allclose(w("taylor2"), [1, -3, 3])
    np.testing.assert_allclose(w("taylor3"), [-1, 4, -6, 4])
    np.testing.assert_allclose(w("rk2"), [1 / 2, -2, 5 / 2])  # paper eq. 32, not eq. 33
    np.testing.assert_allclose(w("taylorseer2"), [1 / 2, -2, 5 / 2])
    np.testing.assert_allclose(w("taylorseer3"), [-1 / 6, 1, -5 / 2, 8 / 3])
    np.testing.assert_allclose(w("bdf2"), np.array([2, -7, 8]) / 3)
    np.testing.assert_allclose(w("am2"), np.array([1, -6, 9]) / 4)
    np.testing.assert_allclose(w("am3"), np.array([7, -38, 55]) / 24)
    # Adams-Bashforth: textbook coefficients applied to secant slopes, h = 2.
    slope = lambda j: np.eye(len(t))[j] - np.eye(len(t))[j - 1]  # h * Delta_j  # noqa: E731
    ab2 = np.eye(4)[3] + 3 / 2 * slope(3) - 1 / 2 * slope(2)
    ab3 = np.eye(4)[3] + (23 * slope(3) - 16 * slope(2) + 5 * slope(1)) / 12
    np.testing.assert_allclose(w("ab2"), ab2[1:])
    np.testing.assert_allclose(w("ab3"), ab3)


def test_adams_bashforth_k_steps_ahead_of_spacing_n():
    # Slopes Delta_n at 0 and Delta_{n-1} at -N, integrated over [0, k]:
    # y* = F_n + k Delta_n + k^2/(2N) (Delta_n - Delta_{n-1}), Delta = difference / N.
    for spacing, k in itertools.product((1, 2, 4), (1, 2, 3, 5)):
        d_n, d_n1 = np.array([0, -1, 1]) / spacing, np.array([-1, 1, 0]) / spacing
        expected = np.array([0, 0, 1]) + k * d_n + k * k / (2 * spacing) * (d_n - d_n1)
        times = np.array([-2.0, -1.0, 0.0]) * spacing
        np.testing.assert_allclose(solver("ab2").weights(times, float(k)), expected, atol=1e-12)


def test_taylorseer_matches_its_incremental_algorithm():
    """Replays TaylorSeer's cache update (factor i+1 = (new factor i - old factor i) /
    distance between the last two full steps) and its evaluation sum_i f_i x^i / i!."""
    rng = np.random.default_rng(3)
    for name, order in (("taylorseer2", 2), ("taylorseer3", 3)):
        times = np.cumsum(rng.uniform(0.5, 2.0, order + 1))
        target = times[-1] + 1.7
        values = rng.normal(size=order + 1)
        factors = {}
        for i, (t, v) in enumerate(zip(times, values)):
            new = {0: v}
            for level in range(order):
                if level not in factors or i == 0:
                    break
                new[level + 1] = (new[level] - factors[level]) / (t - times[i - 1])
            factors = new
        x = target - times[-1]
        expected = sum(f * x**i / math.factorial(i) for i, f in factors.items())
        assert solver(name).weights(times, target) @ values == pytest.approx(expected, rel=1e-12)


def test_formula_on_values_equals_weights():
    rng = np.random.default_rng(4)
    for s in POOL:
        times, target = random_grid(rng, s.history, 3, 2, -1)
        values = rng.normal(size=(s.history, 5))
        np.testing.assert_allclose(s.formula(values, times, target),
                                   s.weights(times, target) @ values, rtol=1e-10, atol=1e-12)


def test_members_are_distinct_except_documented():
    times, target = random_grid(np.random.default_rng(5), MAX_HISTORY, 3, 2, 1)
    for a, b in itertools.combinations(POOL, 2):
        if a.history != b.history:
            continue
        same = np.allclose(a.weights(times[-a.history:], target), b.weights(times[-b.history:], target))
        assert same == ({a.name, b.name} <= DOCUMENTED_IDENTICAL), (a.name, b.name)


def test_pool_registry():
    assert POOL_VERSION == 1
    assert len({s.id for s in POOL}) == len({s.name for s in POOL}) == len(POOL)
    assert MAX_HISTORY == max(s.history for s in POOL) == 4
    for s in POOL:
        assert solver(s.name) is s and solver(s.id) is s and solver(np.int64(s.id)) is s
    for bad in ("nope", 999):
        with pytest.raises(KeyError, match="unknown solver"):
            solver(bad)


def test_weights_validate_input():
    s = solver("taylor2")
    with pytest.raises(ValueError, match="needs 3"):
        s.weights([0.0, 1.0], 2.0)
    with pytest.raises(ValueError, match="monotone"):
        s.weights([0.0, 2.0, 1.0], 3.0)
    with pytest.raises(ValueError, match="monotone"):
        s.weights([0.0, 1.0, 2.0], 1.5)  # target not beyond the last time


def test_time_axis():
    assert TIME_VARIABLES == ("step", "sigma")
    np.testing.assert_array_equal(time_axis("step", [0, 2, 4], [1.0, 0.5, 0.1]), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(time_axis("sigma", [0, 2, 4], [1.0, 0.5, 0.1]), [1.0, 0.5, 0.1])
    assert time_axis("step", [0, 1], None).dtype == np.float64
    with pytest.raises(ValueError, match="time variable"):
        time_axis("timestep", [0], [1.0])
