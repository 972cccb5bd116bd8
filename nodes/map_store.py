"""Where solver maps live on disk, and how a MODEL finds the map made for its base weights.

Maps are keyed by architecture and a fingerprint of the base weights (LoRA patches live in
``model.patches`` and in ``model.backup`` once applied, so they never change it). A map is saved in
the ``hyca`` models folder (registered with folder_paths, so extra_model_paths.yaml can add more)
and, when the nodes learn the checkpoint's file from the prompt (`checkpoint_path`), beside it as
``<checkpoint file name>.hyca`` (`side_file`). Maps are searched beside the checkpoint first, then
in the hyca folders and in this package's ``calibrations/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import folder_paths
import numpy as np
import torch

from ..hyca_core.map_file import read_metadata
from ..hyca_core.solver_map import MapError, SolverMap
from .patching import model_architecture, unit_widths

FOLDER = "hyca"
SUFFIX = ".hyca.safetensors"
SIDE_SUFFIX = ".hyca"
SHIPPED = Path(__file__).resolve().parent.parent / "calibrations"
_SAMPLED_TENSORS = 4
_SAMPLED_VALUES = 256
_NAME_PART_LENGTH = 64  # three parts and the suffix stay far below any file system's 255


def register_folder() -> None:
    """Add models/hyca unless extra_model_paths.yaml or another node already registered it."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        if isinstance(extensions, set):
            extensions.add(".safetensors")
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})


