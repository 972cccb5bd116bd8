"""A map's identity: its file round trip, the model width it fits, the fingerprint that finds it again
(LoRAs leave it unchanged) and the auto mode that makes and reuses one."""

import logging

import pytest
import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr
from harness.run_log import block_counts


def test_map_round_trips_through_a_file(pack, solver_map, tmp_path):
    SolverMap = pack.hyca_core.solver_map.SolverMap
    path = solver_map.save(tmp_path / "tiny.hyca.safetensors")
    loaded = SolverMap.load(path)
    assert loaded.architecture == solver_map.architecture
    assert loaded.blocks.keys() == solver_map.blocks.keys()
    for key, block in solver_map.blocks.items():
        for name in ("labels", "series", "solver", "variable", "errors", "indicators"):
            assert (getattr(loaded.blocks[key], name) == getattr(block, name)).all()


def test_map_of_another_width_is_refused(pack, solver_map, apply_every):
    other = tiny_models.build(dict(tiny_models.FLUX, hidden_size=32, num_heads=2), seed=1)
    with pytest.raises(pack.hyca_core.solver_map.MapError, match="width"):
        apply_every(other, solver_map, interval=4)


def test_auto_mode_calibrates_on_the_first_run_saves_and_reuses(pack, conditioning, latent, caplog, steps,
                                                                apply_every):
    import folder_paths

    model = tiny_models.build(tiny_models.FLUX, seed=11)  # a base model no map exists for yet
    map_store = pack.nodes.map_store
    assert map_store.find(model) is None
    patched = apply_every(model, None, interval=4)
    full = sampling.sample(model, *conditioning, latent, steps=steps, seed=5)
    with caplog.at_level(logging.INFO):
        first = sampling.sample(patched, *conditioning, latent, steps=steps, seed=5)
    assert torch.equal(first, full)  # the calibrating run computes everything
    saved = map_store.find(model)
    assert saved is not None and saved.parent == pack.nodes.map_store.search_folders()[0]
    assert str(saved).startswith(folder_paths.models_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = sampling.sample(patched, *conditioning, latent, steps=steps, seed=5)
    assert block_counts(caplog.text) == (28, 52)
    assert latent_psnr(second, full) > 30
    # a new Apply on the same base model finds the saved map without being given one
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = sampling.sample(apply_every(model, None, interval=4), *conditioning, latent,
                                steps=steps, seed=5)
    assert "using solver map" in caplog.text and block_counts(caplog.text) == (28, 52)
    assert torch.equal(again, second)


def test_lora_patches_do_not_change_the_fingerprint(pack, conditioning, latent, steps):
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
    base_map, _ = pack.nodes.calibrate_node.probe(model, 0, steps, 1.0, "euler", "simple", *conditioning,
                                                  {"samples": latent}, schedule)
    (saved,) = pack.nodes.map_store.save_for(base_map)
    assert pack.nodes.map_store.find(lora) == saved
