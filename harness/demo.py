"""The README's demo: the trained reference model sampled through ComfyUI with and without HyCa.

The model is the small Wan 2.1-layout transformer of ``harness/reference_model.py`` (coloured digits,
32x32), its solver map the one shipped in ``calibrations/``. One batch, one digit per image, is
sampled three ways: full compute, HyCa, and plain sampling with fewer steps at the same number of
full computations (the honest bar). Printed: the PSNR of each against full compute, how many images
a classifier still reads as their digit, the wall-clock speed-up next to the ratio of block
computations and its Amdahl bound. Written: full | HyCa | fewer steps | difference, side by side.

Wall-clock times come from runs with nothing attached, taken in turns (full, HyCa, fewer steps,
full, ...) so that load from elsewhere on the machine falls on all three alike; the fastest of each
counts, the least disturbed (and not HyCa's first run, which also fits the map to this schedule).
The Amdahl bound needs the share of a full run's time spent inside the transformer blocks, measured
in one separate run with timing hooks on the blocks: with share p and r times fewer block
computations, no caching scheme can beat 1 / ((1 - p) + p / r), since the rest of the step (the
embeddings, the sampler, the guidance) still runs every step.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import node_pack, reference_model
from .metrics import image_psnr
from .reference_data import NUM_CLASSES, grid
from .wall_clock import amdahl_bound, block_share

DIFFERENCE_GAIN = 4  # the difference panel shows 4x |HyCa - full|


class _QuietAudio(logging.Filter):
    """ComfyUI warns at import that torchaudio is missing: only its audio models need it, not this demo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchaudio missing")


def interleaved_runs(runs: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """The fastest wall-clock seconds of each run and its output, the runs taken in turns."""
    seconds, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, outputs


def labelled(picture: Image.Image, label: str) -> Image.Image:
    canvas = Image.new("RGB", (picture.width, picture.height + 18), "white")
    canvas.paste(picture, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), label, fill="black")
    return canvas


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=reference_model.STEPS)
    parser.add_argument("--cfg", type=float, default=reference_model.CFG)
    parser.add_argument("--batch", type=int, default=8, help="images, one digit each (0, 1, 2, ...)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--interval", type=int, help="HyCa's N (default: the N the map was tuned for)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: the map's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, in turns")
    parser.add_argument("--out", type=Path, default=Path("output/demo.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].addFilter(_QuietAudio())
    # The model is too small to gain from intra-op threads; on a busy machine their spin-waiting made
    # a run 8-45x slower (and its time erratic) than on one thread.
    torch.set_num_threads(1)

    pack = node_pack.load()
    model = reference_model.load()
    solver_map = pack.nodes.map_store.load_for(model)
    if solver_map is None:
        raise SystemExit("no solver map for the reference model in calibrations/: "
                         "calibrate one with HyCa Calibrate (or harness.sampling.probe_map)")
    tuned = solver_map.probe_schedule
    schedule = pack.hyca_core.schedule.Schedule(interval=args.interval or tuned.interval,
                                                warmup=args.warmup or tuned.warmup)
    mask = schedule.mask(args.steps)
    computed = int(mask.sum())
    patched = pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule)
    labels = [i % NUM_CLASSES for i in range(args.batch)]

    def sampler(m, steps=args.steps):
        return lambda: reference_model.sample(m, labels, seed=args.seed, steps=steps, cfg=args.cfg)

    runs = {"full": sampler(model), "hyca": sampler(patched), "fewer": sampler(model, computed)}
    # also warms ComfyUI's caches for the timed runs
    share = block_share(runs["full"], model.model.diffusion_model.blocks)
    seconds, latents = interleaved_runs(runs, args.repeats)

    images = {name: reference_model.decode(latent) for name, latent in latents.items()}
    classifier = reference_model.load_classifier()
    read = {name: int((classifier.predict(x) == torch.tensor(labels)).sum()) for name, x in images.items()}
    ratio = args.steps / computed
    amdahl = amdahl_bound(share, 1 / ratio, 1.0)

    print(f"model: the reference Wan 2.1-layout transformer ({reference_model.WEIGHTS.name}), "
          f"{args.batch} images, {args.steps} steps, cfg {args.cfg}, euler / simple")
    print(f"map: {solver_map.architecture.rsplit('.', 1)[-1]}, tuned for N={tuned.interval}, "
          f"warm-up {tuned.warmup}; run with N={schedule.interval}, warm-up {schedule.warmup}")
    print(f"{'':34}{'time':>8}{'speed-up':>10}{'PSNR vs full':>14}{'digit read':>12}")
    rows = [("full compute, " + str(args.steps) + " steps", "full"),
            (f"HyCa N={schedule.interval}", "hyca"),
            (f"fewer steps ({computed}, same compute)", "fewer")]
    for title, name in rows:
        quality = "-" if name == "full" else f"{image_psnr(images[name], images['full']):.2f} dB"
        print(f"{title:34}{seconds[name]:7.2f}s{seconds['full'] / seconds[name]:9.2f}x{quality:>14}"
              f"{read[name]:>8}/{args.batch}")
    print(f"block computations: {computed} of {args.steps} steps computed, {ratio:.2f}x fewer; "
          f"the blocks take {share:.0%} of a full run, so the wall-clock bound (Amdahl) is {amdahl:.2f}x")
    print("PSNR: per image, pixels in [0, 1], mean over the batch. Times: fastest of "
          f"{args.repeats} runs of each, taken in turns.")
    if seconds["full"] / seconds["hyca"] > amdahl * 1.05 or seconds["full"] / seconds["fewer"] > ratio * 1.05:
        print("note: a speed-up above its bound means other load on the machine disturbed the timings; "
              "run again on an idle machine")

    columns = min(args.batch, 4)
    difference = (images["hyca"] - images["full"]).abs() * DIFFERENCE_GAIN
    panels = [labelled(grid(to_uint8(images["full"]), columns), f"full, {args.steps} steps"),
              labelled(grid(to_uint8(images["hyca"]), columns), f"HyCa N={schedule.interval}"),
              labelled(grid(to_uint8(images["fewer"]), columns), f"{computed} steps"),
              labelled(grid(to_uint8(difference), columns), f"{DIFFERENCE_GAIN}x |HyCa - full|")]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 12 * 3, panels[0].height), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (panel.width + 12), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} (full | HyCa | fewer steps | {DIFFERENCE_GAIN}x |HyCa - full|)")


if __name__ == "__main__":
    main()
