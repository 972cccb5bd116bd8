"""Quality against speed on the trained reference model: HyCa next to every peer (project issue 5).

One run, one process, the same (class, seed) pairs for every method:

- calibration: HyCa Calibrate's ``probe`` on ONE (class, seed) pair, 50 steps euler / simple;
- evaluation: one batch of 32 other (class, seed) pairs sampled at once (each latent gets the
  noise a batch-1 KSampler run with its own seed would get, and its own class context), at the
  trained resolution (32 px, every method) and a larger one (40 px, a smaller method set: no
  single-solver ablation, fewer thresholds and tolerances);
- methods: full compute (the reference), fewer steps at HyCa's compute (euler, dpmpp_2m,
  res_multistep), FORA / uniform Taylor / TaylorSeer and every single pool solver (through
  HyCa's own map path, ``only=``), ComfyUI's EasyCache (stock, and with its input copied: see
  :func:`copying_input`) and LazyCache nodes, HyCa with the paper's fixed pool, with fitted
  solvers and adaptive, at HyCa Apply's default warm-up (2 steps) and the earlier default (3); an
  8-step schedule too. Baselines whose solver needs more history get the warm-up it needs.

Measured per method: block computations (forward hooks on the model's transformer blocks count
real executions, so whole-step skips count too), wall-clock time (fastest of 2 warm runs), PSNR
and SSIM of the decoded images against full compute, agreement of the reference classifier's
argmax with full compute, and HyCa's residual-history peak (its own log line). Prints a table
and the targets' verdicts, writes ``benchmarks/results/quality.txt`` and ``quality.png``.

    .venv/bin/python benchmarks/bench_quality.py            # the whole benchmark (~25 min, 1 core)
    .venv/bin/python benchmarks/bench_quality.py --quick    # fewer methods, 16 pairs, 32 px (~5 min)
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import node_pack, reference_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 50
WARMUP = 2  # HyCa Apply's default
PAPER_WARMUP = 3  # the earlier default, run beside it: one more full step at the start, longer histories
INTERVALS = (3, 4, 5, 6, 8)
EXTRA_INTERVALS = (2, 10)  # more HyCa points on the curves, so peers' speed-ups fall inside them
ABLATION_N = 6
CACHE_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
STOCK_EASYCACHE_THRESHOLDS = (0.05, 0.2, 1.0)  # broken in fp32 (see copying_input), so fewer points
ADAPTIVE_N = 6
ADAPTIVE_TOLERANCES = (0.05, 0.1, 0.25, 0.5, 1.0, 4.0)
OVERHEAD_REPEATS = 4  # HyCa fixed and FORA, the overhead target's pair: fastest of 4 interleaved runs
CALIBRATION = dict(label=0, seed=0)
EVAL_SEED0 = 100  # evaluation seeds EVAL_SEED0 + i, class i % 10: none is the calibration pair


# ----------------------------------------------------------------------------------------------
# measures


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR (dB), images in [0, 1] (peak 1)."""
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images: torch.Tensor, reference: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, per RGB channel, valid
    positions only, K1 = 0.01, K2 = 0.03, data range 1. Images (B, H, W, 3) in [0, 1]."""
    x = images.movedim(-1, 1).double()
    y = reference.movedim(-1, 1).double()
    channels = x.shape[1]
    window = _gaussian_window(size, sigma).double().expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim_map.flatten(1).mean(1).mean())


# ----------------------------------------------------------------------------------------------
# instrumentation


class BlockCounter:
    """Forward hooks on the transformer blocks: real executions, and optionally time inside them."""

    def __init__(self, blocks):
        self.count = 0
        self.timing = False
        self.inside_s = 0.0
        self._start = None
        self.handles = []
        for block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._pre))
            self.handles.append(block.register_forward_hook(self._post))

    def _pre(self, module, args):
        if self.timing:
            self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.count += 1
        if self.timing and self._start is not None:
            self.inside_s += time.perf_counter() - self._start
            self._start = None

    def remove(self):
        for h in self.handles:
            h.remove()


class LogCapture(logging.Handler):
    """Keeps the HyCa/EasyCache log lines of the current run."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(("HyCa", "EasyCache", "LazyCache")):
            self.lines.append(message)

    def history_mb(self) -> float | None:
        found = [float(m.group(1)) for line in self.lines
                 if (m := re.search(r"residual history held ([0-9.]+) MB at most", line))]
        return max(found) if found else None


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class Result:
    name: str
    family: str
    steps: int
    blocks: int
    seconds: float
    psnr: float
    ssim: float
    agree: float
    memory: str  # MB or "-"
    compute_x: float = 1.0
    wall_x: float = 1.0
    cpu: float = float("nan")  # this process's CPU seconds in the fastest run (immune to being descheduled)
    note: str = ""
    n: int | None = None
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args, pack, model, classifier):
        self.args = args
        self.pack = pack
        self.model = model
        self.classifier = classifier
        self.counter = BlockCounter(model.model.diffusion_model.blocks)
        self.capture = LogCapture()
        root = logging.getLogger()
        root.addHandler(self.capture)
        root.setLevel(logging.INFO)
        self.out_lines: list[str] = []
        self.last_cpu = float("nan")

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.out_lines.append(line)

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, model, labels, seeds, size, steps, sampler="euler", scheduler="simple"):
        import comfy.sample

        side = size // 2
        latent = torch.zeros(len(labels), reference_model.LATENT_CHANNELS, 1, side, side)
        # every latent gets the noise a batch-1 KSampler run with its own seed gets
        noise = torch.cat([comfy.sample.prepare_noise(latent[i:i + 1], int(s)) for i, s in enumerate(seeds)])
        return comfy.sample.sample(
            model, noise, steps, 1.0, sampler, scheduler, reference_model.conditioning(list(labels)),
            reference_model.unconditional(len(labels)), latent, disable_pbar=True, seed=int(seeds[0]))

    def images(self, latent) -> torch.Tensor:
        return reference_model.decode(latent)

    def classify(self, images) -> torch.Tensor:
        if images.shape[1] != 32:  # the classifier was trained at 32 px
            images = F.interpolate(images.movedim(-1, 1), size=(32, 32), mode="bilinear",
                                   antialias=True, align_corners=False).movedim(1, -1)
        return self.classifier.predict(images)

    def output(self, model, setting, steps, sampler="euler"):
        """One timed run: (images, block executions counted, log lines, seconds)."""
        labels, seeds, size = setting
        self.capture.lines.clear()
        self.counter.count = 0
        start, cpu = time.perf_counter(), time.process_time()
        latent = self.sample(model, labels, seeds, size, steps, sampler)
        seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu
        blocks, self.counter.count = self.counter.count, 0
        return self.images(latent), blocks, list(self.capture.lines), seconds

    def seconds(self, model, setting, steps, sampler="euler") -> float:
        labels, seeds, size = setting
        start, cpu = time.perf_counter(), time.process_time()
        self.sample(model, labels, seeds, size, steps, sampler)
        seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu
        return seconds

    @staticmethod
    def compile_ahead(model, steps, scheduler="simple") -> int | None:
        """A HyCa-patched model's one-time warm-up, done outside the timed runs: compiling its
        map for this run's sigmas (what its first run would otherwise do). Returns the number of
        compiled schedules, to check that the run then finds it (None: nothing to compile)."""
        import comfy.samplers

        state = model.model_options.get("transformer_options", {}).get("hyca")
        source = getattr(state, "source", None)
        if source is None or source.solver_map is None or source.adaptive:
            return None
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
        source.plan(sigmas.double().cpu().numpy()[:-1])
        return len(source._compiled)

    def measure(self, specs: list[dict], setting, reference, repeats: int = 2) -> list[Result]:
        """Each spec (name, family, model, steps, sampler, memory_known, n, note) sampled `repeats`
        times; the first run gives the output, the fastest run the time. The process is warm (the
        probe and the full-compute runs came first) and HyCa maps are compiled before the first
        run, so every timed run is a warm one. After the first run of every spec the others follow
        round by round, interleaved, so that drifting load on the shared machine hits them alike."""
        ref_images, ref_blocks, ref_seconds, ref_classes = reference
        outputs = []
        for spec in specs:
            steps, sampler = spec.get("steps", STEPS), spec.get("sampler", "euler")
            try:
                compiled = self.compile_ahead(spec["model"], steps)
                images, blocks, lines, seconds = self.output(spec["model"], setting, steps, sampler)
                if compiled is not None and self.compile_ahead(spec["model"], steps) != compiled:
                    spec["note"] = (spec.get("note", "") + " (first run compiled its map)").strip()
                outputs.append((spec, images, blocks, lines, seconds, self.last_cpu))
            except Exception as error:  # reported, never hidden
                self.say(f"{spec['name']}: FAILED ({type(error).__name__}: {error})")
        best = [o[4] for o in outputs]
        best_cpu = [o[5] for o in outputs]
        for round_ in range(1, max([repeats] + [o[0].get("repeats", repeats) for o in outputs])):
            for i, (spec, *_rest) in enumerate(outputs):
                if round_ < spec.get("repeats", repeats):
                    best[i] = min(best[i], self.seconds(spec["model"], setting, spec.get("steps", STEPS),
                                                        spec.get("sampler", "euler")))
                    best_cpu[i] = min(best_cpu[i], self.last_cpu)
        outputs = [o[:4] for o in outputs]
        results = []
        for (spec, images, blocks, lines), seconds, cpu in zip(outputs, best, best_cpu):
            self.capture.lines = lines
            mb = self.capture.history_mb()
            memory = f"{mb:.1f}" if mb is not None else ("0" if spec.get("memory_known", True) else "-")
            finite = bool(torch.isfinite(images).all())
            result = Result(
                name=spec["name"], family=spec["family"], steps=spec.get("steps", STEPS), blocks=blocks,
                seconds=seconds, psnr=psnr(images, ref_images) if finite else float("nan"),
                ssim=ssim(images, ref_images) if finite else float("nan"),
                agree=float((self.classify(images) == ref_classes).float().mean()),
                memory=memory, compute_x=ref_blocks / max(blocks, 1), wall_x=ref_seconds / seconds, cpu=cpu,
                n=spec.get("n"), note=(spec.get("note", "") + ("" if finite else " non-finite output")).strip(),
            )
            result.extra["lines"] = lines
            result.extra["spec"] = spec
            print(f"  [{time.strftime('%H:%M:%S')}] {row(result)}", file=sys.stderr, flush=True)
            results.append(result)
        return results


