"""The residual history's memory for a FLUX-size model, from the code's own accounting.

ResidualHistory on PyTorch's meta device allocates nothing but accounts exactly as on a GPU; the
README states these figures, and this test keeps the two in step.
"""

from pathlib import Path

import pytest
import torch

from hyca_core.predict import ResidualHistory

# FLUX.1-dev at 1024x1024, batch 1: 4096 image + 512 text tokens, hidden 3072; 19 double blocks
# (an image and a text stream each) and 38 single blocks (both, concatenated); a 16 x 128 x 128
# latent. The (tokens, channels) of every cached residual, per granularity:
FLUX_RESIDUALS = {
    "block": [(4096, 3072)] * 19 + [(512, 3072)] * 19 + [(4608, 3072)] * 38,
    "stack": [(4096, 3072), (512, 3072), (4608, 3072)],
    "model": [(128 * 128, 16)],
}
CACHED = 3  # residuals per stream with the default warm-up of 3 (the longest solver history it admits)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flux_history_bytes(granularity: str, dtype: torch.dtype) -> int:
    total = 0
    for tokens, width in FLUX_RESIDUALS[granularity]:
        history = ResidualHistory(CACHED, dtype=dtype, device="meta")
        for _ in range(CACHED + 1):
            history.push(torch.empty(1, tokens, width, device="meta"))
        total += history.nbytes
    return total


def _readable(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@pytest.mark.parametrize("granularity", list(FLUX_RESIDUALS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_flux_history_size_is_the_readme_figure(granularity, dtype):
    nbytes = flux_history_bytes(granularity, DTYPES[dtype])
    tokens = sum(t * w for t, w in FLUX_RESIDUALS[granularity])
    assert nbytes == CACHED * tokens * torch.finfo(DTYPES[dtype]).bits // 8
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"| {granularity} | {dtype} | {_readable(nbytes)} |" in readme


def test_stack_granularity_holds_a_fraction_of_per_block_memory():
    per_block, per_stack = (flux_history_bytes(g, torch.bfloat16) for g in ("block", "stack"))
    assert per_block / per_stack > 25
