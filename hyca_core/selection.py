"""One-time choosing: which solver predicts each cluster of channels, measured on a probe.

Every error here comes from second moments. Predicting step s from history steps h with weights w
errs by ||sum_j w_j V[h_j] - V[s]||^2 = u^T G[i, i] u, with u = (w, -1), i = (h, s) and G the
(steps x steps) Gram matrix of a cluster's residuals over its rows and channels. One Gram per
cluster turns every (solver, time variable, skipped step) error and every least-squares fit into
products of matrices no larger than the history.

Beyond the paper:
- the choice can depend on the step's position in the caching schedule (`Position`);
- `fit` corrects the chosen solver's weights by ridge regression on the probe, still over the same
  history slots, so inference costs the same;
- `refit` re-selects for another schedule (20 or 30 steps from a 50-step probe) from a small
  `CompactSample` of the probe, interpolated in sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.interpolate import CubicSpline

from .solvers import MAX_HISTORY, POOL, TIME_VARIABLES, Solver, solver, time_axis

# Ridge strength of `fit`, relative to the mean eigenvalue of the normal matrix. Chosen on held-out
# synthetic trajectories (another seed): see tests/core/test_selection.py.
FIT_LAMBDA = 1e-2
# Principal series a map keeps per cluster (`compact_sample`), and so the most a map may hold.
SERIES_PER_CLUSTER = 24


class Position(NamedTuple):
    """Where a predicted step sits in the caching schedule."""

    offset: int  # steps since the last full step (1 = the step right after it)
    gaps: tuple[int, ...]  # distances between the last MAX_HISTORY computed steps: the history's
    # geometry, denser while it still holds warm-up steps


@dataclass(frozen=True)
class SkipStep:
    step: int
    history: tuple[int, ...]  # the computed steps it is predicted from, oldest first
    times: np.ndarray  # their times on the time variable's axis
    target: float  # the step's own time
    position: Position


def _skip_step(step: int, computed: np.ndarray, history: int, axis: np.ndarray) -> SkipStep:
    """`computed`: the steps computed before `step`, ascending."""
    if len(computed) < history:
        raise ValueError(
            f"step {step} follows {len(computed)} computed steps but its solvers need {history}: "
            "lengthen the warm-up"
        )
    used = computed[len(computed) - history :]
    gaps = tuple(int(g) for g in np.diff(computed[-MAX_HISTORY:]))
    return SkipStep(int(step), tuple(int(h) for h in used), axis[used], float(axis[step]),
                    Position(int(step - computed[-1]), gaps))


def skip_steps(mask: np.ndarray, sigmas: np.ndarray, variable: str, history: int) -> list[SkipStep]:
    """Each predicted step (mask False) with its last `history` computed steps, timed on `variable`.

    A solver predicts step p with weights `solver.weights(p.times[-solver.history:], p.target)`.
    """
    axis = time_axis(variable, np.arange(len(mask)), sigmas)
    computed = np.flatnonzero(mask)
    return [
        _skip_step(step, computed[computed < step], history, axis) for step in np.flatnonzero(~mask)
    ]


@dataclass(frozen=True)
class StepWeights:
    """The predicted steps of one schedule and every pool solver's weights for them.

    Weights depend on the schedule and sigmas only, so one StepWeights serves all blocks of a model.
    """

    sigmas: np.ndarray
    steps: np.ndarray  # (K,) predicted steps
    history: np.ndarray  # (K, m) computed steps each is predicted from, oldest first
    positions: tuple[Position, ...]  # (K,)
    pool: tuple[Solver, ...]
    variables: tuple[str, ...]
    weights: np.ndarray  # (P, V, K, m), right-aligned: shorter histories weigh the oldest slots 0


def _step_weights(sigmas: np.ndarray, pool: tuple[Solver, ...],
                  skips: dict[str, list[SkipStep]]) -> StepWeights:
    """`skips`: the same predicted steps timed on each variable."""
    first = next(iter(skips.values()))
    m = max(s.history for s in pool)
    V, K = len(skips), len(first)
    times = np.array([[s.times for s in steps] for steps in skips.values()]).reshape(V * K, m)
    targets = np.array([[s.target for s in steps] for steps in skips.values()]).reshape(V * K)
    weights = np.zeros((len(pool), V, K, m))
    for p, s in enumerate(pool):
        weights[p, ..., m - s.history :] = s.batch_weights(times[:, m - s.history :], targets).reshape(
            V, K, s.history)
    return StepWeights(
        sigmas=np.asarray(sigmas, dtype=np.float64),
        steps=np.array([s.step for s in first], dtype=int),
        history=np.array([s.history for s in first], dtype=int).reshape(len(first), m),
        positions=tuple(s.position for s in first),
        pool=tuple(pool),
        variables=tuple(skips),
        weights=weights,
    )


def step_weights_for(mask: np.ndarray, sigmas: np.ndarray, pool=POOL,
                     variables=TIME_VARIABLES) -> StepWeights:
    """The step weights of a caching schedule; the mask must give every predicted step the longest
    history in `pool` (warm-up >= that history)."""
    m = max(s.history for s in pool)
    return _step_weights(sigmas, tuple(pool), {v: skip_steps(mask, sigmas, v, m) for v in variables})


def cluster_gram(values: np.ndarray, labels: np.ndarray, clusters: int | None = None) -> np.ndarray:
    """(C, S, S) float64: G[c, t, u] = sum over rows and channels of cluster c of V[t] * V[u].

    clusters: C, by default one more than the largest label."""
    clusters = int(labels.max()) + 1 if clusters is None else clusters
    steps = values.shape[0]
    # channels grouped by cluster (one gather), then each cluster copied once into a contiguous
    # float64 (steps, rows x channels) block for the product. The indices are valid by
    # construction: mode="clip" skips take's bounds checks, which double its cost.
    order = np.argsort(labels, kind="stable")
    grouped = np.take(np.asarray(values), order, axis=2, mode="clip")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=clusters))])
    gram = np.zeros((clusters, steps, steps))
    for c in range(clusters):
        x = grouped[:, :, bounds[c] : bounds[c + 1]].astype(np.float64).reshape(steps, -1)
        gram[c] = x @ x.T
    return gram


def _energy(gram: np.ndarray) -> np.ndarray:
    """(C,) mean squared residual per step (summed over the cluster), the errors' yardstick."""
    return np.maximum(np.trace(gram, axis1=1, axis2=2) / gram.shape[1], np.finfo(float).tiny)


