"""The two HyCa Apply nodes as ComfyUI serves and runs them: the plain one takes granularity and warm-up
from the map, the advanced one keeps the pre-split node id and widgets (less the removed adaptive mode's)
so that old API prompts still validate and run, mismatches read as sentences, and the UI hears what a run
did (ComfyUI's own PromptServer, never started: its messages queue up).
"""

import asyncio
import logging
import os
import re
import sys
import uuid

import numpy as np
import pytest
import torch

from harness import sampling, tiny_models

LATENT = (1, 16, 16, 16)
STEPS = 12
# HyCa Apply's inputs as API prompts name them: the first release's; those saved before the split (the
# fused widget's id was compile_predict until later); one saved with the adaptive mode on, before it was
# removed; today's. ComfyUI drops an input the node does not declare: the old ones run on the fixed schedule.
KEPT = dict(interval=2, warmup=2, final_steps=0, fitted=False, granularity="block", history_dtype="auto",
            offload_history=False)  # the first release's inputs that the node still declares
FIRST_RELEASE = dict(KEPT, adaptive=False, adaptive_tolerance=0.15)
LATER_KNOBS = dict(target_speedup=0.0, start_percent=0.0, end_percent=1.0, placement="fixed")
BEFORE_SPLIT = dict(FIRST_RELEASE, **LATER_KNOBS, compile_predict=False)
ADAPTIVE_ON = dict(FIRST_RELEASE, **LATER_KNOBS, fused=False, adaptive=True, adaptive_tolerance=0.5)
CURRENT = dict(KEPT, **LATER_KNOBS, fused=False)


@pytest.fixture
def prompt_server(monkeypatch):
    """ComfyUI's PromptServer on a fresh event loop, as PromptServer.instance: (server, messages())."""
    import comfy.utils

    comfy_dir = os.path.dirname(comfy.utils.__file__)
    with monkeypatch.context() as context:  # comfy/ on sys.path (the runtime's) would shadow ComfyUI's utils/
        context.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != comfy_dir])
        import server
    loop = asyncio.new_event_loop()
    instance = server.PromptServer(loop)

    def messages():
        loop.run_until_complete(asyncio.sleep(0))
        found = []
        while not instance.messages.empty():
            found.append(instance.messages.get_nowait())
        return found

    yield instance, messages
    del server.PromptServer.instance
    loop.close()


def _texts(messages, node_id):
    """The progress texts sent to ``node_id`` (ComfyUI packs them as node id length, node id, text)."""
    import struct

    from server import BinaryEventTypes

    texts = []
    for event, data, _ in messages:
        if event == BinaryEventTypes.TEXT:
            length = struct.unpack(">I", data[:4])[0]
            if data[4:4 + length].decode() == node_id:
                texts.append(data[4 + length:].decode())
    return texts


def _run_node(node_id, class_type, prompt, **linked):
    import execution
    import nodes
    from comfy_execution.graph import DynamicPrompt

    node = nodes.NODE_CLASS_MAPPINGS[class_type]
    inputs = prompt[node_id]["inputs"]
    _, _, hidden = execution.get_input_data(inputs, node, node_id, None, DynamicPrompt(prompt), {})
    return node.PREPARE_CLASS_CLONE(hidden).execute(**inputs | linked).args[0]


