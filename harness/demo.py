"""The README's demo: a small model sampled through ComfyUI with and without HyCa.

Prints the wall-clock speed-up, the share of block computations saved, and the PSNR against full
compute next to the honest bar, sampling with fewer steps at the same number of full computations;
writes full | HyCa | fewer steps | difference side by side.

Until the trained reference model lands, the model is a small FLUX-architecture ComfyUI model with
seeded random weights: it shows the whole path working, not image quality.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import node_pack, sampling, tiny_models
from .metrics import latent_psnr

DEMO_FLUX = dict(tiny_models.FLUX, hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=2,
                 depth_single_blocks=4, context_in_dim=64, vec_in_dim=32)


def to_rgb(latent: torch.Tensor, low: float, high: float, scale: int = 4) -> Image.Image:
    """Three latent channels as an RGB picture, on a shared value range."""
    rgb = ((latent[0, :3] - low) / (high - low)).clamp(0, 1).permute(1, 2, 0).numpy()
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def timed(fn, repeats: int = 1):
    """Result and the fastest of ``repeats`` wall-clock times (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=4, help="HyCa's N: one full step every N")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the fastest counts")
    parser.add_argument("--out", type=Path, default=Path("output/demo.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    pack = node_pack.load()
    Schedule = pack.hyca_core.schedule.Schedule
    model = tiny_models.build(DEMO_FLUX, seed=0)
    positive, negative = sampling.flux_conditioning(DEMO_FLUX["context_in_dim"], DEMO_FLUX["vec_in_dim"])
    latent = torch.zeros(1, 16, args.size, args.size)
    schedule = Schedule(interval=args.interval, warmup=args.warmup)

    def run(m, steps=args.steps):
        return sampling.sample(m, positive, negative, latent, steps=steps, seed=42)

    (solver_map, _), calibration_s = timed(lambda: pack.nodes.calibrate_node.probe(
        model, 7, args.steps, 1.0, "euler", "simple", positive, negative, {"samples": latent}, schedule))
    patched = pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule)
    run(patched)  # compiles the map for this schedule once (cached for later runs), warms caches
    computed = int(schedule.mask(args.steps).sum())
    full, full_s = timed(lambda: run(model), args.repeats)
    hyca, hyca_s = timed(lambda: run(patched), args.repeats)
    fewer, fewer_s = timed(lambda: run(model, steps=computed), args.repeats)

    print(f"model: FLUX-architecture ComfyUI model, hidden {DEMO_FLUX['hidden_size']}, "
          f"{DEMO_FLUX['depth']}+{DEMO_FLUX['depth_single_blocks']} blocks, random weights (seed 0)")
    print(f"calibration (probe + choosing): {calibration_s:.1f} s")
    print(f"{'':28}{'time':>8}{'speed-up':>10}{'PSNR vs full':>14}")
    print(f"{'full compute, ' + str(args.steps) + ' steps':28}{full_s:7.2f}s{1.0:9.2f}x{'-':>14}")
    print(f"{'HyCa N=' + str(args.interval):28}{hyca_s:7.2f}s{full_s / hyca_s:9.2f}x"
          f"{latent_psnr(hyca, full):11.2f} dB")
    print(f"{'fewer steps (' + str(computed) + ', same compute)':28}{fewer_s:7.2f}s{full_s / fewer_s:9.2f}x"
          f"{latent_psnr(fewer, full):11.2f} dB")
    print(f"block computations: {computed}/{args.steps} steps computed ({args.steps / computed:.2f}x fewer)")

    low, high = float(full.min()), float(full.max())
    difference = (hyca - full).abs() * 10 + low
    panels = [to_rgb(t, low, high) for t in (full, hyca, fewer, difference)]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * 3, panels[0].height), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (panel.width + 8), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} (full | HyCa | fewer steps | 10x |HyCa - full|)")


if __name__ == "__main__":
    main()
