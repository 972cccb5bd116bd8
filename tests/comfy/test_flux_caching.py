"""HyCa on a tiny real ComfyUI FLUX: calibrate, apply, sample through ComfyUI's sampler."""

import logging

import pytest
import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr

STEPS = 20


@pytest.fixture(scope="module")
def flux_config():
    return tiny_models.FLUX  # the larger tiny FLUX, with its own latent and map below


@pytest.fixture(scope="module")
def latent():
    return torch.zeros(1, 16, 32, 32)


@pytest.fixture(scope="module")
def full(flux, conditioning, latent):
    return sampling.sample(flux, *conditioning, latent, steps=STEPS, seed=5)


@pytest.fixture(scope="module")
def solver_map(pack, flux, conditioning, latent):
    calibrate = pack.nodes.calibrate_node
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    solver_map, _ = calibrate.probe(flux, 0, STEPS, 1.0, "euler", "simple", *conditioning,
                                    {"samples": latent}, schedule)
    return solver_map


def _apply(pack, model, solver_map, interval, **kwargs):
    schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=3)
    return pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule, **kwargs)


def test_map_covers_every_block_stream(solver_map, flux):
    depth, single = tiny_models.FLUX["depth"], tiny_models.FLUX["depth_single_blocks"]
    expected = {f"double_block.{i}.{s}" for i in range(depth) for s in ("img", "txt")}
    expected |= {f"single_block.{i}.img" for i in range(single)}
    assert set(solver_map.blocks) == expected
    width = tiny_models.FLUX["hidden_size"]
    assert all(len(b.labels) == width for b in solver_map.blocks.values())


def test_interval_one_is_bit_identical(pack, flux, solver_map, conditioning, latent, full):
    patched = _apply(pack, flux, solver_map, interval=1)
    assert torch.equal(sampling.sample(patched, *conditioning, latent, steps=STEPS, seed=5), full)


def test_patches_land_on_every_block_and_input_model_is_untouched(pack, flux, solver_map):
    patched = _apply(pack, flux, solver_map, interval=4)
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    depth, single = tiny_models.FLUX["depth"], tiny_models.FLUX["depth_single_blocks"]
    assert set(replaced) == ({("double_block", i) for i in range(depth)}
                             | {("single_block", i) for i in range(single)})
    assert "patches_replace" not in flux.model_options["transformer_options"]
    assert "hyca" not in flux.model_options["transformer_options"]


def test_caching_skips_the_scheduled_blocks_and_stays_close(pack, flux, solver_map, conditioning, latent,
                                                             full, caplog):
    patched = _apply(pack, flux, solver_map, interval=4)
    with caplog.at_level(logging.INFO):
        out = sampling.sample(patched, *conditioning, latent, steps=STEPS, seed=5)
    blocks = tiny_models.FLUX["depth"] + tiny_models.FLUX["depth_single_blocks"]
    # 20 steps, warm-up 3, then every 4th from step 2: computed steps 0,1,2,6,10,14,18
    computed_steps = 7
    counts = f"{computed_steps * blocks} block calls computed, {(STEPS - computed_steps) * blocks} predicted"
    assert counts in caplog.text
    assert not torch.equal(out, full)
    assert latent_psnr(out, full) > 30


def test_fixed_pool_and_fitted_both_run(pack, flux, solver_map, conditioning, latent, full):
    fixed = sampling.sample(_apply(pack, flux, solver_map, 4, fitted=False), *conditioning, latent,
                            steps=STEPS, seed=5)
    fitted = sampling.sample(_apply(pack, flux, solver_map, 4, fitted=True), *conditioning, latent,
                             steps=STEPS, seed=5)
    assert latent_psnr(fixed, full) > 30 and latent_psnr(fitted, full) > 30
    assert not torch.equal(fixed, fitted)


def test_map_round_trips_through_a_file(pack, solver_map, tmp_path):
    SolverMap = pack.hyca_core.solver_map.SolverMap
    path = solver_map.save(tmp_path / "tiny.hyca.safetensors")
    loaded = SolverMap.load(path)
    assert loaded.architecture == solver_map.architecture
    assert loaded.blocks.keys() == solver_map.blocks.keys()
    for key, block in solver_map.blocks.items():
        for name in ("labels", "series", "solver", "variable", "errors", "indicators"):
            assert (getattr(loaded.blocks[key], name) == getattr(block, name)).all()


