"""Solver maps: what one-time choosing found for a model, as a validated safetensors file.

A map holds, per block stream (``"double_block.3.img"``): the cluster of every channel, the
solver each cluster chose on the probe (with every pool member's error, so users can see why),
the clusters' mean indicators, and a compact sample of the probe from which the solvers are
re-selected and fitted for whatever schedule a later run uses (`compile`). It is data only:
written with safetensors (no pickle), atomically, and checked field by field when read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .indicators import INDICATOR_NAMES
from .schedule import Schedule, calibrated_mask
from .selection import (FIT_LAMBDA, CompactSample, coefficients, gap_costs, plan_schedule, refit, resample,
                        single)
from .solvers import MAX_HISTORY, POOL, POOL_VERSION, TIME_VARIABLES, solver

FORMAT = "hyca-solver-map"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 256 * 2**20  # a FLUX map is a few MB; anything far larger is not ours
MAX_CHANNELS = 1 << 16
MAX_CLUSTERS = 256
MAX_STEPS = 10_000
_FIELDS = ("labels", "series", "solver", "variable", "errors", "indicators")


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
            raise MapError(f"map is for {self.architecture}, model is {architecture}")
        mapped = {key.rsplit(".", 1)[0]: len(block.labels) for key, block in self.blocks.items()}
        if mapped.keys() != block_widths.keys():
            missing = sorted(block_widths.keys() - mapped.keys())
            extra = sorted(mapped.keys() - block_widths.keys())
            raise MapError(f"map does not cover the model's blocks: missing {missing[:4]}, unknown {extra[:4]}")
        wrong = [name for name, width in block_widths.items() if mapped[name] != width]
        if wrong:
            raise MapError(f"blocks {wrong[:4]} have width {block_widths[wrong[0]]}, map has {mapped[wrong[0]]}")

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        tensors = {"probe_sigmas": np.asarray(self.probe_sigmas, dtype=np.float64)}
        for key, block in self.blocks.items():
            for name in _FIELDS:
                tensors[f"{key}/{name}"] = np.ascontiguousarray(getattr(block, name))
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
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SolverMap":
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise MapError(f"{size} bytes, more than a solver map can be ({MAX_FILE_BYTES})")
            with safe_open(path, framework="numpy") as f:
                return _read(f)
        except MapError as error:
            raise MapError(f"{path}: {error}") from None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise MapError(f"{path}: not a readable HyCa solver map ({error})") from None

    # --- inference -----------------------------------------------------------------------------

    def compile(self, step_sigmas: np.ndarray, schedule: Schedule, fitted: bool = True,
                per_position: bool = True, budget: int | None = None,
                only: tuple[str, str] | None = None) -> "CompiledMap":
        """Re-select (and fit) every block's solvers for this run's steps and schedule.

        step_sigmas: the sigma of each sampler step (ComfyUI's sigmas without the final one).
        budget: if given, compute that many steps, placed where the probe says prediction errs
        most (`calibrated_mask`) instead of every `schedule.interval`-th. only: one (solver name,
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
            mask = self._calibrated_mask(step_sigmas, budget, warmup, pool)
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
            coefficient_tables[key] = coefficients(assignment, block.labels, mask, step_sigmas)
        return CompiledMap(mask, coefficient_tables)

    def _calibrated_mask(self, step_sigmas, budget, warmup, pool) -> np.ndarray:
        """One mask for all blocks, from the summed gap costs of their resampled probes."""
        values, labels, offset = [], [], 0
        for block in self.blocks.values():
            v, l = resample(CompactSample(self.probe_sigmas, block.series), step_sigmas)
            values.append(v / np.sqrt(np.mean(v**2) + 1e-30))  # relative errors: blocks weigh alike
            labels.append(l + offset)
            offset += block.clusters
        max_gap = min(len(step_sigmas) - 1, 2 * len(step_sigmas) // max(budget, 1) + 2)
        costs = gap_costs(np.concatenate(values, axis=2), np.concatenate(labels), step_sigmas, warmup,
                          max_gap, pool=pool)
        return calibrated_mask(costs, budget, warmup)


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


def _read(f) -> SolverMap:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise MapError("not a HyCa solver map (format tag missing)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise MapError(f"format version {meta.get('format_version')!r}, this HyCa reads {FORMAT_VERSION}")
    if meta.get("pool_version") != str(POOL_VERSION):
        raise MapError(f"solver pool version {meta.get('pool_version')!r}, this HyCa has {POOL_VERSION}")
    keys = json.loads(meta["blocks"])
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise MapError("block list missing or malformed")
    schedule = Schedule(**{k: int(v) for k, v in json.loads(meta["probe_schedule"]).items()})
    stored = set(f.keys())
    expected = {"probe_sigmas"} | {f"{k}/{name}" for k in keys for name in _FIELDS}
    if stored != expected:
        raise MapError(f"tensors missing {sorted(expected - stored)[:3]} / unexpected {sorted(stored - expected)[:3]}")
    for name in stored:  # shapes before data: a huge declared tensor is refused unread
        shape = f.get_slice(name).get_shape()
        if any(d > max(MAX_CHANNELS, MAX_STEPS) for d in shape) or np.prod(shape, dtype=np.int64) > 2**26:
            raise MapError(f"tensor {name} has implausible shape {shape}")
    sigmas = f.get_tensor("probe_sigmas")
    if sigmas.ndim != 1 or not 4 <= len(sigmas) <= MAX_STEPS or not np.all(np.isfinite(sigmas)):
        raise MapError("probe_sigmas must be a finite 1-D array of at least 4 steps")
    blocks = {k: _read_block(f, k, len(sigmas)) for k in keys}
    return SolverMap(meta.get("architecture", ""), meta.get("fingerprint", ""), sigmas, schedule, blocks,
                     info=json.loads(meta.get("info", "{}")))


def _read_block(f, key: str, steps: int) -> BlockMap:
    block = BlockMap(**{name: f.get_tensor(f"{key}/{name}") for name in _FIELDS})
    C = block.series.shape[0] if block.series.ndim == 3 else -1
    checks = [
        (block.labels.ndim == 1 and 0 < len(block.labels) <= MAX_CHANNELS, "labels must be 1-D channel ids"),
        (0 < C <= MAX_CLUSTERS and block.series.shape[2] == steps, "series shape does not match the probe"),
        (np.issubdtype(block.labels.dtype, np.integer) and block.labels.min() >= 0 and block.labels.max() < C,
         "cluster ids out of range"),
        (block.solver.shape == (C,) and np.isin(block.solver, [s.id for s in POOL]).all(), "unknown solver ids"),
        (block.variable.shape == (C,) and ((block.variable >= 0) & (block.variable < len(TIME_VARIABLES))).all(),
         "unknown time variable ids"),
        (block.errors.shape == (len(POOL), len(TIME_VARIABLES), C), "errors table has the wrong shape"),
        (block.indicators.shape == (C, len(INDICATOR_NAMES)), "indicators table has the wrong shape"),
        (all(np.all(np.isfinite(a)) for a in (block.series, block.indicators)) and not np.isnan(block.errors).any(),
         "NaN or inf values"),
    ]
    for ok, message in checks:
        if not ok:
            raise MapError(f"block {key}: {message}")
    return block
