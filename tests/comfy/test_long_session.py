"""A long session: 200 queued runs on the same HyCa-patched models, as a ComfyUI server keeps them
between prompts.

Two models (a tiny FLUX given a map, a tiny Wan 2.1 in auto mode that calibrates from its first run long
enough), each with and without a LoRA, each at N=1 and N=2, sampled in a seeded random order at three
resolutions, batch 1 and 2, CFG 1 and 3, with euler and heun, at several step counts and denoise values, some
runs cancelled at a random step. Every completed output must be what a fresh clone gives for the same inputs:
at N=1, and while auto mode has no map, the unpatched model's, bit for bit; otherwise a fresh HyCa Apply's
with the same map. After every run, completed or not, HyCa holds nothing of it: its run state and every
residual history are freed, the MODELs' templates are pristine, and each map's run maps stay within their
bound.

A shorter session does the same among other nodes: Skip Layer Guidance before and after HyCa, Apply chained
twice, and schedules that repeat a sigma.
"""

import functools
import logging
import random
import weakref

import pytest
import torch

from harness import sampling, tiny_models
from harness.other_nodes import scheduler_sigmas, skip_layer_guidance, skip_layer_guidance_simple

RUNS = 200
FLUX = tiny_models.FLUX_SMALLEST
WAN = tiny_models.WAN21_T2V
N, WARMUP = 2, 2
SIZES = ((8, 8), (8, 12), (12, 12))  # latent height, width
STEPS = (3, 5, 6)  # 3 steps: predicted with a map, too short to calibrate from
DENOISE = (1.0, 1.0, 0.8, 0.6)  # img2img: each value a schedule of its own
CANCELLED = 0.15
OTHER_RUNS = 60


class Tracker:
    """Sees every run state when its run ends and every residual history HyCa creates, through weak references
    only, so that what it watches can be freed."""

    def __init__(self, pack, monkeypatch):
        run_state, apply_run = pack.nodes.run_state, pack.nodes.apply_run
        self.histories = weakref.WeakSet()
        self.states = []  # weak references to the run states of the current run
        self.peak_run = 0  # the most residual-history bytes one run held
        self.peak_held = 0  # the most bytes all live histories held at once
        tracker = self

        class History(run_state.ResidualHistory):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                tracker.histories.add(self)

            def push(self, residual):
                super().push(residual)
                tracker.peak_held = max(tracker.peak_held, sum(h.nbytes for h in tracker.histories))

            def push_difference(self, after, before):
                super().push_difference(after, before)
                tracker.peak_held = max(tracker.peak_held, sum(h.nbytes for h in tracker.histories))

        finish = apply_run.ApplyRunState.finish

        def finishing(state, completed, rerun=None):
            self.states.append(weakref.ref(state))
            self.peak_run = max(self.peak_run, state.peak_bytes)
            finish(state, completed, rerun)

        monkeypatch.setattr(run_state, "ResidualHistory", History)
        monkeypatch.setattr(apply_run.ApplyRunState, "finish", finishing)

    def check_released(self, templates):
        """Every run state and residual history since the last check is freed; the templates hold no run
        data."""
        assert self.states and all(ref() is None for ref in self.states)
        assert len(self.histories) == 0
        self.states.clear()
        for template in templates:
            assert not template.holds_run_data()


def _lora(model, seed):
    """A clone with a LoRA-like weight patch on every attention input projection
    (ModelPatcher.add_patches)."""
    generator = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    patches = {k: (torch.randn(weights[k].shape, generator=generator) * 0.02,)
               for k in weights if k.endswith(("qkv.weight", "self_attn.q.weight"))}
    lora = model.clone()
    assert sorted(lora.add_patches(patches, 1.0)) == sorted(patches)
    return lora


def _sample(model, conditioning, latent, steps, cfg, sampler, seed, denoise, cancel_at=None):
    """comfy.sample.sample as KSampler calls it; ``cancel_at``: the step after which the user cancels."""
    import comfy.model_management
    import comfy.sample

    def callback(step, *_):
        if step == cancel_at:
            raise comfy.model_management.InterruptProcessingException()

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", *conditioning, latent,
                               denoise=denoise, disable_pbar=True, seed=seed, callback=callback)


