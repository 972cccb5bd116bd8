"""HyCa Calibrate: one full-compute probe sampling, recorded, turned into a solver map."""

from __future__ import annotations

import logging

import comfy.samplers
import comfy.utils
import nodes as comfy_nodes  # ComfyUI's nodes.py: common_ksampler is KSampler's own path
from comfy_api.latest import io

from ..hyca_core.calibration import calibrate
from ..hyca_core.clustering import DEFAULT_CLUSTERS
from ..hyca_core.schedule import Schedule
from ..hyca_core.trajectories import DEFAULT_TOKENS, TrajectoryRecorder
from . import checkpoint_path, map_store
from .run_state import RunState
from .patching import GRANULARITIES, model_architecture, with_hyca
from .types import CATEGORY, SolverMapType


def probe(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, schedule: Schedule,
          clusters: int = DEFAULT_CLUSTERS, tokens: int = DEFAULT_TOKENS, granularity: str = "block"):
    """Sample once at full compute while recording every block; return (solver map, latent)."""
    recorder = TrajectoryRecorder(tokens=tokens, seed=seed)
    patched = with_hyca(model, RunState(recorder=recorder), granularity)
    (out,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent)
    progress = comfy.utils.ProgressBar(len(recorder))
    solver_map = calibrate(
        recorder, schedule, clusters=clusters, seed=seed,
        architecture=model_architecture(model), fingerprint=map_store.fingerprint(model),
        info={"steps": steps, "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg, "seed": seed,
              "granularity": granularity},
        progress=lambda done, total: progress.update_absolute(done, total),
    )
    return solver_map, out


class HyCaCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaCalibrate",
            display_name="HyCa Calibrate",
            category=CATEGORY,
            description=(
                "Runs one full-compute sampling (the probe), records how every hidden channel of every "
                "transformer block evolves, groups channels by their dynamics and picks the best "
                "predictor for each group. The solver map it outputs is reused for any prompt, "
                "resolution or LoRA of this base model."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to calibrate (LoRAs may already be applied)."),
                io.Conditioning.Input("positive", tooltip="Conditioning of the probe prompt; any typical prompt works."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of the probe."),
                io.Latent.Input("latent_image", tooltip="Latent to sample the probe from (e.g. an Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the probe; also seeds token sampling and clustering."),
                io.Int.Input("steps", default=30, min=4, max=10000,
                             tooltip="Probe steps. Maps serve other step counts too; use the count you sample with most."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the probe."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler of the probe."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler of the probe."),
                io.Int.Input("interval", default=4, min=2, max=20,
                             tooltip="Caching interval N the probe's choice is made for: one full step every N steps."),
                io.Int.Input("warmup", default=3, min=1, max=50,
                             tooltip="Steps always computed at the start; higher-order predictors need more history."),
                io.Int.Input("clusters", default=DEFAULT_CLUSTERS, min=1, max=64,
                             tooltip="Number of channel groups per block (k-means), each with its own predictor."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="block: every transformer block's residual (the paper). stack: one per run of "
                                       "blocks (less memory). model: the whole model's output, for families without "
                                       "block patches. Use the same in Apply."),
                io.Boolean.Input("save", default=True,
                                 tooltip="Save the map beside the checkpoint (<file name>.hyca) when its folder is "
                                         "writable, and in models/hyca: where HyCa Apply finds it for this base model."),
            ],
            outputs=[
                SolverMapType.Output(display_name="solver_map", tooltip="The solver map, for HyCa Apply and the Inspector."),
                io.Latent.Output(display_name="LATENT", tooltip="The probe's full-compute result, so the run is not wasted."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to find the checkpoint's file: the map goes beside it
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                interval, warmup, clusters, granularity, save) -> io.NodeOutput:
        solver_map, latent = probe(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image, Schedule(interval=interval, warmup=warmup), clusters,
                                   granularity=granularity)
        if save:
            saved = map_store.save_for(solver_map, checkpoint_path.for_node(cls))
            logging.info("HyCa: solver map saved to %s", " and ".join(map(str, saved)))
        return io.NodeOutput(solver_map, latent)
