"""Solver map files: exact round trip, clear refusal of anything that is not a sound map."""

import dataclasses
import json
import os
import stat
import struct
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from hyca_core import solver_map as sm
from hyca_core.calibration import calibrate
from hyca_core.run_maps import run_map
from hyca_core.schedule import RunSchedule, Schedule
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
        for name in sm.FIELDS:
            np.testing.assert_array_equal(getattr(loaded.blocks[key], name), getattr(block, name))


def test_write_is_atomic_and_leaves_no_temp_on_failure(solver_map, saved, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(sm.map_file, "serialize", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        solver_map.save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_an_interrupted_write_leaves_the_old_map_whole(solver_map, saved, monkeypatch, fail):
    """Interrupted with the new map written but not yet renamed, or failing at the rename."""
    before = saved.read_bytes()
    monkeypatch.setattr(sm.map_file.os, fail, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        solver_map.save(saved)
    assert saved.read_bytes() == before and sm.SolverMap.load(saved).fingerprint == "abc123"
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_a_new_map_gets_the_permissions_of_any_new_file(solver_map, tmp_path):
    umask = os.umask(0o022)
    try:
        path = solver_map.save(tmp_path / "new.hyca.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's owner-only 0o600


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
        (lambda t, m: t.update({"double_block.0.txt/errors": np.zeros((2, 2, 2), np.float32)}),
         "errors table"),
        (lambda t, m: m.update(blocks="not json"), "'blocks' is not valid JSON"),
        (lambda t, m: m.update(blocks="[" * 100_000 + "]" * 100_000), "'blocks' is not valid JSON"),
        (lambda t, m: m.update(blocks='["a/b.img"]'), "block list"),
        (lambda t, m: m.update(blocks='["double_block.0.img", "double_block.0.img"]'), "block list"),
        (lambda t, m: m.pop("probe_schedule"), "'probe_schedule' missing"),
        (lambda t, m: m.update(probe_schedule="[4, 3]"), "not a schedule"),
        (lambda t, m: m.update(probe_schedule='{"interval": 1e999}'), "not a schedule"),
        (lambda t, m: m.update(probe_schedule='{"interval": 0}'), "invalid schedule"),
        (lambda t, m: m.update(info="[]"), "not a JSON object"),
        (lambda t, m: m.update(architecture="../../evil"), "not a class path"),
        (lambda t, m: m.update(fingerprint="../x"), "not a hex digest"),
        (lambda t, m: t.update({"double_block.0.img/labels":
                                t["double_block.0.img/labels"].astype(np.int64)}),
         "is I64, expected I32"),
        (lambda t, m: t.update({"single_block.0.img/series":
                                t["single_block.0.img/series"].astype(np.float16)}),
         "is F16, expected F32"),
        (lambda t, m: t.update({"single_block.0.img/solver":
                                t["single_block.0.img/solver"].view(np.float32)}),
         "is F32, expected I32"),
        (lambda t, m: t.update({"double_block.0.img/labels": t["double_block.0.img/labels"].reshape(8, 8)}),
         "expected 1 dimensions"),
        (lambda t, m: t.update({"double_block.0.img/labels": np.zeros(70_000, np.int32)}), "at most 65536"),
        (lambda t, m: t.update({"probe_sigmas": t["probe_sigmas"][::-1].copy()}), "strictly decreasing"),
        (lambda t, m: t["double_block.0.img/indicators"].__setitem__((0, 0), -np.inf), "NaN or inf"),
        (lambda t, m: t["double_block.0.img/errors"].__setitem__((0, 0, 0), np.nan), "NaN or inf"),
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
    with pytest.raises(sm.MapError, match="not a readable safetensors file"):
        sm.SolverMap.load(saved)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(sm.MapError):
        sm.SolverMap.load(garbage)
    # a header declaring an enormous tensor is refused before any data is read
    header = json.dumps({"__metadata__": {"format": sm.map_file.FORMAT, "format_version": "1",
                                          "pool_version": "1",
                                          "blocks": '["a.0.img"]', "probe_schedule": "{}"},
                         "probe_sigmas": {"dtype": "F64", "shape": [10**9], "data_offsets": [0, 8 * 10**9]}})
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(sm.MapError):
        sm.SolverMap.load(huge)


def test_oversized_file_or_header_is_refused_before_safetensors_reads_it(saved, tmp_path, monkeypatch):
    refuse = lambda *a, **k: pytest.fail("safetensors opened an oversized file")  # noqa: E731
    monkeypatch.setattr(sm.map_file, "safe_open", refuse)
    big = tmp_path / "big.hyca.safetensors"
    with big.open("wb") as f:
        f.truncate(sm.map_file.MAX_FILE_BYTES + 1)  # sparse: nothing is really written
    too_big = sm.map_file.MAX_FILE_BYTES + 1
    with pytest.raises(sm.MapError, match=f"{big}: {too_big} bytes, more than a solver map"):
        sm.SolverMap.load(big)
    data = saved.read_bytes()
    saved.write_bytes(struct.pack("<Q", sm.map_file.MAX_HEADER_BYTES + 1) + data[8:])
    with pytest.raises(sm.MapError, match="header, more than a solver map has"):
        sm.SolverMap.load(saved)
    with pytest.raises(sm.MapError, match="header, more than a solver map has"):
        sm.read_metadata(saved)


def test_check_fits_names_what_does_not_fit(solver_map):
    widths = {"double_block.0": 64, "single_block.0": 64}
    solver_map.check_fits(ARCH, widths)
    with pytest.raises(sm.MapError, match="map is for"):
        solver_map.check_fits("comfy.ldm.wan.model.WanModel", widths)
    with pytest.raises(sm.MapError, match="missing"):
        solver_map.check_fits(ARCH, {**widths, "single_block.1": 64})
    with pytest.raises(sm.MapError, match="width"):
        solver_map.check_fits(ARCH, {"double_block.0": 64, "single_block.0": 32})


def test_load_checks_the_fit_and_names_the_file(saved):
    widths = {"double_block.0": 64, "single_block.0": 64}
    assert sm.SolverMap.load(saved, fits=(ARCH, widths)).fingerprint == "abc123"
    with pytest.raises(sm.MapError, match=f"{saved}: map is for {ARCH}, model is comfy.ldm.wan"):
        sm.SolverMap.load(saved, fits=("comfy.ldm.wan.model.WanModel", widths))
    with pytest.raises(sm.MapError, match=f"{saved}: blocks .* have width 32, map has 64"):
        sm.SolverMap.load(saved, fits=(ARCH, {"double_block.0": 32, "single_block.0": 32}))


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("fitted", [False, True])
def test_a_50_step_map_serves_runs_of_other_step_counts(solver_map, steps, fitted):
    prepared = run_map(solver_map, flow_sigmas(steps, 3.0), Schedule(interval=4, warmup=3), fitted=fitted)
    predicted = np.flatnonzero(~prepared.mask)
    assert len(predicted) > 0 and prepared.mask[:3].all()
    for table in prepared.tables.values():
        assert sorted(table) == predicted.tolist()
        for coefficients in table.values():
            assert coefficients.shape[1] == 64 and np.isfinite(coefficients).all()
            if not fitted:  # pool solvers are consistent; fitted weights may damp
                np.testing.assert_allclose(coefficients.sum(axis=0), 1.0, atol=1e-5)


def test_calibrated_budget_places_full_steps_where_prediction_errs_most(solver_map):
    sigmas = flow_sigmas(30, 3.0)
    uniform = Schedule(interval=4, warmup=3)
    budget = int(uniform.mask(30).sum())
    prepared = run_map(solver_map, sigmas, uniform, budget=budget)
    assert prepared.mask.sum() <= budget and prepared.mask[:3].all()
    assert not np.array_equal(prepared.mask, uniform.mask(30))


def test_calibrated_budget_keeps_the_steps_the_schedule_forces(solver_map):
    sigmas = flow_sigmas(30, 3.0)
    schedule = RunSchedule(interval=4, warmup=3, final=2, opens=5)  # 5 steps before the window, 2 after
    budget = int(schedule.mask(30).sum())
    prepared = run_map(solver_map, sigmas, schedule, budget=budget)
    assert prepared.mask[:5].all() and prepared.mask[-2:].all()
    assert prepared.mask.sum() <= budget and not prepared.mask.all()


def _with_block(solver_map, **arrays):
    """The map with its first block's arrays replaced."""
    key = next(iter(solver_map.blocks))
    block = dataclasses.replace(solver_map.blocks[key], **arrays)
    return dataclasses.replace(solver_map, blocks={**solver_map.blocks, key: block})


UNSOUND = {  # maps calibration could hand over, each refused by load
    "increasing probe": lambda m: dataclasses.replace(m, probe_sigmas=m.probe_sigmas[::-1].copy()),
    "repeated sigma": lambda m: dataclasses.replace(
        m, probe_sigmas=np.sort(np.r_[m.probe_sigmas[:-1], m.probe_sigmas[1]])[::-1].copy()),
    "25 series per cluster": lambda m: _with_block(m, series=np.zeros((4, 25, 50), np.float32)),
    "series on other steps": lambda m: _with_block(m, series=m.blocks["double_block.0.img"].series[..., :40]),
    "more clusters than channels": lambda m: _with_block(
        m, series=np.zeros((65, 24, 50), np.float32), solver=np.zeros(65, np.int32),
        variable=np.zeros(65, np.int32), errors=np.zeros((13, 2, 65), np.float32),
        indicators=np.zeros((65, 10), np.float32)),
    "a solver needing more history than the warm-up": lambda m: _with_block(
        m, solver=np.full(4, 3, np.int32)),  # taylor3 keeps 4 residuals, the warm-up 3
    "a value float32 cannot hold": lambda m: _with_block(m, series=np.full((4, 24, 50), 1e300)),
    "an id int32 cannot hold": lambda m: _with_block(
        m, labels=m.blocks["double_block.0.img"].labels.astype(np.int64) + 2**32),  # wraps to the same ids
    "architecture": lambda m: dataclasses.replace(m, architecture="../../evil"),
}


@pytest.mark.parametrize("unsound", list(UNSOUND))
def test_save_refuses_what_load_refuses(solver_map, tmp_path, unsound):
    """One validation for both: auto mode once saved a map from an increasing schedule that no load took."""
    path = tmp_path / "m.hyca.safetensors"
    with pytest.raises(sm.MapError):
        UNSOUND[unsound](solver_map).save(path)
    assert list(tmp_path.iterdir()) == []


def _written(path, data: bytes, age: float):
    """`path` holding `data`, last changed `age` seconds ago."""
    path.write_bytes(data)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_saving_removes_stale_temporaries_of_killed_saves_and_nothing_else(solver_map, tmp_path):
    old = 2 * sm.map_file.STALE_SECONDS
    stale = [_written(tmp_path / name, b"half a map", old) for name in
             (".hyca.0123456789abcdef.tmp", ".m.hyca.safetensors.0123456789abcdef.tmp",
              ".flux.safetensors.hyca.fedcba9876543210.tmp")]
    kept = [_written(tmp_path / ".hyca.aaaaaaaaaaaaaaaa.tmp", b"not ours to remove", 0)]  # a save under way
    kept += [_written(tmp_path / name, b"not ours to remove", old)
             for name in (".other.0123456789abcdef.tmp", "notes.tmp", ".hyca.xyz.tmp")]
    target = _written(tmp_path / "elsewhere", b"a link's target", old)
    link = tmp_path / ".hyca.bbbbbbbbbbbbbbbb.tmp"
    link.symlink_to(target)
    os.utime(link, (0, 0), follow_symlinks=False)
    solver_map.save(tmp_path / "m.hyca.safetensors")
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"not ours to remove" for p in kept) and link.is_symlink()
    assert target.read_bytes() == b"a link's target"