def _window_grams(gram: np.ndarray, step_weights: StepWeights) -> np.ndarray:
    """(C, K, m+1, m+1): each cluster's Gram over (history slots, predicted step) of each step."""
    idx = np.concatenate([step_weights.history, step_weights.steps[:, None]], axis=1)
    return gram[:, idx[:, :, None], idx[:, None, :]]


def _relative_errors(gram: np.ndarray, step_weights: StepWeights, weights: np.ndarray) -> np.ndarray:
    """weights (..., C, K, m) -> (..., C, K) squared error relative to each cluster's energy."""
    u = np.concatenate([weights, -np.ones(weights.shape[:-1] + (1,))], axis=-1)
    err = np.einsum("...cki,ckij,...ckj->...ck", u, _window_grams(gram, step_weights), u)
    return np.maximum(err, 0.0) / _energy(gram)[:, None]


@dataclass(frozen=True)
class ErrorTable:
    step_weights: StepWeights
    gram: np.ndarray  # (C, S, S) of the probe
    errors: np.ndarray  # (P, V, C, K) relative squared error of each pool solver on each variable

    @property
    def energy(self) -> np.ndarray:
        return _energy(self.gram)


def solver_errors(values: np.ndarray, labels: np.ndarray, step_weights: StepWeights,
                  clusters: int | None = None) -> ErrorTable:
    """Every pool solver's error on every cluster and predicted step of `step_weights`.

    values: (S, R, D) a block's residuals on the probe; labels: (D,) cluster of each channel. The
    error of a cluster is the squared prediction error over its rows and channels divided by its
    mean squared residual, so clusters of different scale compare.
    """
    gram = cluster_gram(values, labels, clusters)
    P, V, K, m = step_weights.weights.shape
    # the weights are the same for every cluster: per step, one product of the pool's (u u^T)
    # with all clusters' window Grams, u = (w, -1)
    u = np.concatenate([step_weights.weights, -np.ones((P, V, K, 1))], axis=-1)
    outer = (u[..., :, None] * u[..., None, :]).reshape(P * V, K, -1).transpose(1, 0, 2)
    window = _window_grams(gram, step_weights).reshape(len(gram), K, -1).transpose(1, 2, 0)
    err = np.matmul(outer, window).transpose(1, 2, 0).reshape(P, V, len(gram), K)
    return ErrorTable(step_weights, gram, np.maximum(err, 0.0) / _energy(gram)[:, None])


