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

from ..hyca_core import defaults, tuning
from ..hyca_core.closeness import latent_psnr
from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import SolverMap
from .apply_options import AUTO, ApplyOptions

SEED_RANGE = 2**64  # KSampler's seeds


def reference_seed(probe_seed: int | None) -> int:
    """The seed of the tuning's reference run: the probe's next, a run the map was not fitted on."""
    return ((probe_seed or 0) + 1) % SEED_RANGE


def candidate_options(candidate: tuning.Candidate | None, interval: int,
                      options: ApplyOptions = ApplyOptions()) -> ApplyOptions:
    """The options a replay of ``candidate`` at this interval runs with: the candidate's schedule over the
    whole denoising, whatever the user's window or target speed-up (a map's tuning serves every graph).
    None: what the map's own tuning says at this interval (a searched placement included)."""
    if candidate is None:
        return replace(options, schedule=Schedule(interval=interval), placement=AUTO, target_speedup=0.0,
                       window=(0.0, 1.0), tuned_warmup=True)
    return replace(options, schedule=Schedule(interval=interval, warmup=candidate.warmup),
                   placement=candidate.placement, target_speedup=0.0, window=(0.0, 1.0), tuned_warmup=False)


class Runs(Protocol):
    """The runs a tuning samples, each from the reference seed's noise; each returns the final latent."""

    steps: int
    reference_seed: int

    def full(self) -> torch.Tensor: ...

    def replay(self, candidate: tuning.Candidate | None, interval: int,
               solver_map: SolverMap) -> torch.Tensor: ...  # None: the map's own tuning at this interval

    def plain(self, sampler_name: str, steps: int) -> torch.Tensor: ...

    def source(self, solver_map: SolverMap, options: ApplyOptions): ...  # the MapSource replays predict with


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

    def source(self, solver_map, options):
        return self.state_for(solver_map, options).source

    def plain(self, sampler_name, steps) -> torch.Tensor:
        sigmas = fewer_sigmas(self.rerun.model_sampling, self.sigmas, steps)
        return self.sample(self.state_for(None, None), sampler=comfy.samplers.sampler_object(sampler_name),
                           sigmas=sigmas)


def tune(runs: Runs, solver_map: SolverMap, budget: float = tuning.BUDGET,
         search: int = 0) -> tuple[SolverMap, tuning.Tuning]:
    """The map with its tuning in its info ("tuned"), and the tuning itself. The reference is the probe's
    settings sampled at full compute from another seed (``runs.reference_seed``): a run the map was not
    fitted on. ``search``: replays per tuned N for a local search of its full steps (`tuning.search`), an
    addition to the budget."""
    steps, seed = runs.steps, runs.reference_seed
    progress = comfy.utils.ProgressBar(int(budget * steps))
    reference = runs.full()
    result = tuning.tune(lambda candidate, n: runs.replay(candidate, n, solver_map), runs.plain, reference,
                         steps, budget=budget, progress=progress.update_absolute)
    tuned = with_tuning(solver_map, result.tuned, seed)
    for n in sorted(result.tuned, key=lambda k: k != defaults.INTERVAL) if search else ():
        tuned = _searched(runs, tuned, n, reference, search)
    for n, found in sorted(tuning.from_info(tuned.info).items()):
        logging.info("HyCa: tuned N=%d: %s%s, %.1f dB against seed %d (%+.1f dB over plain %s with %d steps)",
                     n, found.candidate.label(), "" if found.searched is None else ", searched", found.psnr,
                     seed, found.lead, found.plain_sampler, found.computed)
    logging.info("HyCa: tuning computed %d model steps (the probe's %d times %.2f)",
                 result.computed, steps, result.computed / steps)
    return tuned, result


def with_tuning(solver_map: SolverMap, tuned: dict[int, tuning.Tuned], seed: int) -> SolverMap:
    return replace(solver_map, info={**solver_map.info, "tuned": tuning.to_info(tuned), "tuned_seed": seed})


def _searched(runs: Runs, solver_map: SolverMap, n: int, reference: torch.Tensor, replays: int) -> SolverMap:
    """The map with N=n's tuned placement improved by a local search on the reference (`tuning.search`),
    each move a replay of the map as Apply would run it. The entry keeps the tuning's score: the best of many
    replays of one run flatters it, and the verdict must not lean on that."""
    every = tuning.from_info(solver_map.info)
    found = every[n]
    options = candidate_options(found.candidate, n)
    start = runs.source(solver_map, options).for_run(solver_map.probe_sigmas).mask

    def trial(mask) -> SolverMap:
        return with_tuning(solver_map, {**every, n: found.with_mask(mask)}, runs.reference_seed)

    def score(mask) -> float:
        return latent_psnr(runs.replay(None, n, trial(mask)), reference)

    mask, psnr, spent = tuning.search(start, found.psnr, found.candidate.warmup, score, replays)
    logging.info("HyCa: N=%d: placement searched in %d replays, %.1f dB against %.1f dB before", n, spent,
                 psnr, found.psnr)
    return trial(mask) if psnr > found.psnr else solver_map
