"""Solver maps: what one-time choosing found for a model, as a validated safetensors file.

A map holds, per block stream (``"double_block.3.img"``): the cluster of every channel, the
solver each cluster chose on the probe (with every pool member's error, so users can see why),
the clusters' mean indicators, and a compact sample of the probe from which the solvers are
re-selected and fitted for whatever schedule a later run uses (`compile`). It is data only:
written with safetensors (no pickle), atomically, and read only within size limits, every header
field, dtype and shape checked before any tensor is, then every value.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as serialize

from . import defaults
from .indicators import INDICATOR_NAMES
from .schedule import Schedule, calibrated_mask
from .selection import (FIT_LAMBDA, CompactSample, coefficients, gap_costs, plan_schedule, refit, resample,
                        single)
from .solvers import MAX_HISTORY, POOL, POOL_VERSION, TIME_VARIABLES, solver

FORMAT = "hyca-solver-map"
FORMAT_VERSION = 1
# Limits a file must keep before any of it is parsed or allocated: a FLUX map is a few MB with a
# header of ~100 bytes per tensor, so anything far larger is not ours.
MAX_FILE_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 4 * 2**20
MAX_BLOCKS = 4096
MAX_CHANNELS = 1 << 16
MAX_CLUSTERS = 256
MAX_STEPS = 10_000
MIN_PROBE_STEPS = 4  # fewer leave too little to choose solvers from (HyCa Calibrate's minimum)
MAX_ELEMENTS = 2**26  # per tensor
# Tensors stored per block stream: dtype and number of dimensions.
_FIELDS = {"labels": (np.int32, 1), "series": (np.float32, 3), "solver": (np.int32, 1),
           "variable": (np.int32, 1), "errors": (np.float32, 3), "indicators": (np.float32, 2)}
_SIGMAS = (np.float64, 1)
_SAFETENSORS_DTYPES = {np.int32: "I32", np.float32: "F32", np.float64: "F64"}
_BLOCK_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+")  # "double_block.3.img"
_ARCHITECTURE = re.compile(r"[A-Za-z0-9_.]{0,256}")  # a Python class path, "" if unknown
_FINGERPRINT = re.compile(r"[0-9a-f]{0,64}")


class MapError(ValueError):
    """A solver map file that cannot be used, with the reason."""


@dataclass
class BlockMap:
    labels: np.ndarray  # (D,) int32 cluster of each channel
    series: np.ndarray  # (C, n, S) float32 compact probe sample (see selection.CompactSample)
    solver: np.ndarray  # (C,) int32 pool id chosen on the probe schedule
    variable: np.ndarray  # (C,) int32 index into TIME_VARIABLES
    errors: np.ndarray  # (P, V, C) float32 each pool solver's mean relative error on the probe
    indicators: np.ndarray  # (C, 10) float32 mean standardized indicators per cluster

    @property
    def clusters(self) -> int:
        return self.series.shape[0]


@dataclass
class SolverMap:
    architecture: str
    fingerprint: str  # of the base weights; LoRA patches do not change it
    probe_sigmas: np.ndarray  # (S,) float64
    probe_schedule: Schedule  # the schedule the probe's choice was made for
    blocks: dict[str, BlockMap]
    pool_version: int = POOL_VERSION
    info: dict = field(default_factory=dict)  # free-form provenance (sampler, steps, ...)

    def check_fits(self, architecture: str, block_widths: dict[str, int]) -> None:
        """Raise MapError unless this map was made for a model of this architecture and shape.

        block_widths: the model's blocks by name ("double_block.0") and hidden width; map keys
        name a block's stream ("double_block.0.img").
        """
        if architecture != self.architecture:
            raise MapError(f"map is for {self.architecture}, model is {architecture}: "
                           "calibrate one for this model")
        mapped = {key.rsplit(".", 1)[0]: len(block.labels) for key, block in self.blocks.items()}
        if mapped.keys() != block_widths.keys():
            missing = sorted(block_widths.keys() - mapped.keys())
            extra = sorted(mapped.keys() - block_widths.keys())
            granularity = self.info.get("granularity", "block")
            raise MapError(f"map does not cover the model's blocks: missing {missing[:4]}, unknown "
                           f"{extra[:4]} (the map's granularity is {granularity!r}; use the same)")
        wrong = [name for name, width in block_widths.items() if mapped[name] != width]
        if wrong:
            raise MapError(f"blocks {wrong[:4]} have width {block_widths[wrong[0]]}, map has "
                           f"{mapped[wrong[0]]}: it was calibrated for another model of this family")

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, flushed to disk, then a rename, so
        an existing map is either left whole or replaced whole."""
        path = Path(path)
        tensors = {"probe_sigmas": np.asarray(self.probe_sigmas, dtype=_SIGMAS[0])}
        for key, block in self.blocks.items():
            for name, (dtype, _) in _FIELDS.items():
                tensors[f"{key}/{name}"] = np.ascontiguousarray(getattr(block, name), dtype=dtype)
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "pool_version": str(self.pool_version),
            "architecture": self.architecture,
            "fingerprint": self.fingerprint,
            "probe_schedule": json.dumps(asdict(self.probe_schedule)),
            "blocks": json.dumps(list(self.blocks)),
            "info": json.dumps(self.info),
        }
        data = serialize(tensors, metadata=metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
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

    @classmethod
    def load(cls, path: str | os.PathLike, fits: tuple[str, dict[str, int]] | None = None) -> "SolverMap":
        """Read and validate a map file; with ``fits`` = (architecture, block widths), also check
        that it fits that model (`check_fits`). Raises MapError naming the file and the reason."""
        with _opened(path) as f:
            solver_map = _read(f)
            if fits is not None:
                solver_map.check_fits(*fits)
            return solver_map

    # --- inference -----------------------------------------------------------------------------

    def compile(self, step_sigmas: np.ndarray, schedule: Schedule, fitted: bool = defaults.FITTED,
                per_position: bool = True, budget: int | None = None,
                only: tuple[str, str] | None = None) -> "CompiledMap":
        """Re-select (and fit) every block's solvers for this run's steps and schedule.

        step_sigmas: the sigma of each sampler step (ComfyUI's sigmas without the final one).
        budget: if given, compute that many steps, placed where the probe says prediction errs
        most (`calibrated_mask`) instead of every `schedule.interval`-th; the schedule's warm-up,
        final steps and steps outside its window are computed all the same. only: one (solver name,
        time variable) for every channel, the single-solver baselines (FORA = ("reuse", "step"),
        TaylorSeer-like = ("taylorseer2", "step")). Only pool members whose
        history fits in the warm-up are used, so the warm-up asked for is the warm-up run.
        """
        step_sigmas = np.asarray(step_sigmas, dtype=np.float64)
        warmup = max(schedule.warmup, 1)
        pool = tuple(s for s in POOL if s.history <= warmup)
        if budget is None:
            mask = schedule.mask(len(step_sigmas))
        else:
            # the schedule with no every-N pattern: what it computes whatever the budget
            forced = replace(schedule, interval=len(step_sigmas) + 1).mask(len(step_sigmas))
            mask = self._calibrated_mask(step_sigmas, budget, warmup, forced, pool)
        if mask.all():
            return CompiledMap(mask, {})
        plan = plan_schedule(mask, step_sigmas, pool=pool)
        coefficient_tables = {}
        for key, block in self.blocks.items():
            if only is not None:
                assignment = single(solver(only[0]).id, only[1], block.clusters)
            else:
                sample = CompactSample(self.probe_sigmas, block.series)
                assignment = refit(sample, plan, per_position=per_position, lam=FIT_LAMBDA if fitted else None)
            coefficient_tables[key] = coefficients(assignment, block.labels, plan)
        return CompiledMap(mask, coefficient_tables)

    def _calibrated_mask(self, step_sigmas, budget, warmup, forced, pool) -> np.ndarray:
        """One mask for all blocks, from the summed gap costs of their resampled probes; no gap
        spans a `forced` step."""
        values, labels, offset = [], [], 0
        for block in self.blocks.values():
            v, l = resample(CompactSample(self.probe_sigmas, block.series), step_sigmas)
            values.append(v / np.sqrt(np.mean(v**2) + 1e-30))  # relative errors: blocks weigh alike
            labels.append(l + offset)
            offset += block.clusters
        max_gap = min(len(step_sigmas) - 1, 2 * len(step_sigmas) // max(budget, 1) + 2)
        costs = gap_costs(np.concatenate(values, axis=2), np.concatenate(labels), step_sigmas, warmup,
                          max_gap, pool=pool)
        # cost[a, g] predicts steps a+1..a+g: forbidden when a forced step lies among them
        count = np.concatenate([[0], np.cumsum(forced)])  # forced steps before each index
        a, g = np.ogrid[: len(step_sigmas), : costs.shape[1]]
        costs[count[np.minimum(a + g + 1, len(step_sigmas))] > count[a + 1]] = np.inf
        return calibrated_mask(costs, max(budget, int(forced.sum())), max(warmup, _leading(forced)))


def _leading(mask: np.ndarray) -> int:
    """Length of the run of True at the start of `mask`."""
    return int(np.argmin(mask)) if not mask.all() else len(mask)


@dataclass
class CompiledMap:
    """A map collapsed for one run: which steps compute, and per block the per-channel weights.

    Like `DynamicMap`, it answers a run's three questions: must this step compute, can it be
    predicted from the history this run holds, and with which weights per channel.
    """

    mask: np.ndarray  # (steps,) bool, True = full compute
    tables: dict[str, dict[int, np.ndarray]]  # key -> predicted step -> (m, D) float32

    def history(self, key: str) -> int:
        """Residuals to keep for block stream `key`."""
        table = self.tables.get(key)
        return next(iter(table.values())).shape[0] if table else 1

    def forced(self, step: int) -> bool:
        return step >= len(self.mask) or bool(self.mask[step])

    def can_predict(self, step: int, history_steps: tuple[int, ...]) -> bool:
        """Only with exactly the history the weights were fitted for."""
        if self.forced(step):
            return False
        computed = tuple(int(s) for s in np.flatnonzero(self.mask[:step]))
        length = min(MAX_HISTORY, len(computed))
        return length > 0 and tuple(history_steps[-length:]) == computed[-length:]

    def coefficients(self, key: str, step: int, history_steps, history_sigmas, sigma) -> np.ndarray:
        return self.tables[key][step]


class DynamicMap:
    """The map's per-cluster pool solvers (paper eq. 5 choice) on whatever history a run holds.

    Serves the error-adaptive schedule, where the computed steps are only known as the run goes:
    weights come from each cluster's solver at the run's actual history times.
    """

    def __init__(self, solver_map: SolverMap, schedule: Schedule, num_steps: int):
        self.solver_map = solver_map
        self.first_predictable = max(schedule.warmup, 1)
        self.last_predictable = num_steps - schedule.final - 1
        self._weights: dict[tuple, np.ndarray] = {}  # the same few solvers serve every block

    def history(self, key: str) -> int:
        block = self.solver_map.blocks[key]
        return max(solver(int(s)).history for s in block.solver)

    def forced(self, step: int) -> bool:
        return not self.first_predictable <= step <= self.last_predictable

    def can_predict(self, step: int, history_steps: tuple[int, ...]) -> bool:
        return not self.forced(step) and len(history_steps) > 0

    def coefficients(self, key: str, step: int, history_steps, history_sigmas, sigma) -> np.ndarray:
        block = self.solver_map.blocks[key]
        m = min(self.history(key), len(history_steps))
        cluster_weights = np.zeros((block.clusters, m))
        for c, (solver_id, variable) in enumerate(zip(block.solver, block.variable)):
            rule = solver(int(solver_id))
            if rule.history > m:  # the run holds less history than the solver needs: reuse
                rule = solver("reuse")
            times, target = ((history_steps, step) if TIME_VARIABLES[variable] == "step"
                             else (history_sigmas, sigma))
            times = tuple(float(t) for t in times[-rule.history :])
            cache_key = (rule.id, times, float(target))
            if cache_key not in self._weights:
                self._weights[cache_key] = rule.weights(times, target)
            cluster_weights[c, m - rule.history :] = self._weights[cache_key]
        return np.ascontiguousarray(cluster_weights[block.labels].T, dtype=np.float32)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A map file's header (architecture, fingerprint, info ...), its tensors unread; MapError if
    it is not a map this HyCa reads."""
    with _opened(path) as f:
        return _metadata(f)


@contextmanager
def _opened(path: str | os.PathLike):
    """safe_open (data only, never code) after the size limits; any failure a MapError naming the file."""
    path = Path(path)
    try:
        _check_size(path)
        with safe_open(path, framework="numpy") as f:
            yield f
    except MapError as error:
        raise MapError(f"{path}: {error}") from None
    except (OSError, SafetensorError) as error:
        raise MapError(f"{path}: not a readable safetensors file ({error})") from None


def _check_size(path: Path) -> None:
    """Refuse a file or header too large to be a map before safetensors parses any of it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise MapError(f"{size} bytes, more than a solver map can be ({MAX_FILE_BYTES})")
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")  # safetensors: the header's length, then the header
    if header > MAX_HEADER_BYTES:
        raise MapError(f"a {header}-byte header, more than a solver map has ({MAX_HEADER_BYTES})")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metadata(f) -> dict[str, str]:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise MapError("not a HyCa solver map (format tag missing)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise MapError(f"format version {_short(meta.get('format_version'))}, "
                       f"this HyCa reads {FORMAT_VERSION}")
    if meta.get("pool_version") != str(POOL_VERSION):
        raise MapError(f"solver pool version {_short(meta.get('pool_version'))}, "
                       f"this HyCa has {POOL_VERSION}")
    return meta


def _json_field(meta: dict[str, str], name: str, default: str | None = None):
    text = meta.get(name, default)
    if text is None:
        raise MapError(f"metadata field {name!r} missing")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise MapError(f"metadata field {name!r} is not valid JSON ({_short(str(error))})") from None


def _schedule(value) -> Schedule:
    names = {f.name for f in fields(Schedule)}
    if not (isinstance(value, dict) and value.keys() <= names
            and all(type(v) is int and 0 <= v <= MAX_STEPS for v in value.values())):
        raise MapError(f"probe_schedule {_short(value)} is not a schedule")
    try:
        return Schedule(**value)
    except ValueError as error:
        raise MapError(f"probe_schedule: {error}") from None


def _read(f) -> SolverMap:
    meta = _metadata(f)
    keys = _json_field(meta, "blocks")
    if not (isinstance(keys, list) and 0 < len(keys) <= MAX_BLOCKS
            and all(isinstance(k, str) and _BLOCK_KEY.fullmatch(k) for k in keys)
            and len(set(keys)) == len(keys)):
        raise MapError(f"block list {_short(keys)} missing or malformed")
    schedule = _schedule(_json_field(meta, "probe_schedule"))
    info = _json_field(meta, "info", "{}")
    if not isinstance(info, dict):
        raise MapError(f"info {_short(info)} is not a JSON object")
    architecture, fingerprint = meta.get("architecture", ""), meta.get("fingerprint", "")
    if not _ARCHITECTURE.fullmatch(architecture):
        raise MapError(f"architecture {_short(architecture)} is not a class path")
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise MapError(f"fingerprint {_short(fingerprint)} is not a hex digest")
    expected = {"probe_sigmas": _SIGMAS}
    expected |= {f"{k}/{name}": spec for k in keys for name, spec in _FIELDS.items()}
    stored = set(f.keys())
    if stored != expected.keys():
        raise MapError(f"tensors missing {sorted(expected.keys() - stored)[:3]} / "
                       f"unexpected {_short(sorted(stored - expected.keys())[:3])}")
    for name, spec in expected.items():  # dtypes and shapes before data: nothing implausible is read
        _check_declared(f.get_slice(name), name, *spec)
    sigmas = f.get_tensor("probe_sigmas")
    if not (MIN_PROBE_STEPS <= len(sigmas) <= MAX_STEPS and np.all(np.isfinite(sigmas))
            and np.all(sigmas >= 0) and np.all(np.diff(sigmas) < 0)):
        raise MapError(f"probe_sigmas must be {MIN_PROBE_STEPS} to {MAX_STEPS} finite, non-negative, "
                       "strictly decreasing sigmas")
    blocks = {k: _read_block(f, k, len(sigmas)) for k in keys}
    return SolverMap(architecture, fingerprint, sigmas, schedule, blocks, info=info)


def _check_declared(view, name: str, dtype, rank: int) -> None:
    declared, shape = view.get_dtype(), view.get_shape()
    if declared != _SAFETENSORS_DTYPES[dtype]:
        raise MapError(f"tensor {name} is {declared}, expected {_SAFETENSORS_DTYPES[dtype]}")
    largest = max(MAX_CHANNELS, MAX_STEPS)
    if len(shape) != rank or max(shape, default=0) > largest or math.prod(shape) > MAX_ELEMENTS:
        raise MapError(f"tensor {name} has shape {_short(shape)}; expected {rank} dimensions of at most "
                       f"{largest}, {MAX_ELEMENTS} values")


def _read_block(f, key: str, steps: int) -> BlockMap:
    block = BlockMap(**{name: f.get_tensor(f"{key}/{name}") for name in _FIELDS})
    C = block.series.shape[0]
    checks = (  # in order: each assumes the ones before it hold
        (lambda: 0 < len(block.labels) <= MAX_CHANNELS, f"labels must hold 1 to {MAX_CHANNELS} channels"),
        (lambda: 0 < C <= MAX_CLUSTERS and block.series.shape[2] == steps,
         "series shape does not match the probe"),
        (lambda: block.labels.min() >= 0 and block.labels.max() < C, "cluster ids out of range"),
        (lambda: block.solver.shape == (C,) and np.isin(block.solver, [s.id for s in POOL]).all(),
         "unknown solver ids"),
        (lambda: block.variable.shape == (C,)
         and ((block.variable >= 0) & (block.variable < len(TIME_VARIABLES))).all(),
         "unknown time variable ids"),
        (lambda: block.errors.shape == (len(POOL), len(TIME_VARIABLES), C),
         "errors table has the wrong shape"),
        (lambda: block.indicators.shape == (C, len(INDICATOR_NAMES)), "indicators table has the wrong shape"),
        (lambda: np.isfinite(block.series).all() and np.isfinite(block.indicators).all()
         and not np.isnan(block.errors).any(), "NaN or inf values"),
    )
    for ok, message in checks:
        if not ok():
            raise MapError(f"block {key}: {message}")
    return block