@dataclass(frozen=True)
class Choices:
    """One solver per cluster."""

    solver: np.ndarray  # (C,) pool solver id
    variable: np.ndarray  # (C,) index into TIME_VARIABLES
    correction: np.ndarray  # (C, MAX_HISTORY) fitted addition to the solver's weights, newest last


@dataclass(frozen=True)
class Assignment:
    """A block's solver map: per cluster (the paper), optionally refined per schedule position."""

    default: Choices
    by_position: dict[Position, Choices] = field(default_factory=dict)

    def choices(self, position: Position) -> Choices:
        return self.by_position.get(position, self.default)

    def solvers(self) -> tuple[Solver, ...]:
        """The pool solvers the map uses."""
        ids = {int(i) for ch in (self.default, *self.by_position.values()) for i in ch.solver}
        return tuple(solver(i) for i in sorted(ids))


def single(solver_id: int, variable: str, clusters: int) -> Assignment:
    """One solver for every cluster: the non-hybrid baseline (TaylorSeer-like caches)."""
    variable_index = TIME_VARIABLES.index(variable)
    return Assignment(_choices(np.full(clusters, solver_id), np.full(clusters, variable_index)))


def _choices(solver_ids: np.ndarray, variables: np.ndarray) -> Choices:
    return Choices(np.asarray(solver_ids, dtype=int), np.asarray(variables, dtype=int),
                   np.zeros((len(solver_ids), MAX_HISTORY)))


def _argmin(table: ErrorTable, mean_error: np.ndarray) -> Choices:
    """mean_error (P, V, C) -> the cheapest (solver, variable) of each cluster."""
    P, V, C = mean_error.shape
    p, v = np.divmod(mean_error.reshape(P * V, C).argmin(axis=0), V)
    return _choices([table.step_weights.pool[i].id for i in p],
                    [TIME_VARIABLES.index(table.step_weights.variables[i]) for i in v])


def select(table: ErrorTable, per_position: bool = False) -> Assignment:
    """The solver of least mean error per cluster, and per (cluster, position) if asked.

    Paper eq. 5: s_c* = argmin_{s in S} (1/|c|) sum_{d in c} ||F^(s,d)_{t+1} - F^(d)_{t+1}||^2, the
    sum running over the predicted steps; the pool here spans solvers x time variables.
    """
    default = _argmin(table, table.errors.mean(axis=-1))
    if not per_position:
        return Assignment(default)
    positions = table.step_weights.positions
    by_position = {
        pos: _argmin(table, table.errors[..., [p == pos for p in positions]].mean(axis=-1))
        for pos in dict.fromkeys(positions)
    }
    return Assignment(default, by_position)


def _map_weights(assignment: Assignment, step_weights: StepWeights,
                 corrected: bool = True) -> np.ndarray:
    """(C, K, m) the weights the map gives each cluster at each predicted step of `step_weights`."""
    pool_index = {s.id: i for i, s in enumerate(step_weights.pool)}
    var_index = {TIME_VARIABLES.index(v): i for i, v in enumerate(step_weights.variables)}
    K, m = step_weights.history.shape
    weights = np.empty((len(assignment.default.solver), K, m))
    for k, pos in enumerate(step_weights.positions):
        ch = assignment.choices(pos)
        p = [pool_index[int(i)] for i in ch.solver]
        v = [var_index[int(i)] for i in ch.variable]
        weights[:, k] = step_weights.weights[p, v, k]
        if corrected:
            weights[:, k] += ch.correction[:, MAX_HISTORY - m :]
    return weights


