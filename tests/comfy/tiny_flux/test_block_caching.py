"""HyCa per block on a tiny real ComfyUI FLUX: calibrate, apply, sample through ComfyUI's sampler."""

import logging

import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr


def test_map_covers_every_block_stream(solver_map, flux):
    depth, single = tiny_models.FLUX["depth"], tiny_models.FLUX["depth_single_blocks"]
    expected = {f"double_block.{i}.{s}" for i in range(depth) for s in ("img", "txt")}
    expected |= {f"single_block.{i}.img" for i in range(single)}
    assert set(solver_map.blocks) == expected
    width = tiny_models.FLUX["hidden_size"]
    assert all(len(b.labels) == width for b in solver_map.blocks.values())


def test_interval_one_is_bit_identical(pack, flux, solver_map, conditioning, latent, full, steps,
                                       apply_every):
    patched = apply_every(flux, solver_map, interval=1)
    assert torch.equal(sampling.sample(patched, *conditioning, latent, steps=steps, seed=5), full)


def test_patches_land_on_every_block_and_input_model_is_untouched(pack, flux, solver_map, apply_every):
    patched = apply_every(flux, solver_map, interval=4)
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    depth, single = tiny_models.FLUX["depth"], tiny_models.FLUX["depth_single_blocks"]
    assert set(replaced) == ({("double_block", i) for i in range(depth)}
                             | {("single_block", i) for i in range(single)})
    assert "patches_replace" not in flux.model_options["transformer_options"]
    assert "hyca" not in flux.model_options["transformer_options"]


def test_caching_skips_the_scheduled_blocks_and_stays_close(pack, flux, solver_map, conditioning, latent,
                                                             full, caplog, steps, apply_every):
    patched = apply_every(flux, solver_map, interval=4)
    with caplog.at_level(logging.INFO):
        out = sampling.sample(patched, *conditioning, latent, steps=steps, seed=5)
    blocks = tiny_models.FLUX["depth"] + tiny_models.FLUX["depth_single_blocks"]
    # 20 steps, warm-up 3, then every 4th from step 2: computed steps 0,1,2,6,10,14,18
    computed_steps = 7
    counts = f"{computed_steps * blocks} block calls computed, {(steps - computed_steps) * blocks} predicted"
    assert counts in caplog.text
    assert not torch.equal(out, full)
    assert latent_psnr(out, full) > 30


def test_fixed_pool_and_fitted_both_run(pack, flux, solver_map, conditioning, latent, full, steps,
                                        apply_every):
    fixed = sampling.sample(apply_every(flux, solver_map, 4, fitted=False), *conditioning, latent,
                            steps=steps, seed=5)
    fitted = sampling.sample(apply_every(flux, solver_map, 4, fitted=True), *conditioning, latent,
                             steps=steps, seed=5)
    assert latent_psnr(fixed, full) > 30 and latent_psnr(fitted, full) > 30
    assert not torch.equal(fixed, fitted)


def test_single_solver_baselines_predict_every_channel_alike(pack, flux, solver_map, conditioning, latent,
                                                             full, steps):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    apply = pack.nodes.apply_hyca.apply_hyca
    fora = sampling.sample(apply(flux, solver_map, schedule, single_solver=("reuse", "step")), *conditioning,
                           latent, steps=steps, seed=5)
    taylor = sampling.sample(apply(flux, solver_map, schedule, single_solver=("taylor1", "step")),
                             *conditioning, latent, steps=steps, seed=5)
    assert not torch.equal(fora, taylor) and not torch.equal(fora, full)
    step_sigmas = solver_map.probe_sigmas
    run_map = pack.hyca_core.run_maps.run_map
    reuse = run_map(solver_map, step_sigmas, schedule, single_solver=("reuse", "step"))
    for table in reuse.tables.values():
        for weights in table.values():
            assert (weights[:-1] == 0).all() and (weights[-1] == 1).all()

