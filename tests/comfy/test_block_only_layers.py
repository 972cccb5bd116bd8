"""Wan's time projection, read only by its blocks, is skipped on a call that predicts every block: the
same bits as computing it, and computed on every call where a block computes."""

import pytest
import torch

from harness import sampling, tiny_models

STEPS, INTERVAL, WARMUP = 10, 3, 3
LATENT = (1, 16, 2, 16, 16)


@pytest.fixture(scope="module")
def wan():
    return tiny_models.build(tiny_models.WAN21_T2V, seed=0)


def test_a_call_that_predicts_every_block_skips_the_time_projection(pack, wan):
    conditioning = sampling.text_conditioning(tiny_models.WAN21_T2V["text_dim"])
    solver_map = sampling.probe_map(pack, wan, conditioning, LATENT, INTERVAL, WARMUP, steps=STEPS)
    schedule = pack.hyca_core.schedule.Schedule(interval=INTERVAL, warmup=WARMUP)
    hyca = pack.nodes.apply_hyca.apply_hyca(wan, solver_map, schedule)
    plain = hyca.clone()
    skipping = [p for p, patch in plain.object_patches.items()
                if isinstance(patch, pack.nodes.block_only_layers.SkippedWhenPredicted)]
    assert skipping == ["diffusion_model.time_projection.forward"]
    del plain.object_patches[skipping[0]]

    computed = []  # the projection's own linear layer runs only where it is computed
    projection = wan.model.diffusion_model.time_projection
    linear = [m for m in projection.modules() if isinstance(m, torch.nn.Linear)][-1]
    handle = linear.register_forward_hook(lambda *_: computed.append(1))
    try:
        outputs = []
        for model in (plain, hyca):
            computed.clear()
            outputs.append(sampling.sample(model, *conditioning, torch.zeros(LATENT), steps=STEPS, seed=5))
            calls = len(computed)
            if model is plain:
                assert calls == STEPS
    finally:
        handle.remove()
    assert torch.equal(outputs[0], outputs[1])
    assert calls == int(schedule.mask(STEPS).sum()) < STEPS  # the calls with computed blocks, no more
