"""k-means partition of channels by their dynamics descriptors, and agreement between partitions.

scikit-learn is imported where it is first used: importing it costs seconds, which ComfyUI's start-up
should not pay for a node that may never calibrate.
"""

from __future__ import annotations

import numpy as np

from .threads import single_threaded

# The paper does not state its cluster count. Eight leaves room for the distinct dynamic
# regimes it shows (smooth, oscillatory, stiff, noisy, at a few magnitudes) while keeping
# hundreds of channels per cluster on a 3072-wide model, so each cluster's solver choice
# rests on many channels.
DEFAULT_CLUSTERS = 8

# Restarts from different seeded k-means++ initializations; the best inertia wins. Two do as
# well as four at half the cost (four took a large share of a FLUX calibration): on synthetic
# probes both recovered the known dynamics families in every case tried, where one start missed
# some, and the maps selected on 8 clusters erred alike. The counts and error ratios are in the
# README ("The algorithm's own costs").
_N_INIT = 2
# KMeans takes a random_state of 0..2**32 - 1, a ComfyUI seed widget gives up to 2**64 - 1: seeds are
# folded into that range (those already in it unchanged).
_SEED_RANGE = 2**32


def cluster_channels(descriptors: np.ndarray, clusters: int = DEFAULT_CLUSTERS,
                     seed: int = 0) -> np.ndarray:
    """Cluster labels ``(D,)`` in ``0..C-1`` for descriptor rows ``(D, k)``.

    ``C`` is ``clusters`` clipped to the number of distinct rows. Deterministic for a given
    seed (any integer). Labels are canonical: cluster 0 is the largest, ties broken by the lowest channel
    index, so equal partitions always carry equal labels.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"descriptors must be a non-empty (channels, k) matrix, got {x.shape}")
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    # Rows with distinct sums are distinct rows: the exact count (a sort of whole rows rather than
    # of one sum per row; its time is in the README) is only needed when there are fewer distinct
    # sums than clusters.
    if len(np.unique(x.sum(axis=1))) < clusters:
        clusters = min(clusters, len(np.unique(x, axis=0)))
    if clusters == 1:
        return np.zeros(len(x), dtype=np.int64)
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=clusters, n_init=_N_INIT, random_state=seed % _SEED_RANGE)
    # A few thousand 10-d points gain nothing from OpenMP threads, and their spin-waiting
    # makes k-means many times slower whenever another process is busy on the CPU.
    with single_threaded("openmp"):
        labels = kmeans.fit_predict(x)
    return _canonical(labels)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels by cluster size (descending), then by first channel index."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    renumber = np.empty(ids.max() + 1, dtype=np.int64)
    renumber[ids[order]] = np.arange(len(ids))
    return renumber[labels]


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings: 1 for equal partitions, about 0 for chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(a), np.asarray(b)))
