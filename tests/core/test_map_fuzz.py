"""Solver map files are data, never code: whatever bytes a file holds, loading it gives a sound map
(one that can be fitted to a run) or a MapError naming the file, never another exception.

Property-based: hypothesis mutates a valid saved map four ways, 1,300 files in all: raw bytes
(truncation, byte flips, insertions, deletions, a lying header length, random bytes); the JSON
header regardless of the data (dtypes, huge shapes, offsets, entries swapped or dropped); the
content of well-formed safetensors files (metadata values, missing and extra tensors, other
dtypes and shapes, NaN, inf and out-of-range ids), which all reach HyCa's own checks; and blocks
consistent in themselves but past a bound of the model they claim to fit (wider compact samples,
more clusters than channels, other probe steps, solvers needing more history than the probe's
warm-up), which must all be refused. Paths that are not regular files (a FIFO, a device, a folder,
links) are refused without blocking.
"""

import functools
import json
import struct
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyca_core import solver_map as sm
from hyca_core.calibration import calibrate
from hyca_core.run_maps import run_map
from hyca_core.schedule import Schedule
from hyca_core.solvers import POOL, TIME_VARIABLES
from hyca_core.trajectories import Trajectory
from harness.synthetic import flow_sigmas, mixture

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
          "F8_E4M3"]
TEXT = st.sampled_from(["", "1", "null", "[]", "{}", "1e999", "NaN", '"x"', '["double_block.0.img"]',
                        '{"interval": 2, "warmup": 2}', '{"interval": -1}', '{"interval": true}',
                        "[" * 10_000, "../../x", "\x00", "é"]) | st.text(max_size=40)
NUMPY_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.uint8, np.bool_]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 3e38, -1.0, 0.0]
SPECIAL_INTS = [-1, 2**31 - 1, 99, 0]


@functools.cache
def valid_map() -> bytes:
    """A small valid map (two block streams of 16 channels, an 8-step probe) as file bytes."""
    trajectories = {}
    for i, key in enumerate(("double_block.0.img", "single_block.0.img")):
        sigmas, values, _ = mixture(steps=8, rows=4, channels_per_group=4, seed=i, shift=3.0)
        trajectories[key] = Trajectory(sigmas, values)
    solver_map = calibrate(trajectories, Schedule(interval=2, warmup=2), clusters=2,
                           architecture="comfy.ldm.flux.model.Flux", fingerprint="0123abcd")
    with tempfile.TemporaryDirectory() as folder:
        return solver_map.save(Path(folder) / "valid.hyca.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + body


@st.composite
def raw_mutations(draw) -> bytes:
    data = bytearray(valid_map())
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "length", "random"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[position] = draw(st.integers(0, 255))
    elif kind in ("insert", "delete"):
        position = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[position : position + draw(st.integers(1, 64))]
    elif kind == "length":  # the header length prefix lies
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        return draw(st.binary(max_size=512))
    return bytes(data)


@st.composite
def header_edits(draw) -> bytes:
    """The JSON header edited without regard to the data: mostly refused by safetensors itself."""
    header, body = split(valid_map())
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        entry = header.get(draw(st.sampled_from(names)))
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "swap", "drop"]))
        if entry is None:  # dropped by an earlier edit
            continue
        if edit == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif edit == "shape":  # any shape, huge ones included
            entry["shape"] = draw(st.lists(st.integers(0, 2**40), max_size=4))
        elif edit == "offsets":
            offsets = st.lists(st.integers(0, len(body) + 64), min_size=2, max_size=2)
            entry["data_offsets"] = sorted(draw(offsets))
        elif edit == "swap":  # two entries trade their data: both consistent, each in the other's place
            other = header.get(draw(st.sampled_from(names)))
            if other is not None:
                for key in ("dtype", "shape", "data_offsets"):
                    entry[key], other[key] = other[key], entry[key]
        else:
            header = {k: v for k, v in header.items() if v is not entry}
    return join(header, body)


@functools.cache
def valid_content() -> tuple[dict, dict]:
    header, _ = split(valid_map())
    return safetensors.numpy.load(valid_map()), header["__metadata__"]


@st.composite
def content_edits(draw) -> bytes:
    """Well-formed safetensors files with hostile content: every one reaches HyCa's own checks."""
    tensors, meta = valid_content()
    tensors, meta = {k: v.copy() for k, v in tensors.items()}, dict(meta)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tensors)))
        edit = draw(st.sampled_from(["meta", "drop_meta", "astype", "reshape", "replace", "value", "value",
                                     "swap", "drop", "extra"]))
        if edit == "meta":
            meta[draw(st.sampled_from(sorted(meta)) | st.text(max_size=8))] = draw(TEXT)
        elif edit == "drop_meta" and meta:
            meta.pop(draw(st.sampled_from(sorted(meta))))
        elif edit == "astype":
            with np.errstate(all="ignore"):  # NaN, inf or 3e38 cast to a narrower type: whatever it gives
                tensors[name] = tensors[name].astype(draw(st.sampled_from(NUMPY_DTYPES)))
        elif edit == "reshape":  # the same values in another shape
            count = tensors[name].size
            shapes = [(count,), (1, count), (count, 1, 1)] + ([()] if count == 1 else [])
            tensors[name] = tensors[name].reshape(draw(st.sampled_from(shapes)))
        elif edit == "replace":  # another size altogether
            shape = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
            tensors[name] = np.ones(shape, dtype=tensors[name].dtype)
        elif edit == "value" and tensors[name].size:
            flat = tensors[name].reshape(-1)
            specials = SPECIAL_FLOATS if flat.dtype.kind == "f" else SPECIAL_INTS
            value = np.array(draw(st.sampled_from(specials)))
            with np.errstate(all="ignore"):  # an out-of-range id wraps in a narrower type: still hostile
                flat[draw(st.integers(0, flat.size - 1))] = value.astype(flat.dtype)
        elif edit == "swap":
            other = draw(st.sampled_from(sorted(tensors)))
            tensors[name], tensors[other] = tensors[other], tensors[name]
        elif edit == "drop" and len(tensors) > 1:
            del tensors[name]
        elif edit == "extra":
            extra_name = draw(st.sampled_from(["extra", "x/labels", name.replace("double", "triple")]))
            tensors[extra_name] = np.zeros(3)
    return safetensors.numpy.save(tensors, metadata=meta)


