"""Solver maps: what one-time choosing found for a model, and what any map must satisfy.

A map holds, per block stream (``"double_block.3.img"``): the cluster of every channel, the
solver each cluster chose on the probe (with every pool member's error, so users can see why),
the clusters' mean indicators, and a compact sample of the probe from which the solvers are
re-selected and fitted for whatever schedule a later run uses (`run_maps.run_map`).

`SolverMap.validate` bounds every array by what calibration can make for the model the map claims
to fit (its widths, probe steps, clusters, series per cluster, solver histories) and is applied on
save and on load alike, so a map that saves always loads. The file itself is `map_file`'s.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import map_file, tuning
from .indicators import INDICATOR_NAMES
from .map_file import MapError, read_metadata
from .schedule import Schedule
from .selection import SERIES_PER_CLUSTER
from .solvers import POOL, POOL_VERSION, TIME_VARIABLES, solver, warmup_pool

__all__ = ["MIN_PROBE_STEPS", "BlockMap", "MapError", "SolverMap", "read_metadata"]

MAX_BLOCKS = 4096
MAX_CHANNELS = 1 << 16
MAX_CLUSTERS = 64  # HyCa Calibrate's largest
MAX_STEPS = 10_000  # HyCa Calibrate's most probe steps
MIN_PROBE_STEPS = 4  # fewer leave too little to choose solvers from (HyCa Calibrate's minimum)
# Tensors stored per block stream: dtype and largest shape.
FIELDS = {"labels": (np.int32, (MAX_CHANNELS,)),
          "series": (np.float32, (MAX_CLUSTERS, SERIES_PER_CLUSTER, MAX_STEPS)),
          "solver": (np.int32, (MAX_CLUSTERS,)),
          "variable": (np.int32, (MAX_CLUSTERS,)),
          "errors": (np.float32, (len(POOL), len(TIME_VARIABLES), MAX_CLUSTERS)),
          "indicators": (np.float32, (MAX_CLUSTERS, len(INDICATOR_NAMES)))}
SIGMAS = (np.float64, (MAX_STEPS,))
_BLOCK_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+")  # "double_block.3.img"
_ARCHITECTURE = re.compile(r"[A-Za-z0-9_.]{0,256}")  # a Python class path, "" if unknown
_FINGERPRINT = re.compile(r"[0-9a-f]{0,64}")


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

    def channel_choices(self) -> np.ndarray:
        """(D,) the predictor each channel gets, one code per (pool solver, time variable) pair: what two
        maps must share for one to serve the other's model, whatever their clusters' numbering."""
        return (self.solver * len(TIME_VARIABLES) + self.variable)[self.labels]

    def stored(self) -> "BlockMap":
        """This block with every array in its file dtype; MapError if an id does not fit int32 (it would
        wrap around, maybe into range)."""
        with np.errstate(all="ignore"):  # a float past float32 becomes inf, which `validate` refuses
            stored = {name: np.ascontiguousarray(getattr(self, name), dtype=dtype)
                      for name, (dtype, _) in FIELDS.items()}
        wrapped = [name for name, (dtype, _) in FIELDS.items()
                   if dtype == np.int32 and not np.array_equal(stored[name], getattr(self, name))]
        if wrapped:
            raise MapError(f"{wrapped[0]} holds values past int32")
        return BlockMap(**stored)

    def validate(self, steps: int, history: int) -> None:
        """Raise MapError unless this block fits a probe of `steps` steps whose solvers keep at most
        `history` residuals."""
        D, C = len(self.labels), len(self.series)
        checks = (  # in order: each assumes the ones before it hold
            (lambda: self.labels.ndim == 1 and 0 < D <= MAX_CHANNELS,
             f"labels must hold 1 to {MAX_CHANNELS} channels"),
            (lambda: self.series.ndim == 3 and 0 < C <= min(MAX_CLUSTERS, D)
             and self.series.shape[2] == steps,
             f"series shape does not match the probe ({steps} steps, 1 to {MAX_CLUSTERS} clusters)"),
            (lambda: 0 < self.series.shape[1] <= min(SERIES_PER_CLUSTER, steps),
             f"series hold 1 to {SERIES_PER_CLUSTER} series per cluster, no more than the probe's steps"),
            (lambda: self.labels.min() >= 0 and self.labels.max() < C, "cluster ids out of range"),
            (lambda: self.solver.shape == (C,) and np.isin(self.solver, [s.id for s in POOL]).all(),
             "unknown solver ids"),
            (lambda: max(solver(int(s)).history for s in self.solver) <= history,
             f"solvers need more history than the probe's warm-up holds ({history})"),
            (lambda: self.variable.shape == (C,)
             and ((self.variable >= 0) & (self.variable < len(TIME_VARIABLES))).all(),
             "unknown time variable ids"),
            (lambda: self.errors.shape == (len(POOL), len(TIME_VARIABLES), C),
             "errors table has the wrong shape"),
            (lambda: self.indicators.shape == (C, len(INDICATOR_NAMES)),
             "indicators table has the wrong shape"),
            (lambda: np.isfinite(self.series).all() and np.isfinite(self.indicators).all()
             and not np.isnan(self.errors).any(), "NaN or inf values"),
        )
        for ok, message in checks:
            if not ok():
                raise MapError(message)


@dataclass
class SolverMap:
    architecture: str
    fingerprint: str  # of the base weights; LoRA patches do not change it
    probe_sigmas: np.ndarray  # (S,) float64
    probe_schedule: Schedule  # the schedule the probe's choice was made for
    blocks: dict[str, BlockMap]
    pool_version: int = POOL_VERSION
    info: dict = field(default_factory=dict)  # free-form provenance (sampler, steps, ...)

    def check_fits(self, architecture: str, unit_widths: dict[str, int]) -> None:
        """Raise MapError unless this map was made for a model of this architecture and shape.

        unit_widths: the model's units (blocks, stacks or the whole model, per granularity) by name
        ("double_block.0") and width; map keys name a unit's stream ("double_block.0.img").
        """
        if architecture != self.architecture:
            raise MapError(f"map is for {self.architecture}, model is {architecture}: "
                           "calibrate one for this model")
        mapped = {key.rsplit(".", 1)[0]: len(block.labels) for key, block in self.blocks.items()}
        if mapped.keys() != unit_widths.keys():
            missing = sorted(unit_widths.keys() - mapped.keys())
            extra = sorted(mapped.keys() - unit_widths.keys())
            granularity = self.info.get("granularity", "block")
            raise MapError(f"map does not cover the model's blocks: missing {missing[:4]}, unknown "
                           f"{extra[:4]} (the map's granularity is {granularity!r}; use the same)")
        wrong = [name for name, width in unit_widths.items() if mapped[name] != width]
        if wrong:
            raise MapError(f"blocks {wrong[:4]} have width {unit_widths[wrong[0]]}, map has "
                           f"{mapped[wrong[0]]}: it was calibrated for another model of this family")

    def validate(self) -> None:
        """Raise MapError unless every field is what calibration can make: the one check of `save`
        and `load`."""
        short = map_file.short
        if not _ARCHITECTURE.fullmatch(self.architecture):
            raise MapError(f"architecture {short(self.architecture)} is not a class path")
        if not _FINGERPRINT.fullmatch(self.fingerprint):
            raise MapError(f"fingerprint {short(self.fingerprint)} is not a hex digest")
        if not isinstance(self.info, dict):
            raise MapError(f"info {short(self.info)} is not a JSON object")
        if "tuned" in self.info:
            try:
                tuning.check_info(self.info["tuned"])
            except ValueError as error:
                raise MapError(f"info tuned: {error}") from None
        schedule = self.probe_schedule
        if not all(0 <= getattr(schedule, f.name) <= MAX_STEPS for f in fields(schedule)):
            raise MapError(f"probe_schedule {short(self.probe_schedule)} is not a schedule")
        _check_block_keys(list(self.blocks))
        sigmas = self.probe_sigmas
        if not (sigmas.ndim == 1 and MIN_PROBE_STEPS <= len(sigmas) <= MAX_STEPS
                and np.all(np.isfinite(sigmas)) and np.all(sigmas >= 0) and np.all(np.diff(sigmas) < 0)):
            raise MapError(f"probe_sigmas must be {MIN_PROBE_STEPS} to {MAX_STEPS} finite, non-negative, "
                           "strictly decreasing sigmas")
        history = max(s.history for s in warmup_pool(self.probe_schedule.warmup))
        for key, block in self.blocks.items():
            try:
                block.validate(len(sigmas), history)
            except MapError as error:
                raise MapError(f"block {key}: {error}") from None

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write atomically (`map_file.write`); MapError if the map is not sound."""
        blocks = {}
        for key, block in self.blocks.items():
            try:
                blocks[key] = block.stored()
            except MapError as error:
                raise MapError(f"block {key}: {error}") from None
        stored = replace(self, probe_sigmas=np.asarray(self.probe_sigmas, dtype=SIGMAS[0]), blocks=blocks)
        stored.validate()
        tensors = {"probe_sigmas": stored.probe_sigmas}
        for key, block in stored.blocks.items():
            tensors |= {f"{key}/{name}": getattr(block, name) for name in FIELDS}
        metadata = {
            "format": map_file.FORMAT,
            "format_version": str(map_file.FORMAT_VERSION),
            "pool_version": str(self.pool_version),
            "architecture": self.architecture,
            "fingerprint": self.fingerprint,
            "probe_schedule": json.dumps(asdict(self.probe_schedule)),
            "blocks": json.dumps(list(self.blocks)),
            "info": json.dumps(self.info),
        }
        return map_file.write(Path(path), metadata, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, fits: tuple[str, dict[str, int]] | None = None) -> "SolverMap":
        """Read and validate a map file; with ``fits`` = (architecture, unit widths), also check
        that it fits that model (`check_fits`). Raises MapError naming the file and the reason."""
        with map_file.opened(path) as f:
            solver_map = _read(f)
            solver_map.validate()
            if fits is not None:
                solver_map.check_fits(*fits)
            return solver_map

    # --- inference -----------------------------------------------------------------------------


