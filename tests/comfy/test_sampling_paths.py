"""HyCa on the sampling paths ComfyUI really takes, with its real samplers, nodes and executor.

A tiny real FLUX (and tiny real Wan models) sampled through ComfyUI: multi-call samplers and img2img,
conditioning branches and batch shapes, runs that change shape or get cancelled, patched clones side by
side, ControlNet inputs, odd schedules, a two-stage Wan 2.2 graph, and an API-format workflow run by
ComfyUI's PromptExecutor. Everywhere: N=1 is bit-identical to the unpatched model, N>1 stays close to full
compute, and the calls computed and predicted are exactly those the sigma schedule implies.

PSNR bounds are measured on these tiny models (values in the comments) less a margin of about 5 dB.
"""

import asyncio
import functools
import logging
import os
import random
import re
import uuid

import numpy as np
import pytest
import torch

from harness import sampling, tiny_models
from harness.metrics import latent_psnr

# FLUX with one double and one single block: every code path, little compute
FLUX = tiny_models.FLUX_SMALLEST  # the conftest's flux
LATENT = (1, 16, 16, 16)
STEPS = 10
N, WARMUP = 2, 2
FIRST = ("double_block", 0)  # the first block HyCa patches, in FLUX and Wan alike


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _report(text, *args):
    logging.getLogger(__name__).warning("measured: " + text, *args)


def _sample(model, positive, negative, latent, steps=STEPS, cfg=1.0, sampler="euler", scheduler="simple",
            seed=5, denoise=1.0, callback=None):
    """comfy.sample.sample as KSampler calls it (noise from the seed), with an optional sampler callback."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, disable_pbar=True, seed=seed, callback=callback)


def _apply(pack, model, solver_map, interval=N, warmup=WARMUP, **kwargs):
    schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=warmup)
    return pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule, **kwargs)


def _mask(pack, steps, interval=N, warmup=WARMUP):
    return pack.hyca_core.schedule.Schedule(interval=interval, warmup=warmup).mask(steps)


def _logged_counts(text):
    found = re.findall(r"(\d+) block calls computed, (\d+) predicted", text)
    return tuple(int(x) for x in found[-1]) if found else None


class Watch:
    """Passes every call of a patched model's HyCa block patches through, and notes what happened.

    Per block: calls computed and predicted (told apart by the run state's counter). For the first block,
    every call's step position on the sigma schedule, decision, branches (one per conditioning in the call)
    and (batch, tokens) shape; and for each predicted call, whether each residual history it predicts from
    holds exactly what this block computed for that branch's rows at the on-grid steps the branch names (the
    newest computation at each).
    """

    def __init__(self, pack, patched):
        run_state = pack.nodes.run_state
        self.current_call, self.state_key = run_state.current_call, run_state.OPTIONS_KEY
        self.history_key = f"{FIRST[0]}.{FIRST[1]}.img"
        replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        self.counts = {key: [0, 0] for key in replaced}
        for key, patch in list(replaced.items()):
            replaced[key] = functools.partial(self._call, key, patch)
        self.reset()

    def reset(self):
        self.counts = {key: [0, 0] for key in self.counts}
        self.calls = []  # (step, predicted, branches, shape) of the first block
        self.sample_sigmas = []  # of every run
        self.residuals = {}  # (branch, step) -> the first block's computed img residual, that branch's rows
        self.stale = []  # steps of predicted calls whose history was not the computed residuals

    def _call(self, key, patch, args, extra):
        options = args["transformer_options"]
        state, call = options.get(self.state_key), self.current_call(options)
        if call is None:
            return patch(args, extra)
        before = state.predicted
        first = key == FIRST
        if first:
            img = args["img"].clone()
            if not self.calls or options["sample_sigmas"] is not self.sample_sigmas[-1]:
                self.sample_sigmas.append(options["sample_sigmas"])
            if call.predict:
                self._check_history(call)
        out = patch(args, extra)
        predicted = state.predicted > before
        self.counts[key][predicted] += 1
        if first:
            self.calls.append((call.step, call.predict, tuple(id(p.branch) for p in call.parts),
                               tuple(img.shape[:2])))
            for part in call.parts:
                if part.decision.keeps:  # what the run state keeps: an on-grid step's newest computation
                    self.residuals[id(part.branch), int(call.step)] = call.rows(out["img"] - img, part)
        return out

    def _check_history(self, call):
        for part in call.parts:
            views = part.branch.histories[self.history_key].views()
            computed = [self.residuals.get((id(part.branch), step)) for step in part.branch.steps]
            expected = computed[-len(views):]
            if not views or len(expected) != len(views) or any(
                    e is None or not torch.equal(v, e) for v, e in zip(views, expected)):
                self.stale.append(call.step)

    def per_block(self):
        return {key: tuple(c) for key, c in self.counts.items()}


def _check_calls(watch, mask, positions, blocks):
    """Every call at the expected step position with the mask's decision; every block alike."""
    steps = [step for step, *_ in watch.calls]
    assert len(steps) == len(positions), steps
    for step, position, before in zip(steps, positions, [None] + positions):
        if position is None:  # an off-grid evaluation strictly between the step before and the next
            assert before < step < before + 1, steps
        else:
            assert step == position, steps
    decisions = [predicted for _, predicted, *_ in watch.calls]
    assert decisions == [s.is_integer() and not mask[int(s)] for s in steps]
    computed = decisions.count(False)
    assert watch.per_block() == {key: (computed, len(decisions) - computed) for key in watch.counts}
    assert watch.stale == []
    return computed * blocks, (len(decisions) - computed) * blocks


