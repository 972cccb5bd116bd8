"""Reliability and security of HyCa inside a real ComfyUI, on a tiny real FLUX.

1. Map files in the store: a bad saved map makes HyCa Apply warn and calibrate anew (and the new map
   replaces it); a map that does not fit, passed explicitly, stops Apply with the reason; broken
   files never hide good ones.
2. Writes stay in the hyca folder, whatever names a map holds.
3. A predicted residual that is not finite (NaN or inf coefficients, a half-precision history that
   overflowed) falls back to computing that unit: the image is what computing it gives, and the
   fallback is counted and logged once per run.
4. Patched clones of one model never share state, faults included; the unpatched model is untouched.
5. Limits: maps calibrated at other step counts and samplers serve any run; a map of another
   granularity is refused with what to do; auto mode passes over runs too short to calibrate from
   (their image intact) and calibrates for the interval a target speed-up gives.
(Fewer steps than the warm-up, N above the step count, families without block patches: see
test_sampling_paths.py's schedules and test_families.py.)
"""

import dataclasses
import logging
import re

import numpy as np
import pytest
import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr

FLUX = tiny_models.FLUX_SMALLEST  # the conftest's flux
LATENT = (1, 16, 16, 16)
STEPS = 10
N, WARMUP = 2, 2
BLOCKS = 2
FAULT = "HyCa: the predicted residual"


@pytest.fixture
def store(pack, tmp_path, monkeypatch):
    """The map store searching only a fresh hyca folder (and the shipped maps)."""
    map_store = pack.nodes.map_store
    folder = tmp_path / "hyca"
    folder.mkdir()
    monkeypatch.setattr(map_store, "search_folders", lambda: [folder, map_store.SHIPPED])
    return map_store


def _sample(model, conditioning, steps=STEPS, sampler="euler"):
    return sampling.sample(model, *conditioning, torch.zeros(LATENT), steps=steps, sampler=sampler, seed=5)


def _apply(pack, model, solver_map, interval=N, **kwargs):
    schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=WARMUP)
    return pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule, **kwargs)