@st.composite
def bound_edits(draw) -> bytes:
    """One block made consistent in itself but past a bound of the map's model: the valid map has blocks of
    16 channels, an 8-step probe (so at most 8 series per cluster) and a warm-up of 2 (solvers of 2
    residuals)."""
    tensors, meta = valid_content()
    tensors = {k: v.copy() for k, v in tensors.items()}
    key = draw(st.sampled_from(json.loads(meta["blocks"])))
    block = {name: tensors[f"{key}/{name}"] for name in sm.FIELDS}
    clusters, width, steps = block["series"].shape
    kind = draw(st.sampled_from(["width", "clusters", "steps", "history"]))
    if kind == "width":
        width = draw(st.integers(steps + 1, 64))
    elif kind == "clusters":  # more clusters than channels, each table sized to match
        clusters = draw(st.integers(len(block["labels"]) + 1, 80))
        block["solver"] = np.zeros(clusters, np.int32)
        block["variable"] = np.zeros(clusters, np.int32)
        block["errors"] = np.zeros((len(POOL), len(TIME_VARIABLES), clusters), np.float32)
        block["indicators"] = np.zeros((clusters, block["indicators"].shape[1]), np.float32)
    elif kind == "steps":
        steps = draw(st.integers(1, 40).filter(lambda s: s != steps))
        width = min(width, steps)
    else:
        block["solver"][draw(st.integers(0, clusters - 1))] = draw(st.sampled_from([s.id for s in POOL
                                                                                   if s.history > 2]))
    block["series"] = np.asarray(draw(st.sampled_from([0.0, 1.0, -2.5])) + np.arange(clusters * width * steps)
                                 .reshape(clusters, width, steps), np.float32)
    tensors |= {f"{key}/{name}": value for name, value in block.items()}
    return safetensors.numpy.save(tensors, metadata=meta)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.hyca.safetensors"


def load_or_refuse(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        loaded = sm.SolverMap.load(path)
    except sm.MapError as error:
        assert str(error).startswith(f"{path}: ") and len(str(error)) < 1000
        return
    prepared = run_map(loaded, flow_sigmas(6, 3.0), Schedule(interval=2, warmup=2))  # a loaded map is usable
    assert prepared.mask.any()


def test_the_valid_map_loads(path):
    load_or_refuse(path, valid_map())
    assert sm.SolverMap.load(path).architecture == "comfy.ldm.flux.model.Flux"


@settings(max_examples=400, **SETTINGS)
@given(data=raw_mutations())
def test_raw_mutations_load_or_are_refused(path, data):
    load_or_refuse(path, data)


@settings(max_examples=300, **SETTINGS)
@given(data=header_edits())
def test_header_edits_load_or_are_refused(path, data):
    load_or_refuse(path, data)


@settings(max_examples=400, **SETTINGS)
@given(data=content_edits())
def test_content_edits_load_or_are_refused(path, data):
    load_or_refuse(path, data)


@settings(max_examples=200, **SETTINGS)
@given(data=bound_edits())
def test_blocks_past_the_bounds_of_their_model_are_refused(path, data):
    path.write_bytes(data)
    with pytest.raises(sm.MapError, match=f"^{re.escape(str(path))}: (block|tensor) "):
        sm.SolverMap.load(path)


def _special_files(folder: Path) -> list[Path]:
    """Paths named like maps that are not regular files."""
    fifo = folder / "fifo.hyca.safetensors"
    os.mkfifo(fifo)
    folder_named_like_a_map = folder / "folder.hyca.safetensors"
    folder_named_like_a_map.mkdir()
    links = {"linked": fifo, "device": Path("/dev/zero"), "dangling": folder / "nothing"}
    for name, target in links.items():
        (folder / f"{name}.hyca.safetensors").symlink_to(target)
    return [fifo, folder_named_like_a_map] + [folder / f"{name}.hyca.safetensors" for name in links]


@pytest.mark.parametrize("reader", [sm.SolverMap.load, sm.read_metadata])
def test_special_files_are_refused_without_blocking(tmp_path, reader):
    for special in _special_files(tmp_path):
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(_refusal(reader, special)), daemon=True)
        thread.start()
        thread.join(timeout=10)
        if thread.is_alive():  # blocked opening the FIFO: a writer releases it before the test fails
            with open(special, "wb"):
                pass
            pytest.fail(f"reading {special.name} blocked")
        assert outcome[0].startswith(f"{special}: "), outcome


def _refusal(read, path: Path) -> str:
    try:
        read(path)
    except sm.MapError as error:
        return str(error)
    return "read"