# ---------------------------------------------------------------------------------------------------------
# 1. Decisions follow the sigma timeline: multi-call samplers and img2img


def _positions(sampler, steps):
    """The step position of every model call a sampler makes on a flow model's schedule from sigma 1 to 0
    (None: off-grid, strictly between two steps).

    heun evaluates each step's start and, except into sigma 0, the next step's sigma (its correction).
    dpmpp_2s_ancestral evaluates each step's start and a midpoint, except on the last step (into sigma 0);
    from sigma 1 its midpoint is 0.9999 (sampling.py hard-codes it), on step 0. The others: each step once;
    dpmpp_2m_sde evaluates step 0 at 0.9999 too (offset_first_sigma_for_snr): it is step 0's evaluation."""
    if sampler == "heun":
        return [0] + [j for j in range(1, steps) for _ in range(2)]
    if sampler == "dpmpp_2s_ancestral":
        return [0, 0] + [p for j in range(1, steps) for p in ((j, None) if j < steps - 1 else (j,))]
    return list(range(steps))


# name: PSNR bound at N=2; measured heun 70.4, dpmpp_2s_ancestral 73.7, dpmpp_2m 68.9, dpmpp_2m_sde 60.8,
# uni_pc 69.3, euler img2img 67.8 dB
SAMPLERS = {"heun": 65, "dpmpp_2s_ancestral": 68, "dpmpp_2m": 63, "dpmpp_2m_sde": 55, "uni_pc": 64,
            "img2img": 62}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_decisions_follow_the_sigma_schedule(pack, flux, solver_map, conditioning, name, caplog):
    sampler, denoise = ("euler", 0.6) if name == "img2img" else (name, 1.0)
    latent = _randn(*LATENT, seed=7) if name == "img2img" else torch.zeros(LATENT)
    run = functools.partial(_sample, positive=conditioning[0], negative=conditioning[1], latent=latent,
                            sampler=sampler, denoise=denoise)
    full = run(flux)
    blocks = len(pack.nodes.families.patchable_blocks(flux.model.diffusion_model))

    patched = _apply(pack, flux, solver_map, interval=1)
    watch = Watch(pack, patched)
    assert torch.equal(run(patched), full)
    _check_calls(watch, _mask(pack, STEPS, 1), _positions(sampler, STEPS), blocks)

    patched = _apply(pack, flux, solver_map)
    watch = Watch(pack, patched)
    with caplog.at_level(logging.INFO):
        out = run(patched)
    (sigmas,) = watch.sample_sigmas
    assert len(sigmas) == STEPS + 1
    # uni_pc writes 0.001 over it
    assert float(sigmas[-1]) == pytest.approx(0.001 if sampler == "uni_pc" else 0.0)
    if denoise < 1:  # img2img: the run's schedule is the tail of a longer one, and HyCa's steps count on it
        assert float(sigmas[0]) < 0.9
    expected = _check_calls(watch, _mask(pack, STEPS), _positions(sampler, STEPS), blocks)
    assert _logged_counts(caplog.text) == expected
    psnr = latent_psnr(out, full)
    _report("%s: PSNR %.1f dB at N=%d, block calls computed/predicted %s", name, psnr, N, expected)
    assert not torch.equal(out, full) and psnr > SAMPLERS[name]


