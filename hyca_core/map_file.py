"""The solver map file format: a safetensors file (data only, never code) written atomically and read
only within limits.

This module knows bytes, tags and tensor declarations; what the values must satisfy is the data
model's (`solver_map.SolverMap.validate`), checked on save and on load alike. Reading opens regular
files only (a FIFO or device named like a map would block or never end), refuses oversized files and
headers before safetensors parses them, and every tensor's declared dtype and shape before any is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as serialize

from .solvers import POOL_VERSION

FORMAT = "hyca-solver-map"
FORMAT_VERSION = 1
# Limits a file must keep before any of it is parsed or allocated: a FLUX map is a few MB with a
# header of ~100 bytes per tensor, so anything far larger is not ours.
MAX_FILE_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 4 * 2**20
DTYPE_NAMES = {np.int32: "I32", np.float32: "F32", np.float64: "F64"}
# `save`'s temporary files: ".hyca.<16 hex>.tmp"; earlier versions named them ".<map name>.<16 hex>.tmp",
# map names ending in ".hyca" or ".hyca.safetensors". Nothing else in a models folder is named so.
_TEMPORARY = re.compile(r"\.(?:.+\.)?hyca(?:\.safetensors)?\.[0-9a-f]{16}\.tmp")
# A save writes a few MB and renames within seconds; a temporary this old belongs to a dead process.
STALE_SECONDS = 3600


class MapError(ValueError):
    """A solver map file that cannot be used, with the reason."""


def write(path: Path, metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> Path:
    """Write atomically: a temporary file in the same folder, flushed to disk, then a rename, so an
    existing map is either left whole or replaced whole. Stale temporaries of killed saves in that
    folder are removed first (`remove_stale_temporaries`)."""
    data = serialize(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    # A short name of its own: "<map name>.<token>.tmp" would pass 255 bytes for a name that fits.
    temporary = path.with_name(f".hyca.{secrets.token_hex(8)}.tmp")
    # Created exclusively (never through an existing file or link), with the permissions any new
    # file gets: safetensors' own save_file makes owner-only files.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the map
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete this package's temporary files in `folder` older than STALE_SECONDS: a save killed
    mid-write (power loss, a killed process) leaves one that nothing else ever removes. Only regular
    files named by `save`'s pattern are touched, never links; failures are logged and skipped."""
    try:
        entries = [e for e in os.scandir(folder) if _TEMPORARY.fullmatch(e.name)]
    except OSError:
        return  # the save that follows reports an unusable folder
    cutoff = time.time() - STALE_SECONDS
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                logging.info("HyCa: removed %s, left by an interrupted save", entry.path)
        except OSError as error:
            logging.warning("HyCa: cannot remove the stale temporary file %s (%s)", entry.path, error)


@contextmanager
def opened(path: str | os.PathLike):
    """safe_open (data only, never code) on a regular file within the size limits; any failure a
    MapError naming the file."""
    path = Path(path)
    try:
        _check_file(path)
        with safe_open(path, framework="numpy") as f:
            yield f
    except MapError as error:
        raise MapError(f"{path}: {error}") from None
    except (OSError, SafetensorError) as error:
        raise MapError(f"{path}: not a readable safetensors file ({error})") from None


def _check_file(path: Path) -> None:
    """Refuse anything but a regular file, and a file or header too large to be a map, before
    safetensors parses any of it. Opened non-blocking: opening a FIFO would otherwise wait for a writer."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(handle, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise MapError("not a regular file")
        if status.st_size > MAX_FILE_BYTES:
            raise MapError(f"{status.st_size} bytes, more than a solver map can be ({MAX_FILE_BYTES})")
        header = int.from_bytes(f.read(8), "little")  # safetensors: the header's length, then the header
    if header > MAX_HEADER_BYTES:
        raise MapError(f"a {header}-byte header, more than a solver map has ({MAX_HEADER_BYTES})")


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """A map file's header (architecture, fingerprint, ...) and its info object, its tensors unread;
    MapError if it is not a map this HyCa reads."""
    with opened(path) as f:
        return metadata(f)


def metadata(f) -> tuple[dict[str, str], dict]:
    """An opened file's metadata after its format, format version and solver pool version, and its
    info (free-form provenance) parsed."""
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise MapError("not a HyCa solver map (format tag missing)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise MapError(f"format version {short(meta.get('format_version'))}, "
                       f"this HyCa reads {FORMAT_VERSION}")
    if meta.get("pool_version") != str(POOL_VERSION):
        raise MapError(f"solver pool version {short(meta.get('pool_version'))}, "
                       f"this HyCa has {POOL_VERSION}")
    info = json_field(meta, "info", "{}")
    if not isinstance(info, dict):
        raise MapError(f"info {short(info)} is not a JSON object")
    return meta, info


def json_field(meta: dict[str, str], name: str, default: str | None = None):
    text = meta.get(name, default)
    if text is None:
        raise MapError(f"metadata field {name!r} missing")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise MapError(f"metadata field {name!r} is not valid JSON ({short(str(error))})") from None


def read_tensors(f, expected: dict[str, tuple[type, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The tensors `expected` names, {name: (dtype, largest shape)}, after checking that the file holds
    exactly those and declares each with that dtype and a shape within those bounds: nothing
    implausible is allocated."""
    stored = set(f.keys())
    if stored != expected.keys():
        raise MapError(f"tensors missing {sorted(expected.keys() - stored)[:3]} / "
                       f"unexpected {short(sorted(stored - expected.keys())[:3])}")
    for name, (dtype, largest) in expected.items():
        view = f.get_slice(name)
        declared, shape = view.get_dtype(), view.get_shape()
        if declared != DTYPE_NAMES[dtype]:
            raise MapError(f"tensor {name} is {declared}, expected {DTYPE_NAMES[dtype]}")
        if len(shape) != len(largest) or any(n > most for n, most in zip(shape, largest)):
            bounds = " x ".join(map(str, largest))
            raise MapError(f"tensor {name} has shape {short(shape)}; expected {len(largest)} dimensions "
                           f"of at most {bounds}")
    return {name: f.get_tensor(name) for name in expected}


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

