"""Maps beside the checkpoint: HyCa Apply and Calibrate learn the model's file from the prompt (ComfyUI keeps
no path on a MODEL) and save the map beside it as ``<file name>.hyca``, where they look first.

A tiny real Wan 2.1 is saved as a file in a temporary diffusion_models folder and loaded by ComfyUI's own
UNETLoader (and LoraLoaderModelOnly); the HyCa nodes run as ComfyUI's executor runs them, their hidden inputs
built by execution.get_input_data from a hand-written API-format prompt.
"""

import logging
import os
import re
import threading

import pytest
import torch
from safetensors.torch import save_file

from harness import sampling, tiny_models
from harness.run_log import block_counts

# Wan 2.1 as comfy.model_detection reads it back from a file: 128-wide heads, UMT5's 4096-wide text
WAN_FILE = dict(tiny_models.WAN21_T2V, dim=128, num_heads=1, ffn_dim=256, text_dim=4096)
MODEL_NAME = "tiny-wan.safetensors"
LORA_NAME = "tiny-lora.safetensors"
LATENT = (1, 16, 1, 8, 8)
STEPS = 8
SETTINGS = dict(interval=2, warmup=2, final_steps=0, fitted=True, granularity="block", history_dtype="auto",
                offload_history=False)


@pytest.fixture
def folders(pack, tmp_path, monkeypatch):
    """Fresh diffusion_models, checkpoints, loras and hyca folders, ComfyUI's file lists unaware of others."""
    import folder_paths

    made = {name: tmp_path / name for name in ("diffusion_models", "checkpoints", "loras", "hyca")}
    for name, folder in made.items():
        folder.mkdir()
        if name != "hyca":
            monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                                ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    map_store = pack.nodes.map_store
    monkeypatch.setattr(map_store, "search_folders", lambda: [made["hyca"], map_store.SHIPPED])
    return made


@pytest.fixture
def model_file(folders):
    """The tiny Wan's weights as a diffusion model file; its LoRA (every attention query) in the loras
    folder."""
    weights = tiny_models.build(WAN_FILE, seed=3).model.diffusion_model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, folders["diffusion_models"] / MODEL_NAME)
    generator = torch.Generator().manual_seed(4)
    lora = {}
    for key in (k for k in weights if k.endswith("self_attn.q.weight")):
        name = "diffusion_model." + key[: -len(".weight")]
        lora[f"{name}.lora_up.weight"] = torch.randn(weights[key].shape[0], 2, generator=generator) * 0.1
        lora[f"{name}.lora_down.weight"] = torch.randn(2, weights[key].shape[1], generator=generator) * 0.1
    save_file(lora, folders["loras"] / LORA_NAME)
    return folders["diffusion_models"] / MODEL_NAME


def _prompt(node, **settings):
    """UNETLoader -> LoraLoaderModelOnly -> ModelSamplingSD3 -> ``node`` (id "4"), and a second ``node``
    (id "5") right after the loader."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": LORA_NAME, "strength_model": 1.0}},
        "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 5.0}},
        "4": {"class_type": node, "inputs": {"model": ["3", 0], **settings}},
        "5": {"class_type": node, "inputs": {"model": ["1", 0], **settings}},
    }


def _models():
    """The MODELs nodes 3 (with the LoRA and the shift) and 1 (the file as loaded) of `_prompt` output."""
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    (loaded,) = nodes.UNETLoader().load_unet(MODEL_NAME, "default")
    (lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(loaded, LORA_NAME, 1.0)
    assert lora.patches  # the LoRA does act
    (shifted,) = ModelSamplingSD3().patch(lora, 5.0)
    return shifted, loaded


def _execute(prompt, node_id, **inputs):
    """Run a V3 node of ``prompt`` as ComfyUI's executor does: hidden inputs from get_input_data, given to a
    class clone; the linked inputs (``inputs``) are given here."""
    import execution
    import nodes
    from comfy_execution.graph import DynamicPrompt

    node = nodes.NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
    _, _, hidden = execution.get_input_data(prompt[node_id]["inputs"], node, node_id, None,
                                            DynamicPrompt(prompt), {})
    return node.PREPARE_CLASS_CLONE(hidden).execute(**inputs).args[0]


def _sample(model):
    positive, negative = sampling.text_conditioning(WAN_FILE["text_dim"])
    return sampling.sample(model, positive, negative, torch.zeros(LATENT), steps=STEPS, seed=5)


def _content(path):
    """A map file's header and tensors (its bytes differ between saves: safetensors orders the header at
    random)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return f.metadata(), {key: f.get_tensor(key).tobytes() for key in f.keys()}