def _rewrite(path, edit):
    """Change a saved map's tensors in place with ``edit(tensors)``, past the checks of `SolverMap.save`."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, framework="numpy") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _summary(text):
    """(computed, predicted, fallbacks) from the run summaries HyCa logged, the last one."""
    found = re.findall(r"(\d+) block calls computed, (\d+) predicted.*?(?:; (\d+) computed as their|$)", text,
                       re.MULTILINE)
    return tuple(int(x or 0) for x in found[-1]) if found else None


# ---------------------------------------------------------------------------------------------------------
# 1. Bad map files


@pytest.mark.parametrize("damage", ["truncated", "tampered ids", "other width"])
def test_a_bad_saved_map_warns_and_calibrates_a_new_one(pack, store, conditioning, caplog, damage):
    model = tiny_models.build(FLUX, seed=51)  # its own base weights: its own saved map
    if damage == "other width":  # a map with this model's fingerprint, of a model twice as wide
        wide = tiny_models.build(dict(FLUX, hidden_size=128, num_heads=8), seed=51)
        wide_map = sampling.probe_map(pack, wide, conditioning, LATENT, N, WARMUP)
        (saved,) = store.save_for(dataclasses.replace(wide_map, fingerprint=store.fingerprint(model)))
        reason = r"blocks \['double_block.0', 'single_block.0'\] have width 64, map has 128"
    else:
        solver_map = sampling.probe_map(pack, model, conditioning, LATENT, N, WARMUP)
        if damage == "truncated":
            (saved,) = store.save_for(solver_map)
            saved.write_bytes(saved.read_bytes()[:-100])
            reason = "not a readable safetensors file"
        else:  # a cluster id far out of range
            (saved,) = store.save_for(solver_map)
            _rewrite(saved, lambda tensors: tensors["double_block.0.img/labels"].__setitem__(0, 1000))
            reason = "cluster ids out of range"
    with caplog.at_level(logging.INFO):
        patched = _apply(pack, model, None)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert re.search(f"HyCa: .*{re.escape(str(saved))}: .*{reason}", warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.INFO):
        first = _sample(patched, conditioning)
    assert torch.equal(first, _sample(model, conditioning))  # the calibrating run computes everything
    assert store.find(model) == saved  # replaced by the new map, under the same name
    assert store.load_for(model).fingerprint == store.fingerprint(model)
    assert _summary(caplog.text) is None
    with caplog.at_level(logging.INFO):
        _sample(patched, conditioning)
    assert _summary(caplog.text)[1] > 0


def test_broken_files_never_hide_a_good_map(pack, store, solver_map, flux, caplog):
    folder = store.search_folders()[0]
    (good,) = store.save_for(solver_map)
    # found before it: not a safetensors file, too large, a map for this model with a NaN in it
    (folder / "0-garbage.hyca.safetensors").write_bytes(b"\x00" * 64)
    with (folder / "1-huge.hyca.safetensors").open("wb") as f:
        f.truncate(pack.hyca_core.map_file.MAX_FILE_BYTES + 1)
    tampered = solver_map.save(folder / "2-tampered.hyca.safetensors")
    _rewrite(tampered, lambda tensors: tensors["single_block.0.img/series"].fill(np.nan))
    with caplog.at_level(logging.WARNING):
        assert store.load_for(flux).blocks.keys() == solver_map.blocks.keys()
    assert re.search(r"skipping .*0-garbage.*: not a readable safetensors file", caplog.text)
    assert re.search(r"skipping .*1-huge.*: \d+ bytes, more than a solver map can be", caplog.text)
    assert re.search(r"skipped .*2-tampered.*: block single_block.0.img: NaN or inf values", caplog.text)
    assert f"{good.name}:" not in caplog.text


def test_a_map_that_does_not_fit_passed_explicitly_stops_apply_with_the_reason(pack, flux, conditioning):
    wan = tiny_models.build(tiny_models.WAN21_T2V, seed=41)
    positive, negative = sampling.text_conditioning(tiny_models.WAN21_T2V["text_dim"])
    wan_map, _ = pack.nodes.calibrate_node.probe(wan, 0, 8, 1.0, "euler", "simple", positive, negative,
                                                 {"samples": torch.zeros(1, 16, 1, 8, 8)},
                                                 pack.hyca_core.schedule.Schedule(N, WARMUP))
    node = pack.nodes.apply_node.HyCaApply
    inputs = dict(interval=N, warmup=WARMUP, final_steps=0, fitted=True, granularity="block",
                  history_dtype="auto", offload_history=False)
    MapError = pack.hyca_core.solver_map.MapError
    message = "map is for comfy.ldm.wan.model.WanModel, model is comfy.ldm.flux.model.Flux: calibrate one"
    with pytest.raises(MapError, match=message):
        node.execute(model=flux, solver_map=wan_map, **inputs)
    assert "hyca" not in flux.model_options["transformer_options"]


def test_a_map_of_another_granularity_says_which(pack, flux, conditioning):
    stack_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, granularity="stack")
    with pytest.raises(ValueError, match='Set HyCa Apply\'s granularity to "auto" .* or to "stack"'):
        _apply(pack, flux, stack_map, granularity="block")
    for given in ("stack", None):  # None: the map's
        assert _sample(_apply(pack, flux, stack_map, granularity=given), conditioning).isfinite().all()


# ---------------------------------------------------------------------------------------------------------
# 2. Writes confined to the hyca folder


HOSTILE = ["../../../outside", "/etc/passwd", "..", ".", "C:\\Windows\\x", "a\x00b", "x" * 5000, "", "é/..",
           "-" * 300]


@pytest.mark.parametrize("field", ["architecture", "fingerprint", "granularity"])
def test_file_names_from_map_data_stay_in_the_folder(store, solver_map, tmp_path, field):
    folder = store.search_folders()[0]
    for text in HOSTILE:
        hostile = (dataclasses.replace(solver_map, info={"granularity": text}) if field == "granularity"
                   else dataclasses.replace(solver_map, **{field: text}))
        name = store.file_name(hostile)
        assert re.fullmatch(r"[A-Za-z0-9_]+-[A-Za-z0-9_]+(-[A-Za-z0-9_]+)?\.hyca\.safetensors", name), name
        assert len(name.encode()) <= 255
        try:
            (path,) = store.save_for(hostile)
        except store.MapError:  # save refuses what load would: no model has that architecture or fingerprint
            assert field != "granularity"
            continue
        assert path.parent == folder and path.name == name
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != folder]
    assert outside == []
    assert all(not p.name.endswith(".tmp") for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------
# 3. Numerical faults fall back to computing


def _poison(pack, patched, where):
    """Make the patched model's run maps give inf weights for every (unit, step) that ``where`` accepts."""
    source = patched.model_options["transformer_options"][pack.nodes.run_state.OPTIONS_KEY].source
    for_run = source.for_run
    FixedRunMap = pack.hyca_core.run_maps.FixedRunMap

    def poisoned(step_sigmas):
        run_map = for_run(step_sigmas)
        tables = {key: {step: np.full_like(c, np.inf) if where(key.rsplit(".", 1)[0], step) else c
                        for step, c in table.items()} for key, table in run_map.tables.items()}
        return FixedRunMap(run_map.mask, tables)

    source.for_run = poisoned  # read by each run's state, cloned from the template
    return patched


