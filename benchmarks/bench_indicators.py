"""Time indicators + clustering for a FLUX-size probe: 57 blocks x 3072 channels x 50 steps.

Rows: 64 (the brief's size; batch 2 x 32 tokens) and 32 (the recorder's default, batch 1).
The whole calibration should take about 5 s for 57 blocks; this part should be well under.
Wall time depends on what else runs on the machine, so CPU time and load are printed too.
Run from the repository root: ``python benchmarks/bench_indicators.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyca_core.clustering import DEFAULT_CLUSTERS, cluster_channels  # noqa: E402
from hyca_core.indicators import descriptor_matrix  # noqa: E402
from harness.synthetic import mixture  # noqa: E402

BLOCKS, STEPS, CHANNELS = 57, 50, 3072
DISTINCT = 3  # distinct synthetic blocks, cycled: 3 x 39 MB already exceeds the CPU caches


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run(rows: int) -> None:
    blocks = [mixture(steps=STEPS, rows=rows, channels_per_group=CHANNELS // 4, seed=seed,
                      shift=3.0)[1] for seed in range(DISTINCT)]
    cluster_channels(descriptor_matrix(blocks[0]))  # warm up imports and caches
    describe, cluster = [0.0, 0.0], [0.0, 0.0]
    load = os.getloadavg()[0]
    for block in range(BLOCKS):
        start = _clock()
        descriptors = descriptor_matrix(blocks[block % DISTINCT])
        middle = _clock()
        cluster_channels(descriptors, DEFAULT_CLUSTERS, seed=0)
        end = _clock()
        for i in range(2):
            describe[i] += middle[i] - start[i]
            cluster[i] += end[i] - middle[i]
    print(f"{BLOCKS} blocks x {CHANNELS} channels x {STEPS} steps x {rows} rows "
          f"({os.cpu_count()} CPUs, load average {load:.2f} -> {os.getloadavg()[0]:.2f})")
    for name, (wall, cpu) in (("indicators + descriptors", describe),
                              (f"k-means, {DEFAULT_CLUSTERS} clusters", cluster),
                              ("total", (describe[0] + cluster[0], describe[1] + cluster[1]))):
        print(f"  {name:26s} {wall:6.2f} s wall ({wall / BLOCKS * 1e3:6.1f} ms/block), "
              f"{cpu:6.2f} s CPU")


if __name__ == "__main__":
    for rows in (64, 32):
        run(rows)
