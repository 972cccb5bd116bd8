"""One model's benchmark, in the order it runs: calibration, then per image size full compute and
every method (counted in an untimed run, then timed interleaved with full compute), fewer steps at
equal compute and at equal measured time, an 8-step schedule; then HyCa under each sampler at two
guidance scales and two sizes."""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import measures, report, timing
from .measures import Result
from .methods import ABLATION_N, FEWER_STEP_SAMPLERS, SAMPLERS, STEPS, WARMUP, Method, Methods
from .models import ModelSpec, classify

CALIBRATION = {"label": 0, "seed": 0}
EVAL_SEED0 = 100  # evaluation seeds EVAL_SEED0 + i, class i % classes: none is the calibration pair
EQUAL_TIME_SAMPLERS = ("euler", "dpmpp_2m")


@dataclass(frozen=True)
class Plan:
    """What a run covers: the whole benchmark or --quick."""

    quick: bool
    pairs: int
    sizes: tuple[int, ...]  # the main sections' sizes, the trained one first
    intervals: tuple[int, ...]
    extra_intervals: tuple[int, ...]  # more HyCa points on the curves, so peers' speed-ups fall inside them
    rounds: int  # timed runs per method (median)
    cache_thresholds: tuple[float, ...]
    stock_easycache_thresholds: tuple[float, ...]  # broken in fp32 (see copying_input), so fewer points
    ablation_variables: tuple[str, ...]  # single-solver ablation's time variables (() skips it)
    placements: bool  # calibrated placement and the earlier warm-up beside every N
    matrix_intervals: tuple[int, ...]
    matrix_sizes: tuple[int, ...]


def plan(quick: bool, spec: ModelSpec, pairs: int | None, rounds: int | None) -> Plan:
    """`pairs`, `rounds`: the command line's (None: the plan's own); the whole benchmark's evaluation
    batch and main sizes are the model's (:class:`ModelSpec`)."""
    sizes = spec.sizes
    if quick:
        return Plan(True, pairs or min(16, spec.pairs), sizes[:1], (3, 6, 8), (), rounds or 3, (0.2,), (), (),
                    False, (ABLATION_N,), sizes[:2])
    return Plan(False, pairs or spec.pairs, sizes[:spec.main_sizes], (3, 4, 5, 6, 8), (2, 10), rounds or 3,
                (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0), (0.05, 0.2, 1.0), ("step", "sigma"), True, (3, 6),
                sizes[:2])


@dataclass(frozen=True)
class Setting:
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    size: int
    cfg: float = 1.0


@dataclass
class Reference:
    """Full compute of a setting: what every method is scored and timed against."""

    setting: Setting
    steps: int
    sampler: str
    images: torch.Tensor
    classes: torch.Tensor
    blocks: int
    passes: int
    share: float = float("nan")  # of its time inside the blocks (its own hooked run); nan: not timed
    runs: list[float] = field(default_factory=list)  # its timed runs, from every group's rounds


