"""Calibration time (indicators + k-means + selection + compact sample) for a FLUX-size model.

57 block streams x 3072 channels, 50 probe steps, 32 sampled token rows (the recorder's default),
from recorded statistics: synthetic trajectories of the four dynamics families stand in for a
probe (the cost does not depend on the values). Target: at most 5 s on the 2-core dev machine.
Also prints the time to compile the map for a 28-step run (re-selection and fitting per block).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyca_core.calibration import calibrate  # noqa: E402
from hyca_core.schedule import Schedule  # noqa: E402
from hyca_core.trajectories import DEFAULT_TOKENS, Trajectory  # noqa: E402
from harness.synthetic import flow_sigmas, mixture  # noqa: E402

BLOCKS, CHANNELS, STEPS, TARGET_S = 57, 3072, 50, 5.0


def main() -> None:
    sigmas, values, _ = mixture(steps=STEPS, rows=DEFAULT_TOKENS, channels_per_group=CHANNELS // 4,
                                seed=0, shift=3.0)
    rng = np.random.default_rng(0)
    trajectories = {f"block.{i}.img": Trajectory(sigmas, values[..., rng.permutation(CHANNELS)])
                    for i in range(BLOCKS)}
    start = time.perf_counter()
    solver_map = calibrate(trajectories, Schedule(interval=6, warmup=3))
    calibration_s = time.perf_counter() - start
    start = time.perf_counter()
    solver_map.compile(flow_sigmas(28, 3.0), Schedule(interval=4, warmup=3))
    compile_s = time.perf_counter() - start
    verdict = "PASS" if calibration_s <= TARGET_S else "FAIL"
    print(f"calibration, {BLOCKS} blocks x {CHANNELS} channels x {STEPS} steps x {DEFAULT_TOKENS} rows: "
          f"{calibration_s:.2f} s (target <= {TARGET_S:.0f} s: {verdict})")
    print(f"compiling the map for a 28-step run, N=4: {compile_s:.2f} s")


if __name__ == "__main__":
    main()
