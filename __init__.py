"""HyCa for ComfyUI: hybrid feature caching for diffusion transformers.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (its V3 node API). The
import of the node layer is guarded so that tools importing the folder without ComfyUI (packaging,
linters, test collection) do not fail.
"""

# pytest imports this file alone (no parent package) from a folder whose name is no identifier
if __package__:
    try:
        from .nodes import comfy_entrypoint  # noqa: F401
    except ModuleNotFoundError as error:  # not inside ComfyUI
        if (error.name or "").split(".")[0] not in ("comfy", "comfy_api"):
            raise

WEB_DIRECTORY = "./web"