def test_a_long_session_of_mixed_runs(pack, tmp_path, monkeypatch):
    import comfy.model_management

    map_store = pack.nodes.map_store
    (tmp_path / "hyca").mkdir()
    monkeypatch.setattr(map_store, "search_folders", lambda: [tmp_path / "hyca", map_store.SHIPPED])
    Schedule = pack.hyca_core.schedule.Schedule
    apply_hyca = pack.nodes.apply_hyca.apply_hyca

    flux, wan = tiny_models.build(FLUX, seed=61), tiny_models.build(WAN, seed=62)
    models = {
        "flux": (flux, sampling.flux_conditioning(FLUX["context_in_dim"], FLUX["vec_in_dim"]), (16,)),
        "wan": (wan, sampling.text_conditioning(WAN["text_dim"]), (16, 1)),  # latent channels, frames
    }
    flux_map, _ = pack.nodes.calibrate_node.probe(flux, 0, 8, 1.0, "euler", "simple", *models["flux"][1],
                                                  {"samples": torch.zeros(1, 16, 8, 8)}, Schedule(N, WARMUP))
    tracker = Tracker(pack, monkeypatch)
    variants = {}  # (model, lora) -> the MODEL a LoRA loader would output
    session = {}  # (model, lora, N) -> the MODEL HyCa Apply output, kept for the whole session
    for name, (model, *_) in models.items():
        for lora in (False, True):
            variants[name, lora] = _lora(model, seed=len(variants)) if lora else model
            for interval in (1, N):
                given = flux_map if name == "flux" else None  # Wan: auto mode
                session[name, lora, interval] = apply_hyca(variants[name, lora], given,
                                                           Schedule(interval, WARMUP))
    templates = [patched.model_options["transformer_options"]["hyca"] for patched in session.values()]
    sources = {template.source for template in templates}

    draw = random.Random(7)
    references = {}
    counts = {"completed": 0, "cancelled": 0, "predicting": 0, "calibrated": 0}
    for run in range(RUNS):
        key = draw.choice(sorted(session))
        name, lora, interval = key
        _, conditioning, channels = models[name]
        height, width = draw.choice(SIZES)
        steps, denoise, seed = draw.choice(STEPS), draw.choice(DENOISE), draw.randrange(3)
        batch, cfg, sampler = draw.choice((1, 2)), draw.choice((1.0, 3.0)), draw.choice(("euler", "heun"))
        latent = torch.zeros(batch, *channels, height, width)
        if denoise < 1:
            latent = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        inputs = (conditioning, latent, steps, cfg, sampler, seed, denoise)
        what = f"run {run}: {key} {tuple(latent.shape)} steps {steps} denoise {denoise} cfg {cfg} {sampler}"

        source = session[key].model_options["transformer_options"]["hyca"].source
        solver_map = source.solver_map  # None: auto mode still waiting for a run to calibrate from
        if draw.random() < CANCELLED:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                _sample(session[key], *inputs, cancel_at=draw.randrange(steps))
            assert source.solver_map is solver_map, what  # a cancelled run calibrates nothing
            counts["cancelled"] += 1
        else:
            out = _sample(session[key], *inputs)
            full = interval == 1 or solver_map is None
            reference_key = (name, lora, interval if not full else 1, id(solver_map) if not full else None,
                             tuple(latent.shape), inputs[2:])
            if reference_key not in references:
                fresh = variants[name, lora] if full else apply_hyca(variants[name, lora], solver_map,
                                                                     Schedule(interval, WARMUP))
                references[reference_key] = _sample(fresh, *inputs)
            assert torch.equal(out, references[reference_key]), what
            counts["completed"] += 1
            counts["predicting"] += not full
            if solver_map is None and source.solver_map is not None:
                counts["calibrated"] += 1
                assert interval == N and steps >= pack.hyca_core.solver_map.MIN_PROBE_STEPS, what
        tracker.check_released(templates)
        assert all(len(s.run_maps) <= pack.nodes.map_source.RUN_MAPS_KEPT for s in sources), what

    assert counts["calibrated"] == 2  # the two Wan Applies at N=2, each from its own first run long enough
    assert counts["cancelled"] > 10 and counts["predicting"] > 50, counts
    # the bound was reached
    assert any(len(s.run_maps) == pack.nodes.map_source.RUN_MAPS_KEPT for s in sources)
    run_maps = sum(t.nbytes for s in sources for c in s.run_maps for table in c.tables.values()
                   for t in table.values())
    logging.getLogger(__name__).warning(
        "measured: %d runs (%s), %d references; residual histories at most %.1f KB in one run, "
        "%.1f KB live at once, 0 after every run; run maps held at the end %.1f KB",
        RUNS, counts, len(references), tracker.peak_run / 1024, tracker.peak_held / 1024, run_maps / 1024)


