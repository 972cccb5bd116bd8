"""Quality against speed, HyCa next to every peer, on each reference model (benchmarks/quality/).

One process, the same (class, seed) pairs for every method, per model:

- calibration: HyCa Calibrate's ``probe`` on ONE (class, seed) pair, 50 steps euler / simple, cfg 1;
- evaluation: one batch of (class, seed) pairs sampled at once (each latent gets the noise a
  batch-1 KSampler run with its own seed would get), at the trained size (``--sizes`` adds others);
- methods: full compute, HyCa (fixed and fitted solvers, calibrated placement, the earlier warm-up),
  FORA / Taylor / TaylorSeer and every single pool solver, fewer steps (euler, dpmpp_2m,
  res_multistep) at HyCa's compute and at HyCa's measured time, ComfyUI's EasyCache and LazyCache,
  an 8-step schedule; then HyCa under euler, dpmpp_2m, res_multistep and uni_pc at cfg 1 and the
  model's cfg at two sizes, against each sampler with fewer steps and the best stock sampler;
- measured: block executions and model calls (hooks, in an untimed run), wall-clock time (no hooks,
  interleaved rounds, median; the Amdahl bound and a check beside it), image PSNR and SSIM against
  full compute, the classifier's agreement, HyCa's residual-history peak.

Writes ``benchmarks/results/quality-<model>.txt`` and ``.png`` (``-quick`` under --quick), then
``summary.txt`` and ``.png`` (``summary-quick``): HyCa's margins per model and N, from every model's
latest results file there (benchmarks/quality/summary.py).

    # every model, the whole benchmark (two models at once on a 2-core machine)
    .venv/bin/python benchmarks/bench_quality.py --jobs 2
    # fewer methods, 16 pairs (a few min a model)
    .venv/bin/python benchmarks/bench_quality.py --quick
    # exit 1 if a speed-up beats its bound
    .venv/bin/python benchmarks/bench_quality.py --model wan --check-timing
    # the summary of the files there
    .venv/bin/python benchmarks/bench_quality.py --quick --summary-only
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import jobs, report, run, summary  # noqa: E402
from benchmarks.quality.methods import Methods  # noqa: E402
from benchmarks.quality.models import MODELS  # noqa: E402
from harness import node_pack  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", choices=sorted(MODELS), action="append",
                        help="the model(s) to run (repeatable; default: every model)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer methods, intervals and thresholds, 16 pairs (at most)")
    parser.add_argument("--weights", type=Path, help="the model's weights file (with a single --model)")
    parser.add_argument("--classifier", type=Path,
                        help="its classifier's weights file (with a single --model)")
    parser.add_argument("--pairs", type=int, help="evaluation (class, seed) pairs (the model's: 32, SD3 12; "
                        "quick 16 at most)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes in px, the trained one first, "
                        "every one with its main table (default: the model's)")
    parser.add_argument("--rounds", type=int, help="timed runs per method, interleaved (median; default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine one thread is faster and "
                             "steadier)")
    parser.add_argument("--check-timing", action="store_true",
                        help="exit with status 1 if a wall-clock speed-up exceeds its Amdahl bound by more "
                             "than the measured noise")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: rewrite the summary from the results files already in --out")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models benchmarked at once, each in a process of its own (2 on a 2-core "
                             "machine)")
    parser.add_argument("--one-of-jobs", action="store_true", help=argparse.SUPPRESS)  # a --jobs child
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="only the overhead target: HyCa (defaults) and FORA at each N, ROUNDS "
                             "back-to-back pairs (median ratio), written to overhead-<model>.txt")
    args = parser.parse_args(argv)
    args.model = args.model or sorted(MODELS)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if (args.weights or args.classifier) and len(args.model) != 1:
        parser.error("--weights and --classifier need a single --model")
    return args


def stem(args, kind: str, name: str | None = None) -> Path:
    """A results file's path without its suffix."""
    return args.out / "-".join([kind, *([name] if name else []), *(["quick"] if args.quick else [])])


