"""HyCa Calibrate's closed-loop tuning (`hyca_core.tuning`) run on the model: a full-compute reference run
with another noise seed, cached replays of it per candidate, and plain fewer-step runs."""

from __future__ import annotations

import logging
from dataclasses import replace

import comfy.sample
import comfy.utils

from ..hyca_core import tuning
from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import SolverMap
from .apply_hyca import patch_model
from .apply_options import ApplyOptions

SEED_RANGE = 2**64  # KSampler's seeds


def sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent):
    """KSampler's sampling (`nodes.common_ksampler`) without its per-run progress bar: tuning reports
    its own progress over all its runs."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, noise_mask=latent.get("noise_mask"), disable_pbar=True,
                               seed=seed)


def tune(model, solver_map: SolverMap, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
         budget: float = tuning.BUDGET, reference_seed: int | None = None) -> tuple[SolverMap, tuning.Tuning]:
    """The map with its tuning in its info ("tuned"), and the tuning itself. The reference is the probe's
    settings sampled at full compute with the next seed (unless ``reference_seed`` is given): a run the
    map was not fitted on."""
    if reference_seed is None:
        reference_seed = (seed + 1) % SEED_RANGE

    def run(patched, sampler, count):
        return sample(patched, reference_seed, count, cfg, sampler, scheduler, positive, negative, latent)

    def replay(candidate: tuning.Candidate, interval: int):
        options = ApplyOptions(schedule=Schedule(interval=interval, warmup=candidate.warmup),
                               placement=candidate.placement)
        return run(patch_model(model, solver_map, options), sampler_name, steps)

    progress = comfy.utils.ProgressBar(int(budget * steps))
    reference = run(model, sampler_name, steps)
    result = tuning.tune(replay, lambda sampler, count: run(model, sampler, count), reference, steps,
                         budget=budget, progress=lambda done, total: progress.update_absolute(done, total))
    for n, tuned in sorted(result.tuned.items()):
        verdict = (f"plain {tuned.plain_sampler} with {tuned.computed} steps is closer" if tuned.plain_wins
                   else f"{tuned.psnr - tuned.plain_psnr:.1f} dB above plain {tuned.plain_sampler}")
        logging.info("HyCa Calibrate: tuned N=%d: %s, %.1f dB against seed %d (%s)", n,
                     tuned.candidate.label(), tuned.psnr, reference_seed, verdict)
    logging.info("HyCa Calibrate: tuning computed %d model steps (the probe's %d times %.2f)",
                 result.computed, steps, result.computed / steps)
    info = {**solver_map.info, "tuned": result.to_info(), "tuned_seed": reference_seed}
    return replace(solver_map, info=info), result