# ----------------------------------------------------------------------------------------------
# the benchmark


def copying_input(model):
    """A clone of ``model`` whose model_sampling hands the diffusion model a copy of the latent.

    ComfyUI's flow sampling (CONST) passes the latent itself as the model input when no dtype
    cast is needed (fp32 weights, as here on the CPU), and stock EasyCache, on a skipped step,
    adds its cached difference to that input in place and returns it as the output: the latent
    the output is then combined with has changed under it. In bf16/fp16 the cast copies, so
    users on GPUs do not see this; the copy here gives EasyCache the same conditions.
    """
    sampling = model.get_model_object("model_sampling")
    base = type(sampling)

    class CopyingInput(base):
        def calculate_input(self, sigma, noise):
            return base.calculate_input(self, sigma, noise).clone()

    copied = copy.copy(sampling)
    copied.__class__ = CopyingInput
    patched = model.clone()
    patched.add_object_patch("model_sampling", copied)
    return patched


def hyca_computed_steps(n: int, steps: int = STEPS) -> int:
    return int(node_pack.load().hyca_core.schedule.Schedule(interval=n, warmup=WARMUP).mask(steps).sum())


def row(r: Result) -> str:
    return (f"{r.name:<34}{r.steps:>4}{r.blocks:>6}{r.compute_x:>7.2f}x{r.seconds:>8.2f}s{r.cpu:>7.2f}s{r.wall_x:>7.2f}x"
            f"{r.psnr:>8.2f}{r.ssim:>8.4f}{r.agree:>7.0%}{r.memory:>9}  {r.note}")


