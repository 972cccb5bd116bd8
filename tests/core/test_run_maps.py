"""Run maps on grids with near-repeated times: a step whose weights would amplify the history's errors
past MAX_WEIGHT_NORM computes instead."""

import numpy as np
import pytest

from hyca_core.calibration import calibrate
from hyca_core.run_maps import MAX_WEIGHT_NORM, run_map
from hyca_core.schedule import Schedule
from hyca_core.trajectories import Trajectory
from harness.synthetic import flow_sigmas, mixture

SCHEDULE = Schedule(interval=2, warmup=3)  # computes 0, 1, 2, then every other step


@pytest.fixture(scope="module")
def solver_map():
    trajectories = {}
    for i, key in enumerate(("double_block.0.img", "single_block.0.img")):
        sigmas, values, _ = mixture(steps=30, rows=4, channels_per_group=8, seed=i, shift=3.0)
        trajectories[key] = Trajectory(sigmas, values)
    return calibrate(trajectories, SCHEDULE, clusters=2)


def _near_repeat(d: float) -> np.ndarray:
    """20 flow sigmas whose warm-up ends with two times d apart: the history of step 3."""
    sigmas = flow_sigmas(20, 3.0)
    sigmas[2] = sigmas[1] - d
    return sigmas


def _line(sigmas):
    return 0.3 - 2.0 * np.asarray(sigmas)  # every pool member reproduces a straight line exactly


@pytest.mark.parametrize("d", [1e-4, 1e-8])
def test_a_fixed_step_with_unstable_weights_computes(solver_map, d):
    sigmas = _near_repeat(d)
    prepared = run_map(solver_map, sigmas, SCHEDULE, single_solver=("ab2", "sigma"))
    assert np.flatnonzero(prepared.mask != SCHEDULE.mask(20)).tolist() == [3]  # step 3 only
    for table in prepared.tables.values():
        for step, weights in table.items():
            history = np.flatnonzero(prepared.mask[:step])[-len(weights):]
            assert np.abs(weights).sum(axis=0).max() <= MAX_WEIGHT_NORM
            np.testing.assert_allclose(_line(sigmas[history]) @ weights, _line(sigmas[step]), atol=1e-4)


@pytest.mark.parametrize("budget", [None, 3])
def test_a_single_solver_computes_until_its_history_is_there(solver_map, budget):
    """A single solver of a longer history than the warm-up (taylor1 at warm-up 1, as on a 4-step run)
    once raised KeyError: the warm-up's pool did not hold it. It now computes its first steps instead."""
    sigmas = flow_sigmas(4, 3.0)
    schedule = Schedule(interval=2, warmup=1)
    prepared = run_map(solver_map, sigmas, schedule, single_solver=("taylor1", "sigma"), budget=budget)
    assert prepared.mask[:2].all() and not prepared.mask.all()
    for table in prepared.tables.values():
        for step, weights in table.items():
            history = np.flatnonzero(prepared.mask[:step])[-len(weights):]
            np.testing.assert_allclose(_line(sigmas[history]) @ weights, _line(sigmas[step]), atol=1e-4)
