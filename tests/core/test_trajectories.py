import numpy as np
import pytest
import torch

from hyca_core.trajectories import (
    DEFAULT_TOKENS,
    TrajectoryRecorder,
    sample_token_indices,
)


def test_token_sampling_is_deterministic_and_stratified():
    idx = sample_token_indices(4096, 32, seed=7)
    assert torch.equal(idx, sample_token_indices(4096, 32, seed=7))
    assert not torch.equal(idx, sample_token_indices(4096, 32, seed=8))
    assert len(idx) == 32
    # one token per stratum of 128 tokens, hence sorted and distinct
    assert torch.equal(idx // 128, torch.arange(32))


def test_token_sampling_uneven_strata():
    idx = sample_token_indices(100, 7, seed=0)
    starts = torch.arange(8) * 100 // 7
    assert ((idx >= starts[:-1]) & (idx < starts[1:])).all()


def test_token_sampling_small_inputs_take_everything():
    assert torch.equal(sample_token_indices(5, 32, seed=3), torch.arange(5))
    assert torch.equal(sample_token_indices(32, 32, seed=3), torch.arange(32))
    with pytest.raises(ValueError):
        sample_token_indices(0, 4, seed=0)


def test_round_trip_keeps_sampled_rows_in_order():
    rec = TrajectoryRecorder(tokens=4, seed=1, dtype=torch.float32)
    sigmas = [1.0, 0.7, 0.3]
    steps = [torch.randn(2, 10, 3) for _ in sigmas]
    for sigma, residual in zip(sigmas, steps):
        rec.record("block.0", sigma, residual)
    traj = rec.trajectories()["block.0"]
    idx = sample_token_indices(10, 4, seed=1)
    expected = np.stack([r[:, idx, :].reshape(8, 3).numpy() for r in steps])
    assert traj.sigmas.dtype == np.float64 and traj.values.dtype == np.float32
    np.testing.assert_array_equal(traj.sigmas, sigmas)
    np.testing.assert_array_equal(traj.values, expected)
    assert list(rec) == ["block.0"]


def test_a_step_split_into_shares_is_kept_as_the_whole_step():
    """A batch the sampler split across model calls: its shares, in any order, make the step's rows."""
    whole, split = (TrajectoryRecorder(tokens=4, seed=1, dtype=torch.float32) for _ in range(2))
    steps = {sigma: torch.randn(3, 10, 5) for sigma in (1.0, 0.5)}
    for sigma, residual in steps.items():
        whole.record("block.0", sigma, residual)
    split.record("block.0", 1.0, steps[1.0])  # the first step batched
    for i in (2, 0, 1):
        assert "block.0" not in split or len(split["block.0"].sigmas) == 1  # not kept before its last share
        split.record("block.0", 0.5, steps[0.5][i:i + 1], share=(i, 3))
    np.testing.assert_array_equal(split["block.0"].values, whole["block.0"].values)
    np.testing.assert_array_equal(split["block.0"].sigmas, [1.0, 0.5])


def test_default_dtype_is_half_precision():
    rec = TrajectoryRecorder(tokens=4)
    residual = torch.randn(1, 10, 3)
    rec.record("b", 0.5, residual)
    stored = rec.trajectory("b").values[0]
    idx = sample_token_indices(10, 4, seed=0)
    np.testing.assert_allclose(stored, residual[0, idx].numpy(), rtol=1e-3, atol=1e-3)


def test_unbatched_residual_and_sigma_tensor():
    rec = TrajectoryRecorder(tokens=2, dtype=torch.float32)
    rec.record("b", torch.tensor(0.9), torch.randn(6, 5))
    assert rec.trajectory("b").values.shape == (1, 2, 5)


def test_in_place_changes_after_record_do_not_leak():
    # all-tokens path with an unchanged dtype is where aliasing would sneak in
    rec = TrajectoryRecorder(tokens=64, dtype=torch.float32)
    residual = torch.zeros(1, 8, 3)
    rec.record("b", 1.0, residual)
    residual.add_(1.0)
    assert (rec.trajectory("b").values == 0).all()


def test_nbytes_matches_estimate():
    rec = TrajectoryRecorder(tokens=4)
    for key in ("a", "b", "c"):
        for step in range(5):
            rec.record(key, 1.0 - step / 5, torch.randn(2, 16, 6))
    assert rec.nbytes == TrajectoryRecorder.estimate_nbytes(
        blocks=3, steps=5, channels=6, rows=2 * 4, dtype=torch.float16)


def test_flux_size_probe_fits_budget():
    # FLUX: 57 blocks, 3072 channels, 50 steps, batch 1 (4096+ tokens are subsampled)
    flux = TrajectoryRecorder.estimate_nbytes(57, 50, 3072, rows=DEFAULT_TOKENS)
    assert flux == 560_378_400
    assert flux < 2e9 / 3
    # even a batched cond/uncond pass stays under the budget
    assert TrajectoryRecorder.estimate_nbytes(57, 50, 3072, rows=2 * DEFAULT_TOKENS) < 2e9


@pytest.mark.parametrize("shape", [(1, 12, 4), (1, 10, 5), (2, 10, 4)])
def test_shape_changes_mid_run_are_rejected(shape):
    rec = TrajectoryRecorder(tokens=4)
    rec.record("b", 1.0, torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match="changed mid-run"):
        rec.record("b", 0.5, torch.randn(*shape))


def test_repeated_sigma_is_rejected():
    rec = TrajectoryRecorder(tokens=4)
    rec.record("b", 0.5, torch.randn(1, 10, 4))
    rec.record("other", 0.5, torch.randn(1, 10, 4))  # keys are independent
    with pytest.raises(ValueError, match="already recorded"):
        rec.record("b", 0.5, torch.randn(1, 10, 4))


def test_residual_without_token_axis_is_rejected():
    with pytest.raises(ValueError, match="tokens, channels"):
        TrajectoryRecorder().record("b", 1.0, torch.randn(8))


def test_residuals_beyond_the_float16_range_are_recorded_finite_at_float16_precision():
    """FLUX activations pass float16's 65504: a step is kept divided by a power of two, not as inf."""
    rec = TrajectoryRecorder(tokens=4)
    generator = torch.Generator().manual_seed(0)
    magnitudes = (torch.rand(1, 10, 3, generator=generator) + 0.5) * torch.tensor([1, 1e3, 1e6])
    residual = magnitudes * torch.tensor([1.0, -1.0, 1.0])  # one channel far past 65504
    rec.record("b", 0.5, residual)
    rec.record("b", 0.4, residual * 1e-6)  # a step within range is plain float16
    values = rec.trajectory("b").values
    idx = sample_token_indices(10, 4, seed=0)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values[0], residual[0, idx].numpy(), rtol=2**-11)
    np.testing.assert_array_equal(values[1], (residual[0, idx] * 1e-6).half().float().numpy())
    assert rec.nbytes == TrajectoryRecorder.estimate_nbytes(1, 2, 3, 4)  # still two bytes a value


def test_non_finite_residuals_stay_non_finite():
    rec = TrajectoryRecorder(tokens=2)
    rec.record("b", 0.5, torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]]))
    values = rec.trajectory("b").values[0]
    assert np.isinf(values[0, 1]) and np.isnan(values[1, 0]) and values[1, 1] == 2.0
