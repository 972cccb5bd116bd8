"""HyCa under ComfyUI's Skip Layer Guidance on the trained reference model.

cfg 1 (where the layer-skipped pass shares the conditional pass's branch and sigma), 20 steps euler/simple,
one sample per class, HyCa Apply at N=4, warm-up 2 with the shipped map; SLG skips block 3 at scale 3, over
its default-like window (the first 15% of the denoising) and over the whole run. Prints the PSNR (peak 1) of
the decoded images against the same graph without HyCa, and HyCa's alone against the plain model.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import comfy_runtime, node_pack  # noqa: E402
from harness import reference_model as reference  # noqa: E402
from harness.metrics import image_psnr  # noqa: E402
from harness.other_nodes import skip_layer_guidance  # noqa: E402

STEPS, N, WARMUP, LAYER = 20, 4, 2, "3"


def main() -> int:
    comfy_runtime.load(base_directory=tempfile.mkdtemp(prefix="hyca-bench-"))
    pack = node_pack.load()
    model = reference.load()
    schedule = pack.hyca_core.schedule.Schedule(N, WARMUP)

    def apply(m):
        return pack.nodes.apply_hyca.apply_hyca(m, None, schedule)

    def images(m):
        return reference.decode(reference.sample(m, range(reference.NUM_CLASSES), steps=STEPS))

    print(f"reference model, cfg 1, {STEPS} steps, HyCa N={N} warm-up {WARMUP}; PSNR of decoded images "
          "(peak 1, mean per image) against the same graph without HyCa")
    print(f"HyCa alone: {image_psnr(images(apply(model)), images(model)):.2f} dB")
    for end in (0.15, 1.0):
        guided = images(skip_layer_guidance(model, end_percent=end, double_layers=LAYER))
        with_hyca = images(skip_layer_guidance(apply(model), end_percent=end, double_layers=LAYER))
        print(f"SLG on block {LAYER}, scale 3, first {end:.0%} of the denoising: "
              f"{image_psnr(with_hyca, guided):.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