class _TestModel:
    """The tiny FLUX, its conditioning and an empty latent, as loader and encoder nodes would output them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "load"
    CATEGORY = "_for_testing"
    model = None

    def load(self):
        positive, negative = sampling.flux_conditioning(tiny_models.FLUX_SMALLEST["context_in_dim"],
                                                        tiny_models.FLUX_SMALLEST["vec_in_dim"])
        return self.model, positive, negative, {"samples": torch.zeros(LATENT)}


@pytest.mark.parametrize("settings", [FIRST_RELEASE, BEFORE_SPLIT, ADAPTIVE_ON, CURRENT],
                         ids=["first_release", "before_split", "adaptive_on", "current"])
def test_an_old_api_prompt_validates_and_runs(pack, flux, solver_map, prompt_server, monkeypatch, settings,
                                              caplog):
    import execution
    import nodes

    server, _ = prompt_server
    monkeypatch.setattr(_TestModel, "model", flux)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "HyCaTestModel", _TestModel)
    monkeypatch.setattr(pack.nodes.map_store, "find", lambda *a, **k: None)
    sampler = dict(seed=5, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    prompt = {
        "1": {"class_type": "HyCaTestModel", "inputs": {}},
        "2": {"class_type": "HyCaApply", "inputs": {"model": ["1", 0], **settings}},
        "4": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["1", 1], "negative": ["1", 2],
                         "latent_image": ["1", 3], **sampler}},
        "5": {"class_type": "SaveLatent",
              "inputs": {"samples": ["4", 0], "filename_prefix": "hyca_test/old"}},
    }
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    # a map of this model in the session (what a saved map gives): the node predicts with it
    monkeypatch.setattr(pack.nodes.map_store, "load_for", lambda *a, **k: solver_map)
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    with caplog.at_level(logging.INFO):
        executor.execute(prompt, prompt_id, {"client_id": "hyca-test"}, outputs)
    assert executor.success
    assert "(N=2, fixed placement;" in caplog.text  # the fixed schedule, whatever adaptive said
    assert re.search(r"HyCa: \d+ block calls computed, [1-9]\d* predicted", caplog.text)


def test_the_advanced_widgets_are_the_pre_split_ones_less_the_adaptive_mode(pack):
    """web/js/hyca_migrate.js tells a workflow saved with the adaptive mode by the values at positions 3 and
    4 (a boolean and a number), where today's widgets are fitted and granularity."""
    inputs = pack.nodes.apply_node.HyCaApply.define_schema().inputs
    assert [i.id for i in inputs] == [
        "model", "interval", "warmup", "final_steps", "fitted", "granularity", "history_dtype",
        "offload_history", "target_speedup", "start_percent", "end_percent", "placement", "fused",
        "solver_map"]


def test_the_plain_node_takes_granularity_and_warmup_from_the_map(pack, flux, conditioning, finished):
    schedule = pack.hyca_core.schedule.Schedule
    stack_map, _ = pack.nodes.calibrate_node.probe(flux, 0, STEPS, 1.0, "euler", "simple", *conditioning,
                                                   {"samples": torch.zeros(LATENT)},
                                                   schedule(interval=2, warmup=3), granularity="stack")
    plain = pack.nodes.apply_node.HyCaCacheSpeedUp
    inputs = {i.id for i in plain.define_schema().inputs}
    assert inputs == {"model", "speed_up", "start_percent", "end_percent", "solver_map"}
    (patched,) = plain.execute(flux, speed_up=2.0, solver_map=stack_map).args
    sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    (state,) = finished
    assert state.source.granularity == "stack" and state.source.options.schedule.warmup == 3
    assert state.predicted and np.array_equal(state.run_map.mask[:3], [True] * 3)


def test_a_granularity_mismatch_is_a_sentence(pack, flux, conditioning, solver_map):
    advanced = pack.nodes.apply_node.HyCaApply
    for granularity in ("stack", "model"):
        with pytest.raises(ValueError) as error:
            advanced.execute(flux, **{**CURRENT, "granularity": granularity}, solver_map=solver_map)
        message = str(error.value)
        assert message.startswith('The solver map was calibrated with granularity "block"')
        assert f'set to "{granularity}"' in message and "/" not in message
    (patched,) = advanced.execute(flux, **{**CURRENT, "granularity": "auto"}, solver_map=solver_map).args
    assert patched is not flux


