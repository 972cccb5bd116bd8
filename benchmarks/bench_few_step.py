"""HyCa on a few-step distilled model (issue 19): the 4-step student of the FLUX-layout reference model.

For 4 and 8 total steps (euler / simple, cfg 1, the student's shift): every schedule HyCa can run there
(warm-up, interval, last steps computed or not), with the student's shipped map (probed on a 50-step run
of the student, as a 4-step run is too short to calibrate on) and with one solver alone (FORA's reuse,
first-order Taylor in sigma); against the student's own plain runs of 1 to 8 steps. Every output is
scored by latent PSNR against the teacher's 50-step cfg-2 output (the mean over held-out (class, seed)
pairs) and read by the classifier. Per budget of full steps, the best HyCa schedule is set against the
best plain run with at most that many steps: the margin the targets ask for (at 2 of 4 steps, and at 2x
and 4x of 8 steps: HyCa at least 1 dB above).

    python benchmarks/bench_few_step.py [--pairs 20] [--out benchmarks/results/few-step.txt]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality.measures import counting  # noqa: E402
from benchmarks.quality.models import FLUX  # noqa: E402
from harness import node_pack, reference_flux, reference_student  # noqa: E402
from harness.metrics import latent_psnr  # noqa: E402

TOTALS = (4, 8)
TARGETS = {4: (2,), 8: (4, 2)}  # budgets of full steps the issue sets a target at, per total
MARGIN_DB = 1.0
VARIANTS = {"HyCa map": None, "FORA (reuse)": ("reuse", "step"), "Taylor 1 (sigma)": ("taylor1", "sigma")}


def score(latents: torch.Tensor, reference: torch.Tensor, labels, classifier) -> tuple[float, float]:
    """(mean latent PSNR over the pairs, share the classifier reads as the asked class)."""
    psnr = float(np.mean([latent_psnr(o, r) for o, r in zip(latents, reference)]))
    read = classifier.predict(reference_student.decode(latents)).numpy()
    return psnr, float((read == np.asarray(labels)).mean())


def schedules(pack, total: int):
    """A schedule for every distinct HyCa mask on ``total`` steps that predicts at least one step."""
    Schedule = pack.hyca_core.schedule.Schedule
    seen = {}
    for warmup, interval, final in itertools.product(range(1, total), range(2, total + 1), (0, 1)):
        schedule = Schedule(interval=interval, warmup=warmup, final=final)
        mask = schedule.mask(total)
        if not mask.all():
            seen.setdefault(tuple(mask), schedule)
    return list(seen.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="held-out (class, seed) pairs")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the model is too small to gain from intra-op threads (harness/demo.py)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    pack = node_pack.load()
    apply_hyca = pack.nodes.apply_hyca.apply_hyca
    labels = [i % reference_flux.NUM_CLASSES for i in range(args.pairs)]
    seed = 100  # the batch's first seed; noise differs per item (comfy.sample.prepare_noise on the batch)
    classifier = reference_student.load_classifier()
    start = time.perf_counter()
    teacher = reference_flux.sample(reference_flux.load(), labels, seed=seed,
                                    steps=reference_student.TEACHER_STEPS, cfg=reference_student.TEACHER_CFG)
    student = reference_student.load()
    blocks = FLUX.blocks(student)
    solver_map = pack.nodes.map_store.load_for(student)
    if solver_map is None:
        raise SystemExit("no solver map for the student: run python -m harness.distill_student")
    say(f"HyCa on the few-step student (harness/reference_student.py), {args.pairs} held-out pairs, "
        f"euler / simple, cfg 1; latent PSNR to the teacher's {reference_student.TEACHER_STEPS} steps at "
        f"cfg {reference_student.TEACHER_CFG:g} ({score(teacher, teacher, labels, classifier)[1]:.0%} "
        "read as their class)")

    plain = {}
    say("\nthe student's plain runs")
    for steps in range(1, max(TOTALS) + 1):
        latent = reference_student.sample(student, labels, seed=seed, steps=steps)
        plain[steps] = score(latent, teacher, labels, classifier)
        say(f"  {steps} steps: {plain[steps][0]:6.2f} dB, classifier {plain[steps][1]:.0%}")

    verdicts = []
    for total in TOTALS:
        say(f"\nHyCa on {total} steps (full steps of {total}: schedule -> dB / classifier, per variant)")
        best = {}
        for schedule in schedules(pack, total):
            cells = []
            for name, single_solver in VARIANTS.items():
                model = apply_hyca(student, solver_map, schedule, single_solver=single_solver)
                # full steps counted, not read off the schedule: a solver's history can lengthen the warm-up
                with counting(FLUX.entry(student), blocks) as counter:
                    latent = reference_student.sample(model, labels, seed=seed, steps=total)
                computed = counter.blocks // len(blocks)
                psnr, read = score(latent, teacher, labels, classifier)
                cells.append(f"{name}: {computed} full, {psnr:6.2f} dB / {read:.0%}")
                if psnr > best.get(computed, (-np.inf,))[0]:
                    best[computed] = (psnr, f"{name}, warm-up {schedule.warmup}, N={schedule.interval}, "
                                            f"last {schedule.final}")
            say(f"  warm-up {schedule.warmup}, N={schedule.interval}, last {schedule.final}: "
                + "; ".join(cells))
        say("  per budget: best HyCa vs the best plain run with at most as many steps")
        for computed in sorted(c for c in best if c < total):
            psnr, what = best[computed]
            steps = max(range(1, computed + 1), key=lambda k: plain[k][0])
            margin = psnr - plain[steps][0]
            say(f"    {computed} of {total} ({total / computed:.2f}x): HyCa {psnr:.2f} dB ({what}) vs "
                f"{steps} plain steps {plain[steps][0]:.2f} dB: {margin:+.2f} dB")
            if computed in TARGETS[total]:
                verdicts.append(f"{total / computed:.0f}x on {total} steps: HyCa {margin:+.2f} dB over the "
                                f"best plain run of at most {computed} steps: "
                                f"{'HOLDS' if margin >= MARGIN_DB else 'FAILS'} (target +{MARGIN_DB:g} dB)")
    say("\ntargets")
    for verdict in verdicts:
        say(f"  {verdict}")
    say(f"\n{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
