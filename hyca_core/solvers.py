"""The solver pool S of HyCa (paper Sec. 3.2, eq. 4; App. A.2.2 eqs. 16-26; App. A.6 eqs. 27-33).

Every member predicts a cached block residual F at a future time from the residuals of the
last few full computations.  All members are linear in the history, so each one is reduced to
a weight vector over the history (oldest first) that depends only on the times involved; a
solver map then turns into per-channel coefficients and prediction is one weighted sum.

Notation used in the docstrings: history values F_0..F_n at strictly monotone times
t_0..t_n (n = history - 1, any direction, non-uniform), target T beyond t_n, h = T - t_n.
Secant slopes Delta_j = (F_j - F_{j-1}) / (t_j - t_{j-1}) are placed at the RIGHT endpoint
t_j, the paper's convention in A.6 ("Delta_n plays the role of f(tau_n)").  Because that
placement is O(h) off the midpoint where a secant slope is accurate, every slope-based member
(ab*, rk2, bdf*, am*, taylorseer*) reproduces polynomials of degree 1 only, whatever its
nominal order; the ``order`` field records that exactness degree.  This is also what keeps
the pool diverse: an m-point linear predictor exact for degree m-1 is unique (the Lagrange
extrapolant, i.e. taylor{m-1}), so with accurately placed slopes every 3-point member would
collapse onto taylor2.  Members with the same history differ in their O(h^2) error constant
(on a uniform grid one step ahead: F_n + dF + c d2F [+ c3 d3F] with different c), which is
what the per-cluster selection exploits.

Documented coincidence: ab2, rk2 and taylorseer2 give identical weights on every grid (all
three are F_n + h*Delta_n + h^2/2 * (Delta_n - Delta_{n-1})/(t_n - t_{n-1})).  They stay
separate members because each name is a baseline users ask for by name.

Weights are obtained by applying each formula to the identity matrix: history slot j is the
basis vector e_j, so the formula's result is the weight vector.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable

import numpy as np

POOL_VERSION: int = 1
TIME_VARIABLES = ("step", "sigma")


def _lagrange(nodes, x) -> np.ndarray:
    """l_i(x): values at x of the Lagrange basis polynomials on `nodes`."""
    nodes = np.asarray(nodes, dtype=np.float64)
    out = np.ones(nodes.shape)
    for i, ti in enumerate(nodes):
        for j, tj in enumerate(nodes):
            if j != i:
                out[i] *= (x - tj) / (ti - tj)
    return out


def _lagrange_derivative(nodes, x) -> np.ndarray:
    """l_i'(x): derivatives at x of the Lagrange basis polynomials on `nodes`."""
    nodes = np.asarray(nodes, dtype=np.float64)
    out = np.zeros(nodes.shape)
    for i, ti in enumerate(nodes):
        for k, tk in enumerate(nodes):
            if k == i:
                continue
            term = 1.0 / (ti - tk)
            for j, tj in enumerate(nodes):
                if j != i and j != k:
                    term *= (x - tj) / (ti - tj)
            out[i] += term
    return out


@lru_cache(maxsize=None)
def _gauss_legendre(n: int):
    return np.polynomial.legendre.leggauss(n)  # exact up to degree 2n-1


def _integral(nodes, a, b) -> np.ndarray:
    """w_i with integral_a^b P(s) ds = sum_i w_i P(nodes_i) for P interpolating at `nodes`."""
    x, g = _gauss_legendre(len(nodes))
    return (b - a) / 2 * sum(gq * _lagrange(nodes, (a + b) / 2 + (b - a) / 2 * xq) for gq, xq in zip(g, x))


def _combine(coefficients, values):
    return sum(c * v for c, v in zip(coefficients, values))


def _slopes(F, t):
    """Secant slopes Delta_j (j = 1..n) and their positions t_j (right endpoints, A.6)."""
    return [(F[j] - F[j - 1]) / (t[j] - t[j - 1]) for j in range(1, len(t))], t[1:]


# ---------------------------------------------------------------------------------------
# Pool formulas: f(F, t, T) with F the history values (oldest first), t their times, T target.


def _reuse(F, t, T):
    """FORA reuse (paper eq. 2): y* = F_n."""
    return F[-1]


