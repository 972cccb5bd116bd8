import numpy as np
import pytest
import torch

from hyca_core.clustering import DEFAULT_CLUSTERS, adjusted_rand, cluster_channels
from hyca_core.indicators import descriptor_matrix
from hyca_core.trajectories import TrajectoryRecorder
from harness.synthetic import DYNAMICS, flow_sigmas, mixture


@pytest.mark.parametrize("steps,shift", [(10, 1.0), (30, 1.0), (50, 1.0), (20, 3.0), (28, 3.0), (50, 3.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_dynamics(steps, shift, seed):
    _, values, truth = mixture(steps=steps, shift=shift, seed=seed)
    labels = cluster_channels(descriptor_matrix(values), clusters=len(DYNAMICS), seed=seed)
    assert adjusted_rand(labels, truth) > 0.8


@pytest.mark.parametrize("steps,shift", [(30, 1.0), (50, 3.0)])
def test_recovers_known_dynamics_through_a_float16_recording(steps, shift):
    sigmas, values, truth = mixture(steps=steps, shift=shift, rows=32)
    recorder = TrajectoryRecorder(tokens=16)               # the real path: float16 on CPU
    for sigma, step in zip(sigmas, values):
        recorder.record("block", sigma, torch.from_numpy(step).reshape(2, 16, -1))
    recorded = recorder.trajectory("block").values
    labels = cluster_channels(descriptor_matrix(recorded), clusters=len(DYNAMICS))
    assert adjusted_rand(labels, truth) > 0.8


@pytest.mark.parametrize("steps,shift", [(30, 1.0), (50, 3.0)])
def test_default_clusters_stay_pure_over_wide_magnitudes(steps, shift):
    # Two decades of channel amplitude may split a family across clusters, which is harmless
    # for solver selection; mixing families inside a cluster is what must not happen.
    _, values, truth = mixture(steps=steps, shift=shift, amplitude_decades=2.0)
    labels = cluster_channels(descriptor_matrix(values))
    majority = sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels))
    assert majority / len(truth) > 0.9


def test_deterministic_for_a_seed():
    _, values, _ = mixture(seed=3)
    desc = descriptor_matrix(values)
    first = cluster_channels(desc, seed=5)
    np.testing.assert_array_equal(first, cluster_channels(desc, seed=5))
    assert first.dtype == np.int64
    assert set(first) == set(range(DEFAULT_CLUSTERS))


def test_labels_are_canonical():
    rng = np.random.default_rng(0)
    sizes, centers = [20, 50, 30], [0.0, 10.0, 20.0]
    truth = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    desc = rng.normal(scale=0.1, size=(len(truth), 3)) + np.take(centers, truth)[:, None]
    order = rng.permutation(len(truth))
    desc, truth = desc[order], truth[order]
    runs = [cluster_channels(desc, clusters=3, seed=s) for s in range(4)]
    for labels in runs[1:]:
        np.testing.assert_array_equal(labels, runs[0])
    assert adjusted_rand(runs[0], truth) == 1.0
    assert list(np.bincount(runs[0])) == [50, 30, 20]   # cluster 0 is the largest


def test_equal_sizes_are_ordered_by_first_channel():
    desc = np.array([[5.0], [0.0], [5.0], [0.0]])
    np.testing.assert_array_equal(cluster_channels(desc, clusters=2), [0, 1, 0, 1])


def test_clusters_are_clipped_to_distinct_rows():
    desc = np.repeat(np.array([[0.0, 1.0], [2.0, 0.0], [4.0, 4.0]]), 5, axis=0)
    labels = cluster_channels(desc, clusters=8)
    assert sorted(set(labels)) == [0, 1, 2]
    np.testing.assert_array_equal(cluster_channels(np.ones((6, 2))), np.zeros(6))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        cluster_channels(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        cluster_channels(np.zeros(5))
    with pytest.raises(ValueError):
        cluster_channels(np.zeros((5, 2)), clusters=0)


def test_adjusted_rand():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand(a, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert isinstance(adjusted_rand(a, a), float)
    assert adjusted_rand(a, np.array([0, 1, 0, 1, 0, 1])) < 0.1


def test_mixture_generator():
    sigmas, values, truth = mixture(steps=12, rows=5, channels_per_group=7, seed=2, shift=3.0)
    assert values.shape == (12, 5, 28) and values.dtype == np.float32
    assert sorted(np.bincount(truth)) == [7] * 4
    np.testing.assert_allclose(sigmas, flow_sigmas(12, 3.0))
    assert sigmas[0] == 1.0 and np.all(np.diff(sigmas) < 0)
    assert np.diff(sigmas)[0] > np.diff(sigmas)[-1]      # shifted: dense steps near sigma 1
    np.testing.assert_allclose(flow_sigmas(4), [1.0, 0.75, 0.5, 0.25])
    again = mixture(steps=12, rows=5, channels_per_group=7, seed=2, shift=3.0)
    np.testing.assert_array_equal(again[1], values)