class Bench:
    """One model loaded, sampled, counted, scored and timed."""

    def __init__(self, spec: ModelSpec, pack, rounds: int, say, weights=None, classifier=None):
        self.spec = spec
        self.pack = pack
        self.rounds = rounds
        self.say = say
        self.model = spec.load(weights or spec.weights)
        self.classifier = spec.load_classifier(classifier or spec.classifier_weights)
        self.blocks = spec.blocks(self.model)
        self.entry = spec.entry(self.model)
        self.capture = measures.LogCapture()

    # -- running -------------------------------------------------------------------------------

    def sample(self, model, setting: Setting, steps: int, sampler: str = "euler"):
        """One batch through ``comfy.sample.sample`` under inference mode, as ComfyUI executes its nodes
        (samplers without their own no_grad, uni_pc among them, would otherwise record autograd graphs)."""
        import comfy.sample

        latent = self.spec.latent(len(setting.labels), setting.size)
        # every latent gets the noise a batch-1 KSampler run with its own seed gets
        noise = torch.cat([comfy.sample.prepare_noise(latent[i:i + 1], s)
                           for i, s in enumerate(setting.seeds)])
        with torch.inference_mode():
            return comfy.sample.sample(
                model, noise, steps, setting.cfg, sampler, "simple",
                self.spec.conditioning(list(setting.labels)), self.spec.negative(len(setting.labels)), latent,
                disable_pbar=True, seed=setting.seeds[0])

    def counted(self, model, setting: Setting, steps: int, sampler: str):
        """One untimed run with counting hooks: (images, block executions, model passes, log lines)."""
        with measures.counting(self.entry, self.blocks) as counter, self.capture.listening() as lines:
            latent = self.sample(model, setting, steps, sampler)
        return self.spec.decode(latent), counter.blocks, counter.passes, list(lines)

    def classify(self, images):
        return classify(self.spec, self.classifier, images)

    def reference(self, setting: Setting, steps: int = STEPS, sampler: str = "euler", timed: bool = True):
        images, blocks, passes, _ = self.counted(self.model, setting, steps, sampler)
        share = (timing.block_share(lambda: self.sample(self.model, setting, steps, sampler), self.blocks)
                 if timed else float("nan"))
        return Reference(setting, steps, sampler, images, self.classify(images), blocks, passes, share)

    # -- measuring -----------------------------------------------------------------------------

    def measure(self, methods: list[Method], reference: Reference, timed: bool = True) -> list[Result]:
        """Each method counted and scored in one untimed run, which also warms it up (HyCa fits its
        map to the schedule there, once); then, if `timed`, `rounds` interleaved rounds of full compute and
        every method with no hook attached, medians compared within these rounds."""
        setting = reference.setting
        measured: list[tuple[Result, Method]] = []
        for method in methods:
            try:
                images, blocks, passes, lines = self.counted(method.model, setting, method.steps,
                                                             method.sampler)
            except Exception as error:  # reported, never hidden
                self.say(f"{method.name}: FAILED ({type(error).__name__}: {error})")
                continue
            psnr, ssim = measures.score(images, reference.images)
            mb = measures.history_mb(lines)
            measured.append((Result(
                name=method.name, family=method.family, steps=method.steps, blocks=blocks, passes=passes,
                psnr=psnr, ssim=ssim,
                agree=float((self.classify(images) == reference.classes).float().mean()),
                memory=f"{mb:.1f}" if mb is not None else ("0" if method.memory_known else "-"),
                compute_x=reference.blocks / max(blocks, 1), n=method.n, key=method.key, lines=lines,
                note=(method.note + ("" if math.isfinite(psnr) else " non-finite output")).strip()), method))
        if timed and measured:
            self.time(measured, reference)
        results = [r for r, _ in measured]
        for r in results:
            print(f"  [{time.strftime('%H:%M:%S')}] {report.row(r)}", file=sys.stderr, flush=True)
        return results

    def time(self, measured: list[tuple[Result, Method]], reference: Reference) -> None:
        """Fills each result's median time, spread, wall-clock speed-up, bound and noise."""
        setting = reference.setting
        jobs = [lambda: self.sample(self.model, setting, reference.steps, reference.sampler)]
        jobs += [lambda m=m: self.sample(m.model, setting, m.steps, m.sampler) for _, m in measured]
        runs = timing.interleaved(jobs, self.rounds,
                                  before=lambda: timing.assert_unhooked([self.entry, *self.blocks]))
        full = runs[0]
        for (r, _), own in zip(measured, runs[1:]):
            r.seconds = statistics.median(own)
            r.spread = timing.spread(own)
            r.wall_x = statistics.median(full) / r.seconds
            r.bound = timing.amdahl_bound(reference.share, r.blocks / reference.blocks,
                                          r.passes / reference.passes)
            r.noise = timing.spread(full) + r.spread
        reference.runs.extend(full)


def full_result(reference: Reference, label: str = "") -> Result:
    """Full compute's row: its median and spread over every timed run of it in the section."""
    return Result(f"full compute {reference.steps} steps", "full", reference.steps, reference.blocks,
                  reference.passes, float("inf"), 1.0, 1.0, "0", seconds=statistics.median(reference.runs),
                  spread=timing.spread(reference.runs), wall_x=1.0, bound=1.0, noise=0.0, note=label)


# ----------------------------------------------------------------------------------------------
# calibration


