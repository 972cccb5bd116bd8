"""The ten temporal indicators HyCa uses to describe each channel (paper, appendix A.2.1).

Channel ``d`` of a recorded trajectory ``values[S, R, D]`` is read as a sequence of feature
vectors ``f_k = values[k, :, d]`` over the R sampled rows, one per step k. Norms and dot
products are taken over those rows; per-step quantities are averaged over the steps where
they are defined (d1 needs 2 steps, d2 three, d3 four), the four ratios with their
denominators as weights (see :func:`_weighted_ratio`).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
import scipy.stats

INDICATOR_NAMES: tuple[str, ...] = (
    "d1",                     # ||f_k - f_{k-1}||
    "d2",                     # ||f_k - 2 f_{k-1} + f_{k-2}||
    "d3",                     # ||f_k - 3 f_{k-1} + 3 f_{k-2} - f_{k-3}||
    "curvature_ratio",        # d2 / (d1 + eps)
    "jerk_ratio",             # d3 / (d2 + eps)
    "direction_consistency",  # cos angle between successive first differences
    "relative_change",        # d1 / (||f_{k-1}|| + eps)
    "energy",                 # ||f_k||
    "low_freq_ratio",         # DCT power in the lowest 20% of frequencies / total
    "spectral_flatness",      # geometric / arithmetic mean of the DCT power
)

# Magnitudes spread over orders of magnitude across channels (DiTs have a few "massive
# activation" channels); on a linear scale those few would take the whole standardized range
# and k-means would spend its clusters on them. On a log scale they differ by ratios.
LOG_SCALED: tuple[str, ...] = ("d1", "d2", "d3", "energy")

MIN_STEPS = 4  # d3 needs four steps
LOW_FREQ_FRACTION = 0.2

# Log-scaled values are clipped at a millionth of their column's largest: an exactly linear
# channel has d2 = 0 (log -inf), and near-zero values would otherwise become extreme outliers
# that k-means spends clusters on.
_LOG_RANGE = 1e-6

# A spread below a few float32 ulps of the column's magnitude is rounding noise, not
# information (indicators and their logs are O(1) quantities, hence the floor of 1).
_FLAT = 8 * np.finfo(np.float32).eps

# Rows per slice of the sums: at FLUX width, slices of 8 rows (5 MB temporaries) took less time
# than all 32 rows at once or 2 at a time (by how much: the README, "The algorithm's own costs").
_ROWS_PER_SLICE = 8


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(S, R, D) x (S, R, D) -> (S, D): dot products over rows."""
    return np.einsum("srd,srd->sd", a, b)


@functools.cache
def _dct_basis(steps: int, dtype: np.dtype) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``basis @ x`` transforms x along its first axis."""
    return scipy.fft.dct(np.eye(steps, dtype=dtype), type=2, norm="ortho", axis=0)


def _row_sums(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sums over the rows of ``x`` (S, r, D) of the products the indicators need.

    Returns ``||f_k||^2``, ``||diff1_k||^2``, ``||diff2_k||^2``, ``||diff3_k||^2`` (each over
    the steps where defined) and the DCT power per frequency, all (steps or frequencies, D)
    and restricted to these rows.

    The DCT is one matrix product with the DCT matrix: for series this short that is faster
    than scipy transforming each of the r x D series on its own (README, "The algorithm's own
    costs").
    """
    diff1 = x[1:] - x[:-1]
    diff2 = diff1[1:] - diff1[:-1]
    diff3 = diff2[1:] - diff2[:-1]
    steps = x.shape[0]
    coefficients = (_dct_basis(steps, x.dtype) @ x.reshape(steps, -1)).reshape(x.shape)
    return (_dot(x, x), _dot(diff1, diff1), _dot(diff2, diff2), _dot(diff3, diff3),
            _dot(coefficients, coefficients))


def _sums_over_rows(v: np.ndarray) -> list[np.ndarray]:
    """:func:`_row_sums` over all rows, slice by slice so that the temporaries stay small."""
    parts = [_row_sums(v[:, a:a + _ROWS_PER_SLICE]) for a in range(0, v.shape[1], _ROWS_PER_SLICE)]
    return [sum(same) for same in zip(*parts)]