def map_errors(table: ErrorTable, assignment: Assignment) -> np.ndarray:
    """(C, K) relative squared error of the map on the table's trajectory and schedule."""
    return _relative_errors(table.gram, table.step_weights, _map_weights(assignment, table.step_weights))


def total_error(table: ErrorTable, assignment: Assignment) -> float:
    """The block's squared prediction error over all channels, relative to its mean squared
    residual, averaged over predicted steps."""
    energy = table.energy
    return float(energy @ map_errors(table, assignment).mean(axis=-1) / energy.sum())


def fit(table: ErrorTable, assignment: Assignment, lam: float = FIT_LAMBDA) -> Assignment:
    """Per cluster and position, least-squares corrections to the chosen solver's weights.

    Over the predicted steps k of a position, with H_k the history columns and y_k the true step:
        min_delta  sum_k ||H_k (w0_k + delta) - y_k||^2 + lam * scale * ||delta||^2,
    w0_k the pool solver's weights (they vary with the step's times), scale the mean eigenvalue of
    sum_k H_k^T H_k so lam is dimensionless. delta spans the solver's own history slots only.
    """
    step_weights = table.step_weights
    K, m = step_weights.history.shape
    base = _map_weights(assignment, step_weights, corrected=False)
    window = _window_grams(table.gram, step_weights)  # (C, K, m+1, m+1)
    positions = list(dict.fromkeys(step_weights.positions))
    # per (position, cluster): the normal equations over the position's steps, all slots at once
    member = np.array([[p == pos for p in step_weights.positions] for pos in positions],
                      dtype=float)  # (Q, K)
    normal = np.einsum("qk,ckij->qcij", member, window[:, :, :m, :m])
    target = window[:, :, :m, m] - np.einsum("ckij,ckj->cki", window[:, :, :m, :m], base)
    rhs = np.einsum("qk,cki->qci", member, target)
    history_of = {s.id: s.history for s in step_weights.pool}
    chosen = [assignment.choices(pos) for pos in positions]
    h = np.array([[history_of[int(i)] for i in ch.solver] for ch in chosen])  # (Q, C)
    correction = np.zeros((len(positions), len(base), MAX_HISTORY))
    for length in np.unique(h):  # the solver's own slots, batched over equal lengths
        q, c = np.nonzero(h == length)
        slots = slice(m - length, m)
        a, b = normal[q, c, slots, slots], rhs[q, c, slots]
        scale = np.trace(a, axis1=1, axis2=2) / length
        ok = scale > 0
        a = a[ok] + lam * scale[ok, None, None] * np.eye(length)
        correction[q[ok], c[ok], MAX_HISTORY - length :] = np.linalg.solve(a, b[ok][..., None])[..., 0]
    return Assignment(assignment.default, {pos: Choices(ch.solver, ch.variable, corr)
                                           for pos, ch, corr in zip(positions, chosen, correction)})


def coefficients(assignment: Assignment, labels: np.ndarray,
                 step_weights: StepWeights) -> dict[int, np.ndarray]:
    """The map collapsed for one inference schedule: {predicted step: (m, D) float32}.

    Row i weighs the i-th of the last m computed residuals (oldest first), so a predicted residual
    is sum_i coeffs[i] * history[i], channel-wise; m is the longest history the map uses (the
    step weights are right-aligned, so one StepWeights of the whole pool serves every block). Steps
    at positions the map has no entry for take its per-cluster default.
    """
    m = max(s.history for s in assignment.solvers())
    weights = _map_weights(assignment, step_weights)[..., step_weights.history.shape[1] - m :]
    per_step = np.ascontiguousarray(weights.astype(np.float32)[labels].transpose(1, 2, 0))  # (K, m, D)
    return {int(step): per_step[k] for k, step in enumerate(step_weights.steps)}