def calibrate(bench: Bench):
    """HyCa Calibrate's probe on ONE (class, seed) pair, 50 steps euler / simple, the main sections' cfg."""
    pack, spec = bench.pack, bench.spec
    start = time.perf_counter()
    solver_map, _ = pack.nodes.calibrate_node.probe(
        bench.model, CALIBRATION["seed"], STEPS, spec.main_cfg, "euler", "simple",
        spec.conditioning([CALIBRATION["label"]]), spec.negative(1),
        {"samples": spec.latent(1, spec.sizes[0])},
        pack.hyca_core.schedule.Schedule(interval=ABLATION_N, warmup=WARMUP))
    seconds = time.perf_counter() - start
    mix = [line.strip() for line in pack.nodes.inspector_node.summary(solver_map).splitlines()
           if line.startswith("  ")]
    clusters = [int(b.clusters) for b in solver_map.blocks.values()]
    bench.say(f"calibration: probe class {CALIBRATION['label']} seed {CALIBRATION['seed']}, {STEPS} steps "
              f"euler/simple, cfg {spec.main_cfg:g}, {seconds:.1f} s; {len(clusters)} block streams, "
              f"{sum(clusters)} clusters")
    bench.say("solver mix (share of channels): " + ", ".join(re.sub(r"\s+", " ", m) for m in mix))
    return solver_map


# ----------------------------------------------------------------------------------------------
# one image size: every method against full compute


def size_section(bench: Bench, methods: Methods, setting: Setting, plan: Plan,
                 trained: bool) -> report.Section:
    reference = bench.reference(setting)
    accuracy = float((reference.classes == torch.tensor(setting.labels)).float().mean())
    section = report.Section(setting.size, len(setting.labels), reference.share, setting.cfg)
    add = section.add

    intervals = sorted(plan.intervals + (plan.extra_intervals if trained else plan.extra_intervals[:1]))
    for n in intervals:
        group = methods.hyca_pair(n)
        if n in plan.intervals:
            group += methods.peers(n) + (methods.placements(n) if plan.placements else [])
        add(bench.measure(group, reference))
    if trained and plan.ablation_variables:
        add(bench.measure(methods.single_solvers(ABLATION_N, plan.ablation_variables, section.single),
                          reference))

    # fewer steps at HyCa's compute, then at HyCa's measured time
    fewer = [methods.fewer_steps(sampler, methods.computed_steps(n), f"fewer steps {sampler}",
                                 f"= HyCa N={n}", n)
             for n in plan.intervals for sampler in FEWER_STEP_SAMPLERS]
    add(bench.measure(fewer, reference))
    add(equal_time(bench, methods, section, reference, plan))

    caches = methods.caches(plan.cache_thresholds if trained else plan.stock_easycache_thresholds,
                            plan.stock_easycache_thresholds if trained else ())
    for r in bench.measure(caches, reference):
        skipped = [line for line in r.lines if "skipped" in line]
        if skipped:
            r.note = (r.note + " " + re.sub(r".* - ", "", skipped[-1])).strip()
        add([r])
    section.full = full_result(reference, f"classifier reads the asked class in {accuracy:.0%}")
    section.eight = eight_steps(bench, methods, setting, reference)
    return section


def equal_time(bench: Bench, methods: Methods, section: report.Section, reference: Reference,
               plan: Plan) -> list[Result]:
    """For each N: the step count of euler and dpmpp_2m whose time matches HyCa fixed's measured time,
    sampled and timed in the same rounds as HyCa fixed at that N. The count comes from a line fitted
    through the sampler's fewer-steps runs (and full compute's, for euler), each time taken as a share
    of full compute's in its own rounds (1 / wall speed-up), so that groups timed under different
    loads compare."""
    group = []
    for n in plan.intervals:
        group.append(Method(f"HyCa fixed N={n} (re-timed beside them)", "equal time HyCa",
                            methods.hyca(n, False), n=n, key=("equal time", n)))
        for sampler in EQUAL_TIME_SAMPLERS:
            points = [(r.steps, 1 / r.wall_x) for r in section.family(f"fewer steps {sampler}")]
            if sampler == reference.sampler:
                points.append((reference.steps, 1.0))
            slope, intercept = np.polyfit(*zip(*points), 1)
            share = 1 / section.hyca["fixed", n].wall_x
            steps = int(np.clip(round((share - intercept) / slope), 1, STEPS))
            group.append(methods.fewer_steps(sampler, steps, f"equal time {sampler}",
                                             f"HyCa N={n}'s time", n))
    return bench.measure(group, reference)