def _computing(pack, patched, unit, steps=None):
    """The patched model with ``unit``'s block computed (uncached) at the predicted calls of ``steps``
    (all if None): what falling back to computing it must give."""
    current_call = pack.nodes.run_state.current_call
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    block_type, index = unit.rsplit(".", 1)
    patch = replaced[(block_type, int(index))]

    def computing(args, extra):
        call = current_call(args["transformer_options"])
        if call is not None and call.predict and (steps is None or int(call.step) in steps):
            return extra["original_block"](args)
        return patch(args, extra)

    replaced[(block_type, int(index))] = computing
    return patched


def test_inf_weights_everywhere_give_full_compute_counted_and_logged_once(pack, flux, solver_map,
                                                                           conditioning, caplog):
    patched = _poison(pack, _apply(pack, flux, solver_map), lambda unit, step: True)
    with caplog.at_level(logging.INFO):
        out = _sample(patched, conditioning)
    assert torch.equal(out, _sample(flux, conditioning))
    predicted_steps = int((~pack.hyca_core.schedule.Schedule(N, WARMUP).mask(STEPS)).sum())
    assert _summary(caplog.text) == (STEPS * BLOCKS, 0, predicted_steps * BLOCKS)
    assert caplog.text.count(FAULT) == 1
    assert "double_block.0, single_block.0 at step 2 is not finite" in caplog.text


@pytest.mark.parametrize("unit, step", [("double_block.0", 4), ("single_block.0", 8)])
def test_inf_weights_for_one_unit_compute_that_unit_only(pack, flux, solver_map, conditioning, caplog, unit,
                                                         step):
    patched = _poison(pack, _apply(pack, flux, solver_map), lambda u, s: (u, s) == (unit, step))
    with caplog.at_level(logging.INFO):
        out = _sample(patched, conditioning)
    expected = _sample(_computing(pack, _apply(pack, flux, solver_map), unit, {step}), conditioning)
    assert torch.isfinite(out).all() and torch.equal(out, expected)
    assert not torch.equal(out, _sample(_apply(pack, flux, solver_map), conditioning))
    predicted_steps = int((~pack.hyca_core.schedule.Schedule(N, WARMUP).mask(STEPS)).sum())
    assert _summary(caplog.text) == ((STEPS - predicted_steps) * BLOCKS + 1, predicted_steps * BLOCKS - 1, 1)
    assert f"{unit} at step {step} is not finite" in caplog.text