# ---------------------------------------------------------------------------------------------------------


def test_the_model_file_is_found_upstream_through_model_inputs(pack, folders, model_file):
    model_file_of = pack.nodes.checkpoint_path.model_file
    (folders["checkpoints"] / "sdxl.safetensors").write_bytes(b"")
    prompt = _prompt("HyCaApply")
    prompt |= {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "11": {"class_type": "HyCaApply", "inputs": {"model": ["10", 0]}},
        # two models in, no "model" input: which one the output is built on is unknown
        "12": {"class_type": "ModelMergeSimple",
               "inputs": {"model1": ["1", 0], "model2": ["10", 0], "ratio": 0.5}},
        "13": {"class_type": "HyCaApply", "inputs": {"model": ["12", 0]}},
        "14": {"class_type": "UNETLoader",
               "inputs": {"unet_name": "gone.safetensors", "weight_dtype": "default"}},
        "15": {"class_type": "HyCaApply", "inputs": {"model": ["14", 0]}},
        "16": {"class_type": "UNETLoader", "inputs": {"unet_name": "../../escape.safetensors"}},
        "17": {"class_type": "HyCaApply", "inputs": {"model": ["16", 0]}},
        "18": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["19", 0]}},  # a cycle
        "19": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["18", 0]}},
        "20": {"class_type": "HyCaApply", "inputs": {"model": ["19", 0]}},
        "21": {"class_type": "HyCaApply", "inputs": {"model": ["404", 0]}},
    }
    assert model_file_of(prompt, "4") == model_file_of(prompt, 5) == model_file
    assert model_file_of(prompt, "11") == folders["checkpoints"] / "sdxl.safetensors"
    for node_id in ("13", "15", "17", "20", "21", "1", "999"):
        assert model_file_of(prompt, node_id) is None, node_id
    assert model_file_of(None, "4") is None
    # outside ComfyUI's executor a node has no hidden inputs: no file, and no error
    assert pack.nodes.checkpoint_path.for_node(pack.nodes.apply_node.HyCaApply) is None


@pytest.mark.parametrize("granularity",
                         ["../../../outside", "/etc/passwd", "..", "a\x00b", "x" * 5000, "", "é/.."])
def test_side_file_names_stay_beside_the_model_file(pack, tmp_path, granularity):
    """The granularity a map holds names its side file: whatever it is, the file stays beside the checkpoint,
    with a name no model loader lists."""
    checkpoint = tmp_path / "models" / "flux1-dev.safetensors"
    side = pack.nodes.map_store.side_file(checkpoint, granularity)
    assert side.parent == checkpoint.parent and len(side.name.encode()) <= 255
    assert re.fullmatch(r"flux1-dev\.safetensors\.[A-Za-z0-9_]+\.hyca", side.name), side.name