def eight_steps(bench: Bench, methods: Methods, setting: Setting, reference50: Reference) -> list[Result]:
    """An 8-step schedule: HyCa N=2 and euler at its compute, against full compute at 8 steps."""
    reference = bench.reference(setting, steps=8)
    k = methods.computed_steps(2, steps=8)
    group = [replace(m, name=f"8 steps: {m.name}", family="8-step") for m in methods.hyca_pair(2, steps=8)]
    group.append(methods.fewer_steps("euler", k, "8-step", "same compute"))
    results = bench.measure(group, reference)
    psnr, ssim = measures.score(reference.images, reference50.images)
    agree = float((reference.classes == reference50.classes).float().mean())
    return [full_result(reference, f"vs 50-step full: {psnr:.2f} dB, SSIM {ssim:.4f}, {agree:.0%} "
                                          "classifier agreement")] + results


# ----------------------------------------------------------------------------------------------
# HyCa under each sampler, guidance and size


def sampler_matrix(bench: Bench, methods: Methods, labels, seeds, plan: Plan) -> list[str]:
    """For every (cfg, size, sampler S, N): HyCa under S against S's own 50-step full compute, S with
    fewer steps at equal compute, and the best of the stock samplers at equal compute (each stock
    sampler's fewer-step run is scored against every S's full compute). Counted runs only, not timed."""
    lines = [report.MATRIX_HEADER]
    margins = []
    for cfg in sorted({1.0, bench.spec.cfg}):
        for size in plan.matrix_sizes:
            setting = Setting(labels, seeds, size, cfg)
            refs = {s: bench.reference(setting, sampler=s, timed=False) for s in SAMPLERS}
            for n in plan.matrix_intervals:
                k = methods.computed_steps(n)
                stock = {s: bench.counted(bench.model, setting, k, s) for s in SAMPLERS}
                for s in SAMPLERS:
                    hyca = bench.measure([Method(f"HyCa fixed N={n} {s}", "matrix", methods.hyca(n, False),
                                                 sampler=s, n=n)], refs[s], timed=False)
                    if not hyca:
                        continue
                    scored = {o: measures.score(out[0], refs[s].images)[0] for o, out in stock.items()}
                    best = max(scored, key=lambda o: scored[o] if math.isfinite(scored[o]) else -1e9)
                    row = report.MatrixRow(cfg, size, s, n, k, hyca[0].blocks, stock[s][1], hyca[0].psnr,
                                           scored[s], best, scored[best])
                    margins.append(row)
                    lines.append(report.matrix_row(row))
                    print(f"  [{time.strftime('%H:%M:%S')}] {lines[-1]}", file=sys.stderr, flush=True)
    lines.append(report.matrix_verdict(margins))
    return lines


# ----------------------------------------------------------------------------------------------
# the overhead mode


def overhead(bench: Bench, methods: Methods, settings: list[Setting], intervals, rounds: int) -> None:
    """HyCa's overhead target alone: at each N, HyCa (Apply's defaults) and FORA on the same schedule
    sampled back to back `rounds` times, in ABBA order; the median of the paired ratios. Adjacent
    runs see the same load on a shared machine, where the fastest of each drifts by +-20%."""
    for setting in settings:
        parts, ok = [], True
        for n in intervals:
            pair = [methods.hyca(n, fitted=False), methods.hyca(n, single_solver=("reuse", "step"))]
            for m in pair:
                bench.sample(m, setting, STEPS)  # warm: fits the map to this schedule
            runs = timing.interleaved([lambda m=m, s=setting: bench.sample(m, s, STEPS) for m in pair],
                                      rounds)
            ratios = [h / f for h, f in zip(*runs)]
            ratio = float(np.median(ratios))
            ok &= ratio <= 1.05
            parts.append(f"N={n}: {ratio:.3f} (pairs {min(ratios):.2f}-{max(ratios):.2f})")
            print(f"  [{time.strftime('%H:%M:%S')}] {setting.size} px {parts[-1]}", file=sys.stderr,
                  flush=True)
        bench.say(f"[{setting.size} px] HyCa (Apply's defaults) wall-clock within 5% of FORA at the same N "
                  f"(same schedule; median of {rounds} back-to-back pairs, ABBA order): "
                  f"{'HOLDS' if ok else 'FAILS'}; " + "; ".join(parts))

