"""The residual history's memory for a FLUX-size model, from the code's own accounting.

ResidualHistory on PyTorch's meta device allocates nothing but accounts exactly as on a GPU; the
README states these figures, and this test keeps the two in step.
"""

from pathlib import Path

import pytest
import torch

from hyca_core.predict import ResidualHistory

# FLUX.1-dev at 1024x1024, batch 1: 4096 image + 512 text tokens, hidden 3072; 19 double blocks
# (an image and a text stream each) and 38 single blocks (both, concatenated).
FLUX_STREAMS = [(4096, 3072)] * 19 + [(512, 3072)] * 19 + [(4608, 3072)] * 38
CACHED = 3  # residuals per stream with the default warm-up of 3 (the longest solver history it admits)
README_FIGURES = {torch.float32: "9.0 GiB", torch.bfloat16: "4.5 GiB", torch.float16: "4.5 GiB"}


def flux_history_bytes(dtype: torch.dtype) -> int:
    total = 0
    for tokens, width in FLUX_STREAMS:
        history = ResidualHistory(CACHED, dtype=dtype, device="meta")
        for _ in range(CACHED + 1):
            history.push(torch.empty(1, tokens, width, device="meta"))
        total += history.nbytes
    return total


@pytest.mark.parametrize("dtype", list(README_FIGURES))
def test_flux_history_size_matches_the_readme(dtype):
    nbytes = flux_history_bytes(dtype)
    assert nbytes == CACHED * 262_656 * 3072 * torch.finfo(dtype).bits // 8
    stated = f"{nbytes / 2**30:.1f} GiB"
    assert stated == README_FIGURES[dtype]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"| {str(dtype).removeprefix('torch.')} | {stated} |" in readme
