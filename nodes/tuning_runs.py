"""Closed-loop tuning (`hyca_core.tuning`) run on the model: a full-compute reference run with another noise
seed, cached replays of it per candidate, and plain fewer-step runs.

Two ways to sample them: HyCa Calibrate samples as KSampler does (`calibrate_node.KSamplerRuns`); a HyCa
Apply that has just calibrated from a user's run replays that run from inside its own ``OUTER_SAMPLE``
wrapper (`ReplayRuns`: the same guider, conditioning, sampler and sigmas, another noise), so auto mode tunes
as Calibrate does.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

import numpy as np
import torch

import comfy.sample
import comfy.samplers
import comfy.utils

from ..hyca_core import tuning
from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import SolverMap
from .apply_options import ApplyOptions

SEED_RANGE = 2**64  # KSampler's seeds


def reference_seed(probe_seed: int | None) -> int:
    """The seed of the tuning's reference run: the probe's next, a run the map was not fitted on."""
    return ((probe_seed or 0) + 1) % SEED_RANGE


def candidate_options(candidate: tuning.Candidate, interval: int, options: ApplyOptions = ApplyOptions()):
    """The options a replay of ``candidate`` at this interval runs with: the candidate's schedule over the
    whole denoising, whatever the user's window or target speed-up (a map's tuning serves every graph)."""
    return replace(options, schedule=Schedule(interval=interval, warmup=candidate.warmup),
                   placement=candidate.placement, target_speedup=0.0, window=(0.0, 1.0), tuned_warmup=False)


class Runs(Protocol):
    """The runs a tuning samples, each from the reference seed's noise; each returns the final latent."""

    steps: int
    reference_seed: int

    def full(self) -> torch.Tensor: ...

    def replay(self, candidate: tuning.Candidate, interval: int, solver_map: SolverMap) -> torch.Tensor: ...

    def plain(self, sampler_name: str, steps: int) -> torch.Tensor: ...


def fewer_sigmas(model_sampling, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The sigmas of a ``steps``-step run on the schedule of ``sigmas``: the stock scheduler's own if one of
    them made ``sigmas`` (as KSampler does, a penultimate sigma dropped included), else the same curve read at
    ``steps`` even intervals of its step index (custom sigmas)."""
    run_steps = len(sigmas) - 1
    reference = sigmas.detach().float().cpu()
    for name in comfy.samplers.SCHEDULER_NAMES:
        for extra in (0, 1):  # KSampler computes one more and drops the penultimate for some samplers
            candidate = comfy.samplers.calculate_sigmas(model_sampling, name, run_steps + extra).float().cpu()
            if extra:
                candidate = torch.cat([candidate[:-2], candidate[-1:]])
            same = candidate.shape == reference.shape and torch.allclose(candidate, reference, 1e-4, 1e-6)
            if same:
                fewer = comfy.samplers.calculate_sigmas(model_sampling, name, steps + extra)
                return torch.cat([fewer[:-2], fewer[-1:]]) if extra else fewer
    positions = np.linspace(0, run_steps, steps + 1)
    curve = np.interp(positions, np.arange(run_steps + 1), reference.double().numpy())
    return torch.from_numpy(curve).float()


class ReplayRuns:
    """A finished run replayed (`model_wrappers.Rerun`) from the reference seed's noise, each replay with the
    run state ``state_for(solver_map, options)`` makes (both None: a full-compute state); a candidate's
    options are ``options`` (the run's: its history precision and placement) with the candidate's schedule."""

    def __init__(self, rerun, state_for, options: ApplyOptions):
        self.rerun, self.state_for, self.options = rerun, state_for, options
        self.sigmas = rerun.argument("sigmas")
        self.steps = len(self.sigmas) - 1
        self.reference_seed = reference_seed(rerun.argument("seed"))
        self.noise = comfy.sample.prepare_noise(rerun.argument("latent_image"), self.reference_seed)

    def sample(self, state, **changes) -> torch.Tensor:
        return self.rerun(state, noise=self.noise, seed=self.reference_seed, **changes)

    def full(self) -> torch.Tensor:
        return self.sample(self.state_for(None, None))

    def replay(self, candidate, interval, solver_map) -> torch.Tensor:
        return self.sample(self.state_for(solver_map, candidate_options(candidate, interval, self.options)))

    def plain(self, sampler_name, steps) -> torch.Tensor:
        sigmas = fewer_sigmas(self.rerun.model_sampling, self.sigmas, steps)
        return self.sample(self.state_for(None, None), sampler=comfy.samplers.sampler_object(sampler_name),
                           sigmas=sigmas)


def tune(runs: Runs, solver_map: SolverMap, budget: float = tuning.BUDGET) -> tuple[SolverMap, tuning.Tuning]:
    """The map with its tuning in its info ("tuned"), and the tuning itself. The reference is the probe's
    settings sampled at full compute from another seed (``runs.reference_seed``): a run the map was not
    fitted on."""
    steps, seed = runs.steps, runs.reference_seed
    progress = comfy.utils.ProgressBar(int(budget * steps))
    result = tuning.tune(lambda candidate, n: runs.replay(candidate, n, solver_map), runs.plain, runs.full(),
                         steps, budget=budget, progress=progress.update_absolute)
    for n, tuned in sorted(result.tuned.items()):
        logging.info("HyCa: tuned N=%d: %s, %.1f dB against seed %d (%+.1f dB over plain %s with %d steps)",
                     n, tuned.candidate.label(), tuned.psnr, seed, tuned.lead, tuned.plain_sampler,
                     tuned.computed)
    logging.info("HyCa: tuning computed %d model steps (the probe's %d times %.2f)",
                 result.computed, steps, result.computed / steps)
    info = {**solver_map.info, "tuned": result.to_info(), "tuned_seed": seed}
    return replace(solver_map, info=info), result