def fingerprint(model) -> str:
    """A short hash of the base weights: names, shapes and a strided sample of a few tensors.

    Values are rounded to bfloat16 precision so that fp32/fp16/bf16 copies of one checkpoint
    agree; weights patched in place by a LoRA are read from the patcher's backup of the originals.
    """
    state = model.model.diffusion_model.state_dict()
    digest = hashlib.sha256()
    names = sorted(state)
    for name in names:
        digest.update(f"{name}:{tuple(state[name].shape)};".encode())
    backup = getattr(model, "backup", {})
    for name in _sampled(names, state):
        original = backup.get(f"diffusion_model.{name}")
        tensor = original.weight if original is not None else state[name]
        flat = tensor.detach().flatten()
        stride = max(1, flat.numel() // _SAMPLED_VALUES)
        sample = flat[::stride][:_SAMPLED_VALUES].to(device="cpu", dtype=torch.bfloat16).float().numpy()
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def _sampled(names: list[str], state: dict) -> list[str]:
    """A few large weight matrices spread over the model (not biases or norms, which LoRAs skip)."""
    matrices = [n for n in names if state[n].ndim >= 2 and state[n].numel() >= 64]
    if not matrices:
        return names[:_SAMPLED_TENSORS]
    picks = np.linspace(0, len(matrices) - 1, _SAMPLED_TENSORS).round().astype(int)
    return [matrices[i] for i in dict.fromkeys(picks)]


def file_name(solver_map: SolverMap) -> str:
    """``Flux-<fingerprint>[-<granularity>].hyca.safetensors``, every part sanitized: whatever the
    map holds, the name stays one file inside the folder it is saved to."""
    family = _name_part(solver_map.architecture.rsplit(".", 1)[-1], "model")
    granularity = _granularity(solver_map.info)
    suffix = "" if granularity == "block" else "-" + _name_part(granularity, "other")
    return f"{family}-{_name_part(solver_map.fingerprint, 'unknown')}{suffix}{SUFFIX}"


def _name_part(text: str, fallback: str) -> str:
    """Letters, digits and underscores only (no separator, dot, drive or NUL), at most _NAME_PART_LENGTH."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", str(text))[:_NAME_PART_LENGTH].strip("_") or fallback


def _granularity(info: dict) -> str:
    return info.get("granularity", "block")


def side_file(checkpoint: Path, granularity: str = "block") -> Path:
    """The map beside a checkpoint: ``flux1-dev.safetensors.hyca`` (``.stack.hyca`` for another
    granularity). Not ``*.safetensors``: ComfyUI's loaders list every such file in their folder, and
    picking a map there fails with "Could not detect model type"."""
    suffix = "" if granularity == "block" else "." + _name_part(granularity, "other")
    return checkpoint.with_name(f"{checkpoint.name}{suffix}{SIDE_SUFFIX}")


def search_folders() -> list[Path]:
    register_folder()
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER)] + [SHIPPED]


def _stored(granularity: str, checkpoint: Path | None) -> Iterator[Path]:
    """Files that may hold this model's map, in search order: beside its checkpoint, then the folders'.
    Tested with os.path, which answers False where Path raises (a side name over 255 bytes: no file can
    have it); what is not a regular file is refused when opened (`map_file.opened`)."""
    if checkpoint is not None and os.path.isfile(side := side_file(checkpoint, granularity)):
        yield side
    for folder in search_folders():
        if os.path.isdir(folder):
            yield from sorted(folder.glob(f"*{SUFFIX}"))


def _candidates(model, granularity: str, checkpoint: Path | None = None) -> Iterator[Path]:
    """Stored maps whose header names this model's architecture, base-weight fingerprint and
    granularity, in search order. Files that are not maps are skipped with a warning."""
    architecture, wanted = model_architecture(model), fingerprint(model)
    for path in _stored(granularity, checkpoint):
        try:
            meta, info = read_metadata(path)
        except MapError as error:  # a broken file must not hide the others
            logging.warning("HyCa: skipping %s", error)
            continue
        found = meta.get("architecture"), meta.get("fingerprint"), _granularity(info)
        if found == (architecture, wanted, granularity):
            yield path


def find(model, granularity: str = "block", checkpoint: Path | None = None) -> Path | None:
    """The first stored map made for this model (see `_candidates`), unread."""
    return next(_candidates(model, granularity, checkpoint), None)


def load_for(model, granularity: str = "block", checkpoint: Path | None = None) -> SolverMap | None:
    """The first stored map for this model that loads and fits it, or None if there is none;
    ``checkpoint``: the model's file if known, beside which a map is looked for first.

    Raises MapError naming each file and what is wrong if maps were found but none could be used
    (HyCa Apply then warns and calibrates a new one, which replaces a map of the standard name).
    """
    fits, refused = (model_architecture(model), unit_widths(model, granularity)), []
    for path in _candidates(model, granularity, checkpoint):
        try:
            solver_map = SolverMap.load(path, fits=fits)
        except MapError as error:
            refused.append(str(error))
            continue
        for reason in refused:
            logging.warning("HyCa: skipped %s", reason)
        logging.info("HyCa: using solver map %s", path)
        return solver_map
    if refused:
        raise MapError("; ".join(refused))
    return None


def save_for(solver_map: SolverMap, checkpoint: Path | None = None) -> list[Path]:
    """Save atomically into the first writable hyca folder and, if the checkpoint's file is known,
    beside it (`side_file`); the map must carry the fingerprint. Returns the files written; MapError
    if none could be."""
    name = file_name(solver_map)
    saved, errors = [], []
    for folder in search_folders()[:-1]:  # never write into the package
        try:
            saved.append(solver_map.save(folder / name))
            break
        except OSError as error:
            errors.append(f"{folder}: {error}")
            logging.warning("HyCa: cannot write %s (%s), trying the next hyca folder", folder / name, error)
    if checkpoint is not None:
        side = side_file(checkpoint, _granularity(solver_map.info))
        try:
            saved.insert(0, solver_map.save(side))
        except OSError as error:  # a read-only models folder (shared, mounted) is a normal setup
            errors.append(f"{side.parent}: {error}")
            logging.info("HyCa: cannot write %s beside the checkpoint (%s); "
                         "the hyca models folder keeps the map", side.name, error)
    if not saved:
        raise MapError("no writable folder for the map: " + "; ".join(errors))
    return saved