def test_a_long_session_among_other_nodes(pack, monkeypatch):
    """Every output is what a fresh build of its graph gives (Apply chained twice: a single Apply with the
    second's settings), or where the schedule repeats a sigma, the graph without HyCa's, bit for bit; nothing
    of a run stays."""
    import comfy.sample
    import comfy.samplers

    Schedule = pack.hyca_core.schedule.Schedule
    flux = tiny_models.build(FLUX, seed=63)
    conditioning = sampling.flux_conditioning(FLUX["context_in_dim"], FLUX["vec_in_dim"])
    flux_map, _ = pack.nodes.calibrate_node.probe(flux, 0, 8, 1.0, "euler", "simple", *conditioning,
                                                  {"samples": torch.zeros(1, 16, 8, 8)}, Schedule(N, WARMUP))

    def apply(model, interval=N):
        return pack.nodes.apply_hyca.apply_hyca(model, flux_map, Schedule(interval, WARMUP))

    slg, slg_simple = skip_layer_guidance, functools.partial(skip_layer_guidance_simple, end_percent=0.5)
    graphs = {  # name -> (the graph with HyCa, a fresh graph it must equal, the graph without HyCa)
        "slg-after-hyca": (lambda: slg(apply(flux)), lambda: slg(apply(flux)), lambda: slg(flux)),
        "slg-before-hyca": (lambda: apply(slg(flux)), lambda: apply(slg(flux)), lambda: slg(flux)),
        "slg-simple": (lambda: apply(slg_simple(flux)), lambda: apply(slg_simple(flux)),
                       lambda: slg_simple(flux)),
        "apply-twice": (lambda: apply(apply(flux, 3)), lambda: apply(flux), lambda: flux),
    }
    tracker = Tracker(pack, monkeypatch)
    session = {name: build() for name, (build, *_) in graphs.items()}
    templates = [model.model_options["transformer_options"][pack.nodes.run_state.OPTIONS_KEY]
                 for model in session.values()]

    def run(model, sigmas, cfg, sampler, seed):
        latent = torch.zeros(1, 16, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler), sigmas,
                                          *conditioning, latent, disable_pbar=True, seed=seed)

    draw = random.Random(11)
    references = {}
    for index in range(OTHER_RUNS):
        name = draw.choice(sorted(graphs))
        steps, cfg, seed = draw.choice(STEPS[1:]), draw.choice((1.0, 3.0)), draw.randrange(2)
        sampler, repeated = draw.choice(("euler", "heun")), draw.random() < 0.3
        sigmas = scheduler_sigmas(flux, steps)
        if repeated:
            sigmas = torch.cat([sigmas[:3], sigmas[2:]])
        out = run(session[name], sigmas, cfg, sampler, seed)
        key = (name, steps, cfg, seed, sampler, repeated)
        if key not in references:
            references[key] = run(graphs[name][2 if repeated else 1](), sigmas, cfg, sampler, seed)
        assert torch.equal(out, references[key]), f"run {index}: {key}"
        tracker.check_released(templates)
    assert len(references) > OTHER_RUNS // 3
