"""The quality benchmark's measuring path on each trained reference model, through ComfyUI's sampler:
counting happens in an untimed run, timed runs carry no hook, speed-ups come with their bound."""

import math

import pytest

from benchmarks.quality import run, timing
from benchmarks.quality.methods import Method, Methods
from benchmarks.quality.models import MODELS

STEPS = 6


@pytest.fixture(scope="module", params=sorted(MODELS))
def bench(pack, request):
    return run.Bench(MODELS[request.param], pack, rounds=2, say=lambda line="": None)


def test_full_compute_is_counted_and_its_block_share_measured_without_leaving_hooks(bench):
    reference = bench.reference(run.Setting((0, 1), (100, 101), bench.spec.sizes[0]), steps=STEPS)
    assert (reference.blocks, reference.passes) == (len(bench.blocks) * STEPS, STEPS)
    assert 0 < reference.share < 1
    timing.assert_unhooked([bench.entry, *bench.blocks])


def test_hyca_is_counted_apart_and_timed_interleaved_with_full_compute(bench, pack):
    reference = bench.reference(run.Setting((0, 1), (100, 101), bench.spec.sizes[0]), steps=STEPS)
    methods = Methods(pack, bench.model, run.calibrate(bench))
    [hyca] = bench.measure([Method("HyCa N=2", "HyCa fixed", methods.hyca(2, False), steps=STEPS, n=2)],
                           reference)
    computed = methods.computed_steps(2, steps=STEPS)
    assert computed < STEPS
    # predicted steps skip the blocks, not the model's pass
    assert (hyca.blocks, hyca.passes) == (len(bench.blocks) * computed, STEPS)
    assert hyca.bound == pytest.approx(timing.amdahl_bound(reference.share, computed / STEPS, 1.0))
    assert len(reference.runs) == bench.rounds  # full compute ran in every round beside HyCa
    assert hyca.seconds > 0 and math.isfinite(hyca.wall_x) and math.isfinite(hyca.noise)
    assert math.isfinite(hyca.psnr) and hyca.psnr > 20
    timing.assert_unhooked([bench.entry, *bench.blocks])


def test_a_cache_that_skips_the_whole_model_is_bounded_by_the_passes_it_kept(bench):
    from comfy_extras.nodes_easycache import EasyCacheNode

    if bench.spec is MODELS["sd3"]:
        pytest.skip("EasyCache never skips on SD3: ComfyUI's MMDiT runs no DIFFUSION_MODEL wrapper, its hook")

    steps = 20
    reference = bench.reference(run.Setting((0, 1), (100, 101), bench.spec.sizes[0]), steps=steps)
    easycache = EasyCacheNode.execute(bench.model, 1.0, 0.15, 0.95, False)[0]
    [result] = bench.measure([Method("EasyCache", "EasyCache", easycache, steps=steps)], reference)
    assert result.passes < steps  # its skipped steps ran neither the blocks nor the embeddings
    assert result.blocks == len(bench.blocks) * result.passes
    assert result.bound == pytest.approx(steps / result.passes)