def test_units_check_themselves_only_after_a_fault_reaches_the_output(pack, flux, solver_map, conditioning,
                                                                       monkeypatch):
    """A clean run checks each predicted call's output once and no unit (no pass per block); a fault at step
    4 turns the units' own checks on from that call to the run's end."""
    RunState = pack.nodes.run_state.RunState
    checked_steps = []
    check = RunState.check

    def counting(self, call, unit, out, x):
        checked_steps.append(int(call.step))
        return check(self, call, unit, out, x)

    monkeypatch.setattr(RunState, "check", counting)
    _sample(_apply(pack, flux, solver_map), conditioning)
    assert checked_steps == []
    _sample(_poison(pack, _apply(pack, flux, solver_map), lambda unit, step: step == 4), conditioning)
    predicted = np.flatnonzero(~pack.hyca_core.schedule.Schedule(N, WARMUP).mask(STEPS))
    assert checked_steps and min(checked_steps) == 4
    assert set(checked_steps) == {int(s) for s in predicted if s >= 4}


def test_an_overflowing_fp16_history_computes_that_block(pack, solver_map, conditioning, caplog):
    """A block whose residual exceeds fp16's 65504 (FLUX's outlier channels can): its fp16 history holds
    inf, so every prediction of it falls back; the others are predicted as usual."""
    model = tiny_models.build(FLUX, seed=1)
    with torch.no_grad():
        model.model.diffusion_model.single_blocks[0].linear2.weight.mul_(1e6)  # residuals around 1e5
    full = _sample(model, conditioning)
    assert torch.isfinite(full).all()
    patched = _apply(pack, model, solver_map, history_dtype=torch.float16)
    with caplog.at_level(logging.INFO):
        out = _sample(patched, conditioning)
    expected = _sample(_computing(pack, _apply(pack, model, solver_map, history_dtype=torch.float16),
                                  "single_block.0"), conditioning)
    assert torch.isfinite(out).all() and torch.equal(out, expected)
    predicted_steps = int((~pack.hyca_core.schedule.Schedule(N, WARMUP).mask(STEPS)).sum())
    assert _summary(caplog.text)[2] == predicted_steps and caplog.text.count(FAULT) == 1


def test_whole_model_granularity_falls_back_too(pack, flux, conditioning, caplog):
    model_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, granularity="model")
    patched = _poison(pack, _apply(pack, flux, model_map, granularity="model"), lambda unit, step: step == 6)
    with caplog.at_level(logging.INFO):
        out = _sample(patched, conditioning)
    assert torch.isfinite(out).all()
    computed, predicted, fallbacks = _summary(caplog.text)
    assert fallbacks == 1 and computed + predicted == STEPS
    assert "model.out at step 6 is not finite" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# 4. Isolation, faults included


def test_a_faulty_clone_leaves_its_siblings_and_the_model_untouched(pack, flux, solver_map, conditioning,
                                                                    caplog):
    other_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, steps=16, sampler="dpmpp_2m")
    fresh = {"a": _sample(_apply(pack, flux, solver_map), conditioning),
             "b": _sample(_apply(pack, flux, other_map, interval=3), conditioning),
             # same weights, never patched
             "unpatched": _sample(tiny_models.build(FLUX, seed=1), conditioning)}
    clones = {"faulty": _poison(pack, _apply(pack, flux, solver_map), lambda unit, step: True),
              "a": _apply(pack, flux, solver_map), "b": _apply(pack, flux, other_map, interval=3),
              "unpatched": flux}
    fresh["faulty"] = fresh["unpatched"]  # every prediction falls back: full compute
    for name in ["faulty", "a", "unpatched", "b", "faulty", "b", "a", "unpatched"]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert torch.equal(_sample(clones[name], conditioning), fresh[name]), name
        assert (FAULT in caplog.text) == (name == "faulty"), name
    assert "hyca" not in flux.model_options["transformer_options"]
    assert "patches_replace" not in flux.model_options["transformer_options"]


