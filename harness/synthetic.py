"""Synthetic residual trajectories whose channels follow known dynamics.

Reusable by any test that needs channels with a ground-truth grouping: clustering, solver
selection, prediction. Dynamics are functions of the ODE time sigma (through the progress
``u = 1 - sigma``), so a non-uniform sigma grid samples the same curves unevenly, as a
shifted flow schedule does. (Only the stiff family's decay rate also follows the grid, so
that it stays stiff on every grid.)
"""

from __future__ import annotations

import numpy as np

DYNAMICS = ("polynomial", "sine", "stiff", "random_walk")


def flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
    """Descending sigmas of a flow-matching schedule: ``shift*t / (1 + (shift-1)*t)``.

    ``t`` runs uniformly from 1 down to ``1/steps`` (the last model call before sigma 0);
    ``shift=1`` gives the uniform grid, larger shifts crowd the steps near sigma 1.
    """
    t = np.linspace(1.0, 0.0, steps + 1)[:-1]
    return shift * t / (1.0 + (shift - 1.0) * t)


def _group(name: str, u: np.ndarray, rows: int, channels: int,
           rng: np.random.Generator) -> np.ndarray:
    """(S, rows, channels) curves of one dynamics family, random per channel and row."""
    u = u[:, None, None]
    shape = (1, rows, channels)
    if name == "polynomial":   # smooth: a random cubic
        c = rng.normal(size=(4, *shape))
        return c[0] + c[1] * u + c[2] * u**2 + c[3] * u**3
    if name == "sine":         # oscillating: 2 to 4 periods over the run
        freq = rng.uniform(2.0, 4.0, size=(1, 1, channels))
        phase = rng.uniform(0.0, 2 * np.pi, size=shape)
        return rng.uniform(0.5, 1.5, size=shape) * np.sin(2 * np.pi * freq * u + phase)
    if name == "stiff":        # exponential transient settling to an offset
        # Stiffness is relative to the step: rate x (first step) is kept in [1, 2] on any
        # grid, since a transient resolved by many steps would just look smooth.
        rate = rng.uniform(1.0, 2.0, size=(1, 1, channels)) / (u[1] - u[0])
        return rng.normal(size=shape) + rng.uniform(0.5, 1.5, size=shape) * np.exp(-rate * u)
    if name == "random_walk":  # noisy: independent Gaussian increments per step
        steps = rng.normal(size=(len(u), rows, channels)) * np.sqrt(1.0 / len(u))
        return np.cumsum(steps, axis=0)
    raise ValueError(f"unknown dynamics {name!r}; choose from {DYNAMICS}")


def mixture(groups: tuple[str, ...] = DYNAMICS, steps: int = 30, rows: int = 16,
            channels_per_group: int = 64, seed: int = 0, shift: float = 1.0,
            amplitude_decades: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channels from several dynamics families, shuffled together.

    Returns ``(sigmas (S,) float64, values (S, rows, D) float32, truth (D,) int64)`` where
    ``truth[d]`` is the index in ``groups`` of channel d's family. Each channel is scaled by
    a log-uniform amplitude spanning ``amplitude_decades`` decades, as real channels differ
    in magnitude. ``shift`` selects the sigma grid (see :func:`flow_sigmas`).
    """
    rng = np.random.default_rng(seed)
    sigmas = flow_sigmas(steps, shift)
    u = 1.0 - sigmas
    curves = [_group(name, u, rows, channels_per_group, rng) for name in groups]
    values = np.concatenate(curves, axis=2)
    truth = np.repeat(np.arange(len(groups)), channels_per_group)
    values *= 10.0 ** rng.uniform(-amplitude_decades / 2, amplitude_decades / 2, len(truth))
    order = rng.permutation(len(truth))
    return sigmas, np.ascontiguousarray(values[:, :, order], dtype=np.float32), truth[order]