def test_the_ui_hears_what_a_run_did(pack, flux, conditioning, solver_map, prompt_server, monkeypatch,
                                     caplog):
    """A run with a map: its ratio and wall-clock time, on the Apply node. Without a map: that the first run
    calibrates, then that it tunes, then that it did and what the next runs do."""
    _, messages = prompt_server
    monkeypatch.setattr(pack.nodes.map_store, "find", lambda *a, **k: None)
    monkeypatch.setattr(pack.nodes.map_store, "load_for", lambda *a, **k: None)
    monkeypatch.setattr(pack.nodes.map_store, "save_for", lambda *a, **k: [])
    prompt = {"7": {"class_type": "HyCaCacheSpeedUp", "inputs": {"model": ["1", 0], "speed_up": 2.0}}}
    patched = _run_node("7", "HyCaCacheSpeedUp", prompt, model=flux, solver_map=solver_map)
    with caplog.at_level(logging.INFO):
        sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    (text,) = _texts(messages(), "7")
    assert re.fullmatch(r"HyCa: [\d.]+x fewer block computations; sampling took [\d.]+ s", text)
    assert re.search(r"fewer block computations; sampling took [\d.]+ s \(wall clock\)", caplog.text)

    auto = _run_node("7", "HyCaCacheSpeedUp", prompt, model=flux)
    (first,) = _texts(messages(), "7")
    assert "next full run computes every step" in first and "calibrates" in first
    sampling.sample(auto, *conditioning, torch.zeros(LATENT), steps=STEPS)
    tuning, done = _texts(messages(), "7")
    assert "now tuning it on replays of this run" in tuning
    assert "calibrated and tuned a solver map from this run" in done and "next runs compute only some" in done


def test_tooltips_and_descriptions_are_short_and_plain(pack):
    for node in (pack.nodes.apply_node.HyCaCacheSpeedUp, pack.nodes.apply_node.HyCaApply,
                 pack.nodes.calibrate_node.HyCaCalibrate):
        schema = node.define_schema()
        assert schema.is_experimental and len(schema.description) <= 320
        for item in [*schema.inputs, *schema.outputs]:
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", item.tooltip.strip()) if s]
            assert 1 <= len(sentences) <= 2, (schema.node_id, item.tooltip)
            assert not re.search(r"\bdB\b|README|\d+(\.\d+)?-\d+(\.\d+)?x", item.tooltip), item.tooltip


def test_node_search_finds_the_plain_node(pack):
    """ComfyUI's frontend (1.32) searches node ids and display names (fuzzy, and only near the start of the
    text); ComfyUI 0.3.75's schema has no search aliases. The words people type are there."""
    schema = pack.nodes.apply_node.HyCaCacheSpeedUp.define_schema()
    searched = [schema.node_id.lower()[:30], schema.display_name.lower()[:30]]
    for word in ("cache", "speed", "up", "faster"):
        assert any(word in text for text in searched), word
    assert "teacache" in schema.description.lower() and schema.display_name.startswith("HyCa Apply")


def test_one_set_of_defaults_everywhere(pack, flux, finished, conditioning, tmp_path, monkeypatch):
    """The nodes' widgets, apply_hyca, Schedule() and run_maps.run_map share hyca_core.defaults (the Python
    API once ran fitted weights and a warm-up of 3 where the nodes said off and 2)."""
    import inspect

    defaults, schedule = pack.hyca_core.defaults, pack.hyca_core.schedule.Schedule()
    assert (schedule.interval, schedule.warmup, schedule.final) == (defaults.INTERVAL, defaults.WARMUP,
                                                                    defaults.FINAL_STEPS)
    run_map_parameters = inspect.signature(pack.hyca_core.run_maps.run_map).parameters
    run_map_fitted = run_map_parameters["fitted"].default
    assert run_map_fitted == pack.nodes.apply_options.ApplyOptions().fitted == defaults.FITTED is False
    widgets = {i.id: i.default for i in pack.nodes.apply_node.HyCaApply.define_schema().inputs
               if i.id in ("interval", "fitted", "final_steps")}
    assert widgets == {"interval": defaults.INTERVAL, "fitted": defaults.FITTED,
                       "final_steps": defaults.FINAL_STEPS}
    calibrate = {i.id: getattr(i, "default", None)
                 for i in pack.nodes.calibrate_node.HyCaCalibrate.define_schema().inputs}
    assert (calibrate["interval"], calibrate["warmup"]) == (defaults.INTERVAL, defaults.WARMUP) == (4, 2)
    map_store = pack.nodes.map_store  # the run calibrates: its map goes to a folder of this test's own
    monkeypatch.setattr(map_store, "search_folders", lambda: [tmp_path, map_store.SHIPPED])
    patched = pack.nodes.apply_hyca.apply_hyca(flux)  # the Python API with nothing given
    sampling.sample(patched, *conditioning, torch.zeros(LATENT), steps=STEPS)
    assert finished[-1].source.options.schedule == schedule and not finished[-1].source.options.fitted
