"""Where a model call falls on a sampling run's sigma schedule.

Deciding by sigma rather than by counting calls keeps multi-call samplers (Heun, DPM++ 2S) and img2img
schedules right: every call at the same sigma gets the same decision.
"""

from __future__ import annotations

import numpy as np

# A call at a sigma within this relative tolerance of a step's evaluates that step: for flow models, ComfyUI's
# SDE samplers and DPM++ 2S evaluate a first sigma of 1 at 0.9999 (offset_first_sigma_for_snr).
ON_STEP_RTOL = 1e-3


def first_rise(step_sigmas) -> int | None:
    """The first step whose sigma is not below the one before (a repeated sigma, a bump), None if the
    schedule strictly decreases: what step positions and the predictors' time grids assume."""
    sigmas = np.asarray(step_sigmas, dtype=np.float64)
    rises = np.flatnonzero(np.diff(sigmas) >= 0)
    return int(rises[0]) + 1 if len(rises) else None


def step_position(step_sigmas, sigma: float) -> float:
    """The step index of ``sigma`` on a strictly decreasing schedule, fractional between two steps.

    ``step_sigmas`` holds the run's sigmas with its final one (usually 0, never evaluated). A sigma within
    ``ON_STEP_RTOL`` of steps' sigmas is the nearest of those steps; one above the first step's is step 0.
    """
    sigmas = np.asarray(step_sigmas, dtype=np.float64)
    close = np.flatnonzero(np.isclose(sigmas, sigma, rtol=ON_STEP_RTOL, atol=1e-7))
    if len(close):
        return float(close[np.argmin(np.abs(sigmas[close] - sigma))])
    below = np.flatnonzero(sigmas < sigma)
    if not len(below) or below[0] == 0:
        return 0.0
    i = int(below[0]) - 1
    return i + float((sigmas[i] - sigma) / (sigmas[i] - sigmas[i + 1]))