def test_map_of_another_width_is_refused(pack, solver_map):
    other = tiny_models.build(dict(tiny_models.FLUX, hidden_size=32, num_heads=2), seed=1)
    with pytest.raises(pack.hyca_core.solver_map.MapError, match="width"):
        _apply(pack, other, solver_map, interval=4)


def _counts(caplog):
    import re

    found = re.findall(r"(\d+) block calls computed, (\d+) predicted", caplog.text)
    return tuple(int(x) for x in found[-1]) if found else None


def test_auto_mode_calibrates_on_the_first_run_saves_and_reuses(pack, conditioning, latent, caplog):
    import folder_paths

    model = tiny_models.build(tiny_models.FLUX, seed=11)  # a base model no map exists for yet
    map_store = pack.nodes.map_store
    assert map_store.find(model) is None
    patched = _apply(pack, model, None, interval=4)
    full = sampling.sample(model, *conditioning, latent, steps=STEPS, seed=5)
    with caplog.at_level(logging.INFO):
        first = sampling.sample(patched, *conditioning, latent, steps=STEPS, seed=5)
    assert torch.equal(first, full)  # the calibrating run computes everything
    saved = map_store.find(model)
    assert saved is not None and saved.parent == pack.nodes.map_store.search_folders()[0]
    assert str(saved).startswith(folder_paths.models_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = sampling.sample(patched, *conditioning, latent, steps=STEPS, seed=5)
    assert _counts(caplog) == (28, 52)
    assert latent_psnr(second, full) > 30
    # a new Apply on the same base model finds the saved map without being given one
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = sampling.sample(_apply(pack, model, None, interval=4), *conditioning, latent,
                                steps=STEPS, seed=5)
    assert "using solver map" in caplog.text and _counts(caplog) == (28, 52)
    assert torch.equal(again, second)


def test_lora_patches_do_not_change_the_fingerprint(pack, conditioning, latent):
    import comfy.sd

    model = tiny_models.build(tiny_models.FLUX, seed=12)
    fingerprint = pack.nodes.map_store.fingerprint
    before = fingerprint(model)
    weights = model.model.state_dict()
    keys = [k for k in weights if k.endswith("img_attn.qkv.weight")]
    original = {k: weights[k].clone() for k in keys}
    # a LoRA file's tensors, applied the way LoraLoaderModelOnly applies them
    lora_sd = {}
    for k in keys:
        out_features, in_features = weights[k].shape
        name = k[: -len(".weight")]
        lora_sd[f"{name}.lora_up.weight"] = torch.randn(out_features, 2) * 0.1
        lora_sd[f"{name}.lora_down.weight"] = torch.randn(2, in_features) * 0.1
    lora, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    assert {k for k in lora.patches} == set(keys)
    lora_out = sampling.sample(lora, *conditioning, latent, steps=4, seed=5)
    # loading the LoRA model patched the shared weights in place; the originals are in its backup
    assert any(not torch.equal(model.model.state_dict()[k], original[k]) for k in keys)
    assert fingerprint(lora) == before
    assert not torch.equal(lora_out, sampling.sample(model, *conditioning, latent, steps=4, seed=5))
    assert fingerprint(model) == before
    # UNETLoader -> LoraLoaderModelOnly -> HyCa Apply: the map calibrated without the LoRA is found
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    base_map, _ = pack.nodes.calibrate_node.probe(model, 0, STEPS, 1.0, "euler", "simple", *conditioning,
                                                  {"samples": latent}, schedule)
    (saved,) = pack.nodes.map_store.save_for(base_map)
    assert pack.nodes.map_store.find(lora) == saved


def test_adaptive_mode_predicts_where_the_measured_error_allows(pack, flux, solver_map, conditioning, latent,
                                                               full, caplog):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    apply = pack.nodes.apply_hyca.apply_hyca
    blocks = tiny_models.FLUX["depth"] + tiny_models.FLUX["depth_single_blocks"]
    with caplog.at_level(logging.INFO):
        strict = sampling.sample(apply(flux, solver_map, schedule, adaptive_tolerance=0.0), *conditioning,
                                 latent, steps=STEPS, seed=5)
    assert torch.equal(strict, full) and _counts(caplog) is None  # zero tolerance: nothing predicted
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loose = sampling.sample(apply(flux, solver_map, schedule, adaptive_tolerance=0.5), *conditioning,
                                latent, steps=STEPS, seed=5)
    computed, predicted = _counts(caplog)
    assert computed + predicted == STEPS * blocks and predicted > 0
    assert predicted % (blocks - 1) == 0  # a predicted step still computes its first block
    assert latent_psnr(loose, full) > 30


def test_inspector_plots_and_summarizes_and_compares(pack, flux, solver_map, conditioning, latent):
    inspector = pack.nodes.inspector_node.HyCaSolverInspector
    image, text = inspector.execute(solver_map).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] > 300 and image.shape[2] > 500 and 0 <= float(image.min()) < float(image.max()) <= 1
    assert solver_map.architecture in text and "solver mix" in text
    # a map from another probe seed of the same model: clusterings compared block by block
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    other, _ = pack.nodes.calibrate_node.probe(flux, 1, STEPS, 1.0, "euler", "simple", *conditioning,
                                               {"samples": latent}, schedule)
    _, compared = inspector.execute(solver_map, other).result
    assert "adjusted Rand index vs the second map over 6 block streams" in compared
    _, same = inspector.execute(solver_map, solver_map).result
    assert "mean 1.000, min 1.000" in same