def test_auto_calibration_saves_beside_the_model_file_and_finds_it_there(pack, folders, model_file, caplog):
    import folder_paths

    shifted, loaded = _models()
    prompt = _prompt("HyCaApply", **SETTINGS)
    side = model_file.with_name(MODEL_NAME + ".hyca")
    with caplog.at_level(logging.INFO):
        patched = _execute(prompt, "4", model=shifted, **SETTINGS)
        assert torch.equal(_sample(patched), _sample(shifted))  # the calibrating run computes everything
    (in_folder,) = folders["hyca"].iterdir()
    assert f"map saved to {side} and {in_folder}" in caplog.text
    assert _content(side) == _content(in_folder)
    # ComfyUI's model loaders never offer the map as a model
    assert folder_paths.get_filename_list("diffusion_models") == [MODEL_NAME]

    in_folder.unlink()  # found beside the file alone, by both Apply nodes: through the LoRA, and without it
    for node_id, model in (("4", shifted), ("5", loaded)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _sample(_execute(prompt, node_id, model=model, **SETTINGS))
        assert f"using solver map {side}" in caplog.text, node_id
        assert (block_counts(caplog.text) or (0, 0))[1] > 0, node_id  # it predicted
    assert list(folders["hyca"].iterdir()) == []  # nothing calibrated anew


def test_calibrate_saves_beside_the_model_file_per_granularity(pack, folders, model_file, caplog):
    shifted, _ = _models()
    settings = dict(seed=0, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple", interval=2,
                    warmup=2, clusters=4, granularity="stack", save=True)
    prompt = _prompt("HyCaCalibrate", **settings)
    positive, negative = sampling.text_conditioning(WAN_FILE["text_dim"])
    with caplog.at_level(logging.INFO):
        solver_map = _execute(prompt, "4", model=shifted, positive=positive, negative=negative,
                              latent_image={"samples": torch.zeros(LATENT)}, **settings)
    side = model_file.with_name(MODEL_NAME + ".stack.hyca")
    assert f"solver map saved to {side} and " in caplog.text
    assert pack.nodes.map_store.find(shifted, "stack", model_file) == side
    assert pack.nodes.map_store.find(shifted, "block", model_file) is None
    assert pack.hyca_core.solver_map.SolverMap.load(side).blocks.keys() == solver_map.blocks.keys()


def test_a_read_only_model_folder_keeps_the_map_in_the_hyca_folder(pack, folders, model_file, caplog):
    shifted, _ = _models()
    folder = folders["diffusion_models"]
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the folder stays writable (running as root)")
        with caplog.at_level(logging.INFO):
            _sample(_execute(_prompt("HyCaApply", **SETTINGS), "4", model=shifted, **SETTINGS))
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_NAME]  # no map, no temporary file
    (in_folder,) = folders["hyca"].iterdir()
    assert re.search(rf"cannot write {re.escape(MODEL_NAME)}\.hyca beside the checkpoint "
                     r"\(.*Permission denied", caplog.text)
    assert f"map saved to {in_folder}" in caplog.text
    assert pack.nodes.map_store.find(shifted, checkpoint=model_file) == in_folder


def test_a_model_file_whose_side_name_is_too_long_keeps_its_map_in_the_hyca_folder(pack, folders, model_file,
                                                                                   caplog):
    """A 252-byte file name is valid; its 257-byte side name is not (ENAMETOOLONG): looked for and saved in
    the hyca folder only, with a log line."""
    long_name = "w" * 240 + ".safetensors"
    os.link(model_file, folders["diffusion_models"] / long_name)
    settings = dict(SETTINGS)
    prompt = _prompt("HyCaApply", **settings)
    prompt["1"]["inputs"]["unet_name"] = long_name
    _, loaded = _models()
    with caplog.at_level(logging.INFO):
        _sample(_execute(prompt, "5", model=loaded, **settings))  # auto mode: calibrates, saves
    (in_folder,) = folders["hyca"].iterdir()
    assert re.search(rf"cannot write {long_name}\.hyca beside the checkpoint \(.*File name too long",
                     caplog.text)
    assert f"map saved to {in_folder}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _sample(_execute(prompt, "5", model=loaded, **settings))
    assert f"using solver map {in_folder}" in caplog.text and (block_counts(caplog.text) or (0, 0))[1] > 0


def test_a_fifo_named_like_a_map_never_blocks_apply(pack, folders, model_file, caplog):
    """Reading a FIFO waits for a writer forever: it is skipped as not a regular file, like any broken map."""
    fifo = folders["hyca"] / "a.hyca.safetensors"
    os.mkfifo(fifo)
    os.mkfifo(model_file.with_name(MODEL_NAME + ".hyca"))  # beside the checkpoint too
    _, loaded = _models()
    applied = []
    with caplog.at_level(logging.INFO):
        thread = threading.Thread(target=lambda: applied.append(
            _execute(_prompt("HyCaApply", **SETTINGS), "5", model=loaded, **SETTINGS)), daemon=True)
        thread.start()
        thread.join(timeout=60)
        if thread.is_alive():  # a writer releases the blocked reader before the test fails
            with open(fifo, "wb"):
                pass
            pytest.fail("HyCa Apply blocked on a FIFO")
    assert f"skipping {fifo}: not a regular file" in caplog.text
    assert "no solver map for this model yet" in caplog.text
