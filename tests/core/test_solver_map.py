"""Solver map files: exact round trip, clear refusal of anything that is not a sound map."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from hyca_core import solver_map as sm
from hyca_core.calibration import calibrate
from hyca_core.schedule import Schedule
from hyca_core.trajectories import Trajectory
from harness.synthetic import flow_sigmas, mixture

ARCH = "comfy.ldm.flux.model.Flux"


@pytest.fixture(scope="module")
def solver_map():
    trajectories = {}
    for i, key in enumerate(("double_block.0.img", "double_block.0.txt", "single_block.0.img")):
        sigmas, values, _ = mixture(steps=50, rows=8, channels_per_group=16, seed=i, shift=3.0)
        trajectories[key] = Trajectory(sigmas, values)
    return calibrate(trajectories, Schedule(interval=4, warmup=3), clusters=4, architecture=ARCH,
                     fingerprint="abc123", info={"steps": 50})


@pytest.fixture
def saved(solver_map, tmp_path):
    return solver_map.save(tmp_path / "m.hyca.safetensors")


def _tensors_and_meta(path):
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_round_trip_is_exact(solver_map, saved):
    loaded = sm.SolverMap.load(saved)
    assert (loaded.architecture, loaded.fingerprint, loaded.info) == (ARCH, "abc123", {"steps": 50})
    assert loaded.probe_schedule == solver_map.probe_schedule
    np.testing.assert_array_equal(loaded.probe_sigmas, solver_map.probe_sigmas)
    for key, block in solver_map.blocks.items():
        for name in sm._FIELDS:
            np.testing.assert_array_equal(getattr(loaded.blocks[key], name), getattr(block, name))


def test_write_is_atomic_and_leaves_no_temp_on_failure(solver_map, saved, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(sm, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        solver_map.save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, m: m.update(format="something-else"), "not a HyCa solver map"),
        (lambda t, m: m.update(format_version="99"), "format version"),
        (lambda t, m: m.update(pool_version="0"), "pool version"),
        (lambda t, m: t.pop("double_block.0.img/labels"), "tensors missing"),
        (lambda t, m: t.update({"extra": np.zeros(1)}), "unexpected"),
        (lambda t, m: t["double_block.0.img/series"].__setitem__((0, 0, 0), np.nan), "NaN or inf"),
        (lambda t, m: t["double_block.0.img/labels"].__setitem__(0, 99), "cluster ids out of range"),
        (lambda t, m: t["single_block.0.img/solver"].__setitem__(0, 1234), "unknown solver ids"),
        (lambda t, m: t["single_block.0.img/variable"].__setitem__(0, 7), "time variable"),
        (lambda t, m: t.update({"probe_sigmas": np.array([1.0, np.inf, 0.5, 0.2])}), "probe_sigmas"),
        (lambda t, m: t.update({"double_block.0.txt/errors": np.zeros((2, 2, 2), np.float32)}), "errors table"),
        (lambda t, m: m.update(blocks="not json"), "not a readable"),
    ],
)
def test_tampered_file_is_refused_with_the_reason(saved, mutate, message):
    tensors, meta = _tensors_and_meta(saved)
    mutate(tensors, meta)
    save_file(tensors, saved, metadata=meta)
    with pytest.raises(sm.MapError, match=message) as error:
        sm.SolverMap.load(saved)
    assert str(saved) in str(error.value)


def test_truncated_garbage_and_huge_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(sm.MapError, match="not a readable"):
        sm.SolverMap.load(saved)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(sm.MapError):
        sm.SolverMap.load(garbage)
    # a header declaring an enormous tensor is refused before any data is read
    header = json.dumps({"__metadata__": {"format": sm.FORMAT, "format_version": "1", "pool_version": "1",
                                          "blocks": '["a.0.img"]', "probe_schedule": "{}"},
                         "probe_sigmas": {"dtype": "F64", "shape": [10**9], "data_offsets": [0, 8 * 10**9]}})
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(sm.MapError):
        sm.SolverMap.load(huge)


def test_check_fits_names_what_does_not_fit(solver_map):
    widths = {"double_block.0": 64, "single_block.0": 64}
    solver_map.check_fits(ARCH, widths)
    with pytest.raises(sm.MapError, match="map is for"):
        solver_map.check_fits("comfy.ldm.wan.model.WanModel", widths)
    with pytest.raises(sm.MapError, match="missing"):
        solver_map.check_fits(ARCH, {**widths, "single_block.1": 64})
    with pytest.raises(sm.MapError, match="width"):
        solver_map.check_fits(ARCH, {"double_block.0": 64, "single_block.0": 32})


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("fitted", [False, True])
def test_a_50_step_map_compiles_for_other_step_counts(solver_map, steps, fitted):
    compiled = solver_map.compile(flow_sigmas(steps, 3.0), Schedule(interval=4, warmup=3), fitted=fitted)
    predicted = np.flatnonzero(~compiled.mask)
    assert len(predicted) > 0 and compiled.mask[:3].all()
    for table in compiled.tables.values():
        assert sorted(table) == predicted.tolist()
        for coefficients in table.values():
            assert coefficients.shape[1] == 64 and np.isfinite(coefficients).all()
            if not fitted:  # pool solvers are consistent; fitted weights may damp
                np.testing.assert_allclose(coefficients.sum(axis=0), 1.0, atol=1e-5)


def test_calibrated_budget_places_full_steps_where_prediction_errs_most(solver_map):
    sigmas = flow_sigmas(30, 3.0)
    uniform = Schedule(interval=4, warmup=3)
    budget = int(uniform.mask(30).sum())
    compiled = solver_map.compile(sigmas, uniform, budget=budget)
    assert compiled.mask.sum() <= budget and compiled.mask[:3].all()
    assert not np.array_equal(compiled.mask, uniform.mask(30))