def _taylor(F, t, T):
    """Finite-difference Taylor extrapolation (TF, eq. 22 with derivatives from the cache):
    y* = P(T), P the Newton divided-difference polynomial through all p+1 history points,
    sum_k F[t_n..t_{n-k}] prod_{i<k} (T - t_{n-i}) (evaluated in the equal Lagrange form).
    Exact for degree p on any grid; on a uniform grid one step ahead taylor2 = 3F_n - 3F_{n-1}
    + F_{n-2}."""
    return _combine(_lagrange(t, T), F)


def _taylorseer(F, t, T):
    """TaylorSeer's truncated Taylor form: derivatives by recursive backward divided
    differences at the newest point, D^0_j = F_j, D^k_j = (D^{k-1}_j - D^{k-1}_{j-1}) /
    (t_j - t_{j-1}) (each level divided by the latest gap only, as TaylorSeer does), then
    y* = sum_k D^k_n h^k / k!.  Differs from the Newton polynomial for p >= 2 and, since
    D^1_n is a backward difference, is exact for degree 1 only (also on uniform grids)."""
    d, tt, y = list(F), t, F[-1]
    for k in range(1, len(F)):
        d = [(d[i] - d[i - 1]) / (tt[i] - tt[i - 1]) for i in range(1, len(d))]
        tt = tt[1:]  # level k lives at t_k..t_n
        y = y + d[-1] * (T - t[-1]) ** k / math.factorial(k)
    return y


def _adams_bashforth(F, t, T):
    """Adams-Bashforth (eqs. 20-21) on cached features, variable step:
    y* = F_n + integral_{t_n}^T P(s) ds, P interpolating the last q secant slopes at their
    right endpoints (q = history - 1).  Uniform grid, one step ahead: ab2 = F_n + h(3/2 Delta_n
    - 1/2 Delta_{n-1}) = 5/2 F_n - 2 F_{n-1} + 1/2 F_{n-2};  ab3 uses (23, -16, 5)/12."""
    slopes, where = _slopes(F, t)
    return F[-1] + _combine(_integral(where, t[-1], T), slopes)


def _rk2(F, t, T):
    """Discrete RK2 of A.6 (eqs. 27-32) generalised to any grid and any target:
    k1 = Delta_n, k2 = slope linearly extrapolated to T from (t_{n-1}, Delta_{n-1}) and
    (t_n, Delta_n), y* = F_n + h/2 (k1 + k2).  Uniform grid, one step ahead this is eq. 32,
    5/2 F_n - 2 F_{n-1} + 1/2 F_{n-2}.  Departure: the paper's eq. 33 (3/2 F_n - 1/2 F_{n-2})
    does not follow from eq. 32 and is not used.  Identical to ab2 on every grid (the
    trapezoidal rule integrates the linear slope model exactly)."""
    slopes, where = _slopes(F, t)
    k1 = slopes[-1]
    k2 = _combine(_lagrange(where[-2:], T), slopes[-2:])
    return F[-1] + (T - t[-1]) / 2 * (k1 + k2)


def _bdf(F, t, T):
    """BDF (eq. 25) in extrapolated-slope form: f* = P(T), P interpolating the last q secant
    slopes at their right endpoints (q = history - 1); y* solves the variable-step BDF-q
    relation Q'(T) = f*, Q the polynomial through (T, y*), (t_n, F_n), ..., (t_{n-q+1},
    F_{n-q+1}).  Linear in F.  Uniform grid, one step ahead: bdf2 = (8F_n - 7F_{n-1} +
    2F_{n-2})/3."""
    slopes, where = _slopes(F, t)
    f_star = _combine(_lagrange(where, T), slopes)
    q = len(slopes)
    d = _lagrange_derivative([T] + list(t[::-1][:q]), T)  # d[0] multiplies y*
    return (f_star - _combine(d[1:], F[::-1][:q])) / d[0]


def _adams_moulton(F, t, T, corrector_slopes):
    """Adams-Moulton (eq. 26) as predictor-corrector: the ab2 predictor gives y_p and the
    slope to the predicted point f* = (y_p - F_n)/h, placed at T; the corrector is
    y* = F_n + integral_{t_n}^T P(s) ds with P interpolating f* and the last
    `corrector_slopes` secant slopes (am2: trapezoid on Delta_n, f*; am3: quadratic on
    Delta_{n-1}, Delta_n, f*).  Uniform grid, one step ahead: am2 = (9F_n - 6F_{n-1} +
    F_{n-2})/4, am3 = (55F_n - 38F_{n-1} + 7F_{n-2})/24.  ab2 rather than Euler predicts for
    am2 because with Euler f* = Delta_n and am2 collapses to taylor1."""
    slopes, where = _slopes(F, t)
    f_star = (_adams_bashforth(F[-3:], t[-3:], T) - F[-1]) / (T - t[-1])
    nodes = list(where[-corrector_slopes:]) + [T]
    values = slopes[-corrector_slopes:] + [f_star]
    return F[-1] + _combine(_integral(nodes, t[-1], T), values)


