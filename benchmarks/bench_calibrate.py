"""Calibration time (indicators + k-means + selection + compact sample) for a FLUX-size model.

57 block streams x 3072 channels, 50 probe steps, 32 sampled token rows (the recorder's default),
from recorded statistics: synthetic trajectories of the four dynamics families stand in for a
probe (the cost does not depend on the values). Target: at most 5 s on the 2-core dev machine.
Blocks are calibrated in parallel, one per core, so the wall time depends on how many cores are
free: the CPU time (all threads) and each stage's CPU time per block say what the work costs
whatever else runs. Also prints the time to fit the map to a 28-step run (re-selection and
fitting per block; a new schedule needs it once), every N-th and with calibrated placement, against
a target of well under a second, and the fits closed-loop tuning adds beside its model runs: each
candidate (warm-up x placement) at each tuned N of a 28-step run, as its replays fit them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hyca_core.calibration as calibration  # noqa: E402
import hyca_core.run_maps as run_maps  # noqa: E402
import hyca_core.tuning as tuning  # noqa: E402
from hyca_core.schedule import Schedule  # noqa: E402
from hyca_core.trajectories import DEFAULT_TOKENS, Trajectory  # noqa: E402
from harness.synthetic import flow_sigmas, mixture  # noqa: E402

BLOCKS, CHANNELS, STEPS, TARGET_S = 57, 3072, 50, 5.0
STAGES = {"descriptor_matrix": "indicators", "cluster_channels": "k-means",
          "solver_errors": "Gram + errors", "select": "selection", "compact_sample": "compact sample"}


def timing_stages() -> dict[str, list[float]]:
    """Wrap the stages calibrate() calls so that each call records its thread's CPU time."""
    seconds = defaultdict(list)

    def timed(name, stage):
        def run(*args, **kwargs):
            start = time.thread_time()
            result = stage(*args, **kwargs)
            seconds[name].append(time.thread_time() - start)
            return result
        return run

    for name, label in STAGES.items():
        setattr(calibration, name, timed(label, getattr(calibration, name)))
    return seconds


def main() -> None:
    sigmas, values, _ = mixture(steps=STEPS, rows=DEFAULT_TOKENS, channels_per_group=CHANNELS // 4,
                                seed=0, shift=3.0)
    rng = np.random.default_rng(0)
    # C-contiguous, as the recorder delivers them (values[..., permutation] is laid out channel-major,
    # and calibrating it would time numpy's copies into the usual layout)
    permuted = (np.ascontiguousarray(values[..., rng.permutation(CHANNELS)]) for _ in range(BLOCKS))
    trajectories = {f"block.{i}.img": Trajectory(sigmas, v) for i, v in enumerate(permuted)}
    stage_seconds = timing_stages()
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    solver_map = calibration.calibrate(trajectories, Schedule(interval=6, warmup=3))
    calibration_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    fit_s = {}
    for placement, budget in (("every N-th", None), ("calibrated placement", 10)):
        start = time.perf_counter()
        run_maps.run_map(solver_map, flow_sigmas(28, 3.0), Schedule(interval=4, warmup=3), budget=budget)
        fit_s[placement] = time.perf_counter() - start
    candidates = [(n, warmup, placement) for n in tuning.intervals_for(28)
                  for warmup in tuning.WARMUPS for placement in tuning.PLACEMENTS]
    start = time.process_time()
    for n, warmup, placement in candidates:
        # calibrated placement keeps the schedule's count of full steps, as map_source asks of it
        budget = tuning.computed_steps(28, n, warmup) if placement == "calibrated" else None
        run_maps.run_map(solver_map, flow_sigmas(28, 3.0), Schedule(interval=n, warmup=warmup), budget=budget)
    tuning_cpu_s = time.process_time() - start
    verdict = "PASS" if calibration_s <= TARGET_S else "FAIL"
    print(f"calibration, {BLOCKS} blocks x {CHANNELS} channels x {STEPS} steps x {DEFAULT_TOKENS} rows: "
          f"{calibration_s:.2f} s (target <= {TARGET_S:.0f} s: {verdict}); {cpu_s:.2f} s CPU on "
          f"{os.cpu_count()} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print("CPU per block (median): " + ", ".join(
        f"{label} {statistics.median(stage_seconds[label]) * 1e3:.1f} ms" for label in STAGES.values()))
    print("fitting the map to a 28-step run, N=4 (target < 1 s): " + ", ".join(
        f"{placement} {seconds:.2f} s" for placement, seconds in fit_s.items()))
    print(f"closed-loop tuning's fits, {len(candidates)} replays "
          f"(N in {tuning.intervals_for(28)} x warm-ups {tuning.WARMUPS} "
          f"x {len(tuning.PLACEMENTS)} placements) "
          f"of a 28-step run: {tuning_cpu_s:.1f} s CPU beside the replays' model compute")


if __name__ == "__main__":
    main()
