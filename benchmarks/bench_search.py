"""Does a placement found by local search on the closed-loop error pay? (issue 13's searched candidate)

Calibrates on the probe pair as `bench_tuning.py` does and samples the tuning's reference run (the next
seed, full compute). At each N it starts from the better of the two placements (fixed, calibrated; warm-up
2) on that reference and hill-climbs: a move shifts one full step after the warm-up by one step either
way (as many full steps as before); every move is replayed and scored against the reference
(`latent_psnr`), the best one kept while it improves, until none does or `--replays` are spent. Then the
held-out pairs score the fixed, calibrated and searched masks: what the search gained on the one
reference it climbed, against what it gains on prompts it never saw.

    python benchmarks/bench_search.py [--model wan|flux|sd3] [--pairs 24] [--replays 60] [--out FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_tuning import PROBE_SEED, heading, mean_psnr, parser, probed, publish  # noqa: E402
from harness.metrics import latent_psnr  # noqa: E402

INTERVALS = (4, 6, 8)


def main(argv=None) -> None:
    options = parser(__doc__.split("\n\n")[0])
    options.add_argument("--replays", type=int, default=60, help="replays the search may spend per N")
    args = options.parse_args(argv)
    probe = probed(args)
    pack = probe.pack
    hyca_core, nodes = pack.hyca_core, pack.nodes
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(probe.model.get_model_object("model_sampling"), "simple",
                                             probe.steps).numpy()[:-1]
    warmup = hyca_core.defaults.WARMUP
    pool = hyca_core.solvers.warmup_pool(warmup)

    def patched(mask):
        """The model predicting on exactly this mask (the solvers re-selected for it, as Apply does)."""
        run_map = hyca_core.run_maps.for_mask(probe.solver_map, sigmas, mask, pool)
        state = nodes.run_state.RunState(make_run_map=lambda step_sigmas: run_map)
        return nodes.patching.with_hyca(probe.model, state), int(run_map.mask.sum())

    reference = probe.one(probe.model, PROBE_SEED + 1)
    full = probe.held_out(probe.model)

    def scored(mask) -> float:
        return latent_psnr(probe.one(patched(mask)[0], PROBE_SEED + 1), reference)

    lines = [heading(args), f"search: hill-climbing from the better placement on seed {PROBE_SEED + 1}'s "
             f"full run, at most {args.replays} replays per N; warm-up {warmup}", "",
             f"{'N':>2} {'full':>4} {'start':>10} {'replays':>7} {'ref: fixed':>10} {'calibrated':>10} "
             f"{'searched':>8} {'held: fixed':>11} {'calibrated':>10} {'searched':>8} {'searched - best':>15}"
             "  searched mask (full steps)"]
    for n in INTERVALS:
        schedule = hyca_core.schedule.Schedule(interval=n, warmup=warmup)
        fixed = schedule.mask(probe.steps)
        calibrated = hyca_core.run_maps.run_map(probe.solver_map, sigmas, schedule,
                                                budget=int(fixed.sum())).mask
        start = {"fixed": fixed, "calibrated": calibrated}
        ref = {name: scored(mask) for name, mask in start.items()}
        name = max(ref, key=ref.get)
        current, best, spent = hyca_core.tuning.search(start[name], ref[name], warmup, scored, args.replays)
        masks = {**start, "searched": current}
        held, counts = {}, {}
        for key, mask in masks.items():
            model, counts[key] = patched(mask)
            held[key] = mean_psnr(probe.held_out(model), full)
        gain = held["searched"] - max(held["fixed"], held["calibrated"])
        steps = " ".join(map(str, np.flatnonzero(current)))
        lines.append(f"{n:>2} {counts['searched']:>4} {name:>10} {spent:>7} {ref['fixed']:>10.2f} "
                     f"{ref['calibrated']:>10.2f} {best:>8.2f} {held['fixed']:>11.2f} "
                     f"{held['calibrated']:>10.2f} {held['searched']:>8.2f} {gain:>+15.2f}  {steps}")
        print(lines[-1], flush=True)
    lines += ["", "full: the searched mask's full steps as run (the fixed schedule's unless a step's weights "
              "were unstable); ref: latent PSNR (dB) of one replay against the reference run the search "
              "climbed on; held: the mean over the held-out pairs against their full compute; searched - "
              "best: the searched mask's held-out dB over the better of the two placements (what the search "
              "adds out of sample)."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
