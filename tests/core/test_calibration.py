import dataclasses

import numpy as np
import pytest
import torch

import hyca_core.calibration as calibration
from hyca_core.calibration import calibrate
from hyca_core.schedule import Schedule
from hyca_core.trajectories import Trajectory, TrajectoryRecorder
from harness.synthetic import mixture


def test_blocks_calibrated_in_parallel_match_one_at_a_time(monkeypatch):
    sigmas, values, _ = mixture(steps=12, rows=4, channels_per_group=8, seed=0)
    rng = np.random.default_rng(0)
    trajectories = {f"block.{i}": Trajectory(sigmas, values[..., rng.permutation(values.shape[2])])
                    for i in range(5)}
    maps = {}
    for cores in (4, 1):
        monkeypatch.setattr(calibration.os, "cpu_count", lambda: cores)
        done = []
        maps[cores] = calibrate(trajectories, Schedule(interval=3, warmup=3),
                                progress=lambda finished, total: done.append((finished, total)))
        assert done == [(i, 5) for i in range(1, 6)]
    assert list(maps[4].blocks) == list(trajectories)
    for key, block in maps[4].blocks.items():
        alone = maps[1].blocks[key]
        for field in dataclasses.fields(block):
            np.testing.assert_array_equal(getattr(block, field.name), getattr(alone, field.name))


def test_a_cancelled_calibration_starts_no_further_block(monkeypatch):
    sigmas, values, _ = mixture(steps=12, rows=4, channels_per_group=8, seed=0)
    trajectories = {f"block.{i}": Trajectory(sigmas, values) for i in range(6)}
    started = []
    original = calibration.calibrate_block
    monkeypatch.setattr(calibration, "calibrate_block", lambda *args: started.append(1) or original(*args))
    monkeypatch.setattr(calibration.os, "cpu_count", lambda: 1)

    at_cancel = []

    def cancel(done, total):
        at_cancel.append(len(started))
        raise InterruptedError("cancelled")  # ComfyUI's progress hook raises when the user cancels

    with pytest.raises(InterruptedError):
        calibrate(trajectories, Schedule(interval=3, warmup=3), progress=cancel)
    # The blocks begun by then, and at most one more: the one worker may take the next block between the
    # cancel and the pool's shutdown (how many it began before depends on the machine's load).
    assert at_cancel and len(started) <= at_cancel[0] + 1


def _recorded(scale: float) -> TrajectoryRecorder:
    """A recorder fed a synthetic probe multiplied by `scale`, as the sampler feeds it."""
    sigmas, values, _ = mixture(steps=12, rows=4, channels_per_group=8, seed=0)
    recorder = TrajectoryRecorder(tokens=4)
    for sigma, step in zip(sigmas, values):
        recorder.record("block.0", sigma, torch.from_numpy(step * np.float32(scale)))
    return recorder


@pytest.mark.parametrize("scale", [2.0**20, 2.0**80])
def test_residuals_past_the_float16_range_calibrate_like_small_ones(scale):
    """Residuals above 65504 (real FLUX activations reach them) calibrate, and so do residuals whose squares
    float32 cannot hold; a power of two scale changes no choice."""
    schedule = Schedule(interval=3, warmup=3)
    small, large = calibrate(_recorded(1.0), schedule), calibrate(_recorded(scale), schedule)
    for name in ("labels", "solver", "variable"):
        np.testing.assert_array_equal(getattr(large.blocks["block.0"], name),
                                      getattr(small.blocks["block.0"], name))


def test_a_probe_with_non_finite_residuals_raises_its_own_error():
    recorder = _recorded(1.0)
    recorder.record("block.0", 0.001, torch.full((4, 32), float("inf")))
    reason = "block.0 recorded NaN or inf residuals at sigma 0.001"
    with pytest.raises(calibration.ProbeNotFinite, match=reason):
        calibrate(recorder, Schedule(interval=3, warmup=3))