# Samplers that ignore the schedule's sigmas but its ends (their own step grid): nothing lands on a step.
OWN_GRID = {"dpm_fast", "dpm_adaptive"}


def test_every_comfyui_sampler_predicts_on_its_steps(pack, flux, solver_map, conditioning):
    """All of ComfyUI's samplers: every step evaluated, on-grid calls as the mask says, the rest computed, and
    the histories exact. Flow models' SDE samplers evaluate step 0 at 0.9999, not 1: before that counted as
    step 0, they never predicted; uni_pc and ipndm, which do not run under no_grad, used to fail."""
    import comfy.samplers

    steps = 6
    mask = _mask(pack, steps)
    patched = _apply(pack, flux, solver_map)
    watch = Watch(pack, patched)
    for sampler in comfy.samplers.KSampler.SAMPLERS:
        watch.reset()
        out = _sample(patched, *conditioning, torch.zeros(LATENT), steps=steps, sampler=sampler)
        assert torch.isfinite(out).all(), sampler
        calls = [(step, predicted) for step, predicted, *_ in watch.calls]
        assert calls == [(s, s.is_integer() and not mask[int(s)]) for s, _ in calls], (sampler, calls)
        assert watch.stale == [], sampler
        assert len(set(watch.per_block().values())) == 1, sampler
        if sampler not in OWN_GRID:
            assert {s for s, _ in calls if s.is_integer()} == set(range(steps)), (sampler, calls)
            assert any(predicted for _, predicted in calls), sampler


# ---------------------------------------------------------------------------------------------------------
# 2. State per conditioning branch and batch shape; runs that change shape or get cancelled


def _split_negative():
    """A negative prompt of 41 tokens: with the positive's 8 they cannot share a batch (ComfyUI pads
    cross-attention only up to 4x), so calc_cond_batch runs cond and uncond as two model calls."""
    _, negative = sampling.text_conditioning(FLUX["context_in_dim"], tokens=41, seed=9,
                                             pooled_dim=FLUX["vec_in_dim"])
    return negative


# name: (cfg, latent batch, split negative, model_options, calls per step, branches, batch per call,
#        PSNR bound)
# PSNR at N=2 measured: cfg-batched 63.6, cfg-split 64.5, cfg-1-unoptimized 70.5, batch-2 70.5 dB
BRANCHES = {
    "cfg-batched": (3.0, 1, False, {}, 1, 1, 2, 58),
    "cfg-split": (3.0, 1, True, {}, 2, 2, 1, 59),
    # at cfg 1 ComfyUI skips the uncond unless a node (e.g. a guidance patch) disables that optimization
    "cfg-1-unoptimized": (1.0, 1, False, {"disable_cfg1_optimization": True}, 1, 1, 2, 65),
    "batch-2": (1.0, 2, False, {}, 1, 1, 2, 65),
}


@pytest.mark.parametrize("name", list(BRANCHES))
def test_conditioning_branches_and_batches(pack, flux, solver_map, conditioning, name, caplog):
    cfg, batch, split, model_options, calls_per_step, branches, batch_per_call, bound = BRANCHES[name]
    positive, negative = conditioning
    if split:
        negative = _split_negative()
    model = flux.clone()
    model.model_options.update(model_options)
    latent = torch.zeros(batch, *LATENT[1:])
    run = functools.partial(_sample, positive=positive, negative=negative, latent=latent, cfg=cfg)
    full = run(model)
    blocks = len(pack.nodes.families.patchable_blocks(flux.model.diffusion_model))
    positions = [j for j in range(STEPS) for _ in range(calls_per_step)]

    patched = _apply(pack, model, solver_map, interval=1)
    watch = Watch(pack, patched)
    assert torch.equal(run(patched), full)
    _check_calls(watch, _mask(pack, STEPS, 1), positions, blocks)

    patched = _apply(pack, model, solver_map)
    watch = Watch(pack, patched)
    with caplog.at_level(logging.INFO):
        out = run(patched)
    expected = _check_calls(watch, _mask(pack, STEPS), positions, blocks)
    assert _logged_counts(caplog.text) == expected
    assert len({branch for *_, branch, _ in watch.calls}) == branches
    assert {shape[0] for *_, shape in watch.calls} == {batch_per_call}
    psnr = latent_psnr(out, full)
    _report("%s: PSNR %.1f dB at N=%d", name, psnr, N)
    assert not torch.equal(out, full) and psnr > bound


