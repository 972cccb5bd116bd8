"""Caching at other granularities than the block: the whole model's output, one residual per stack."""

import logging

import pytest
import torch

from harness import sampling
from harness.metrics import latent_psnr
from harness.run_log import block_counts


def test_whole_model_granularity_caches_the_model_output(pack, flux, conditioning, latent, full, caplog,
                                                         steps):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    whole_map, _ = pack.nodes.calibrate_node.probe(flux, 0, steps, 1.0, "euler", "simple", *conditioning,
                                                   {"samples": latent}, schedule, granularity="model")
    assert list(whole_map.blocks) == ["model.out"] and len(whole_map.blocks["model.out"].labels) == 16
    apply = pack.nodes.apply_hyca.apply_hyca
    exact = pack.hyca_core.schedule.Schedule(1, 3)
    same = sampling.sample(apply(flux, whole_map, exact, granularity="model"), *conditioning, latent,
                           steps=steps, seed=5)
    assert torch.equal(same, full)
    patched = apply(flux, whole_map, schedule, granularity="model")
    assert "patches_replace" not in patched.model_options["transformer_options"]
    with caplog.at_level(logging.INFO):
        out = sampling.sample(patched, *conditioning, latent, steps=steps, seed=5)
    assert block_counts(caplog.text) == (7, 13)  # model calls: computed steps 0,1,2,6,10,14,18
    assert not torch.equal(out, full) and latent_psnr(out, full) > 25
    mismatch = 'calibrated with granularity "model", but HyCa Apply is set to "block"'
    with pytest.raises(ValueError, match=mismatch):
        apply(flux, whole_map, schedule, granularity="block")  # a whole-model map does not fit per block


def test_stack_granularity_caches_one_residual_per_stack(pack, flux, conditioning, latent, full, caplog,
                                                         steps):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    stack_map, _ = pack.nodes.calibrate_node.probe(flux, 0, steps, 1.0, "euler", "simple", *conditioning,
                                                   {"samples": latent}, schedule, granularity="stack")
    assert set(stack_map.blocks) == {"double_blocks.img", "double_blocks.txt", "single_blocks.img"}
    apply = pack.nodes.apply_hyca.apply_hyca
    exact = pack.hyca_core.schedule.Schedule(1, 3)
    same = sampling.sample(apply(flux, stack_map, exact, granularity="stack"), *conditioning, latent,
                           steps=steps, seed=5)
    assert torch.equal(same, full)
    with caplog.at_level(logging.INFO):
        out = sampling.sample(apply(flux, stack_map, schedule, granularity="stack"), *conditioning, latent,
                              steps=steps, seed=5)
    assert block_counts(caplog.text) == (28, 52)  # every block of a predicted step is skipped, as per block
    assert not torch.equal(out, full) and latent_psnr(out, full) > 25
    mismatch = 'calibrated with granularity "stack", but HyCa Apply is set to "block"'
    with pytest.raises(ValueError, match=mismatch):
        apply(flux, stack_map, schedule, granularity="block")  # a stack map does not fit per block