def gap_costs(
    values: np.ndarray,
    labels: np.ndarray,
    sigmas: np.ndarray,
    min_warmup: int,
    max_gap: int,
    pool=POOL,
    variables=TIME_VARIABLES,
) -> np.ndarray:
    """(S, max_gap + 1) cost table for `schedule.calibrated_mask`, measured on a probe.

    cost[a, g]: relative squared error (summed over the g predicted steps a+1..a+g, each cluster
    with its best pool solver for that window) when a is the last computed step. The history is
    taken as a schedule with this gap would hold it: the warm-up plus every (g+1)-th step back
    from a. Entries that cannot be predicted (inside the warm-up, past the end) are inf.
    """
    steps = len(sigmas)
    m = max(s.history for s in pool)
    warmup = max(min_warmup, m)
    axes = {v: time_axis(v, np.arange(steps), sigmas) for v in variables}
    skips = {v: [] for v in variables}
    windows = []  # (a, g, index of its first skip step)
    for a in range(warmup - 1, steps - 1):
        for g in range(1, min(max_gap, steps - 1 - a) + 1):
            computed = np.union1d(np.arange(warmup), np.arange(a, -1, -(g + 1)))
            windows.append((a, g, len(skips[variables[0]])))
            for v in variables:
                skips[v] += [_skip_step(a + j, computed, m, axes[v]) for j in range(1, g + 1)]
    cost = np.full((steps, max_gap + 1), np.inf)
    cost[:, 0] = 0.0
    if not windows:
        return cost
    table = solver_errors(values, labels, _step_weights(sigmas, tuple(pool), skips))
    P, V, C, _ = table.errors.shape
    per_window = np.add.reduceat(table.errors, [w[2] for w in windows], axis=-1)
    best = per_window.reshape(P * V, C, len(windows)).min(axis=0)
    energy = table.energy
    for (a, g, _), c in zip(windows, energy @ best / energy.sum()):
        cost[a, g] = c
    return cost


@dataclass(frozen=True)
class CompactSample:
    """A block's probe reduced to what selection needs, small enough to ship in a map file.

    Per cluster, the leading principal time series of its residuals (U sqrt(L) from the Gram's
    eigendecomposition): their Gram is the cluster's Gram at rank n, the best such approximation,
    where n randomly sampled (row, channel) series would only estimate it. Interpolation is linear,
    so interpolating these series gives the Gram of the interpolated trajectory as well.
    """

    sigmas: np.ndarray  # (S,) float64, the probe's
    series: np.ndarray  # (C, n, S) float32


def compact_sample(gram: np.ndarray, sigmas: np.ndarray,
                   per_cluster: int = SERIES_PER_CLUSTER) -> CompactSample:
    """Keep `per_cluster` principal series per cluster of a probe's `cluster_gram` (C, S, S).

    24 series of a 50-step probe, 8 clusters, 57 blocks: 2.2 MB of float32."""
    n = min(per_cluster, gram.shape[1])
    eigenvalues, vectors = np.linalg.eigh(gram)  # ascending
    top = slice(gram.shape[1] - n, None)
    series = vectors[:, :, top] * np.sqrt(np.maximum(eigenvalues[:, None, top], 0.0))
    return CompactSample(np.asarray(sigmas, dtype=np.float64),
                         series.transpose(0, 2, 1).astype(np.float32))


def resample(sample: CompactSample, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A compact sample as a trajectory on other sigmas: values (S', 1, C*n) and their labels.

    Cubic spline in sigma, sigmas clipped to the probe's range."""
    order = np.argsort(sample.sigmas)
    x = sample.sigmas[order]
    spline = CubicSpline(x, sample.series[..., order].astype(np.float64), axis=-1)
    series = spline(np.clip(sigmas, x[0], x[-1]))  # (C, n, S')
    C, n, steps = series.shape
    return series.transpose(2, 0, 1).reshape(steps, 1, C * n), np.repeat(np.arange(C), n)


def refit(sample: CompactSample, step_weights: StepWeights, per_position: bool = True,
          lam: float | None = FIT_LAMBDA) -> Assignment:
    """Select (and fit, unless lam is None) for another schedule, from a probe's compact sample,
    resampled onto the step weights' sigmas: selection then runs as on a probe of that schedule."""
    values, labels = resample(sample, step_weights.sigmas)
    table = solver_errors(values, labels, step_weights, clusters=sample.series.shape[0])
    assignment = select(table, per_position)
    return assignment if lam is None else fit(table, assignment, lam)
