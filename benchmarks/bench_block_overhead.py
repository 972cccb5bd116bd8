"""HyCa's added cost per skipped FLUX double block, as a share of computing that block.

Usage: python benchmarks/bench_block_overhead.py [--steps 28] [--dtype float32|bfloat16] [--runs 5]
                                                [--passes REPS] [--against REV] [--fused]

One full-size block of ComfyUI's own class (comfy.ldm.flux.layers.DoubleStreamBlock: hidden 3072,
24 heads, mlp_ratio 4, seeded weights) on 1024 image + 256 text tokens. HyCa's work goes through
the node layer's own BlockPatch and RunState, with a solver map calibrated on synthetic
trajectories and fitted to an N=6 schedule with the default warm-up:
- a computed step keeps the block's inputs, takes its img/txt residuals and pushes them into the
  history (the block itself is a stand-in returning outputs made beforehand, so only HyCa's
  work is timed);
- a predicted step predicts both residuals from the history, queues their finiteness check and
  adds them to the block's inputs.
The whole run's HyCa time divided by its predicted steps is the cost per skipped block; the
per-call work (the step decision, one finiteness sync per model call) is shared by all 57
blocks of a FLUX call and left out. Target: under 2% of the block's compute.

--passes times, per block and interleaved, the history work of both streams the way the block patch
does it (predict the residual, move it to the input's dtype and device, add the input; clone the
input, subtract, push the residual) against the single-pass calls (`ResidualHistory.predict(base=)`,
`push_difference`), with the weights of the run's first predicted step; --against REV takes the
first from hyca_core/predict.py as of git revision REV (before and after a change, in one process).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import node_pack, tiny_models  # noqa: E402
from harness.wall_clock import median_times  # noqa: E402
from harness.synthetic import flow_sigmas, mixture  # noqa: E402

HIDDEN, HEADS, MLP_RATIO = 3072, 24, 4.0
IMAGE_TOKENS, TEXT_TOKENS = 1024, 256  # a 512x512 image: 64x64 latent in 2x2 patches
INTERVAL, TARGET = 6, 0.02


def flux_block(dtype: torch.dtype):
    """ComfyUI's DoubleStreamBlock at FLUX.1 size, and its inputs (img, txt, vec, pe)."""
    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND

    block = DoubleStreamBlock(HIDDEN, HEADS, MLP_RATIO, qkv_bias=True, dtype=dtype,
                              operations=comfy.ops.disable_weight_init)
    tiny_models.initialize(block, seed=0)  # ComfyUI builds layers uninitialized
    generator = torch.Generator().manual_seed(0)
    img, txt = (torch.randn(1, n, HIDDEN, generator=generator).to(dtype) for n in (IMAGE_TOKENS, TEXT_TOKENS))
    vec = torch.randn(1, HIDDEN, generator=generator).to(dtype)
    side = int(IMAGE_TOKENS**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    ids = torch.cat([torch.zeros(1, TEXT_TOKENS, 3), img_ids.reshape(1, -1, 3)], dim=1)
    pe = EmbedND(dim=HIDDEN // HEADS, theta=10000, axes_dim=[16, 56, 56])(ids)  # FLUX.1's rope
    return block, (img, txt, vec, pe)


def block_seconds(block, inputs, runs: int) -> float:
    """Median time of one forward pass (each on fresh copies: the block adds into its inputs)."""
    img, txt, vec, pe = inputs
    times = []
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first is a warm-up
            a, b = img.clone(), txt.clone()
            start = time.perf_counter()
            block(img=a, txt=b, vec=vec, pe=pe)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def synthetic_run_map(pack, keys, step_sigmas: np.ndarray, schedule):
    """A map of the block's two streams calibrated on synthetic trajectories, fitted to the run."""
    sigmas, values, _ = mixture(steps=50, rows=32, channels_per_group=HIDDEN // 4, seed=0, shift=3.0)
    Trajectory = pack.hyca_core.trajectories.Trajectory
    # calibration (scikit-learn) is not imported with the pack
    calibration = importlib.import_module(f"{pack.__name__}.hyca_core.calibration")
    solver_map = calibration.calibrate({k: Trajectory(sigmas, values) for k in keys}, schedule)
    return pack.hyca_core.run_maps.run_map(solver_map, step_sigmas, schedule)


def hyca_seconds(pack, inputs, run_map, step_sigmas: np.ndarray, dtype) -> list[float]:
    """HyCa's time at each step of one sampling run, the block's compute left out."""
    run_state, families = pack.nodes.run_state, pack.nodes.families
    img, txt, vec, pe = inputs
    generator = torch.Generator().manual_seed(1)
    outputs = {s: x + 0.1 * torch.randn(x.shape, generator=generator).to(dtype)
               for s, x in (("img", img), ("txt", txt))}
    patch = pack.nodes.block_patch.BlockPatch(families.Block("double_block", 0, HIDDEN),
                                              pack.nodes.block_patch.Unit("double_block.0", 1))
    stand_in = {"original_block": lambda args: dict(outputs)}
    state = run_state.RunState(make_run_map=lambda sigmas: run_map)
    options = {"sample_sigmas": torch.tensor([*step_sigmas, 0.0]), run_state.OPTIONS_KEY: state}
    args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": options}
    times = []
    with torch.inference_mode():
        for sigma in step_sigmas:
            options["sigmas"] = torch.tensor([sigma])
            with run_state.call_scope(options, state.begin_call(img, options)) as call:
                start = time.perf_counter()
                patch(args, stand_in)
                times.append(time.perf_counter() - start)
                state.faults(call)
            state.end_call(call)
    return times


def predict_module_at(revision: str):
    """hyca_core.predict as of a git revision, imported beside the current one (as package hyca_then)."""
    root = Path(__file__).resolve().parents[1]
    package = Path(tempfile.mkdtemp()) / "hyca_then"
    package.mkdir()
    for name in ("__init__.py", "predict.py", "fused.py"):
        source = subprocess.run(["git", "-C", str(root), "show", f"{revision}:hyca_core/{name}"],
                                capture_output=True, text=True, check=True).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("hyca_then.predict")


def pass_seconds(then, now, inputs, run_map, step: int, dtype, fused: bool, reps: int) -> tuple[float, ...]:
    """Median seconds per block of the history work of both streams, interleaved: predicted block the
    patch's way (module `then`) and in one pass per term (`now`), computed block likewise."""
    img, txt = inputs[:2]
    generator = torch.Generator().manual_seed(2)
    streams = {"img": img, "txt": txt}
    outputs = {s: x + 0.1 * torch.randn(x.shape, generator=generator).to(dtype) for s, x in streams.items()}
    histories = {}
    for version, module in enumerate((then, now)):
        for s, x in streams.items():
            table = torch.from_numpy(run_map.coefficients(f"double_block.0.{s}", step))
            history = module.ResidualHistory(len(table))
            for _ in range(len(table)):
                history.push(torch.randn(x.shape, generator=generator).to(dtype))
            histories[version, s] = history, history.prepare(table, fused)

    def predict_then_add():
        for s, x in streams.items():
            history, weights = histories[0, s]
            history.predict(weights).to(x.device, x.dtype).add_(x)

    def predict_onto_input():
        for s, x in streams.items():
            history, weights = histories[1, s]
            history.predict(weights, base=x)

    def push_the_difference_made():
        for s, x in streams.items():
            before = x.clone()
            histories[0, s][0].push(outputs[s] - before)

    def push_difference():
        for s, x in streams.items():
            before = x.clone()
            histories[1, s][0].push_difference(outputs[s], before)

    fns = [predict_then_add, predict_onto_input, push_the_difference_made, push_difference]
    with torch.inference_mode():
        return tuple(median_times(fns, reps, warmup=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--runs", type=int, default=5, help="sampling runs for HyCa's time (median per step)")
    parser.add_argument("--block-runs", type=int, default=3, help="timed forward passes of the block")
    parser.add_argument("--passes", type=int, default=0, metavar="REPS",
                        help="also time the patch's history work against the single-pass calls, REPS times")
    parser.add_argument("--against", metavar="REV",
                        help="with --passes: the patch's way as of git revision REV")
    parser.add_argument("--fused", action="store_true", help="with --passes: the fused kernels")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    pack = node_pack.load()
    schedule = pack.hyca_core.schedule.Schedule(interval=INTERVAL)
    step_sigmas = flow_sigmas(args.steps, 3.0)
    mask = schedule.mask(args.steps)
    run_map = synthetic_run_map(pack, ["double_block.0.img", "double_block.0.txt"], step_sigmas, schedule)

    block, inputs = flux_block(dtype)
    hyca_seconds(pack, inputs, run_map, step_sigmas, dtype)  # warm-up: allocations, coefficient tables
    runs = [hyca_seconds(pack, inputs, run_map, step_sigmas, dtype) for _ in range(args.runs)]
    per_step = np.median(runs, axis=0)
    t_block = block_seconds(block, inputs, args.block_runs)

    predicted, computed = (~mask).sum(), mask.sum()
    per_skipped = per_step.sum() / predicted
    share = per_skipped / t_block
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, DoubleStreamBlock "
          f"{HIDDEN} wide, {IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, "
          f"history of {run_map.history('double_block.0.img')}")
    print(f"block compute                  {t_block * 1e3:9.1f} ms")
    print(f"{args.steps} steps, N={INTERVAL}, warm-up {schedule.warmup}: "
          f"{computed} computed, {predicted} predicted")
    print(f"per predicted block (predict)  {per_step[~mask].mean() * 1e3:9.2f} ms")
    print(f"per computed block (keep)      {per_step[mask].mean() * 1e3:9.2f} ms")
    verdict = "PASS" if share < TARGET else "FAIL"
    print(f"HyCa per skipped block         {per_skipped * 1e3:9.2f} ms = {share:.2%} of the block "
          f"(target < {TARGET:.0%}: {verdict})")
    if args.passes:
        then = predict_module_at(args.against) if args.against else pack.hyca_core.predict
        step = int(np.flatnonzero(~mask)[0])
        old_p, new_p, old_c, new_c = pass_seconds(then, pack.hyca_core.predict, inputs, run_map, step, dtype,
                                                  args.fused, args.passes)
        print(f"history work per block, both streams, median of {args.passes} interleaved "
              f"(patch's way{' as of ' + args.against if args.against else ''} -> single pass"
              f"{', fused' if args.fused else ''}):")
        print(f"  predicted: predict, add input   {old_p * 1e3:7.2f} ms -> predict(base=)     "
              f"{new_p * 1e3:7.2f} ms  ({new_p / old_p:.2f}x)")
        print(f"  computed:  clone, sub, push     {old_c * 1e3:7.2f} ms -> push_difference    "
              f"{new_c * 1e3:7.2f} ms  ({new_c / old_c:.2f}x)")
    return 0 if share < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
