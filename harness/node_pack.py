"""Load this repository into ComfyUI the way ComfyUI loads a folder in custom_nodes/."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from . import comfy_runtime

ROOT = Path(__file__).resolve().parent.parent


def load():
    """Import the node pack through ComfyUI's own loader; return its package module."""
    comfy_runtime.load()
    import nodes

    module_name = str(ROOT).replace(".", "_x_")
    if module_name not in sys.modules:
        if not asyncio.run(nodes.load_custom_node(str(ROOT))):
            raise RuntimeError(f"ComfyUI could not load the node pack at {ROOT}; see the log above")
    return sys.modules[module_name]
