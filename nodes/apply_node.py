"""HyCa Apply: a clone of the MODEL that predicts block residuals between full steps."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import SolverMap
from .block_cache import RunState
from .patching import block_widths, model_architecture, with_hyca
from .types import CATEGORY, SolverMapType

HISTORY_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_hyca(model, solver_map: SolverMap, schedule: Schedule, fitted: bool = True,
               history_dtype: torch.dtype | None = None, offload: bool = False):
    """The patched clone; raises MapError/UnsupportedModel with a clear message if they do not fit."""
    solver_map.check_fits(model_architecture(model), block_widths(model))

    @functools.lru_cache(maxsize=8)  # runs repeat their schedules; compiling refits every block
    def compile_for(step_sigmas: tuple[float, ...]):
        compiled = solver_map.compile(np.array(step_sigmas), schedule, fitted=fitted)
        logging.info("HyCa: %d steps, %d computed, %d predicted (N=%d, warm-up %d)", len(compiled.mask),
                     compiled.mask.sum(), (~compiled.mask).sum(), schedule.interval, schedule.warmup)
        return compiled

    state = RunState(compile_map=lambda sigmas: compile_for(tuple(float(s) for s in sigmas)),
                     history_dtype=history_dtype, offload_device=model.offload_device if offload else None)
    return with_hyca(model, state)


class HyCaApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaApply",
            display_name="HyCa Apply",
            category=CATEGORY,
            description=(
                "Speeds up sampling: transformer blocks are computed fully only every N steps and "
                "predicted in between, each channel group with the predictor its solver map chose. "
                "Outputs a patched copy; the input MODEL stays untouched."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to accelerate; chain it after LoRA loaders."),
                SolverMapType.Input("solver_map", tooltip="Solver map from HyCa Calibrate for this base model."),
                io.Int.Input("interval", default=4, min=1, max=20,
                             tooltip="N: one full computation every N steps after the warm-up. 1 computes every step."),
                io.Int.Input("warmup", default=3, min=1, max=100,
                             tooltip="First steps always computed. Also bounds the predictors' history length."),
                io.Int.Input("final_steps", default=0, min=0, max=100,
                             tooltip="Last steps always computed, for crisper fine detail."),
                io.Boolean.Input("fitted", default=True,
                                 tooltip="Use least-squares fitted predictor weights (on) or the paper's fixed solvers (off)."),
                io.Combo.Input("history_dtype", options=list(HISTORY_DTYPES), default="auto",
                               tooltip="Precision of cached residuals: bf16/fp16 halve their memory; auto keeps the model's."),
                io.Boolean.Input("offload_history", default=False,
                                 tooltip="Keep cached residuals on the offload device (CPU RAM) instead of the GPU."),
            ],
            outputs=[io.Model.Output(tooltip="The model with HyCa caching.")],
        )

    @classmethod
    def execute(cls, model, solver_map, interval, warmup, final_steps, fitted, history_dtype,
                offload_history) -> io.NodeOutput:
        schedule = Schedule(interval=interval, warmup=warmup, final=final_steps)
        return io.NodeOutput(apply_hyca(model, solver_map, schedule, fitted, HISTORY_DTYPES[history_dtype],
                                        offload_history))