def benchmark(name: str, args, pack) -> bool:
    """One model's benchmark, written to its results files; whether its timing check holds."""
    spec = MODELS[name]
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    if args.sizes:
        spec = replace(spec, sizes=tuple(args.sizes), main_sizes=len(args.sizes))
    plan = run.plan(args.quick, spec, args.pairs, args.rounds)
    bench = run.Bench(spec, pack, plan.rounds, say, args.weights, args.classifier)
    started, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    say(f"HyCa quality benchmark{' (--quick)' if plan.quick else ''}, model {name}: {spec.title}, "
        f"{len(bench.blocks)} blocks, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    solver_map = run.calibrate(bench)
    methods = Methods(pack, bench.model, solver_map)
    labels = tuple(i % spec.classes for i in range(plan.pairs))
    seeds = tuple(run.EVAL_SEED0 + i for i in range(plan.pairs))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.overhead:
        run.overhead(bench, methods, [run.Setting(labels, seeds, size, spec.main_cfg) for size in plan.sizes],
                     plan.intervals, args.overhead)
        stem(args, "overhead", name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        return True

    say(f"evaluation: {plan.pairs} (class, seed) pairs in one batch: classes i % {spec.classes}, seeds "
        f"{seeds[0]}..{seeds[-1]}; sizes {', '.join(f'{s} px' for s in plan.sizes)}; "
        f"{plan.rounds} timed rounds")
    say(report.COLUMNS)
    sections, verdicts, timing_ok = [], [], True
    parts = [f"calibration {time.perf_counter() - started:.0f} s"]  # where the time goes, for planning
    for index, size in enumerate(plan.sizes):
        setting = run.Setting(labels, seeds, size, spec.main_cfg)
        part = time.perf_counter()
        section = run.size_section(bench, methods, setting, plan, trained=index == 0)
        parts.append(f"{size} px tables {time.perf_counter() - part:.0f} s")
        sections.append(section)
        say()
        for line in section.table():
            say(line)
        ok, line = report.timing_check(section)
        timing_ok &= ok
        verdicts += [line, report.amdahl_lines(section, plan.intervals),
                     report.predicted_step_line(section, plan.intervals)]
        verdicts += report.targets(section, plan.intervals, [s.name for s in pack.hyca_core.solvers.POOL])
    say()
    say(f"=== HyCa under each sampler (Apply's defaults: fixed solvers, warm-up {run.WARMUP}; "
        f"map from the euler probe at cfg {spec.main_cfg:g}): image PSNR against "
        f"that sampler's {run.STEPS}-step full compute at the same cfg and size; "
        "fewer steps at HyCa's compute ===")
    part = time.perf_counter()
    matrix = run.sampler_matrix(bench, methods, labels, seeds, plan)
    parts.append(f"sampler matrix {time.perf_counter() - part:.0f} s")
    for line in matrix[:-1]:
        say(line)
    verdicts.append(matrix[-1])
    say()
    say(f"total benchmark time for {name}: {time.perf_counter() - started:.0f} s, "
        f"{time.process_time() - cpu:.0f} s of this process's CPU time "
        f"(load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: "
        f"other processes share these CPUs): {', '.join(parts)}")
    say()
    say("TARGETS")
    for line in verdicts:
        say(line)
    results = stem(args, "quality", name)
    results.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    report.plot(f"{name}: {spec.title}", sections, results.with_suffix(".png"))
    print(f"wrote {results}.txt and .png")
    return timing_ok


def write_summary(args, note: str = "") -> None:
    path = stem(args, "summary")
    summary.write({name: stem(args, "quality", name).with_suffix(".txt") for name in sorted(MODELS)}, path,
                  note)
    print(f"wrote {path}.txt and .png")


def side_by_side(args, argv: list[str]) -> list[bool]:
    """Every model in a process of its own, `--jobs` at once, the longest (by its last run) first;
    whether each one's timing check holds. A model whose process fails stops the run."""
    order = sorted(args.model, key=lambda m: -jobs.last_seconds(stem(args, "quality", m).with_suffix(".txt")))
    base = [sys.executable, str(Path(__file__).resolve()), *jobs.without(argv, ("--model", "--jobs")),
            "--one-of-jobs"]
    status = jobs.run_all({m: [*base, "--model", m] for m in order}, args.jobs)
    failed = [m for m, code in status.items() if code not in (0, 1)]
    if failed:
        sys.exit(f"the benchmark of {', '.join(failed)} failed (its output above)")
    return [code == 0 for code in status.values()]


def main(argv=None) -> None:
    args = parse(argv)
    if args.summary_only:
        write_summary(args)
        return
    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the console shows warnings only
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.jobs > 1 and len(args.model) > 1:
        holds = side_by_side(args, sys.argv[1:] if argv is None else list(argv))
    else:
        pack = node_pack.load()
        holds = [benchmark(name, args, pack) for name in args.model]  # every model runs before the verdict
    if not (args.overhead or args.one_of_jobs):
        whole = set(args.model) == set(MODELS)  # the summary reports only a run of every model
        write_summary(args, "" if not whole else f"the whole benchmark, {len(MODELS)} models ({args.jobs} "
                      f"at once): {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs")
    if args.check_timing and not all(holds):
        print("timing check FAILS: a wall-clock speed-up exceeds its Amdahl bound by more than the noise")
        sys.exit(1)


if __name__ == "__main__":
    main()
