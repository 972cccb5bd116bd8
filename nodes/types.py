"""Socket types of the HyCa nodes."""

from comfy_api.latest import io

SolverMapType = io.Custom("HYCA_SOLVER_MAP")
CATEGORY = "model_patches/hyca"