@dataclass(frozen=True)
class Solver:
    """One member of the pool.  `id` and `name` are stable (stored in map files); `order` is
    the polynomial degree reproduced exactly on any grid; `formula` is the rule on values."""

    id: int
    name: str
    history: int
    order: int
    formula: Callable = field(repr=False, compare=False)

    def weights(self, times, target) -> np.ndarray:
        """Weights (float64, shape (history,), oldest first, summing to 1) such that the
        prediction at `target` is sum_j w_j F_j, F_j the residuals cached at `times`."""
        return self.batch_weights(np.asarray(times, dtype=np.float64)[None], [target])[0]

    def batch_weights(self, times, targets) -> np.ndarray:
        """`weights` of many grids at once: times (B, history), targets (B,) -> (B, history).

        The formulas broadcast: slot j of the history is the basis vector e_j as a (history, 1)
        column, every time a (B,) row, so each formula's result is the (history, B) weights."""
        t = np.asarray(times, dtype=np.float64)
        target = np.asarray(targets, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != self.history or target.shape != t.shape[:1]:
            raise ValueError(f"{self.name} needs {self.history} history times per target, got "
                             f"times of shape {t.shape} for targets of shape {target.shape}")
        gaps = np.diff(np.concatenate([t, target[:, None]], axis=1), axis=1)
        monotone = np.all(gaps > 0, axis=1) | np.all(gaps < 0, axis=1)
        if self.history > 1 and not monotone.all():
            bad = int(np.argmin(monotone))
            raise ValueError(f"{self.name}: times must be strictly monotone with the target "
                             f"beyond the last one, got times={t[bad].tolist()}, target={target[bad]}")
        basis = np.eye(self.history)[:, :, None]
        result = self.formula(basis, t.T, target)
        return np.ascontiguousarray(np.broadcast_to(result, (self.history, len(t))).T)


POOL: tuple[Solver, ...] = (
    Solver(0, "reuse", 1, 0, _reuse),
    Solver(1, "taylor1", 2, 1, _taylor),
    Solver(2, "taylor2", 3, 2, _taylor),
    Solver(3, "taylor3", 4, 3, _taylor),
    Solver(4, "taylorseer2", 3, 1, _taylorseer),
    Solver(5, "taylorseer3", 4, 1, _taylorseer),
    Solver(6, "ab2", 3, 1, _adams_bashforth),
    Solver(7, "ab3", 4, 1, _adams_bashforth),
    Solver(8, "rk2", 3, 1, _rk2),
    Solver(9, "bdf2", 3, 1, _bdf),
    Solver(10, "bdf3", 4, 1, _bdf),
    Solver(11, "am2", 3, 1, partial(_adams_moulton, corrector_slopes=1)),
    Solver(12, "am3", 3, 1, partial(_adams_moulton, corrector_slopes=2)),
)
MAX_HISTORY: int = max(s.history for s in POOL)

_BY_NAME = {s.name: s for s in POOL}
_BY_ID = {s.id: s for s in POOL}


def warmup_pool(warmup: int) -> tuple[Solver, ...]:
    """The pool members a schedule with this warm-up can use: those whose history it holds (step 0
    computes whatever the warm-up, so at least reuse)."""
    return tuple(s for s in POOL if s.history <= max(warmup, 1))


def solver(name_or_id) -> Solver:
    """Look a pool member up by its stable name or id."""
    found = (_BY_NAME.get(name_or_id) if isinstance(name_or_id, str)
             else _BY_ID.get(operator.index(name_or_id)))
    if found is None:
        known = ", ".join(f"{s.id}={s.name}" for s in POOL)
        raise KeyError(f"unknown solver {name_or_id!r} (pool v{POOL_VERSION}: {known})")
    return found


def time_axis(variable: str, steps, sigmas) -> np.ndarray:
    """Time values a solver extrapolates in: the step indices ("step") or the sigmas ("sigma")."""
    if variable == "step":
        return np.asarray(steps, dtype=np.float64)
    if variable == "sigma":
        return np.asarray(sigmas, dtype=np.float64)
    raise ValueError(f"unknown time variable {variable!r}; expected one of {TIME_VARIABLES}")
