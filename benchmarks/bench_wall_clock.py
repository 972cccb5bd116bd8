"""An end-to-end wall-clock model of HyCa at real width, FLUX.1's or Wan 2.1 1.3B's: speed-ups against
skipped block computations, and what a predicted step still costs.

Usage: python benchmarks/bench_wall_clock.py [--layout flux|wan] [--double 2] [--single 4] [--layers 4]
           [--frames 21] [--latent SIDE] [--text-tokens K] [--dtype float32|bfloat16] [--steps 20]
           [--n 2,3,4,6,8] [--one-n 6] [--reps 3] [--threads 1] [--out benchmarks/results/wall-clock-...]

``--layout flux``: ComfyUI's Flux at FLUX.1 width (3072 wide, 24 heads, rope axes [16, 56, 56], inputs
4096/768 wide), FluxSchnell (no guidance embedding), 1024 image + 256 text tokens by default. ``--layout
wan``: ComfyUI's Wan 2.1 text-to-video model at the 1.3B model's width (dim 1536, 12 heads, FFN 8960, T5
context 4096 wide), 21 latent frames of 60x60 (18,900 video tokens) and 512 text tokens by default. Both
at reduced depth with seeded weights, sampled by comfy.sample.sample: euler / simple, cfg 1, batch 1; the
defaults are sized for a GPU. Methods: full compute; HyCa per block at every --n, per stack at --one-n;
FORA at --one-n; euler with HyCa's computed step count. Maps: HyCa Calibrate's probe on this model (a full
run each). Each method is counted by hooks in an untimed run (its warm-up), then timed in --reps
interleaved rounds without hooks; a hooked run of its own gives the share inside the blocks, hence
Amdahl's bound. A predicted model call is split in instrumented runs of their own (see `predicted_split`);
HyCa's bound also counts the work outside the blocks its calls no longer do (`set_bounds`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# appended, not put first: ComfyUI's nodes.py must stay ahead of this repository's nodes/ package
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.quality.measures import counting  # noqa: E402
from benchmarks.quality.timing import assert_unhooked, spread  # noqa: E402
from harness import node_pack, sampling, tiny_models  # noqa: E402
from harness.wall_clock import amdahl_bound, block_share, round_times  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 2
WALL_TARGET, STEP_TARGET = 0.95, 0.015
FIELDS = ("call", "inner", "patches", "predict")  # seconds kept per model call (see CallClock)


@dataclass(frozen=True)
class Layout:
    """A timed model: its unet_config (as ComfyUI's detection gives it), latent and conditioning, and
    where its blocks and its first layer (which counts the model's passes) are."""

    title: str
    tokens: str
    config: dict
    latent_shape: tuple[int, ...]
    conditioning: tuple
    block_lists: tuple[str, ...]
    entry: str


def flux_layout(double: int, single: int, latent: int = 64, text_tokens: int = 256, hidden: int = 3072,
                heads: int = 24, axes_dim=(16, 56, 56)) -> Layout:
    """FLUX.1-schnell's config at the given depth (and width); patch 2: latent^2 / 4 image tokens."""
    config = dict(tiny_models.FLUX, hidden_size=hidden, num_heads=heads, axes_dim=list(axes_dim),
                  depth=double, depth_single_blocks=single, context_in_dim=4096, vec_in_dim=768)
    return Layout(f"ComfyUI Flux at FLUX.1 width (hidden {hidden}, {heads} heads), {double} double + "
                  f"{single} single blocks", f"{(latent // 2) ** 2} image + {text_tokens} text tokens",
                  config, (1, config["in_channels"], latent, latent),
                  sampling.flux_conditioning(4096, 768, tokens=text_tokens),
                  ("double_blocks", "single_blocks"), "img_in")


def wan_layout(layers: int, frames: int = 21, latent: int = 60, text_tokens: int = 512, dim: int = 1536,
               heads: int = 12, ffn: int = 8960) -> Layout:
    """Wan 2.1 text-to-video's config at the 1.3B model's width and the given depth; patch (1, 2, 2):
    frames x latent^2 / 4 video tokens."""
    config = dict(tiny_models.WAN21_T2V, dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers,
                  text_dim=4096)
    return Layout(f"ComfyUI Wan 2.1 at 1.3B width (dim {dim}, {heads} heads, FFN {ffn}), {layers} blocks",
                  f"{frames * (latent // 2) ** 2} video + {text_tokens} text tokens", config,
                  (1, config["in_dim"], frames, latent, latent),
                  sampling.text_conditioning(4096, tokens=text_tokens), ("blocks",), "patch_embedding")


class Bench:
    """One model, its blocks and conditioning, and how every method samples it."""

    def __init__(self, layout: Layout, dtype: torch.dtype, steps: int):
        self.pack = node_pack.load()
        self.model = tiny_models.build(layout.config, seed=0, dtype=dtype)
        net = self.model.model.diffusion_model
        self.blocks = [block for name in layout.block_lists for block in getattr(net, name)]
        self.entry = getattr(net, layout.entry)
        self.parameters = sum(p.numel() for p in net.parameters())
        self.conditioning = layout.conditioning
        self.latent_shape = layout.latent_shape
        self.steps = steps

    def sample(self, model, steps: int | None = None):
        # inference mode, as ComfyUI executes its nodes; the latent comes back to the CPU (a sync)
        with torch.inference_mode():
            return sampling.sample(model, *self.conditioning, torch.zeros(self.latent_shape),
                                   steps=steps or self.steps)

    def methods(self, intervals, one_n: int) -> list[tuple[str, object, int]]:
        """(name, model, steps) of every method, full compute first. One probe per granularity: a run
        refuses a map calibrated at another granularity."""
        Schedule = self.pack.hyca_core.schedule.Schedule
        maps = {g: sampling.probe_map(self.pack, self.model, self.conditioning, self.latent_shape, one_n,
                                      WARMUP, steps=self.steps, granularity=g) for g in ("block", "stack")}

        def hyca(n: int, granularity: str = "block", **options):
            return self.pack.nodes.apply_hyca.apply_hyca(self.model, maps[granularity],
                                                         Schedule(interval=n, warmup=WARMUP), **options)

        found = [("full compute", self.model, self.steps)]
        intervals = sorted({*intervals, one_n})  # the split times HyCa at one_n
        found += [(f"HyCa N={n}", hyca(n), self.steps) for n in intervals]
        found += [(f"HyCa N={one_n} per stack", hyca(one_n, "stack"), self.steps),
                  (f"FORA N={one_n}", hyca(one_n, single_solver=("reuse", "step")), self.steps)]
        fewer: dict[int, list[int]] = {}  # euler at HyCa's computed steps, one run per step count
        for n in intervals:
            fewer.setdefault(int(Schedule(interval=n, warmup=WARMUP).mask(self.steps).sum()), []).append(n)
        found += [(f"euler {k} steps (HyCa N={','.join(map(str, ns))})", self.model, k)
                  for k, ns in sorted(fewer.items(), reverse=True)]
        return found


@dataclass
class Row:
    """One method: counted in its untimed run, timed in the interleaved rounds."""

    name: str
    blocks: int
    passes: int
    runs: list[float]
    compute_x: float = 1.0  # full compute's block executions over the method's
    wall_x: float = 1.0  # full compute's median time over the method's, same rounds
    bound: float = 1.0  # Amdahl's bound on wall_x with free prediction
    noise: float = 0.0  # the spread of full compute's runs plus the method's
    hyca: bool = False  # HyCa's patches (prompt and position layers once per run) or a plain model


def timed(bench: Bench, found, reps: int) -> tuple[list[Row], float]:
    """Every method counted, then timed in interleaved rounds; the block share from a run of its own."""
    rows = []
    for name, model, steps in found:
        with counting(bench.entry, bench.blocks) as counter:
            bench.sample(model, steps)
        rows.append(Row(name, counter.blocks, counter.passes, [], hyca=model is not bench.model))
    assert_unhooked([bench.entry, *bench.blocks])  # the counting hooks are gone before any timed run
    runs = round_times([lambda m=m, s=s: bench.sample(m, s) for _, m, s in found], reps, warmup=0)
    share = block_share(lambda: bench.sample(bench.model), bench.blocks)
    full = rows[0]
    for row, own in zip(rows, runs):
        row.runs = own
        row.compute_x = full.blocks / row.blocks
        row.wall_x = statistics.median(runs[0]) / statistics.median(own)
        row.noise = spread(runs[0]) + spread(own)
    return rows, share


def set_bounds(rows: list[Row], share: float, split: Split) -> None:
    """Each method's Amdahl bound: plain runs' from the share inside the blocks alone; HyCa's also counts
    the work outside the blocks that a HyCa call no longer does (full compute's outside time per call
    less a predicted call's, `split.outside`), at every pass. Those times come from the instrumented runs
    alone, as a share of their own full step: on a loaded machine the timed rounds run at another pace."""
    full = rows[0]
    step = split.full + split.sampler  # full compute's time per step (one model pass per step)
    saved = max(split.full - share * step - split.outside, 0.0) / step
    for row in rows:
        row.bound = amdahl_bound(share, row.blocks / full.blocks, row.passes / full.passes,
                                 saved if row.hyca else 0.0)


class CallClock:
    """Seconds per model call: the whole call (ComfyUI's model_function_wrapper, outside HyCa's
    APPLY_MODEL wrapper), the model inside HyCa's wrapper (an APPLY_MODEL wrapper added after it), the
    block patches and the predictions in it (class-level wrappers, within `timing` only)."""

    def __init__(self, pack):
        self.pack = pack
        self.records: list[dict] = []

    def _timed(self, field: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():  # else a GPU's queued kernels would be timed where the queue waits
            torch.cuda.synchronize()
        self.records[-1][field] += time.perf_counter() - start
        return out

    def model(self, model):
        """A clone of ``model`` whose calls are recorded."""
        import comfy.patcher_extension

        def outer(apply_model, args):
            self.records.append(dict.fromkeys(FIELDS, 0.0) | {"predicted": False})
            return self._timed("call", apply_model, args["input"], args["timestep"], **args["c"])

        def inner(executor, *args, **kwargs):
            options = args[5] if len(args) > 5 else kwargs["transformer_options"]
            call = self.pack.nodes.run_state.current_call(options)  # HyCa's decision, made outside
            self.records[-1]["predicted"] |= call is not None and call.predict
            return self._timed("inner", executor, *args, **kwargs)

        clone = model.clone()
        clone.set_model_unet_function_wrapper(outer)
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "wall_clock", inner)
        return clone

    @contextlib.contextmanager
    def timing(self):
        """The block patches and predictions timed for the runs inside the `with`, restored after it."""
        places = [(self.pack.nodes.block_patch.BlockPatch, "__call__", "patches"),
                  (self.pack.hyca_core.predict.ResidualHistory, "predict", "predict")]
        originals = [getattr(owner, name) for owner, name, _ in places]
        for (owner, name, field), original in zip(places, originals):
            setattr(owner, name, lambda *a, _f=field, _o=original, **k: self._timed(_f, _o, *a, **k))
        try:
            yield self
        finally:
            for (owner, name, _), original in zip(places, originals):
                setattr(owner, name, original)


@dataclass
class Split:
    """Mean seconds of a model call: full compute's, HyCa's computed and predicted ones; the three parts
    of a predicted one add up to it."""

    full: float
    computed: float
    predicted: float
    predict: float  # (a) the blocks' predictions
    patches: float  # (b) the rest of the patch calls, and HyCa's per-call decision
    outside: float  # (c) the model's own work outside the blocks
    calls: int  # predicted calls measured
    sampler: float  # per step: the sampling run outside the model calls (full compute's instrumented run)


def predicted_split(bench: Bench, hyca_model) -> Split:
    """From an instrumented run of full compute and one of ``hyca_model`` (never timed runs): (a) time in
    ResidualHistory.predict; (b) the rest of the block patches' time, plus the call's time outside the
    model (HyCa's decision, its finiteness sync); (c) the model's time outside the patches."""
    clock = CallClock(bench.pack)
    with clock.timing():
        start = time.perf_counter()
        bench.sample(clock.model(bench.model))
        run, full = time.perf_counter() - start, clock.records
        clock.records = []
        bench.sample(clock.model(hyca_model))
    predicted = [r for r in clock.records if r["predicted"]]
    computed = [r for r in clock.records if not r["predicted"]]
    call, inner, patches, predict = (statistics.fmean(r[f] for r in predicted) for f in FIELDS)
    return Split(full=statistics.fmean(r["call"] for r in full),
                 computed=statistics.fmean(r["call"] for r in computed), predicted=call, predict=predict,
                 patches=patches - predict + call - inner, outside=inner - patches, calls=len(predicted),
                 sampler=(run - sum(r["call"] for r in full)) / len(full))


def measure(layout: Layout, dtype: torch.dtype, steps: int, intervals, one_n: int, reps: int):
    """The benchmark's core: (bench, timed rows, block share, predicted-step split)."""
    bench = Bench(layout, dtype, steps)
    found = bench.methods(intervals, one_n)
    rows, share = timed(bench, found, reps)
    split = predicted_split(bench, next(m for name, m, _ in found if name == f"HyCa N={one_n}"))
    set_bounds(rows, share, split)
    return bench, rows, share, split


def report(header: str, rows: list[Row], share: float, split: Split, reps: int) -> list[str]:
    lines = [header, f"{share:.1%} of a full run inside the blocks (its own hooked run); medians of {reps} "
             "interleaved rounds, no hooks; bound: the speed-up with free predictions (HyCa's: with the "
             "prompt and position layers once per run, from the split below); '!': wall above bound by more "
             "than the spread; target: "
             f"wall/compute >= {WALL_TARGET:.0%}",
             f"{'method':34} {'blocks':>6} {'compute':>8} {'wall':>7} {'bound':>7} {'wall/bound':>10} "
             f"{'wall/compute':>13}"]
    for r in rows:
        ratio = r.wall_x / r.compute_x
        verdict = "" if r is rows[0] else ("PASS" if ratio >= WALL_TARGET else "FAIL")
        verdict += " !" if r.wall_x > r.bound * (1 + r.noise) else ""
        lines.append(f"{r.name:34} {r.blocks:6d} {r.compute_x:7.2f}x {r.wall_x:6.2f}x {r.bound:6.2f}x "
                     f"{r.wall_x / r.bound:10.1%} {ratio:13.1%}  {verdict}  "
                     f"(median {statistics.median(r.runs):.2f} s, spread {spread(r.runs):.0%})")
    share_of = split.predicted / split.full
    lines += [f"a predicted model call: {split.predicted * 1e3:.1f} ms = {share_of:.2%} of a full-compute "
              f"call ({split.full * 1e3:.0f} ms) (target <= {STEP_TARGET:.1%}: "
              f"{'PASS' if share_of <= STEP_TARGET else 'FAIL'}); mean of {split.calls} predicted calls"]
    for label, seconds in (("(a) the blocks' predictions (ResidualHistory.predict)", split.predict),
                           ("(b) the rest of the block patches, the per-call decision", split.patches),
                           ("(c) the model's work outside the blocks", split.outside)):
        lines.append(f"  {label:58} {seconds * 1e3:8.2f} ms {seconds / split.full:7.2%}")
    lines.append(f"HyCa's computed model call: {split.computed * 1e3:.0f} ms; the sampling run outside the "
                 f"model calls: {split.sampler * 1e3:.2f} ms per step")
    return lines


def header(args, layout: Layout, bench: Bench, load: tuple[float, ...]) -> str:
    """The results' first line: model size, tokens, dtype, threads, device, the machine's load."""
    import comfy.model_management

    return (f"{layout.title} ({bench.parameters / 1e6:.0f} M weights); {layout.tokens}; {args.dtype}; "
            f"{args.steps} steps euler/simple, cfg 1, batch 1; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), {comfy.model_management.get_torch_device()}; load average "
            f"at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end {os.getloadavg()[0]:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("flux", "wan"), default="flux")
    parser.add_argument("--double", type=int, default=2, help="FLUX: double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="FLUX: single-stream blocks")
    parser.add_argument("--layers", type=int, default=4, help="Wan: blocks")
    parser.add_argument("--frames", type=int, default=21, help="Wan: latent frames")
    parser.add_argument("--latent", type=int, help="latent side (patch 2 per side; FLUX 64, Wan 60)")
    parser.add_argument("--text-tokens", type=int, help="text tokens (FLUX 256, Wan 512)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", default="2,3,4,6,8", help="HyCa's intervals, per block")
    parser.add_argument("--one-n", type=int, default=6, help="the N of per-stack HyCa, FORA and the split")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default: results/wall-clock-<layout>-width.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    sizes = {k: v for k, v in (("latent", args.latent), ("text_tokens", args.text_tokens)) if v is not None}
    layout = (flux_layout(args.double, args.single, **sizes) if args.layout == "flux"
              else wan_layout(args.layers, args.frames, **sizes))
    intervals = [int(n) for n in args.n.split(",")]
    bench, rows, share, split = measure(layout, getattr(torch, args.dtype), args.steps, intervals, args.one_n,
                                        args.reps)
    lines = report(header(args, layout, bench, load), rows, share, split, args.reps)
    out = args.out or RESULTS / f"wall-clock-{args.layout}-width.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
