"""The ComfyUI-facing layer: node schemas, per-run state, how a MODEL is patched."""

from comfy_api.latest import ComfyExtension, io

from .apply_node import HyCaApply, HyCaCacheSpeedUp
from .calibrate_node import HyCaCalibrate
from .inspector_node import HyCaSolverInspector
from .map_store import register_folder

register_folder()


class HyCaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [HyCaCalibrate, HyCaCacheSpeedUp, HyCaApply, HyCaSolverInspector]


def comfy_entrypoint() -> ComfyExtension:
    return HyCaExtension()