def _weighted_ratio(numerator: np.ndarray, denominator: np.ndarray,
                    guard: np.ndarray) -> np.ndarray:
    """Per-step ratios averaged over steps with their denominators as weights.

    That is sum(numerator) / sum(denominator). A plain mean of the ratios would be ruled by
    steps whose denominator is at the noise floor: once a channel settles, float16 recording
    makes successive differences 0 or one rounding step, and ratios like d2 / d1 jump to
    huge values. Weighting by the denominator counts each step by how much actually moved.
    """
    return numerator.sum(axis=0) / (denominator.sum(axis=0) + guard)


def indicators(values: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Raw indicators, ``(S, R, D) -> (D, 10)`` in :data:`INDICATOR_NAMES` order.

    Spectral indicators use the orthonormal DCT-II along time of every (row, channel)
    series, with the power averaged over rows. Computed in float32 (float64 input stays
    float64).

    ``eps`` guards the divisions as in the paper, but relative to the channel's magnitude
    (its mean energy, or mean power for the spectra): it then only prevents 0/0 and never
    biases channels that are small in absolute terms, so every indicator except the four
    magnitudes is scale-free. A channel that is zero throughout gets 0 for every indicator
    except spectral flatness, which is 1 (its spectrum is flat).
    """
    v = np.asarray(values)
    v = np.ascontiguousarray(v, dtype=np.result_type(v.dtype, np.float32))
    if v.ndim != 3 or v.shape[0] < MIN_STEPS or v.shape[1] < 1 or v.shape[2] < 1:
        raise ValueError(f"values must be (steps >= {MIN_STEPS}, rows >= 1, channels >= 1), "
                         f"got shape {v.shape}")
    steps = v.shape[0]

    energy, d1, d2, d3, power = _sums_over_rows(v)
    # Successive first differences a = diff1_k, b = diff1_{k-1} have a - b = diff2_k, so
    # a.b = (|a|^2 + |b|^2 - |a - b|^2) / 2 needs no pass of its own over the data. It rounds
    # to float32 ulps of |a|^2 + |b|^2 instead of |a||b|: a cosine off by ~1e-7 (|a|/|b| + |b|/|a|).
    dots = (d1[1:] + d1[:-1] - d2) / 2
    # steps covered: energy k = 0..S-1, d1 k = 1.., dots and d2 k = 2.., d3 k = 3..
    energy, d1, d2, d3 = np.sqrt(energy), np.sqrt(d1), np.sqrt(d2), np.sqrt(d3)
    power /= v.shape[1]                                    # (S frequencies, D)
    mean_power = power.mean(axis=0)
    low = max(1, int(LOW_FREQ_FRACTION * steps))

    # Guards in norm and power units; the added eps keeps a zero channel's guard nonzero.
    mean_energy = energy.mean(axis=0)
    guard = eps * (mean_energy + eps)
    power_guard = eps * (mean_power + eps)
    columns = (
        d1.mean(axis=0),
        d2.mean(axis=0),
        d3.mean(axis=0),
        _weighted_ratio(d2, d1[1:], guard),
        _weighted_ratio(d3, d2[1:], guard),
        _weighted_ratio(dots, d1[1:] * d1[:-1], guard**2),
        _weighted_ratio(d1, energy[:-1], guard),
        mean_energy,
        power[:low].sum(axis=0) / (power.sum(axis=0) + power_guard),
        scipy.stats.gmean(power + power_guard, axis=0) / (mean_power + power_guard),
    )
    out = np.stack(columns, axis=1)
    if not np.isfinite(out).all():
        raise ValueError("indicators are not finite: the trajectory holds inf or NaN values")
    return out


def descriptor_matrix(values: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Clustering descriptors ``(D, 10)``: indicators, magnitudes log-scaled, standardized.

    Every column is shifted and scaled to zero mean and unit variance so each indicator
    weighs the same in k-means distances. A column that is constant (up to the float32
    rounding of the indicators) becomes all zeros rather than amplified rounding noise.
    """
    from sklearn.preprocessing import StandardScaler  # imported when first used, as in clustering.py

    raw = indicators(values, eps).astype(np.float64)
    for name in LOG_SCALED:
        column = raw[:, INDICATOR_NAMES.index(name)]
        floor = _LOG_RANGE * column.max() + np.finfo(np.float64).tiny
        column[:] = np.log(np.maximum(column, floor))
    flat = np.ptp(raw, axis=0) <= _FLAT * np.maximum(1.0, np.abs(raw).max(axis=0))
    descriptors = StandardScaler().fit_transform(raw)
    descriptors[:, flat] = 0.0
    return descriptors
