"""The residual history's memory for real model sizes, from the code's own accounting.

ResidualHistory on PyTorch's meta device allocates nothing but accounts exactly as on a GPU; the
README states these figures, and this test keeps the two in step. How many residuals a stream keeps
is derived from HyCa Apply's default warm-up: the longest history among the pool members it admits.
"""

from pathlib import Path

import pytest
import torch

from hyca_core import defaults
from hyca_core.predict import ResidualHistory
from hyca_core.solvers import warmup_pool

# The (tokens, channels) of every cached residual, per model and granularity, batch 1.
# FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens, hidden 3072; 19 double blocks (an image and a
# text stream each) and 38 single blocks (both, concatenated); a 16 x 128 x 128 latent.
# Qwen-Image at 1328x1328: 83x83 image tokens + 256 text tokens, hidden 3072, 60 double-stream blocks.
# Wan 2.1 at 832x480, 81 frames: 21 x 30 x 52 video tokens (the text enters by cross-attention, so a
# block caches one stream); 14B: 40 blocks of 5120, 1.3B: 30 blocks of 1536.
WAN_TOKENS = 21 * 30 * 52
QWEN_IMAGE, QWEN_TEXT = 83 * 83, 256
RESIDUALS = {
    ("FLUX.1-dev", "block"): [(4096, 3072)] * 19 + [(512, 3072)] * 19 + [(4608, 3072)] * 38,
    ("FLUX.1-dev", "stack"): [(4096, 3072), (512, 3072), (4608, 3072)],
    ("FLUX.1-dev", "model"): [(128 * 128, 16)],
    ("Qwen-Image", "block"): [(QWEN_IMAGE, 3072)] * 60 + [(QWEN_TEXT, 3072)] * 60,
    ("Qwen-Image", "stack"): [(QWEN_IMAGE, 3072), (QWEN_TEXT, 3072)],
    ("Wan 2.1 14B", "block"): [(WAN_TOKENS, 5120)] * 40,
    ("Wan 2.1 14B", "stack"): [(WAN_TOKENS, 5120)],
    ("Wan 2.1 1.3B", "block"): [(WAN_TOKENS, 1536)] * 30,
    ("Wan 2.1 1.3B", "stack"): [(WAN_TOKENS, 1536)],
}
CACHED = max(s.history for s in warmup_pool(defaults.WARMUP))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# FLUX in every history dtype; the others in bfloat16, the dtype they run in
ROWS = [(model, granularity, dtype) for (model, granularity) in RESIDUALS
        for dtype in (DTYPES if model == "FLUX.1-dev" else ["bfloat16"])]


def history_bytes(model: str, granularity: str, dtype: torch.dtype) -> int:
    total = 0
    for tokens, width in RESIDUALS[model, granularity]:
        history = ResidualHistory(CACHED, dtype=dtype, device="meta")
        for _ in range(CACHED + 1):
            history.push(torch.empty(1, tokens, width, device="meta"))
        total += history.nbytes
    return total


def _readable(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def test_the_default_warmup_keeps_two_residuals():
    assert defaults.WARMUP == 2 and CACHED == 2


@pytest.mark.parametrize(("model", "granularity", "dtype"), ROWS)
def test_history_size_is_the_readme_figure(model, granularity, dtype):
    nbytes = history_bytes(model, granularity, DTYPES[dtype])
    elements = sum(t * w for t, w in RESIDUALS[model, granularity])
    assert nbytes == CACHED * elements * torch.finfo(DTYPES[dtype]).bits // 8
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"| {model} | {granularity} | {dtype} | {_readable(nbytes)} |" in readme


def test_stack_granularity_holds_a_fraction_of_per_block_memory():
    per_block, per_stack = (history_bytes("FLUX.1-dev", g, torch.bfloat16) for g in ("block", "stack"))
    assert per_block / per_stack > 25