def _read(f) -> SolverMap:
    """The map an opened file holds, parsed only as far as reading needs; `validate` checks the rest."""
    meta, info = map_file.metadata(f)
    keys = map_file.json_field(meta, "blocks")
    _check_block_keys(keys)
    schedule = _schedule(map_file.json_field(meta, "probe_schedule"))
    expected = {"probe_sigmas": SIGMAS} | {f"{k}/{name}": spec for k in keys for name, spec in FIELDS.items()}
    tensors = map_file.read_tensors(f, expected)
    blocks = {k: BlockMap(**{name: tensors[f"{k}/{name}"] for name in FIELDS}) for k in keys}
    return SolverMap(meta.get("architecture", ""), meta.get("fingerprint", ""), tensors["probe_sigmas"],
                     schedule, blocks, info=info)


def _check_block_keys(keys) -> None:
    if not (isinstance(keys, list) and 0 < len(keys) <= MAX_BLOCKS
            and all(isinstance(k, str) and _BLOCK_KEY.fullmatch(k) for k in keys)
            and len(set(keys)) == len(keys)):
        raise MapError(f"block list {map_file.short(keys)} missing or malformed")


def _schedule(value) -> Schedule:
    names = {f.name for f in fields(Schedule)}
    if not (isinstance(value, dict) and value.keys() <= names
            and all(type(v) is int for v in value.values())):
        raise MapError(f"probe_schedule {map_file.short(value)} is not a schedule")
    try:
        return Schedule(**value)
    except ValueError as error:
        raise MapError(f"probe_schedule: {error}") from None
