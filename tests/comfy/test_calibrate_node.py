"""HyCa Calibrate as ComfyUI's executor runs it on a tiny real FLUX: any seed works, a saved map is reused
unless asked to recalibrate, a map that cannot be saved is kept, and a HyCa Apply set to another
granularity is refused before anything is sampled.

The node gets its hidden inputs (the prompt, its own id) from execution.get_input_data on a hand-written
API-format prompt, as in a real run; model calls are counted with a real ModelPatcher wrapper.
"""

import logging

import comfy.patcher_extension
import pytest
import torch

LATENT = (1, 16, 16, 16)
# tune off: these tests count the probe's model calls (test_a_tuned_map_is_saved tunes)
SETTINGS = dict(seed=0, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple", interval=2, warmup=2,
                clusters=4, granularity="block", save=True, tune=False)


def _counted(model):
    """A clone of ``model`` whose diffusion-model calls are counted in the returned list's length."""
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "hyca_test_count", count)
    return counted, calls


def _prompt(settings, consumers=None):
    """Calibrate (id "1") and the nodes fed by it: ``consumers`` {id: (class_type, inputs)}."""
    prompt = {"1": {"class_type": "HyCaCalibrate", "inputs": {"model": ["0", 0], **settings}}}
    for node_id, (class_type, inputs) in (consumers or {}).items():
        prompt[node_id] = {"class_type": class_type, "inputs": inputs}
    return prompt


def _calibrate(model, conditioning, consumers=None, **changes):
    """Run HyCa Calibrate (node "1") as the executor does; returns (solver map, latent, model calls)."""
    import execution
    import nodes
    from comfy_execution.graph import DynamicPrompt

    settings = {**SETTINGS, **changes}
    prompt = _prompt(settings, consumers)
    node = nodes.NODE_CLASS_MAPPINGS["HyCaCalibrate"]
    _, _, hidden = execution.get_input_data(prompt["1"]["inputs"], node, "1", None, DynamicPrompt(prompt), {})
    counted, calls = _counted(model)
    positive, negative = conditioning
    solver_map, latent = node.PREPARE_CLASS_CLONE(hidden).execute(
        model=counted, positive=positive, negative=negative, latent_image={"samples": torch.zeros(LATENT)},
        **settings).args
    return solver_map, latent, len(calls)


def test_any_seed_the_widget_allows_calibrates(pack, flux, conditioning, hyca_folder):
    """The widget goes up to 2**64 - 1, KMeans takes 0..2**32 - 1: it failed after the probe."""
    seed = pack.nodes.calibrate_node.HyCaCalibrate.define_schema().inputs[4]
    assert seed.id == "seed" and seed.max == 2**64 - 1
    for value in (2**64 - 1, 920065994407979):
        solver_map, latent, calls = _calibrate(flux, conditioning, seed=value, save=False)
        assert calls > 0 and solver_map.info["seed"] == value and torch.isfinite(latent["samples"]).all()


def test_a_tuned_map_is_saved_with_its_tuning(pack, flux, conditioning, hyca_folder):
    """tune (on by default) replays the probe's settings with the next seed: the saved map holds what won."""
    tuning = pack.hyca_core.tuning
    solver_map, _, calls = _calibrate(flux, conditioning, tune=True)
    assert solver_map.info["tuned_seed"] == SETTINGS["seed"] + 1 and solver_map.info["tuned"]
    (saved,) = hyca_folder.iterdir()
    loaded = pack.hyca_core.solver_map.SolverMap.load(saved)
    assert tuning.from_info(loaded.info) == tuning.from_info(solver_map.info)
    # every run of the tuning samples all its steps (predicted ones too): more calls than the probe's
    assert calls > SETTINGS["steps"]


def test_a_failed_tuning_keeps_the_probed_map(pack, flux, conditioning, hyca_folder, monkeypatch, caplog):
    """The probe is paid for: tuning running out of memory must not lose its map."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pack.hyca_core.tuning, "tune", out_of_memory)
    solver_map, _, _ = _calibrate(flux, conditioning, tune=True)
    assert "tuned" not in solver_map.info and len(list(hyca_folder.iterdir())) == 1
    assert "tuning failed (CUDA out of memory); the map is kept untuned" in caplog.text


def test_the_probe_seed_stays_fixed_between_queues(pack):
    """randomize would change the seed on every queue and so probe (and overwrite the map) every time."""
    schema = pack.nodes.calibrate_node.HyCaCalibrate.define_schema()
    (seed,) = [i for i in schema.inputs if i.id == "seed"]
    assert seed.as_dict()["control_after_generate"] == "fixed"


def test_a_saved_map_is_reused_unless_recalibrate(pack, flux, conditioning, hyca_folder, caplog):
    first, _, probed = _calibrate(flux, conditioning)
    assert probed > 0 and len(list(hyca_folder.iterdir())) == 1
    with caplog.at_level(logging.INFO):
        reused, latent, calls = _calibrate(flux, conditioning)
    # nothing sampled: no node takes the latent, and the map is read back, not probed
    assert calls == 0 and "reusing the map saved for this model" in caplog.text
    assert reused.blocks.keys() == first.blocks.keys()
    assert all(torch.equal(torch.from_numpy(reused.blocks[k].labels), torch.from_numpy(b.labels))
               for k, b in first.blocks.items())
    assert torch.equal(latent["samples"], torch.zeros(LATENT))

    # a node takes the latent: the probe's settings are sampled, HyCa predicting with the reused map
    preview = {"9": ("SaveLatent", {"samples": ["1", 1], "filename_prefix": "hyca_test/reuse"})}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, latent, calls = _calibrate(flux, conditioning, consumers=preview)
    assert calls == probed and "fewer block computations" in caplog.text
    assert not torch.equal(latent["samples"], torch.zeros(LATENT))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, _, calls = _calibrate(flux, conditioning, recalibrate=True)
    assert calls == probed and "solver map saved to" in caplog.text


def test_a_map_that_cannot_be_saved_is_kept_with_the_probe(pack, flux, conditioning, tmp_path, monkeypatch,
                                                           caplog):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    map_store = pack.nodes.map_store
    monkeypatch.setattr(map_store, "search_folders", lambda: [blocked / "hyca", map_store.SHIPPED])
    with caplog.at_level(logging.WARNING):
        solver_map, latent, calls = _calibrate(flux, conditioning)
    assert calls > 0 and solver_map.blocks and torch.isfinite(latent["samples"]).all()
    assert "could not be saved" in caplog.text and "kept for this session" in caplog.text


def test_an_apply_set_to_another_granularity_is_refused_before_sampling(pack, flux, conditioning,
                                                                        hyca_folder):
    apply = {"2": ("HyCaApply", {"model": ["0", 0], "solver_map": ["1", 0], "granularity": "stack"})}
    refused = 'calibrated with granularity "block", but HyCa Apply is set to "stack"'
    with pytest.raises(ValueError, match=refused) as error:
        _calibrate(flux, conditioning, consumers=apply)
    assert "/" not in str(error.value)  # a sentence, no file path
    assert not list(hyca_folder.glob("*"))  # nothing was probed or saved
    # "auto" follows the map: accepted
    apply["2"][1]["granularity"] = "auto"
    _, _, calls = _calibrate(flux, conditioning, consumers=apply, save=False)
    assert calls > 0
