"""How many channel clusters, and do they hold across probes? (issue 13, "stability that means something")

On a trained reference model, two probes (HyCa Calibrate's: the model's MAP_PROBE pair and train_reference's
SECOND_PROBE pair) are calibrated at several cluster counts k. Per k it prints, over the block streams:
the adjusted Rand index between the two probes' clusterings, the share of channels both maps give the same
predictor, the silhouette of the first probe's clustering on its indicators (how well the channels separate
into groups at all: 1 for tight far groups, about 0 for a continuum), and held-out quality: the latent PSNR
against full compute of HyCa with the first probe's map on held-out (class, seed) pairs at N = 3, 5, 8
(Apply's defaults: warm-up 2, fixed placement; and warm-up 3, calibrated placement), plus the second probe's
map at the same settings (does a map serve prompts it was not probed on?).

    python benchmarks/bench_cluster_count.py [--model wan|flux|sd3] [--pairs 12]
                                             [--out benchmarks/results/cluster-count-wan.txt]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_tuning import HELD_OUT_SEED, mean_psnr, publish  # noqa: E402
from harness import node_pack  # noqa: E402
from harness.train_reference import MODELS, SECOND_PROBE  # noqa: E402

COUNTS = (2, 3, 4, 6, 8, 12)
INTERVALS = (3, 5, 8)
SETTINGS = ((2, "fixed"), (3, "calibrated"))  # (warm-up, placement)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="wan")
    parser.add_argument("--pairs", type=int, default=12, help="held-out (class, seed) pairs")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    reference = importlib.import_module(MODELS[args.model])
    torch.set_num_threads(1)  # the model is too small to gain from intra-op threads (harness/demo.py)

    pack = node_pack.load()
    core, nodes = pack.hyca_core, pack.nodes
    calibration, clustering, indicators, trajectories = (
        importlib.import_module(f"{core.__name__}.{name}")
        for name in ("calibration", "clustering", "indicators", "trajectories"))
    from sklearn.metrics import silhouette_score

    model = reference.load()
    steps, cfg = reference.STEPS, reference.CFG
    probe = reference.MAP_PROBE
    schedule = core.schedule.Schedule(interval=probe["interval"], warmup=probe["warmup"])

    def record(label, seed):
        recorder = trajectories.TrajectoryRecorder(seed=seed)
        patched = nodes.patching.with_hyca(model, nodes.run_state.RunState(recorder=recorder), "block")
        reference.sample(patched, [label], seed=seed, steps=steps, cfg=cfg)
        return {key: recorder[key] for key in recorder}

    probes = [record(probe["label"], probe["seed"]), record(SECOND_PROBE["label"], SECOND_PROBE["seed"])]
    architecture = nodes.patching.model_architecture(model)
    descriptors = {key: indicators.descriptor_matrix(t.values) for key, t in probes[0].items()}

    labels = [i % reference.DATA.NUM_CLASSES for i in range(args.pairs)]

    def held_out(patched):
        return reference.sample(patched, labels, seed=HELD_OUT_SEED, steps=steps, cfg=cfg)

    full = held_out(model)

    def quality(solver_map):
        def patched(n, warmup, placement):
            every_n = core.schedule.Schedule(interval=n, warmup=warmup)
            return nodes.apply_hyca.apply_hyca(model, solver_map, every_n, placement=placement)
        return [mean_psnr(held_out(patched(n, *setting)), full) for n in INTERVALS for setting in SETTINGS]

    columns = [f"N={n} w{w} {p[:3]}" for n in INTERVALS for w, p in SETTINGS]
    lines = [f"reference {args.model} model, {steps} steps euler/simple, cfg {cfg}; "
             f"probes (class {probe['label']}, seed {probe['seed']}) "
             f"and (class {SECOND_PROBE['label']}, seed {SECOND_PROBE['seed']}), "
             f"chosen for {schedule}; "
             f"held-out PSNR: {args.pairs} pairs (classes 0-9, batch seed {HELD_OUT_SEED})", "",
             f"{'k':>3} {'ARI mean/min':>13} {'same predictor mean/min':>24} {'silhouette':>10}  "
             + "  ".join(f"{c:>13}" for c in columns) + "  (first probe's map / second's)"]
    for k in COUNTS:
        maps = [calibration.calibrate(recorded, schedule, clusters=k, seed=i, architecture=architecture)
                for i, recorded in enumerate(probes)]
        blocks = [(maps[0].blocks[key], maps[1].blocks[key]) for key in maps[0].blocks]
        ari = [clustering.adjusted_rand(a.labels, b.labels) for a, b in blocks]
        same = [float(np.mean(a.channel_choices() == b.channel_choices())) for a, b in blocks]
        silhouette = [silhouette_score(descriptors[key], maps[0].blocks[key].labels, random_state=0,
                                       sample_size=min(2000, len(descriptors[key])))
                      for key in maps[0].blocks]
        scores = zip(quality(maps[0]), quality(maps[1]))
        lines.append(f"{k:>3} {np.mean(ari):>6.2f}/{np.min(ari):.2f} "
                     f"{np.mean(same):>16.1%}/{np.min(same):.1%} {np.mean(silhouette):>10.2f}  "
                     + "  ".join(f"{a:>6.2f}/{b:<6.2f}" for a, b in scores))
        print(lines[-1], flush=True)
    lines += ["", "ARI: adjusted Rand index of the two probes' clusterings (1: the same groups, 0: chance); "
              "same predictor: channels both maps give the same pool member; "
              "silhouette: of the first probe's clustering on its ten indicators (mean over block streams)."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
