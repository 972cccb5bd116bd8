import numpy as np
import pytest
import scipy.fft

from hyca_core.indicators import (
    INDICATOR_NAMES,
    LOG_SCALED,
    descriptor_matrix,
    indicators,
)

COL = {name: i for i, name in enumerate(INDICATOR_NAMES)}


def series(*rows):
    """(S, R, 1) values from R per-row sequences of one channel."""
    return np.stack([np.asarray(r, dtype=np.float32) for r in rows], axis=1)[:, :, None]


def test_names_follow_the_paper():
    assert INDICATOR_NAMES == (
        "d1", "d2", "d3", "curvature_ratio", "jerk_ratio", "direction_consistency",
        "relative_change", "energy", "low_freq_ratio", "spectral_flatness")


def test_linear_ramp():
    k = np.arange(6)
    f = np.stack([2 * k + 1, 3 - k], axis=1)              # f_k over two rows, step (2, -1)
    out = indicators(series(f[:, 0], f[:, 1]))[0]
    norms = np.linalg.norm(f, axis=1)
    assert out[COL["d1"]] == pytest.approx(np.sqrt(5))
    assert out[COL["d2"]] == 0 and out[COL["d3"]] == 0
    assert out[COL["curvature_ratio"]] == 0 and out[COL["jerk_ratio"]] == 0
    assert out[COL["direction_consistency"]] == pytest.approx(1.0)
    assert out[COL["relative_change"]] == pytest.approx(5 * np.sqrt(5) / norms[:-1].sum())
    assert out[COL["energy"]] == pytest.approx(norms.mean())


def test_quadratic_averages_each_indicator_where_defined():
    k = np.arange(5.0)
    out = indicators(series(k**2 + 1))[0]          # d1_k = 2k-1 (k >= 1), d2 = 2, d3 = 0
    d1 = 2 * k[1:] - 1
    assert out[COL["d1"]] == pytest.approx(d1.mean())
    assert out[COL["d2"]] == pytest.approx(2.0)
    assert out[COL["d3"]] == 0
    # ratios: per-step d2_k / d1_k (k >= 2) averaged with weights d1_k
    assert out[COL["curvature_ratio"]] == pytest.approx(3 * 2 / d1[1:].sum())
    assert out[COL["relative_change"]] == pytest.approx(d1.sum() / (k[:-1] ** 2 + 1).sum())
    assert out[COL["energy"]] == pytest.approx(np.mean(k**2 + 1))


def test_ratios_ignore_steps_that_barely_move():
    # A channel that settles: after the transient its float16 recording only flickers by
    # one rounding step. Plain per-step ratio means would be ruled by 0/0-like steps.
    k = np.arange(20.0)
    curve = 100.0 + 8.0 * np.exp(-k)
    values = series(curve, 0.5 * curve).astype(np.float16)
    out = indicators(values)[0]
    # exact decay by e per step: d2_k / d1_k = d3_k / d2_k = e - 1, successive steps aligned
    assert out[COL["curvature_ratio"]] == pytest.approx(np.e - 1, rel=0.02)
    assert out[COL["jerk_ratio"]] == pytest.approx(np.e - 1, rel=0.05)
    assert out[COL["direction_consistency"]] == pytest.approx(1.0, abs=0.01)


def test_alternating_sign():
    c = np.array([3.0, 4.0])                       # |c| = 5
    f = np.array([(-1) ** k * c for k in range(8)])
    out = indicators(series(f[:, 0], f[:, 1]))[0]
    assert out[COL["direction_consistency"]] == pytest.approx(-1.0)
    assert out[COL["d1"]] == pytest.approx(10.0)
    assert out[COL["d2"]] == pytest.approx(20.0)
    assert out[COL["d3"]] == pytest.approx(40.0)
    assert out[COL["curvature_ratio"]] == pytest.approx(2.0)
    assert out[COL["jerk_ratio"]] == pytest.approx(2.0)
    assert out[COL["energy"]] == pytest.approx(5.0)
    assert out[COL["low_freq_ratio"]] < 0.1       # all power near the top frequency


def test_constant_has_no_dynamics_and_all_power_at_dc():
    out = indicators(np.full((10, 3, 1), 2.0, dtype=np.float32))[0]
    for name in ("d1", "d2", "d3", "curvature_ratio", "jerk_ratio",
                 "direction_consistency", "relative_change"):
        assert out[COL[name]] == 0, name
    assert out[COL["energy"]] == pytest.approx(2.0 * np.sqrt(3))
    assert out[COL["low_freq_ratio"]] == pytest.approx(1.0)
    assert out[COL["spectral_flatness"]] < 1e-6


def test_zero_channel_is_finite():
    out = indicators(np.zeros((6, 2, 1), dtype=np.float32))[0]
    assert np.isfinite(out).all()