# ---------------------------------------------------------------------------------------------------------
# 5. Maps calibrated at other step counts and samplers


SHORT = "not calibrating from this"


def test_auto_mode_calibrates_from_the_first_run_long_enough(pack, store, conditioning, caplog):
    """Runs too short to calibrate from end with their image and one log line each, not an error out of the
    sampler; the first run long enough calibrates."""
    model = tiny_models.build(FLUX, seed=52)
    patched = _apply(pack, model, None)
    min_steps = pack.hyca_core.solver_map.MIN_PROBE_STEPS
    for steps in range(1, min_steps):  # nothing predicted or too few steps: nothing to calibrate from
        caplog.clear()
        with caplog.at_level(logging.INFO):
            out = _sample(patched, conditioning, steps=steps)
        assert torch.equal(out, _sample(model, conditioning, steps=steps))
        assert caplog.text.count(SHORT) == 1 and f"{SHORT} {steps}-step run (" in caplog.text
        assert store.find(model) is None
    _sample(patched, conditioning, steps=min_steps)
    assert len(store.load_for(model).probe_sigmas) == min_steps


def test_auto_mode_at_interval_1_never_calibrates(pack, store, conditioning, caplog):
    """N=1 predicts no step: every run is the unpatched model's, bit for bit, and none calibrates."""
    model = tiny_models.build(FLUX, seed=53)
    patched = _apply(pack, model, None, interval=1)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert torch.equal(_sample(patched, conditioning), _sample(model, conditioning))
        assert (f"{SHORT} {STEPS}-step run (at N=1 with a warm-up of {WARMUP} it predicts no step)"
                in caplog.text)
        assert store.find(model) is None


def test_auto_mode_calibrates_for_the_interval_of_the_target_speedup(pack, store, conditioning):
    """With a target speed-up the run would have predicted at its own N, so the map is chosen for that N."""
    model = tiny_models.build(FLUX, seed=54)
    patched = _apply(pack, model, None, target_speedup=3.0)
    _sample(patched, conditioning)
    interval = pack.hyca_core.schedule.Schedule(N, WARMUP).for_speedup(STEPS, 3.0).interval
    assert interval != N
    assert store.load_for(model).probe_schedule == pack.hyca_core.schedule.Schedule(interval, WARMUP)


# (probe steps, probe sampler, run steps, run sampler, PSNR bound): measured 75.7, 70.2, 70.4, 71.2 dB
MISMATCHES = {
    "6-step-map-at-20": (6, "euler", 20, "euler", 70),
    "24-step-map-at-8": (24, "euler", 8, "euler", 65),
    "dpmpp_2m-map-on-heun": (12, "dpmpp_2m", 10, "heun", 65),
    "euler-map-on-dpmpp_2m": (12, "euler", 14, "dpmpp_2m", 66),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_maps_serve_other_step_counts_and_samplers(pack, flux, conditioning, caplog, name):
    probe_steps, probe_sampler, steps, sampler, bound = MISMATCHES[name]
    solver_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, steps=probe_steps,
                                    sampler=probe_sampler)
    full = _sample(flux, conditioning, steps=steps, sampler=sampler)
    with caplog.at_level(logging.INFO):
        out = _sample(_apply(pack, flux, solver_map), conditioning, steps=steps, sampler=sampler)
    mask = pack.hyca_core.schedule.Schedule(N, WARMUP).mask(steps)
    calls = np.ones(steps, int)
    if sampler == "heun":  # every step after the first is evaluated twice (the step before's correction)
        calls[1:] = 2
    assert _summary(caplog.text) == (calls[mask].sum() * BLOCKS, calls[~mask].sum() * BLOCKS, 0)
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: %s: PSNR %.1f dB", name, value)
    assert torch.isfinite(out).all() and value > bound