def test_single_solver_baselines_predict_every_channel_alike(pack, flux, solver_map, conditioning, latent,
                                                             full):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    apply = pack.nodes.apply_hyca.apply_hyca
    fora = sampling.sample(apply(flux, solver_map, schedule, single_solver=("reuse", "step")), *conditioning,
                           latent, steps=STEPS, seed=5)
    taylor = sampling.sample(apply(flux, solver_map, schedule, single_solver=("taylor1", "step")),
                             *conditioning, latent, steps=STEPS, seed=5)
    assert not torch.equal(fora, taylor) and not torch.equal(fora, full)
    step_sigmas = solver_map.probe_sigmas
    reuse = solver_map.for_run(step_sigmas, schedule, single_solver=("reuse", "step"))
    for table in reuse.tables.values():
        for weights in table.values():
            assert (weights[:-1] == 0).all() and (weights[-1] == 1).all()


def test_whole_model_granularity_caches_the_model_output(pack, flux, conditioning, latent, full, caplog):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    whole_map, _ = pack.nodes.calibrate_node.probe(flux, 0, STEPS, 1.0, "euler", "simple", *conditioning,
                                                   {"samples": latent}, schedule, granularity="model")
    assert list(whole_map.blocks) == ["model.out"] and len(whole_map.blocks["model.out"].labels) == 16
    apply = pack.nodes.apply_hyca.apply_hyca
    exact = pack.hyca_core.schedule.Schedule(1, 3)
    same = sampling.sample(apply(flux, whole_map, exact, granularity="model"), *conditioning, latent,
                           steps=STEPS, seed=5)
    assert torch.equal(same, full)
    patched = apply(flux, whole_map, schedule, granularity="model")
    assert "patches_replace" not in patched.model_options["transformer_options"]
    with caplog.at_level(logging.INFO):
        out = sampling.sample(patched, *conditioning, latent, steps=STEPS, seed=5)
    assert _counts(caplog) == (7, 13)  # model calls: computed steps 0,1,2,6,10,14,18
    assert not torch.equal(out, full) and latent_psnr(out, full) > 25
    mismatch = 'calibrated with granularity "model", but HyCa Apply is set to "block"'
    with pytest.raises(ValueError, match=mismatch):
        apply(flux, whole_map, schedule, granularity="block")  # a whole-model map does not fit per block


def test_stack_granularity_caches_one_residual_per_stack(pack, flux, conditioning, latent, full, caplog):
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    stack_map, _ = pack.nodes.calibrate_node.probe(flux, 0, STEPS, 1.0, "euler", "simple", *conditioning,
                                                   {"samples": latent}, schedule, granularity="stack")
    assert set(stack_map.blocks) == {"double_blocks.img", "double_blocks.txt", "single_blocks.img"}
    apply = pack.nodes.apply_hyca.apply_hyca
    exact = pack.hyca_core.schedule.Schedule(1, 3)
    same = sampling.sample(apply(flux, stack_map, exact, granularity="stack"), *conditioning, latent,
                           steps=STEPS, seed=5)
    assert torch.equal(same, full)
    with caplog.at_level(logging.INFO):
        out = sampling.sample(apply(flux, stack_map, schedule, granularity="stack"), *conditioning, latent,
                              steps=STEPS, seed=5)
    assert _counts(caplog) == (28, 52)  # every block of a predicted step is skipped, as per block
    assert not torch.equal(out, full) and latent_psnr(out, full) > 25
    mismatch = 'calibrated with granularity "stack", but HyCa Apply is set to "block"'
    with pytest.raises(ValueError, match=mismatch):
        apply(flux, stack_map, schedule, granularity="block")  # a stack map does not fit per block