HEADER = (f"{'method':<34}{'stp':>4}{'blocks':>6}{'compute':>8}{'time':>9}{'cpu':>8}{'wall':>8}"
          f"{'PSNR':>8}{'SSIM':>8}{'cls=':>7}{'mem MB':>9}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer methods and thresholds, 16 pairs, 32 px only")
    parser.add_argument("--weights", type=Path, default=reference_model.WEIGHTS)
    parser.add_argument("--classifier", type=Path, default=reference_model.CLASSIFIER_WEIGHTS)
    parser.add_argument("--pairs", type=int, default=None, help="evaluation (class, seed) pairs (32; quick 16)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes in px, the trained one first (32 40; quick 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine one thread is faster and steadier)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.txt and quality.png")
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="only the overhead target: HyCa (defaults) and FORA at each N, ROUNDS back-to-back "
                             "pairs (median ratio), written to overhead.txt")
    args = parser.parse_args(argv)
    quick = args.quick
    pairs = args.pairs or (16 if quick else 32)
    sizes = args.sizes or ([32] if quick else [32, 40])

    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the console shows warnings only
    torch.set_num_threads(args.threads)
    pack = node_pack.load()
    torch.manual_seed(0)
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    Schedule = pack.hyca_core.schedule.Schedule
    apply_hyca = pack.nodes.apply_hyca.apply_hyca
    probe = pack.nodes.calibrate_node.probe
    summary = pack.nodes.inspector_node.summary
    POOL = pack.hyca_core.solvers.POOL
    solver = pack.hyca_core.solvers.solver

    if not args.weights.is_file():
        raise SystemExit(f"{args.weights} missing: train it (python -m harness.train_reference) or pass --weights")
    model = reference_model.load(args.weights)
    classifier = reference_model.load_classifier(args.classifier)
    bench = Bench(args, pack, model, classifier)
    say = bench.say
    started = time.perf_counter()

    say(f"HyCa quality benchmark{' (--quick)' if quick else ''}: reference Wan-2.1-layout DiT "
        f"({args.weights.name}), {len(model.model.diffusion_model.blocks)} blocks, shift {reference_model.SHIFT}, "
        f"cfg 1, torch threads {torch.get_num_threads()}")

    # -- calibration: one probe, one (class, seed) pair -------------------------------------------
    t0 = time.perf_counter()
    positive = reference_model.conditioning([CALIBRATION["label"]])
    negative = reference_model.unconditional(1)
    solver_map, _ = probe(model, CALIBRATION["seed"], STEPS, 1.0, "euler", "simple", positive, negative,
                          {"samples": reference_model.empty_latent(1)}, Schedule(interval=ABLATION_N, warmup=WARMUP))
    calibration_s = time.perf_counter() - t0
    text = summary(solver_map)
    mix = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    clusters = sorted({int(b.clusters) for b in solver_map.blocks.values()})
    say(f"calibration: probe class {CALIBRATION['label']} seed {CALIBRATION['seed']}, {STEPS} steps euler/simple, "
        f"{calibration_s:.1f} s; {len(solver_map.blocks)} block streams x {'/'.join(map(str, clusters))} clusters "
        f"= {sum(int(b.clusters) for b in solver_map.blocks.values())} clusters")
    say("solver mix (share of channels): " + ", ".join(re.sub(r"\s+", " ", m) for m in mix))

    labels = [i % 10 for i in range(pairs)]
    seeds = [EVAL_SEED0 + i for i in range(pairs)]
    def hyca_model(n, fitted=True, only=None, tolerance=None, warmup=WARMUP, placement="fixed"):
        return apply_hyca(model, solver_map, Schedule(interval=n, warmup=warmup), fitted=fitted,
                          adaptive_tolerance=tolerance, only=only, placement=placement)

    if args.overhead:
        def pair(n):
            return [hyca_model(n, fitted=False), hyca_model(n, only=("reuse", "step"))]
        overhead_only(bench, pair, [(labels, seeds, size) for size in sizes], args.overhead)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.txt").write_text("\n".join(bench.out_lines) + "\n")
        print(f"wrote {args.out / 'overhead.txt'}")
        return
    say(f"evaluation: {pairs} (class, seed) pairs in one batch: classes i % 10, seeds {seeds[0]}..{seeds[-1]}; "
        f"sizes {', '.join(f'{s} px' for s in sizes)}")
    say("columns: stp = sampler steps; blocks = transformer-block executions counted by forward hooks; compute = "
        "speed-up in block executions (full compute's count / this); time = fastest of 2 runs of the batch (4 for "
        "HyCa fixed and FORA at N=3..8; warm process, HyCa maps compiled before the first run); cpu = least CPU "
        "time of this process over those runs; wall = full compute's time / this; PSNR (dB, mean per image) and SSIM (Gaussian 11x11, sigma 1.5) of the decoded RGB images against full compute; cls= = "
        "reference classifier's argmax agreeing with full compute's; mem MB = HyCa's residual-history peak from "
        "its own log line (0: no cache, '-': not known)")

    all_results: dict[int, list[Result]] = {}
    verdicts: list[str] = []
    for index, size in enumerate(sizes):
        trained = index == 0  # the first size is the trained one; later ones get a smaller method set
        setting = (labels, seeds, size)
        say()
        say(f"=== {size} px ({(size // 4) ** 2} tokens per image), batch {pairs}, {STEPS} steps euler/simple ===")

        # full compute, then its time inside the blocks through the hooks (Amdahl)
        images, blocks, _, seconds = bench.output(model, setting, STEPS)
        cpu = bench.last_cpu
        seconds = min(seconds, bench.seconds(model, setting, STEPS))
        cpu = min(cpu, bench.last_cpu)
        bench.counter.timing, bench.counter.inside_s = True, 0.0
        timed_total = bench.seconds(model, setting, STEPS)
        block_share = bench.counter.inside_s / timed_total
        bench.counter.timing = False
        bench.counter.count = 0
        classes = bench.classify(images)
        reference = (images, blocks, seconds, classes)
        accuracy = float((classes == torch.tensor(labels)).float().mean())
        full = Result(f"full compute {STEPS} steps", "full", STEPS, blocks, seconds, float("inf"), 1.0, 1.0, "0", cpu=cpu,
                      note=f"classifier reads the asked class in {accuracy:.0%}")
        results: list[Result] = [full]
        all_results[size] = results

        def spec(name, family, patched, **extra):
            return dict(name=name, family=family, model=patched, **extra)

        # per N, interleaved: HyCa fixed and fitted, FORA, uniform Taylor, TaylorSeer
        trios = (("reuse", "FORA"), ("taylor1", "Taylor"), ("taylorseer2", "TaylorSeer"))
        hyca: dict[tuple, Result] = {}
        single: dict[tuple, Result] = {}
        extras = () if quick else (EXTRA_INTERVALS if trained else EXTRA_INTERVALS[:1])
        for n in sorted(INTERVALS + extras):
            overhead = OVERHEAD_REPEATS if n in INTERVALS else 2
            specs = [spec(f"HyCa {'fitted' if fitted else 'fixed'} N={n}", f"HyCa {'fitted' if fitted else 'fixed'}",
                          hyca_model(n, fitted), n=n, key=("fitted" if fitted else "fixed", n),
                          repeats=2 if fitted else overhead) for fitted in (False, True)]
            if n in INTERVALS:
                specs += [spec(f"{family} ({name}/step) N={n}", family,
                               hyca_model(n, only=(name, "step"), warmup=max(WARMUP, solver(name).history)), n=n,
                               key=(name, "step", n), repeats=overhead if name == "reuse" else 2)
                          for name, family in trios]
                # the same budget of full steps placed by the probe (calibrated schedule), and TaylorSeer
                # on that schedule too, so the table separates what the schedule and the solvers give
                specs += [spec(f"HyCa calibrated {'fitted' if fitted else 'fixed'} N={n} budget", "HyCa calibrated",
                               hyca_model(n, fitted, placement="calibrated"), n=n,
                               key=("calibrated " + ("fitted" if fitted else "fixed"), n)) for fitted in (False, True)]
                specs.append(spec(f"TaylorSeer on HyCa's calibrated schedule, N={n} budget", "TaylorSeer calibrated",
                                  hyca_model(n, only=("taylorseer2", "step"), placement="calibrated",
                                             warmup=solver("taylorseer2").history), n=n,
                                  key=("taylorseer2", "calibrated", n)))
                # the earlier default warm-up, both placements (not HyCa's best: it may compute one more step)
                specs += [spec(f"HyCa {place} N={n} warm-up {PAPER_WARMUP}", f"HyCa warm-up {PAPER_WARMUP}",
                               hyca_model(n, False, warmup=PAPER_WARMUP, placement=place), n=n,
                               key=(f"{place} warm-up {PAPER_WARMUP}", n)) for place in ("fixed", "calibrated")]
            for r in bench.measure(specs, setting, reference):
                s = r.extra["spec"]
                (hyca if s["family"].startswith("HyCa") else single)[s["key"]] = r
                results.append(r)
        tolerances = ADAPTIVE_TOLERANCES[1::2] if quick or not trained else ADAPTIVE_TOLERANCES
        specs = [spec(f"HyCa adaptive tol={tol} (N<={2 * ADAPTIVE_N - 1})", "HyCa adaptive",
                      hyca_model(ADAPTIVE_N, tolerance=tol), key=("adaptive", tol)) for tol in tolerances]
        for r in bench.measure(specs, setting, reference):
            s = r.extra["spec"]
            hyca[s["key"]] = r
            results.append(r)

        # every pool member alone at N=6 (the paper's ablation), both time variables; members that
        # need 4 residuals get a warm-up of 4 (with 3 they cannot predict step 3)
        if trained:
            specs = []
            for s in POOL:
                for variable in ("step",) if quick else ("step", "sigma"):
                    if (s.name, variable, ABLATION_N) in single:
                        continue
                    warmup = max(WARMUP, s.history)
                    specs.append(spec(f"only {s.name}/{variable} N={ABLATION_N}" + ("" if warmup == WARMUP else
                                      f" (warm-up {warmup})"), "single solver",
                                      hyca_model(ABLATION_N, only=(s.name, variable), warmup=warmup),
                                      n=ABLATION_N, key=(s.name, variable, ABLATION_N)))
            for r in bench.measure(specs, setting, reference):
                s = r.extra["spec"]
                single[s["key"]] = r
                results.append(r)

        # fewer steps at HyCa's compute
        fewer: dict[tuple, Result] = {}
        for n in INTERVALS:
            k = hyca_computed_steps(n)
            specs = [spec(f"{sampler} {k} steps (= HyCa N={n})", f"fewer steps {sampler}", model, steps=k,
                          sampler=sampler, n=n, key=(sampler, n)) for sampler in ("euler", "dpmpp_2m", "res_multistep")]
            for r in bench.measure(specs, setting, reference):
                s = r.extra["spec"]
                fewer[s["key"]] = r
                results.append(r)

        # ComfyUI's EasyCache / LazyCache, default start/end percent (0.15 / 0.95); EasyCache also with
        # its input copied (stock EasyCache adds its cached difference to the model input in place,
        # which in fp32 is the very tensor the flow model's output is computed from)
        caches: dict[str, list[Result]] = {"EasyCache": [], "EasyCache (input copied)": [], "LazyCache": []}
        thresholds = CACHE_THRESHOLDS if trained and not quick else STOCK_EASYCACHE_THRESHOLDS
        stock = STOCK_EASYCACHE_THRESHOLDS if trained and not quick else STOCK_EASYCACHE_THRESHOLDS[1:2] if trained else ()
        copied = copying_input(model)
        for threshold in sorted(set(thresholds) | set(stock)):
            specs = []
            if threshold in stock:
                specs.append(spec(f"EasyCache thr={threshold}", "EasyCache",
                                  EasyCacheNode.execute(model, threshold, 0.15, 0.95, False)[0], memory_known=False))
            if threshold in thresholds:
                specs.append(spec(f"EasyCache (input copied) thr={threshold}", "EasyCache (input copied)",
                                  EasyCacheNode.execute(copied, threshold, 0.15, 0.95, False)[0], memory_known=False))
                specs.append(spec(f"LazyCache thr={threshold}", "LazyCache",
                                  LazyCacheNode.execute(model, threshold, 0.15, 0.95, False)[0], memory_known=False))
            for r in bench.measure(specs, setting, reference):
                skipped = [line for line in r.extra["lines"] if "skipped" in line]
                if skipped:
                    r.note = (r.note + " " + re.sub(r".* - ", "", skipped[-1])).strip()
                caches[r.family].append(r)
                results.append(r)

        # 8-step schedule: full 8 vs HyCa N=2 on 8 steps, against the 8-step full run
        images8, blocks8, _, seconds8 = bench.output(model, setting, 8)
        cpu8 = bench.last_cpu
        seconds8 = min(seconds8, bench.seconds(model, setting, 8))
        cpu8 = min(cpu8, bench.last_cpu)
        reference8 = (images8, blocks8, seconds8, bench.classify(images8))
        k8 = int(Schedule(interval=2, warmup=WARMUP).mask(8).sum())
        specs = [spec(f"8 steps: HyCa {'fitted' if fitted else 'fixed'} N=2", "8-step", hyca_model(2, fitted), steps=8)
                 for fitted in (False, True)]
        specs.append(spec(f"8 steps: euler {k8} steps (same compute)", "8-step", model, steps=k8))
        eight = bench.measure(specs, setting, reference8)
        full8 = Result("8 steps: full compute", "8-step", 8, blocks8, seconds8, float("inf"), 1.0, 1.0, "0", cpu=cpu8,
                       note=f"vs 50-step full: {psnr(images8, images):.2f} dB, SSIM {ssim(images8, images):.4f}, "
                            f"{float((reference8[3] == classes).float().mean()):.0%} classifier agreement")

        # the table, by family
        say(HEADER)
        say(row(full))
        say(f"  (a full run spends {block_share:.1%} of its time inside the transformer blocks, timed by pre/post "
            f"forward hooks; {1 - block_share:.1%} outside them)")
        order = ["HyCa fixed", "HyCa fitted", "HyCa calibrated", f"HyCa warm-up {PAPER_WARMUP}", "HyCa adaptive", "FORA", "Taylor", "TaylorSeer",
                 "TaylorSeer calibrated", "single solver",
                 "fewer steps euler", "fewer steps dpmpp_2m", "fewer steps res_multistep", "EasyCache",
                 "EasyCache (input copied)", "LazyCache"]
        for family in order:
            members = [r for r in results if r.family == family]
            if members:
                say(f"-- {family}")
                for r in members:
                    say(row(r))
        say("-- 8-step schedule (PSNR/SSIM/agreement and speed-ups against full compute at 8 steps)")
        for r in [full8] + eight:
            say(row(r))
        results += [full8] + eight

        verdicts += targets(say, size, hyca, single, fewer, caches, POOL, full, block_share, trained)

    say()
    say(f"total benchmark time {time.perf_counter() - started:.0f} s")
    say()
    say("TARGETS")
    for v in verdicts:
        say(v)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.txt").write_text("\n".join(bench.out_lines) + "\n")
    plot(all_results, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.txt'} and {args.out / 'quality.png'}")


def overhead_only(bench: Bench, pair, settings, rounds: int) -> None:
    """HyCa's overhead target alone: at each N, HyCa (Apply's defaults) and FORA on the same schedule
    sampled back to back `rounds` times, in ABBA order; the median of the paired ratios. Adjacent
    runs see the same load on a shared machine, where the fastest of each drifts by +-20%."""
    for setting in settings:
        size = setting[2]
        parts, ok = [], True
        for n in INTERVALS:
            hyca, fora = pair(n)
            for m in (hyca, fora):
                bench.compile_ahead(m, STEPS)
                bench.seconds(m, setting, STEPS)  # warm
            ratios = []
            for r in range(rounds):
                order = (hyca, fora) if r % 2 == 0 else (fora, hyca)
                times = {id(m): bench.seconds(m, setting, STEPS) for m in order}
                ratios.append(times[id(hyca)] / times[id(fora)])
            ratio = float(np.median(ratios))
            ok &= ratio <= 1.05
            parts.append(f"N={n}: {ratio:.3f} (pairs {min(ratios):.2f}-{max(ratios):.2f})")
            print(f"  [{time.strftime('%H:%M:%S')}] {size} px {parts[-1]}", file=sys.stderr, flush=True)
        bench.say(f"[{size} px] HyCa (Apply's defaults) wall-clock within 5% of FORA at the same N (same schedule; "
                  f"median of {rounds} back-to-back pairs, ABBA order): {'HOLDS' if ok else 'FAILS'}; "
                  + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# targets


def hyca_frontier(points: list[Result]) -> list[tuple[float, float]]:
    """Upper-right envelope (compute speed-up, PSNR) of HyCa's points, sorted by speed-up."""
    pts = sorted(((r.compute_x, r.psnr) for r in points if math.isfinite(r.psnr)), key=lambda p: (-p[0], -p[1]))
    frontier, best = [], -float("inf")
    for x, y in pts:  # from the fastest down: keep points better than every faster one
        if y > best:
            frontier.append((x, y))
            best = y
    return sorted(frontier)


def frontier_at(frontier, x) -> tuple[float | None, str]:
    """HyCa's PSNR at compute speed-up x: interpolated inside its range; below it, its slowest point
    (which is at least as fast, so it is a conservative stand-in); above it, unknown."""
    xs = [p[0] for p in frontier]
    ys = [p[1] for p in frontier]
    if x > xs[-1] + 1e-9:
        return None, "beyond HyCa's measured range"
    if x < xs[0]:
        return ys[0], f"HyCa's slowest frontier point ({xs[0]:.2f}x)"
    return float(np.interp(x, xs, ys)), "interpolated"


def best_at(hyca: dict, n: int):
    """HyCa's best variant with the compute of interval n: fixed or fitted solvers, every-N or
    calibrated placement of the same number of full steps."""
    keys = [("fixed", n), ("fitted", n), ("calibrated fixed", n), ("calibrated fitted", n)]
    return max((hyca[k] for k in keys if k in hyca), key=lambda r: r.psnr)


def targets(say, size, hyca, single, fewer, caches, POOL, full, block_share, trained) -> list[str]:
    out = []
    tag = f"[{size} px]"
    n = ABLATION_N
    best_hyca = best_at(hyca, n)
    taylor = max((single["taylor1", "step", n], single["taylorseer2", "step", n]), key=lambda r: r.psnr)
    fora = single["reuse", "step", n]
    ok1 = best_hyca.psnr - taylor.psnr >= 1.5
    ok2 = best_hyca.psnr - fora.psnr >= 4.0
    out.append(f"{tag} N={n}: HyCa best ({best_hyca.name}, {best_hyca.psnr:.2f} dB) vs uniform Taylor best "
               f"({taylor.name}, {taylor.psnr:.2f} dB): {best_hyca.psnr - taylor.psnr:+.2f} dB (target >= +1.5): "
               f"{'HOLDS' if ok1 else 'FAILS'}")
    ts_cal = single.get(("taylorseer2", "calibrated", n))
    if ts_cal is not None:
        out.append(f"{tag} N={n}: (ablation, not a target) TaylorSeer on HyCa's calibrated schedule {ts_cal.psnr:.2f} dB: "
                   f"the schedule gives TaylorSeer {ts_cal.psnr - single['taylorseer2', 'step', n].psnr:+.2f} dB, "
                   f"HyCa's solvers add {best_hyca.psnr - ts_cal.psnr:+.2f} dB on top")
    out.append(f"{tag} N={n}: HyCa best vs FORA ({fora.psnr:.2f} dB): {best_hyca.psnr - fora.psnr:+.2f} dB "
               f"(target >= +4): {'HOLDS' if ok2 else 'FAILS'}")
    per_solver = {}
    for s in POOL if trained else ():
        cands = [single[k] for k in single if k[0] == s.name and k[1] in ("step", "sigma") and k[2] == n]
        if cands:
            per_solver[s.name] = max(cands, key=lambda r: r.psnr if math.isfinite(r.psnr) else -1e9)
    beaten = {k: v for k, v in per_solver.items() if not best_hyca.psnr > v.psnr}
    if not per_solver:
        out.append(f"{tag} N={n}: HyCa vs every single pool solver: the ablation runs at the trained size only")
    else:
        best_single = max(per_solver.values(), key=lambda r: r.psnr if math.isfinite(r.psnr) else -1e9)
        out.append(f"{tag} N={n}: HyCa best vs every single pool solver ({len(per_solver)} solvers, better time "
                   f"variable each; best single {best_single.name} {best_single.psnr:.2f} dB): margin "
                   f"{best_hyca.psnr - best_single.psnr:+.2f} dB: {'HOLDS' if not beaten else 'FAILS'}"
                   + ("" if not beaten else " (not beaten by HyCa: " + ", ".join(beaten) + ")"))

    # HyCa's curve vs EasyCache / LazyCache at matched compute speed-ups
    frontier = hyca_frontier([r for k, r in hyca.items()])
    for label, points in caches.items():
        if not points:
            out.append(f"{tag} HyCa curve above {label}: not run at this size")
            continue
        checks, fails, skipped = [], 0, []
        for r in points:
            if r.compute_x <= 1.0 + 1e-9:
                skipped.append(f"thr {r.name.split('=')[-1]}: no step skipped")
                continue
            if not math.isfinite(r.psnr):
                checks.append(f"{r.compute_x:.2f}x: {label} broke (non-finite), HyCa wins")
                continue
            h, how = frontier_at(frontier, r.compute_x)
            if h is None:
                skipped.append(f"{r.compute_x:.2f}x ({r.psnr:.2f} dB): {how}")
                continue
            win = h > r.psnr
            fails += not win
            checks.append(f"{r.compute_x:.2f}x: HyCa {h:.2f} vs {r.psnr:.2f} dB ({h - r.psnr:+.2f})")
        verdict = "HOLDS" if checks and not fails else ("FAILS" if fails else "NOT TESTED (no comparable point)")
        out.append(f"{tag} HyCa curve above {label} at every matched speed-up: {verdict}; " + "; ".join(checks)
                   + ("" if not skipped else " | not compared: " + "; ".join(skipped)))

    # fewer steps at equal compute
    for samplers, what in ((("euler",), "euler"), (("dpmpp_2m", "res_multistep"), "best of dpmpp_2m/res_multistep")):
        parts, ok = [], True
        for k in INTERVALS:
            h = best_at(hyca, k)
            f = max((fewer[s, k] for s in samplers), key=lambda r: r.psnr)
            margin = h.psnr - f.psnr
            ok &= margin >= 1.0
            parts.append(f"N={k} ({f.steps} steps): HyCa {h.psnr:.2f} vs {f.name.split()[0]} {f.psnr:.2f} "
                         f"({margin:+.2f}{'' if margin >= 1.0 else ' LOSES' if margin < 0 else ' <1dB'})")
        out.append(f"{tag} HyCa beats fewer steps ({what}) by >= 1 dB at every N: {'HOLDS' if ok else 'FAILS'}; "
                   + "; ".join(parts))

    # overhead vs FORA at the same schedule
    parts, ok = [], True
    for k in INTERVALS:
        h = hyca["fixed", k]
        f = single["reuse", "step", k]
        ratio = h.seconds / f.seconds
        ok &= ratio <= 1.05
        parts.append(f"N={k}: {h.seconds:.2f} s vs {f.seconds:.2f} s = {ratio:.3f} (CPU time {h.cpu:.2f} vs "
                     f"{f.cpu:.2f} s = {h.cpu / f.cpu:.3f})")
    out.append(f"{tag} HyCa (fixed) wall-clock within 5% of FORA at the same N (same schedule; fastest of "
               f"{OVERHEAD_REPEATS} interleaved runs each): {'HOLDS' if ok else 'FAILS'}; "
               + "; ".join(parts))
    parts = []
    for k in INTERVALS:
        h = hyca["fixed", k]
        amdahl = 1 / ((1 - block_share) + block_share / h.compute_x)
        parts.append(f"N={k}: blocks {h.compute_x:.2f}x, wall {h.wall_x:.2f}x (Amdahl {amdahl:.2f}x)")
    out.append(f"{tag} HyCa fixed, block-compute ratio vs wall-clock speed-up; {1 - block_share:.1%} of a full "
               "run's time is spent outside the blocks (pre/post forward hooks), so Amdahl's law with free "
               "prediction expects 1 / (outside + inside / ratio): " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# plot

FAMILY_STYLE = {
    "fewer steps euler": ("tab:gray", "s", "--"),
    "fewer steps dpmpp_2m": ("tab:brown", "s", "--"),
    "fewer steps res_multistep": ("tab:pink", "s", "--"),
    "FORA": ("tab:olive", "v", "-"),
    "Taylor": ("tab:cyan", "^", "-"),
    "TaylorSeer": ("tab:blue", "^", "-"),
    "EasyCache": ("tab:purple", "x", ":"),
    "EasyCache (input copied)": ("tab:purple", "D", ":"),
    "LazyCache": ("violet", "D", ":"),
    "HyCa fixed": ("tab:orange", "o", "-"),
    "HyCa fitted": ("tab:red", "o", "-"),
    "HyCa calibrated": ("tab:green", "o", "-"),
    "TaylorSeer calibrated": ("tab:blue", "^", ":"),
    "HyCa adaptive": ("darkred", "*", "-"),
}


def plot(all_results: dict[int, list[Result]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(all_results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(15, 6 * len(sizes)), dpi=90, squeeze=False)
    for row_axes, size in zip(axes, sizes):
        for ax, attr, xlabel in ((row_axes[0], "compute_x", "compute speed-up (counted block executions)"),
                                 (row_axes[1], "wall_x", "wall-clock speed-up")):
            for family, (color, marker, style) in FAMILY_STYLE.items():
                pts = [(getattr(r, attr), r.psnr) for r in sorted(all_results[size], key=lambda r: r.compute_x)
                       if r.family == family and math.isfinite(r.psnr)]  # joined in order of compute
                if pts:
                    ax.plot(*zip(*pts), marker=marker, linestyle=style, color=color, label=family,
                            markersize=8 if family.startswith("HyCa") else 6)
            ax.set(xlabel=xlabel, ylabel="PSNR vs full compute (dB)", xscale="log",
                   title=f"{size} px, {STEPS} steps euler/simple: quality against speed-up")
            ax.set_xticks([1, 1.5, 2, 3, 4, 5, 6, 8, 10])
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