def test_shape_batch_and_prompt_changes_between_runs_never_reuse_residuals(pack, flux, solver_map,
                                                                            conditioning):
    other_prompt = sampling.flux_conditioning(FLUX["context_in_dim"], FLUX["vec_in_dim"], tokens=12, seed=3)
    runs = {
        "base": (conditioning, torch.zeros(LATENT)),
        "resolution": (conditioning, torch.zeros(1, 16, 24, 20)),
        "batch": (conditioning, torch.zeros(3, *LATENT[1:])),
        "prompt": (other_prompt, torch.zeros(LATENT)),
    }
    patched = _apply(pack, flux, solver_map)
    results = {}
    for name in ["base", "resolution", "base", "batch", "prompt", "resolution", "base"]:
        (positive, negative), latent = runs[name]
        out = _sample(patched, positive, negative, latent, steps=8)
        if name not in results:
            results[name] = _sample(_apply(pack, flux, solver_map), positive, negative, latent, steps=8)
        assert torch.equal(out, results[name]), name
    assert len({tuple(r.shape) for r in results.values()}) == 3


def _short_of_two_prompts(model, monkeypatch):
    """ComfyUI batches a step's positive and negative prompt into one model call only while its estimate of
    the call's memory fits what is free then, so under memory pressure one run calls the model with both at
    one step and apart at the next: here free memory is short of the two at every third step."""
    estimate, batched = model.memory_required, []

    def memory_required(input_shape, **kwargs):
        if input_shape[0] == 2:
            batched.append(input_shape)
            if len(batched) % 3 == 0:
                return float("inf")
        return estimate(input_shape, **kwargs)

    monkeypatch.setattr(model, "memory_required", memory_required)


def test_a_batch_split_at_some_steps_predicts_as_the_unsplit_run(pack, flux, solver_map, conditioning,
                                                                  monkeypatch):
    """Each prompt's rows keep their own history: a run whose batch splits at some steps decides and
    predicts every step as the batched run does, and gives its image."""
    positive, negative = conditioning
    latent = torch.zeros(LATENT)
    run = functools.partial(_sample, positive=positive, negative=negative, latent=latent, cfg=3.0)
    batched_watch = Watch(pack, patched := _apply(pack, flux, solver_map))
    batched = run(patched)
    _short_of_two_prompts(flux.model, monkeypatch)
    split_watch = Watch(pack, patched := _apply(pack, flux, solver_map))
    split = run(patched)
    assert {shape[0] for *_, shape in split_watch.calls} == {1, 2}  # both batchings in one run
    decided = {step: predicted for step, predicted, *_ in batched_watch.calls}
    assert {step: predicted for step, predicted, *_ in split_watch.calls} == decided
    assert any(decided.values()) and not split_watch.stale
    torch.testing.assert_close(split, batched, rtol=1e-5, atol=1e-5)


def test_a_probe_split_at_some_steps_records_as_the_unsplit_one(pack, flux, conditioning, monkeypatch):
    """A calibration records both prompts' rows at every step, in the first call's order, however the steps
    batch them."""
    positive, negative = conditioning
    recorders = []
    for split in (False, True):
        if split:
            _short_of_two_prompts(flux.model, monkeypatch)
        recorders.append(pack.hyca_core.trajectories.TrajectoryRecorder())
        state = pack.nodes.run_state.RunState(recorder=recorders[-1])
        probe = pack.nodes.patching.with_hyca(flux, state, "block")
        _sample(probe, positive, negative, torch.zeros(LATENT), cfg=3.0)
    batched, split = recorders
    assert list(split) == list(batched)
    for key in batched:
        assert np.array_equal(split[key].sigmas, batched[key].sigmas) and len(batched[key].sigmas) == STEPS
        np.testing.assert_allclose(split[key].values, batched[key].values, rtol=1e-3, atol=1e-3)


def _interrupt_at(step):
    """A sampler callback that cancels at ``step`` the way ComfyUI's progress hook does when the user
    presses Cancel: the interrupt flag is set, and the next check raises."""
    import comfy.model_management

    def callback(i, *_):
        if i == step:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return callback


def _no_run_state(pack, patched, options_before):
    """The MODEL holds exactly the options it had before sampling, its HyCa template without run data."""
    options = patched.model_options["transformer_options"]
    assert options.keys() == options_before
    template = options[pack.nodes.run_state.OPTIONS_KEY]
    assert pack.nodes.run_state.current_call(options) is None and not template.holds_run_data()


