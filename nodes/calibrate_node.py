"""HyCa Calibrate: one full-compute probe sampling, recorded, turned into a solver map; or the map saved
for this model, reused unless the node is asked to recalibrate."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import nodes as comfy_nodes  # ComfyUI's nodes.py: common_ksampler is KSampler's own path
from comfy_api.latest import io

from ..hyca_core import defaults
from ..hyca_core.clustering import DEFAULT_CLUSTERS
from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import MIN_PROBE_STEPS, MapError, SolverMap
from ..hyca_core.trajectories import DEFAULT_TOKENS, TrajectoryRecorder
from . import checkpoint_path, map_store, prompt_links, tuning_runs, ui_text
from .apply_options import AUTO, ApplyOptions, granularity_for, map_warmup, mismatch_message
from .apply_hyca import patch_model
from .map_source import MapSource
from .run_state import RunState
from .patching import GRANULARITIES, model_architecture, with_hyca
from .types import CATEGORY, SolverMapType

MAP_OUTPUT, LATENT_OUTPUT = 0, 1


def probe(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, schedule: Schedule,
          clusters: int = DEFAULT_CLUSTERS, tokens: int = DEFAULT_TOKENS, granularity: str = "block"):
    """Sample once at full compute while recording every block; return (solver map, latent)."""
    from ..hyca_core.calibration import calibrate  # scikit-learn: imported when first needed

    recorder = TrajectoryRecorder(tokens=tokens, seed=seed)
    patched = with_hyca(model, RunState(recorder=recorder), granularity)
    (out,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                         negative, latent)
    progress = comfy.utils.ProgressBar(len(recorder))
    solver_map = calibrate(
        recorder, schedule, clusters=clusters, seed=seed,
        architecture=model_architecture(model), fingerprint=map_store.fingerprint(model),
        info={"steps": steps, "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg, "seed": seed,
              "granularity": granularity},
        progress=lambda done, total: progress.update_absolute(done, total),
    )
    return solver_map, out


@dataclass
class KSamplerRuns:
    """HyCa Calibrate's runs: KSampler's sampling (`nodes.common_ksampler`) without its per-run progress bar,
    on clones of the unpatched model."""

    model: object
    seed: int  # the probe's
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    positive: list
    negative: list
    latent: dict

    @property
    def reference_seed(self) -> int:
        return tuning_runs.reference_seed(self.seed)

    def sample(self, model, sampler_name: str, steps: int) -> torch.Tensor:
        latent_image = comfy.sample.fix_empty_latent_channels(model, self.latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, self.reference_seed, self.latent.get("batch_index"))
        return comfy.sample.sample(model, noise, steps, self.cfg, sampler_name, self.scheduler, self.positive,
                                   self.negative, latent_image, noise_mask=self.latent.get("noise_mask"),
                                   disable_pbar=True, seed=self.reference_seed)

    def full(self) -> torch.Tensor:
        return self.sample(self.model, self.sampler_name, self.steps)

    def replay(self, candidate, interval, solver_map) -> torch.Tensor:
        patched = patch_model(self.model, solver_map, tuning_runs.candidate_options(candidate, interval))
        return self.sample(patched, self.sampler_name, self.steps)

    def plain(self, sampler_name, steps) -> torch.Tensor:
        return self.sample(self.model, sampler_name, steps)

    def source(self, solver_map, options):
        return MapSource(self.model, solver_map, options, granularity_for(options, solver_map))


def check_consumers(node_cls, granularity: str) -> None:
    """Refuse, before any sampling, a HyCa Apply fed by this node that is set to another granularity."""
    hidden = node_cls.hidden
    if hidden is None:
        return
    for node in prompt_links.consumers(hidden.prompt, hidden.unique_id, MAP_OUTPUT):
        asked = node.get("inputs", {}).get("granularity")
        explicit = isinstance(asked, str) and asked != AUTO
        if node.get("class_type") == "HyCaApply" and explicit and asked != granularity:
            raise ValueError(mismatch_message(granularity, asked))


def saved_map(model, granularity: str, checkpoint) -> SolverMap | None:
    try:
        return map_store.load_for(model, granularity, checkpoint)
    except MapError as error:
        logging.warning("HyCa Calibrate: %s; probing anew", error)
        return None


class HyCaCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyCaCalibrate",
            display_name="HyCa Calibrate",
            category=CATEGORY,
            description=(
                "Makes the solver map HyCa Apply predicts with: samples once at full compute (the probe) and "
                "records how the model's features evolve. The map serves any prompt, resolution or LoRA of "
                "this model and is saved; later runs reuse it unless recalibrate is on."
            ),
            is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate (LoRAs may already be applied)."),
                io.Conditioning.Input("positive",
                                      tooltip="Conditioning of the probe prompt; any typical prompt works."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of the probe."),
                io.Latent.Input("latent_image",
                                tooltip="Latent to sample the probe from (e.g. an Empty Latent Image)."),
                # "fixed": a probe's seed should not change between queues (each new seed would probe again)
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate="fixed",
                             tooltip="Noise seed of the probe; also seeds token sampling and clustering."),
                io.Int.Input("steps", default=30, min=MIN_PROBE_STEPS, max=10000,
                             tooltip="Probe steps. Maps serve other step counts too; use the count you "
                                     "sample with most."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the probe."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler of the probe."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler of the probe."),
                io.Int.Input("interval", default=defaults.INTERVAL, min=2, max=20,
                             tooltip="The interval N the map's choice is made for: one full step every N "
                                     "steps."),
                io.Int.Input("warmup", default=defaults.WARMUP, min=1, max=50,
                             tooltip="Steps always computed at the start; HyCa Apply uses the map's "
                                     "warm-up."),
                io.Int.Input("clusters", default=DEFAULT_CLUSTERS, min=1, max=64,
                             tooltip="Channel groups per block, each with its own predictor."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="What is cached: every block (best), one output per stack of blocks "
                                       "(far less memory) or the whole model's output (any model)."),
                io.Boolean.Input("save", default=True,
                                 tooltip="Save the map beside the model file and in models/hyca, where HyCa "
                                         "Apply finds it."),
                io.Boolean.Input("recalibrate", default=False, optional=True,
                                 tooltip="Probe again although a map for this model is saved."),
                io.Boolean.Input("tune", default=True, optional=True,
                                 tooltip="After the probe, try HyCa's settings on one more sampling (another "
                                         "seed) and keep what comes closest, per speed-up; takes up to three "
                                         "more full runs' time."),
                io.Int.Input("search", default=0, min=0, max=500, optional=True,
                             tooltip="With tune: replays per tuned speed-up searching where its full steps "
                                     "go, kept where they come closer (0: off). Each takes about 1/N of a "
                                     "run; the result serves runs with this step count."),
            ],
            outputs=[
                SolverMapType.Output(display_name="solver_map",
                                     tooltip="The solver map, for HyCa Apply and the Inspector."),
                io.Latent.Output(display_name="LATENT",
                                 tooltip="The probe's image; with a reused map, the same settings sampled "
                                         "with it."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # the model's file, and the nodes fed by this one
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                interval, warmup, clusters, granularity, save, recalibrate=False, tune=True,
                search=0) -> io.NodeOutput:
        check_consumers(cls, granularity)
        checkpoint = checkpoint_path.for_node(cls)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        reused = None if recalibrate else saved_map(model, granularity, checkpoint)
        if reused is not None:
            logging.info("HyCa Calibrate: reusing the map saved for this model (recalibrate probes again)")
            ui_text.show(node_id, "HyCa: reused the solver map saved for this model. Turn on recalibrate to "
                                  "probe again.")
            latent = latent_image
            if prompt_links.consumed(cls, LATENT_OUTPUT):
                options = ApplyOptions(schedule=Schedule(interval=interval, warmup=map_warmup(reused)))
                (latent,) = comfy_nodes.common_ksampler(patch_model(model, reused, options), seed, steps,
                                                        cfg, sampler_name, scheduler, positive, negative,
                                                        latent_image)
            return io.NodeOutput(reused, latent)
        solver_map, latent = probe(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image, Schedule(interval=interval, warmup=warmup), clusters,
                                   granularity=granularity)
        if tune:
            try:
                runs = KSamplerRuns(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                    negative, latent_image)
                solver_map, _ = tuning_runs.tune(runs, solver_map, search=search)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: the probe is paid for, keep it
                logging.warning("HyCa Calibrate: tuning failed (%s); the map is kept untuned", error)
        where = "not saved"
        if save:
            try:
                saved = map_store.save_for(solver_map, checkpoint)
                where = "solver map saved to " + " and ".join(map(str, saved))
                logging.info("HyCa: %s", where)
            except MapError as error:  # the probe is paid for: keep its map and image
                where = "kept in memory only: no folder was writable"
                logging.warning("HyCa Calibrate: the map could not be saved (%s); it is kept for this "
                                "session", error)
        ui_text.show(node_id, f"HyCa: calibrated a new solver map ({where}).")
        return io.NodeOutput(solver_map, latent)
