import numpy as np
import pytest

from hyca_core.timeline import ON_STEP_RTOL, first_rise, step_position

# a flow schedule of 5 steps and its final sigma
SIGMAS = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


@pytest.mark.parametrize("index", range(5))
def test_a_step_sigma_is_that_step(index):
    assert step_position(SIGMAS, SIGMAS[index]) == index


def test_a_sigma_between_two_steps_is_fractional():
    assert step_position(SIGMAS, 0.7) == pytest.approx(1.5)
    assert step_position(SIGMAS, 0.75) == pytest.approx(1.25)
    assert step_position(SIGMAS, 0.1) == pytest.approx(4.5)  # towards the final sigma


def test_a_sigma_within_the_tolerance_of_a_step_is_that_step():
    """Flow models' SDE samplers and DPM++ 2S evaluate a first sigma of 1 at 0.9999."""
    assert step_position(SIGMAS, 0.9999) == 0
    assert step_position(SIGMAS, 0.6 * (1 + ON_STEP_RTOL / 2)) == 2
    assert step_position(SIGMAS, 0.6 * (1 + 3 * ON_STEP_RTOL)) != 2


def test_a_sigma_above_the_first_step_is_step_zero():
    assert step_position(SIGMAS, 1.5) == 0


def test_of_steps_within_the_tolerance_the_nearest_is_taken():
    sigmas = np.array([1.0, 0.5002, 0.5, 0.0])
    assert step_position(sigmas, 0.5) == 2
    assert step_position(sigmas, 0.5002) == 1


def test_first_rise_finds_repeats_and_bumps():
    assert first_rise(SIGMAS) is None
    assert first_rise([1.0, 0.9, 0.3, 0.3, 0.2, 0.0]) == 3  # a repeated sigma
    assert first_rise([1.0, 0.9, 0.95, 0.5, 0.0]) == 2  # a bump
    assert first_rise([0.5, 1.0, 0.6, 0.0]) == 1  # a first sigma set below the second (SetFirstSigma)
    assert first_rise([1.0]) is None and first_rise([]) is None
