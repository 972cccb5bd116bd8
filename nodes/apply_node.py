"""The HyCa Apply nodes: a plain one with the widgets most users touch, and the advanced one with every knob.

The advanced node keeps the node id "HyCaApply" and its widget order, so that workflows and API prompts
saved before the split load and run (the frontend restores widgets by position). The error-adaptive
mode's two widgets, `adaptive` and `adaptive_tolerance`, were removed from the middle of that order: API
prompts naming them still run (ComfyUI drops an input the node does not declare), and
web/js/hyca_migrate.js drops their values from a saved workflow before the frontend restores the rest.
The plain node's id carries the words people search for ("cache", "speed up"): ComfyUI's node search
matches the node id and the display name only.
"""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..hyca_core import defaults
from ..hyca_core.schedule import Schedule
from . import checkpoint_path
from .apply_options import AUTO, HISTORY_DTYPES, PLACEMENTS, ApplyOptions, map_warmup
from .apply_hyca import patch_model
from .patching import GRANULARITIES
from .types import CATEGORY, SolverMapType

DESCRIPTION = ("A feature cache for diffusion transformers, like TeaCache or EasyCache: faster sampling, "
               "nearly the same image. Computes the model fully on some steps and predicts the steps in "
               "between. Without a map, the first run calibrates one for this model.")


def _window_inputs() -> list[io.Input]:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Steps before this fraction of the denoising are always computed."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Steps after this fraction of the denoising are always computed."),
    ]


def _map_input() -> io.Input:
    return SolverMapType.Input("solver_map", optional=True,
                               tooltip="A map from HyCa Calibrate. Leave empty to use the map saved for this "
                                       "model; without one, the first run makes it.")


MODEL_TOOLTIP = "The model to speed up, after any LoRA loaders. It stays untouched."


def _schema(node_id: str, display_name: str, description: str, widgets: list[io.Input]) -> io.Schema:
    """An Apply node: the model, its widgets, the optional map in; the patched model out. The hidden inputs
    give the model's file (where maps are saved) and the node's id (where the UI shows what a run did)."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
        is_experimental=True,
        inputs=[io.Model.Input("model", tooltip=MODEL_TOOLTIP), *widgets, _map_input()],
        outputs=[io.Model.Output(tooltip="The model with HyCa caching.")],
        hidden=[io.Hidden.prompt, io.Hidden.unique_id],
    )


def _patched(node_cls, model, solver_map, options: ApplyOptions) -> io.NodeOutput:
    """The patched model, the options completed from the hidden inputs when ComfyUI's executor runs it."""
    hidden = node_cls.hidden
    options = replace(options, checkpoint=checkpoint_path.for_node(node_cls),
                      node_id=hidden.unique_id if hidden is not None else None)
    return io.NodeOutput(patch_model(model, solver_map, options))


class HyCaCacheSpeedUp(io.ComfyNode):
    """The plain HyCa Apply: how much faster, and where in the denoising."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        speed_up = io.Float.Input(
            "speed_up", default=3.0, min=1.0, max=20.0, step=0.5,
            tooltip="How many times fewer model computations to aim for. Higher is faster and drifts further "
                    "from the full result; 1 computes every step.")
        return _schema("HyCaCacheSpeedUp", "HyCa Apply (faster sampling)", DESCRIPTION,
                       [speed_up, *_window_inputs()])

    @classmethod
    def execute(cls, model, speed_up, start_percent=0.0, end_percent=1.0, solver_map=None) -> io.NodeOutput:
        options = ApplyOptions(schedule=Schedule(warmup=map_warmup(solver_map)), target_speedup=speed_up,
                               window=(start_percent, end_percent), tuned_warmup=True)
        return _patched(cls, model, solver_map, options)


def _advanced_widgets() -> list[io.Input]:
    """The pre-split HyCa Apply's widgets in their order, less the adaptive mode's (see the module
    docstring); the ones added later are optional and last, so that saved workflows and API prompts
    without them still load."""
    return [
        io.Int.Input(
            "interval", default=defaults.INTERVAL, min=1, max=20,
            tooltip="One full computation every N steps after the warm-up; 1 computes every step."),
        io.Int.Input(
            "warmup", default=0, min=0, max=100,
            tooltip="First steps always computed; more allows higher-order predictors. 0: the warm-up the "
                    f"map was tuned to for this N (else its own), {defaults.WARMUP} without a map."),
        io.Int.Input(
            "final_steps", default=defaults.FINAL_STEPS, min=0, max=100,
            tooltip="Last steps always computed, for crisper fine detail."),
        io.Boolean.Input(
            "fitted", default=defaults.FITTED,
            tooltip="Predictor weights fitted to this model, instead of the paper's fixed solvers."),
        io.Combo.Input(
            "granularity", options=[AUTO, *GRANULARITIES], default=AUTO,
            tooltip="What is cached: every block, one output per stack of blocks (far less memory) or the "
                    "whole model's output. auto follows the map."),
        io.Combo.Input(
            "history_dtype", options=list(HISTORY_DTYPES), default="auto",
            tooltip="Precision of the cached outputs: bf16/fp16 halve their memory; auto keeps the model's."),
        io.Boolean.Input(
            "offload_history", default=False,
            tooltip="Keep the cached outputs in CPU RAM instead of on the GPU."),
        io.Float.Input(
            "target_speedup", default=0.0, min=0.0, max=20.0, step=0.1, optional=True,
            tooltip="Instead of N: the speed-up to aim for on each run's step count. 0 uses interval."),
        *_window_inputs(),
        io.Combo.Input(
            "placement", options=[AUTO, *PLACEMENTS], default=AUTO, optional=True,
            tooltip="auto: what HyCa Calibrate found best for this N, else fixed. fixed computes every N-th "
                    "step; calibrated places as many full steps where the map says prediction errs most."),
        # API prompts saved before this id name it compile_predict: ComfyUI drops an input the node does
        # not declare, so they run with the eager ops
        io.Boolean.Input(
            "fused", default=False, optional=True,
            tooltip="For cached outputs in CPU RAM: predict with fused kernels built by torch.compile "
                    "(needs a C++ compiler; compiles on first use)."),
    ]


class HyCaApply(io.ComfyNode):
    """HyCa Apply (Advanced), every knob. Node id and widget order are the pre-split HyCa Apply's (less the
    adaptive mode's): old workflows keep working."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        description = DESCRIPTION + " Every setting, for tuning and research."
        return _schema("HyCaApply", "HyCa Apply (Advanced)", description, _advanced_widgets())

    @classmethod
    def execute(cls, model, interval, warmup, final_steps, fitted, granularity, history_dtype,
                offload_history, target_speedup=0.0, start_percent=0.0, end_percent=1.0, placement=AUTO,
                fused=False, solver_map=None) -> io.NodeOutput:
        schedule = Schedule(interval=interval, warmup=warmup or map_warmup(solver_map), final=final_steps)
        options = ApplyOptions(
            schedule=schedule, fitted=fitted, history_dtype=HISTORY_DTYPES[history_dtype],
            offload=offload_history, granularity=None if granularity == AUTO else granularity,
            target_speedup=target_speedup, window=(start_percent, end_percent), placement=placement,
            tuned_warmup=warmup == 0, fused=fused,
        )
        return _patched(cls, model, solver_map, options)