def test_low_frequency_cosine_versus_white_noise():
    steps, rows = 40, 256
    rng = np.random.default_rng(0)
    k = np.arange(steps)[:, None]
    # DCT-II basis function 1, with a random amplitude per row
    cosine = np.cos(np.pi * (k + 0.5) / steps) * rng.uniform(0.5, 2.0, rows)
    noise = rng.normal(size=(steps, rows))
    out = indicators(np.stack([cosine, noise], axis=2).astype(np.float32))
    assert out[0, COL["low_freq_ratio"]] == pytest.approx(1.0, abs=1e-6)
    assert out[0, COL["spectral_flatness"]] < 1e-3
    assert out[1, COL["low_freq_ratio"]] == pytest.approx(0.2, abs=0.05)  # 8 of 40 bins
    assert out[1, COL["spectral_flatness"]] > 0.9


def test_ratios_and_spectra_do_not_depend_on_scale():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(12, 4, 5)).cumsum(axis=0).astype(np.float32)
    small, large = indicators(values * 1e-3), indicators(values * 1e3)
    free = [COL[n] for n in INDICATOR_NAMES if n not in LOG_SCALED]
    np.testing.assert_allclose(small[:, free], large[:, free], rtol=1e-4)
    scaled = [COL[n] for n in LOG_SCALED]
    np.testing.assert_allclose(large[:, scaled], small[:, scaled] * 1e6, rtol=1e-4)


def test_channels_are_independent():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(9, 3, 6)).astype(np.float32)
    whole = indicators(values)
    np.testing.assert_allclose(indicators(values[:, :, 2:3]), whole[2:3], rtol=1e-6)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="steps >= 4"):
        indicators(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError):
        indicators(np.zeros((5, 2)))
    bad = np.ones((5, 2, 2))
    bad[2, 0, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        indicators(bad)


def test_descriptor_matrix_is_standardized():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(10, 4, 50)).cumsum(axis=0)
    values *= 10.0 ** rng.uniform(-2.5, 2.5, 50)  # five decades of channel magnitude
    desc = descriptor_matrix(values)
    assert desc.shape == (50, 10)
    np.testing.assert_allclose(desc.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(desc.std(axis=0), 1, rtol=1e-9)
    # magnitudes enter on a log scale: an affine map of log(raw)
    raw = indicators(values)
    for name in LOG_SCALED:
        log_raw = np.log(raw[:, COL[name]])
        assert np.corrcoef(log_raw, desc[:, COL[name]])[0, 1] == pytest.approx(1.0)


def test_descriptor_matrix_constant_columns_become_zero():
    k = np.arange(8.0)[:, None, None]
    slopes = np.arange(1.0, 6.0)[None, None, :]
    values = np.concatenate([k * slopes, -k * slopes], axis=1)   # ramps: d2 = d3 = 0
    desc = descriptor_matrix(values)
    assert np.isfinite(desc).all()
    for name in ("d2", "d3", "curvature_ratio", "jerk_ratio", "direction_consistency"):
        np.testing.assert_array_equal(desc[:, COL[name]], 0.0)


def test_many_rows_match_a_direct_computation():
    # more rows than one slice holds: the slices' sums must add up
    rng = np.random.default_rng(5)
    values = rng.normal(size=(10, 40, 6)).astype(np.float32)
    out = indicators(values)
    d1 = np.linalg.norm(np.diff(values, axis=0), axis=1).mean(axis=0)
    energy = np.linalg.norm(values, axis=1).mean(axis=0)
    power = (scipy.fft.dct(values.astype(np.float64), norm="ortho", axis=0) ** 2).mean(axis=1)
    diff = np.diff(values.astype(np.float64), axis=0)
    dots = np.einsum("srd,srd->sd", diff[1:], diff[:-1])  # successive first differences
    norms = np.linalg.norm(diff, axis=1)
    np.testing.assert_allclose(out[:, COL["d1"]], d1, rtol=1e-5)
    np.testing.assert_allclose(out[:, COL["energy"]], energy, rtol=1e-5)
    np.testing.assert_allclose(out[:, COL["direction_consistency"]],
                               dots.sum(axis=0) / (norms[1:] * norms[:-1]).sum(axis=0), atol=1e-6)
    np.testing.assert_allclose(out[:, COL["low_freq_ratio"]],
                               power[:2].sum(axis=0) / power.sum(axis=0), rtol=1e-4)


def test_float64_input_is_computed_in_float64():
    k = np.arange(6.0)[:, None, None]
    values = 1e9 + k * np.ones((1, 2, 1))       # steps of 1 on top of 1e9: lost in float32
    assert indicators(values)[0, COL["d1"]] == pytest.approx(np.sqrt(2))