def test_cancelled_run_leaves_nothing_behind(pack, flux, solver_map, conditioning):
    import comfy.model_management

    latent = torch.zeros(LATENT)
    fresh = _sample(_apply(pack, flux, solver_map), *conditioning, latent)
    patched = _apply(pack, flux, solver_map)
    options_before = set(patched.model_options["transformer_options"])
    draw = random.Random(4)
    watch = Watch(pack, patched)
    for step in (draw.randrange(WARMUP), draw.randrange(WARMUP, STEPS - 1)):  # in the warm-up, then later
        watch.reset()
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _sample(patched, *conditioning, latent, callback=_interrupt_at(step))
        assert max(s for s, *_ in watch.calls) == step  # cancelled right after the model call at `step`
        _no_run_state(pack, patched, options_before)
        assert torch.equal(_sample(patched, *conditioning, latent), fresh), step
        _no_run_state(pack, patched, options_before)
    assert "hyca" not in flux.model_options["transformer_options"]


def test_cancelled_calibrating_run_calibrates_nothing(pack, conditioning):
    import comfy.model_management

    # a base model no map exists for: Apply calibrates on its first run
    model = tiny_models.build(FLUX, seed=31)
    map_store = pack.nodes.map_store
    patched = _apply(pack, model, None)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(patched, *conditioning, torch.zeros(LATENT), callback=_interrupt_at(STEPS // 2))
    assert map_store.find(model) is None
    assert patched.model_options["transformer_options"]["hyca"].source.solver_map is None


# ---------------------------------------------------------------------------------------------------------
# 3. Isolation: patched clones of one model side by side, and the unpatched model


def test_patched_clones_and_the_unpatched_model_never_share_state(pack, flux, solver_map, conditioning):
    Schedule = pack.hyca_core.schedule.Schedule
    other_map, _ = pack.nodes.calibrate_node.probe(flux, 1, 16, 1.0, "dpmpp_2m", "simple", *conditioning,
                                                   {"samples": torch.zeros(LATENT)}, Schedule(3, 3),
                                                   clusters=4)
    settings = {"a": (solver_map, 2, 2), "b": (other_map, 3, 3)}
    latent = torch.zeros(LATENT)

    def run(model):
        return _sample(model, *conditioning, latent)

    fresh = {name: run(_apply(pack, flux, m, interval=n, warmup=w)) for name, (m, n, w) in settings.items()}
    never_patched = run(tiny_models.build(FLUX, seed=1))  # the same weights, in a model never patched
    assert not torch.equal(fresh["a"], fresh["b"])
    clones = {name: _apply(pack, flux, m, interval=n, warmup=w) for name, (m, n, w) in settings.items()}
    clones["unpatched"] = flux
    fresh["unpatched"] = never_patched
    for name in ["a", "b", "unpatched", "b", "a", "a", "unpatched", "b"]:
        assert torch.equal(run(clones[name]), fresh[name]), name
    templates = [clones[name].model_options["transformer_options"]["hyca"] for name in settings]
    assert templates[0] is not templates[1]
    assert "hyca" not in flux.model_options["transformer_options"]
    assert "patches_replace" not in flux.model_options["transformer_options"]


# ---------------------------------------------------------------------------------------------------------
# 4. ControlNet inputs added to the image stream after the blocks


def _tiny_controlnet():
    """A real comfy.controlnet.ControlNet around a tiny XLabs-style ControlNetFlux of the tiny FLUX's shape,
    built as comfy.controlnet.load_controlnet_flux_xlabs_mistoline builds it from a checkpoint."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management
    import comfy.ops

    config = {k: v for k, v in FLUX.items() if k != "image_model"}
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init,
                                                             dtype=torch.float32, **config)
    tiny_models.initialize(control_model, seed=21)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None, extra_conds=["y", "guidance"])


# PSNR at N=2 measured: 72.0 dB
def test_controlnet_inputs_added_after_the_blocks(pack, flux, solver_map, conditioning, caplog):
    import nodes

    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))  # an IMAGE, 8x the latent
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        *conditioning, _tiny_controlnet(), hint, strength=0.8, start_percent=0.0, end_percent=1.0)
    latent = torch.zeros(LATENT)
    full = _sample(flux, positive, negative, latent)
    assert not torch.equal(full, _sample(flux, *conditioning, latent))  # the control does act
    blocks = len(pack.nodes.families.patchable_blocks(flux.model.diffusion_model))

    patched = _apply(pack, flux, solver_map, interval=1)
    assert torch.equal(_sample(patched, positive, negative, latent), full)
    patched = _apply(pack, flux, solver_map)
    watch = Watch(pack, patched)
    with caplog.at_level(logging.INFO):
        out = _sample(patched, positive, negative, latent)
    expected = _check_calls(watch, _mask(pack, STEPS), list(range(STEPS)), blocks)
    assert _logged_counts(caplog.text) == expected
    psnr = latent_psnr(out, full)
    _report("controlnet: PSNR %.1f dB at N=%d", psnr, N)
    assert not torch.equal(out, full) and psnr > 67


# ---------------------------------------------------------------------------------------------------------
# 5. Schedules: few steps, changing step counts, a final sigma of 0, fewer steps than the warm-up, N > steps


# name: (steps, N, warm-up, sampler, PSNR bound); measured 65.6, 71.7, 70.2, 52.0, 63.6, 60.3 dB
SCHEDULES = {
    "4-steps-warmup-1": (4, 2, 1, "euler", 60),
    "6-steps-warmup-2": (6, 2, 2, "euler", 66),
    "8-steps-warmup-2": (8, 2, 2, "euler", 65),
    "lcm-6-steps": (6, 2, 2, "lcm", 47),
    "interval-above-steps": (6, 10, 2, "euler", 58),
    "interval-far-above-steps": (5, 50, 1, "euler", 55),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_short_schedules(pack, flux, solver_map, conditioning, name):
    steps, interval, warmup, sampler, bound = SCHEDULES[name]
    latent = torch.zeros(LATENT)
    run = functools.partial(_sample, positive=conditioning[0], negative=conditioning[1], latent=latent,
                            steps=steps, sampler=sampler)
    full = run(flux)
    blocks = len(pack.nodes.families.patchable_blocks(flux.model.diffusion_model))
    assert torch.equal(run(_apply(pack, flux, solver_map, interval=1, warmup=warmup)), full)
    patched = _apply(pack, flux, solver_map, interval=interval, warmup=warmup)
    watch = Watch(pack, patched)
    out = run(patched)
    mask = _mask(pack, steps, interval, warmup)
    # the sampler's last step goes to sigma 0, never evaluated
    assert float(watch.sample_sigmas[0][-1]) == 0.0
    _check_calls(watch, mask, list(range(steps)), blocks)
    assert mask.sum() < steps
    psnr = latent_psnr(out, full)
    _report("%s: PSNR %.1f dB, %d of %d steps computed", name, psnr, mask.sum(), steps)
    assert not torch.equal(out, full) and psnr > bound


def test_fewer_steps_than_the_warmup_compute_everything(pack, flux, solver_map, conditioning, caplog):
    latent = torch.zeros(LATENT)
    caplog.clear()
    for steps, warmup in ((3, 3), (2, 3), (1, 2)):
        patched = _apply(pack, flux, solver_map, interval=2, warmup=warmup)
        watch = Watch(pack, patched)
        with caplog.at_level(logging.INFO):
            out = _sample(patched, *conditioning, latent, steps=steps)
        assert torch.equal(out, _sample(flux, *conditioning, latent, steps=steps))
        assert [(s, p) for s, p, *_ in watch.calls] == [(j, False) for j in range(steps)]
    assert _logged_counts(caplog.text) is None  # nothing predicted, so nothing to report


def test_step_count_changes_between_runs(pack, flux, solver_map, conditioning, caplog):
    """20, 12, then 20 steps again on one patched model: a map fitted to each schedule, each run as fresh."""
    latent = torch.zeros(LATENT)
    blocks = len(pack.nodes.families.patchable_blocks(flux.model.diffusion_model))
    patched = _apply(pack, flux, solver_map)
    watch = Watch(pack, patched)
    for steps in (20, 12, 20):
        watch.reset()
        out = _sample(patched, *conditioning, latent, steps=steps)
        _check_calls(watch, _mask(pack, steps), list(range(steps)), blocks)
        fresh = _sample(_apply(pack, flux, solver_map), *conditioning, latent, steps=steps)
        assert torch.equal(out, fresh), steps
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for steps in (20, 12):
            _sample(patched, *conditioning, latent, steps=steps)
    # both schedules' run maps were made already
    assert not re.search(r"HyCa: \d+ steps, \d+ computed", caplog.text)


# ---------------------------------------------------------------------------------------------------------
# 6. Wan 2.2 A14B's two stages: a high-noise and a low-noise model, each with its own HyCa Apply and map

WAN_STEPS, WAN_SWITCH, WAN_CFG = 12, 6, 4.0
WAN_LATENT = (1, 16, 1, 16, 16)


def _two_stage(high, low, positive, negative, latent):
    """Two KSamplerAdvanced nodes as Wan 2.2's template wires them."""
    import nodes

    sampler = nodes.KSamplerAdvanced()
    (leftover,) = sampler.sample(high, "enable", 5, WAN_STEPS, WAN_CFG, "euler", "simple", positive, negative,
                                 {"samples": latent}, 0, WAN_SWITCH, "enable")
    (out,) = sampler.sample(low, "disable", 5, WAN_STEPS, WAN_CFG, "euler", "simple", positive, negative,
                            leftover, WAN_SWITCH, 10000, "disable")
    return leftover["samples"], out["samples"]


# PSNR at N=2 measured: 69.1 dB
def test_wan22_two_stages_each_with_its_own_map(pack, caplog):
    Schedule = pack.hyca_core.schedule.Schedule
    high, low = (tiny_models.build(tiny_models.WAN21_T2V, seed=seed) for seed in (41, 42))
    positive, negative = sampling.text_conditioning(tiny_models.WAN21_T2V["text_dim"])
    latent = torch.zeros(WAN_LATENT)
    maps = [pack.nodes.calibrate_node.probe(model, 5, WAN_STEPS, WAN_CFG, "euler", "simple", positive,
                                            negative, {"samples": latent}, Schedule(N, WARMUP))[0]
            for model in (high, low)]
    assert maps[0].fingerprint != maps[1].fingerprint
    leftover, full = _two_stage(high, low, positive, negative, latent)

    exact = [_apply(pack, model, m, interval=1) for model, m in zip((high, low), maps)]
    exact_stages = _two_stage(*exact, positive, negative, latent)
    assert all(torch.equal(a, b) for a, b in zip(exact_stages, (leftover, full)))

    patched = [_apply(pack, model, m) for model, m in zip((high, low), maps)]
    watches = [Watch(pack, p) for p in patched]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, out = _two_stage(*patched, positive, negative, latent)
    blocks = tiny_models.WAN21_T2V["num_layers"]
    stage_steps = (WAN_SWITCH, WAN_STEPS - WAN_SWITCH)
    logged = [tuple(int(x) for x in c)
              for c in re.findall(r"(\d+) block calls computed, (\d+) predicted", caplog.text)]
    for watch, steps, counts in zip(watches, stage_steps, logged, strict=True):
        (sigmas,) = watch.sample_sigmas
        assert len(sigmas) == steps + 1
        assert _check_calls(watch, _mask(pack, steps), list(range(steps)), blocks) == counts
        assert {shape[0] for *_, shape in watch.calls} == {2}  # cond and uncond batched
    high_sigmas, low_sigmas = watches[0].sample_sigmas[0], watches[1].sample_sigmas[0]
    assert float(high_sigmas[-1]) == float(low_sigmas[0]) > 0 and float(low_sigmas[-1]) == 0
    psnr = latent_psnr(out, full)
    _report("wan 2.2 two stages: PSNR %.1f dB at N=%d", psnr, N)
    assert not torch.equal(out, full) and psnr > 64


# ---------------------------------------------------------------------------------------------------------
# 7. An API-format workflow with the three HyCa nodes, run by ComfyUI's own executor

# Wan 2.1 as comfy.model_detection reads it back from a file: 128-wide heads, UMT5's 4096-wide text
WAN_FILE = dict(tiny_models.WAN21_T2V, dim=128, num_heads=1, ffn_dim=256, text_dim=4096)
WAN_FILE_NAME = "hyca-test-tiny-wan21.safetensors"


class _TestConditioning:
    """Test-only node standing in for a text encoder (no encoder weights here): a seeded CONDITIONING of
    UMT5-XXL's width, as CLIPTextEncode outputs it for Wan."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"

    def encode(self, seed):
        return (sampling.text_conditioning(WAN_FILE["text_dim"], tokens=8, seed=seed)[0],)


class _Server:
    """Stands in for PromptServer, whose websocket is not involved: what execution.py reads and calls."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def _inputs(class_type, **given):
    """A node's API-format inputs: ``given`` plus the default of every other required input, so that the
    workflow keeps running when a node gains an input."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    inputs = dict(given)
    for name, entry in spec["required"].items():
        if name not in inputs:
            options = entry[1] if len(entry) > 1 else {}
            assert "default" in options or isinstance(entry[0], list), f"{class_type}.{name} needs a value"
            inputs[name] = options["default"] if "default" in options else entry[0][0]
    return inputs


def test_workflow_through_comfyui_executor(pack, monkeypatch, caplog):
    import comfy.sd
    import execution
    import folder_paths
    import nodes
    from comfy_extras.nodes_preview_any import PreviewAny
    from safetensors.torch import load_file, save_file

    # the model file, where UNETLoader looks, read back with the config it was built with
    source = tiny_models.build(WAN_FILE, seed=3)
    weights = {k: v.contiguous() for k, v in source.model.diffusion_model.state_dict().items()}
    path = f"{folder_paths.get_folder_paths('diffusion_models')[0]}/{WAN_FILE_NAME}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(weights, path)
    loaded = comfy.sd.load_diffusion_model(path)
    detected = loaded.model.model_config.unet_config
    assert {k: detected[k] for k in WAN_FILE if k in detected} == {
        k: WAN_FILE[k] for k in WAN_FILE if k in detected}
    assert type(loaded.model.model_config).__name__ == "WAN21_T2V"
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.diffusion_model.state_dict().items())

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "HyCaTestConditioning", _TestConditioning)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "PreviewAny", PreviewAny)
    steps, cfg, seed = 10, 4.0, 5
    sampling_args = dict(seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple")
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_FILE_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "HyCaTestConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "HyCaTestConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "HyCaCalibrate", "inputs": _inputs(
            "HyCaCalibrate", model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0],
            interval=N, warmup=WARMUP, save=False, **sampling_args)},
        "6": {"class_type": "HyCaApply", "inputs": _inputs(
            "HyCaApply", model=["1", 0], interval=N, warmup=WARMUP, solver_map=["5", 0])},
        "7": {"class_type": "KSampler", "inputs": _inputs(
            "KSampler", model=["6", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0],
            denoise=1.0, **sampling_args)},
        "8": {"class_type": "SaveLatent",
              "inputs": {"samples": ["7", 0], "filename_prefix": "hyca_test/hyca"}},
        "9": {"class_type": "SaveLatent",
              "inputs": {"samples": ["5", 1], "filename_prefix": "hyca_test/probe"}},
        "10": {"class_type": "HyCaSolverInspector", "inputs": {"solver_map": ["5", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        "12": {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}},
    }
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    assert set(outputs) == {"8", "9", "11", "12"}

    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        executor.execute(prompt, prompt_id, {"client_id": "hyca-test"}, outputs)
    assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
    events = [event for event, _ in server.messages]
    assert "execution_start" in events and "execution_success" in events
    history = executor.history_result["outputs"]
    assert set(history) == {"8", "9", "11", "12"}
    assert "solver mix" in history["12"]["text"][0]
    assert history["11"]["images"][0]["filename"].endswith(".png")

    def saved(node_id):
        (entry,) = history[node_id]["latents"]
        directory = folder_paths.get_output_directory()
        return load_file(os.path.join(directory, entry["subfolder"], entry["filename"]))["latent_tensor"]

    hyca, probe = saved("8"), saved("9")
    # the probe is full compute: the same sampling of the loaded model without HyCa, bit for bit
    empty = nodes.EmptyLatentImage().generate(128, 128, 1)[0]
    positive, negative = _TestConditioning().encode(1)[0], _TestConditioning().encode(2)[0]
    (reference,) = nodes.common_ksampler(loaded, seed, steps, cfg, "euler", "simple", positive, negative,
                                         empty)
    assert torch.equal(probe, reference["samples"])
    counts = _logged_counts(caplog.text)
    mask = _mask(pack, steps)
    blocks = WAN_FILE["num_layers"]
    assert counts == (int(mask.sum()) * blocks, int((~mask).sum()) * blocks)
    psnr = latent_psnr(hyca, probe)
    _report("workflow: PSNR %.1f dB at N=%d, block calls computed/predicted %s", psnr, N, counts)
    # PSNR measured: 68.2 dB
    assert not torch.equal(hyca, probe) and psnr > 63
