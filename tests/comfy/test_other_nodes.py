"""HyCa among other nodes that patch or call the model, on a tiny real FLUX with ComfyUI's real samplers.

Skip Layer Guidance calls the model a second time at a step's sigma with blocks skipped: that call caches
apart from the sampler's and never reads or writes their cache. A block patch another node put on the model
is run as the block, whichever node comes first. A second HyCa on a model (Apply chained twice, Calibrate on
Apply's output) replaces the first. A schedule whose sigmas do not strictly decrease computes fully.
"""

import functools
import logging

import pytest
import torch

from harness import sampling, tiny_models
from harness.other_nodes import scheduler_sigmas, skip_layer_guidance, skip_layer_guidance_simple
from harness.metrics import latent_psnr

LATENT = (1, 16, 16, 16)
STEPS = 10
N, WARMUP = 2, 2
EXTRA = "model calls with other nodes' patches (Skip Layer Guidance ...) kept apart"


def _apply(pack, model, solver_map, interval=N, **kwargs):
    schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=WARMUP)
    return pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule, **kwargs)


def _sample(model, conditioning, cfg=1.0, steps=STEPS):
    return sampling.sample(model, *conditioning, torch.zeros(LATENT), steps=steps, cfg=cfg, seed=5)


def _slg_pass_without_hyca(pack, model):
    """A clone whose Skip Layer Guidance pass runs on a model options copy without HyCa's state: the pass is
    the unpatched model's, and HyCa never sees it."""
    key = pack.nodes.run_state.OPTIONS_KEY

    def without_hyca(post_cfg, args):
        options = dict(args["model_options"])
        options["transformer_options"] = {k: v for k, v in options["transformer_options"].items() if k != key}
        return post_cfg({**args, "model_options": options})

    clone = model.clone()
    functions = clone.model_options["sampler_post_cfg_function"]
    functions[:] = [functools.partial(without_hyca, f) for f in functions]
    return clone


def _stacked(pack):
    """A tiny FLUX of two double and two single blocks, its conditioning and a stack-granularity map."""
    config = tiny_models.FLUX
    flux = tiny_models.build(config, seed=3)
    conditioning = sampling.flux_conditioning(config["context_in_dim"], config["vec_in_dim"])
    stack_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, granularity="stack")
    return flux, conditioning, stack_map


class HistoryAudit:
    """Wraps every HyCa block patch of a model and watches one block. Keeps the residual it computes in each
    call under that call's branches (one per conditioning, its rows), and at each call that predicts it, notes
    whether each history predicted from is exactly the residuals computed for that branch. Tells another
    node's extra passes from the sampler's own calls (``extra(options, wrappers)``; by default: a dit patch
    that is not one of these wrappers, as Skip Layer Guidance's) and notes the branches of each."""

    def __init__(self, pack, patched, block=("single_block", 0), extra=None):
        self.current_call = pack.nodes.run_state.current_call
        self.block, self.key = block, f"{block[0]}.{block[1]}.img"
        self.extra = extra or (lambda options, wrappers: any(
            options["patches_replace"]["dit"].get(k) is not w for k, w in wrappers.items()))
        dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        self.wrappers = {}
        for key, patch in list(dit.items()):
            dit[key] = self.wrappers[key] = functools.partial(self._call, key, patch)
        self.residuals = {}  # (branch, step) -> the block's computed residual
        self.branches = {"own": set(), "extra": set()}
        self.predicted = {"own": 0, "extra": 0}
        self.stale = 0

    def _call(self, key, patch, args, extra):
        options = args["transformer_options"]
        call = self.current_call(options)
        if key != self.block or call is None:
            return patch(args, extra)
        kind = "extra" if self.extra(options, self.wrappers) else "own"
        self.branches[kind].add(tuple(id(p.branch) for p in call.parts))
        if call.predict:
            self.predicted[kind] += 1
            for part in call.parts:
                views = part.branch.histories[self.key].views()
                expected = [self.residuals.get((id(part.branch), s)) for s in part.branch.steps][-len(views):]
                self.stale += not all(e is not None and torch.equal(v, e) for v, e in zip(views, expected))
            return patch(args, extra)
        before = args["img"].clone()
        out = patch(args, extra)
        for part in call.parts:
            self.residuals[id(part.branch), int(call.step)] = call.rows(out["img"] - before, part)
        return out


# ---------------------------------------------------------------------------------------------------------
# 1. Skip Layer Guidance's extra model calls


@pytest.mark.parametrize("order", ["slg-after-hyca", "slg-before-hyca"])
def test_skip_layer_guidance_pass_caches_apart(pack, flux, solver_map, conditioning, order, caplog):
    """At cfg 1 (FLUX's usual setting) the skipped pass has the cond's branch and sigma: it was taken for a
    second evaluation of the step and its residuals replaced the real ones. It caches in a branch of its
    own, predicted at the steps the sampler's are."""
    def build(interval):
        if order == "slg-after-hyca":
            return skip_layer_guidance(_apply(pack, flux, solver_map, interval))
        return _apply(pack, skip_layer_guidance(flux), solver_map, interval)

    full = _sample(skip_layer_guidance(flux), conditioning)
    assert not torch.equal(full, _sample(flux, conditioning))  # the guidance acts
    assert torch.equal(_sample(build(1), conditioning), full)

    patched = build(N)
    audit = HistoryAudit(pack, patched)
    with caplog.at_level(logging.INFO):
        out = _sample(patched, conditioning)
    predicted_steps = int((~pack.hyca_core.schedule.Schedule(N, WARMUP).mask(STEPS)).sum())
    assert audit.predicted == {"own": predicted_steps, "extra": predicted_steps} and audit.stale == 0
    assert len(audit.branches["own"]) == len(audit.branches["extra"]) == 1
    assert not audit.branches["own"] & audit.branches["extra"]
    assert f"; {STEPS} {EXTRA}" in caplog.text
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: SLG %s, N=%d: PSNR %.1f dB", order, N, value)
    assert not torch.equal(out, full) and value > 55  # measured 60.2 dB; scale 3 magnifies the cond's error


def test_skip_layer_guidance_inside_a_stack_computes_its_pass(pack, caplog):
    """A pass that skips a block inside a stack unit cannot use the stack's residuals: it computes fully and
    keeps nothing, as the unpatched model computes it."""
    flux, conditioning, stack_map = _stacked(pack)
    full = _sample(skip_layer_guidance(flux), conditioning)
    exact = skip_layer_guidance(_apply(pack, flux, stack_map, 1, granularity="stack"))
    assert torch.equal(_sample(exact, conditioning), full)
    patched = skip_layer_guidance(_apply(pack, flux, stack_map, granularity="stack"))
    out = _sample(patched, conditioning)
    assert torch.equal(out, _sample(_slg_pass_without_hyca(pack, patched), conditioning))
    assert not torch.equal(out, full)


def test_skip_layer_guidance_simple_keeps_its_window_apart(pack, flux, solver_map, conditioning):
    """The simple variant skips layers in the unconditional pass inside its window only: the plain passes
    outside it never predict from the skipped ones."""
    end, cfg = 0.5, 3.0
    full = _sample(skip_layer_guidance_simple(flux, end), conditioning, cfg)
    exact = _apply(pack, skip_layer_guidance_simple(flux, end), solver_map, 1)
    assert torch.equal(_sample(exact, conditioning, cfg), full)
    patched = _apply(pack, skip_layer_guidance_simple(flux, end), solver_map)
    audit = HistoryAudit(pack, patched)
    out = _sample(patched, conditioning, cfg)
    assert audit.predicted["own"] > 0 and audit.predicted["extra"] > 0 and audit.stale == 0
    assert not audit.branches["own"] & audit.branches["extra"]
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: SLG simple, cfg %.0f, N=%d: PSNR %.1f dB", cfg, N, value)
    assert not torch.equal(out, full) and value > 60  # measured 65.8 dB


def _weakened_text_guidance(model):
    """A guidance trick as a node would build it with ComfyUI's own mechanisms: after CFG, a second
    conditional pass at the step's sigma whose text stream a "post_input" patch weakens, pushed away
    from."""
    import comfy.samplers

    def weaken(inputs):
        return {**inputs, "txt": inputs["txt"] * 0.5}

    def post_cfg(args):
        options = args["model_options"].copy()
        transformer_options = options["transformer_options"] = options["transformer_options"].copy()
        patches = transformer_options["patches"] = dict(transformer_options.get("patches", {}))
        patches["post_input"] = patches.get("post_input", []) + [weaken]
        (weak,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                  options)
        return args["denoised"] + (args["cond_denoised"] - weak)

    guided = model.clone()
    guided.set_model_sampler_post_cfg_function(post_cfg)
    return guided


def test_a_guidance_pass_with_list_patches_caches_apart(pack, flux, solver_map, conditioning):
    """Not only replacement patches: a pass that adds a patch to a list (here "post_input") is another's
    too."""
    full = _sample(_weakened_text_guidance(flux), conditioning)
    assert not torch.equal(full, _sample(flux, conditioning))
    exact = _weakened_text_guidance(_apply(pack, flux, solver_map, 1))
    assert torch.equal(_sample(exact, conditioning), full)
    patched = _weakened_text_guidance(_apply(pack, flux, solver_map))
    audit = HistoryAudit(pack, patched, extra=lambda options, _: "post_input" in options.get("patches", {}))
    out = _sample(patched, conditioning)
    assert audit.predicted["own"] > 0 and audit.predicted["extra"] > 0 and audit.stale == 0
    assert not audit.branches["own"] & audit.branches["extra"]
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: a list-patch guidance pass, N=%d: PSNR %.1f dB", N, value)
    assert not torch.equal(out, full) and value > 65  # measured 70.5 dB


# ---------------------------------------------------------------------------------------------------------
# 2. Block patches of other nodes


def _halved(args, extra):
    """Another node's dit patch: the block adds half its residual (IPAdapter-style packs reshape blocks)."""
    before = {s: args[s].clone() for s in ("img", "txt") if s in args}
    out = extra["original_block"](args)
    return {**out, **{s: before[s] + 0.5 * (out[s] - before[s]) for s in before}}


def _with_patch(model, block=("double_block", 0)):
    patched = model.clone()
    patched.set_model_patch_replace(_halved, "dit", *block)
    return patched


def test_a_block_patch_placed_before_hyca_is_run_as_the_block(pack, flux, solver_map, conditioning, caplog):
    foreign = _with_patch(flux)
    full = _sample(foreign, conditioning)
    assert not torch.equal(full, _sample(flux, conditioning))
    with caplog.at_level(logging.INFO):
        assert torch.equal(_sample(_apply(pack, foreign, solver_map, 1), conditioning), full)
    assert "1 blocks carry another node's patch (double_block.0)" in caplog.text
    # a second HyCa replaces the first and keeps the other node's patch
    twice = _apply(pack, _apply(pack, foreign, solver_map), solver_map, 1)
    assert torch.equal(_sample(twice, conditioning), full)
    patched = _apply(pack, foreign, solver_map)
    audit = HistoryAudit(pack, patched, block=("double_block", 0))
    out = _sample(patched, conditioning)
    assert audit.predicted["own"] > 0 and audit.stale == 0
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: a foreign block patch, N=%d: PSNR %.1f dB", N, value)
    assert not torch.equal(out, full) and value > 68  # measured 73.2 dB


def test_a_block_patch_placed_after_hyca(pack, flux, solver_map, conditioning):
    """Per block, HyCa's patch of that block no longer runs: the block computes at every step."""
    full = _sample(_with_patch(flux), conditioning)
    assert torch.equal(_sample(_with_patch(_apply(pack, flux, solver_map, 1)), conditioning), full)
    out = _sample(_with_patch(_apply(pack, flux, solver_map)), conditioning)
    value = latent_psnr(out, full)
    logging.getLogger(__name__).warning("measured: a block patch after HyCa, N=%d: PSNR %.1f dB", N, value)
    assert not torch.equal(out, full) and value > 69  # measured 74.2 dB


def test_a_block_patch_placed_after_hyca_inside_a_stack_computes_the_run(pack, caplog):
    """A stack's prediction is added at its first block and its residual taken at its last: a block of it
    replaced after HyCa breaks both, so the run computes fully, with a warning."""
    flux, conditioning, stack_map = _stacked(pack)
    for block in (("double_block", 0), ("double_block", 1), ("single_block", 1)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patched = _with_patch(_apply(pack, flux, stack_map, granularity="stack"), block)
            out = _sample(patched, conditioning)
        assert torch.equal(out, _sample(_with_patch(flux, block), conditioning)), block
        assert f"replaced blocks of {block[0]}s; this run computes fully" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# 3. A second HyCa on one model


CHAINS = {  # the first HyCa's granularity and interval, the second's
    "apply-apply": (("block", N), ("block", 3)),
    "apply-block-then-model": (("block", N), ("model", N)),
    "apply-model-then-block": (("model", N), ("block", N)),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_second_apply_replaces_the_first(pack, flux, solver_map, conditioning, chain, caplog):
    (granularity, interval), (second_granularity, second_interval) = CHAINS[chain]
    model_map = sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP, granularity="model")
    maps = {"block": solver_map, "model": model_map}
    first = _apply(pack, flux, maps[granularity], interval, granularity=granularity)
    with caplog.at_level(logging.WARNING):
        second = _apply(pack, first, maps[second_granularity], second_interval,
                        granularity=second_granularity)
    alone = _apply(pack, flux, maps[second_granularity], second_interval, granularity=second_granularity)
    assert torch.equal(_sample(second, conditioning), _sample(alone, conditioning))
    assert caplog.text.count("this model already has HyCa on it") == 1
    assert torch.equal(_sample(first, conditioning), _sample(_apply(pack, flux, maps[granularity], interval,
                                                                    granularity=granularity), conditioning))


def test_calibrate_on_an_applied_model_probes_at_full_compute(pack, flux, solver_map, conditioning):
    Schedule = pack.hyca_core.schedule.Schedule
    latent = {"samples": torch.zeros(LATENT)}

    def probe(model):
        return pack.nodes.calibrate_node.probe(model, 0, 12, 1.0, "euler", "simple", *conditioning, latent,
                                               Schedule(N, WARMUP))

    chained_map, chained_latent = probe(_apply(pack, flux, solver_map))
    plain_map, plain_latent = probe(flux)
    assert torch.equal(chained_latent["samples"], plain_latent["samples"])
    assert torch.equal(_sample(_apply(pack, flux, chained_map), conditioning),
                       _sample(_apply(pack, flux, plain_map), conditioning))


# ---------------------------------------------------------------------------------------------------------
# 4. Schedules whose sigmas do not strictly decrease


def _schedules(flux):
    from comfy_extras.nodes_custom_sampler import SetFirstSigma

    sigmas = scheduler_sigmas(flux, STEPS)
    return {
        "repeated": torch.cat([sigmas[:7], sigmas[6:]]),
        "set-first-sigma": SetFirstSigma.execute(sigmas, 0.5)[0],
        "bump": torch.cat([sigmas[:3], sigmas[1:2], sigmas[3:]]),
    }


@pytest.mark.parametrize("name", ["repeated", "set-first-sigma", "bump"])
def test_sigmas_that_do_not_decrease_compute_fully(pack, flux, solver_map, conditioning, name, caplog):
    import comfy.sample
    import comfy.samplers

    sigmas = _schedules(flux)[name]
    noise = comfy.sample.prepare_noise(torch.zeros(LATENT), 5)

    def run(model):
        return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          *conditioning, torch.zeros(LATENT), disable_pbar=True, seed=5)

    patched = _apply(pack, flux, solver_map)
    with caplog.at_level(logging.WARNING):
        out = run(patched)
    assert torch.equal(out, run(flux))
    assert caplog.text.count("sigmas do not decrease") == 1


@pytest.mark.parametrize("name", ["repeated", "bump"])
def test_sigmas_that_do_not_decrease_calibrate_nothing(pack, conditioning, name, tmp_path, monkeypatch,
                                                       caplog):
    """Auto mode (no map yet) records nothing from such a run: a map fitted on it would not load."""
    import comfy.sample
    import comfy.samplers

    map_store = pack.nodes.map_store
    monkeypatch.setattr(map_store, "search_folders", lambda: [tmp_path])
    model = tiny_models.build(tiny_models.FLUX_SMALLEST, seed=41)
    sigmas = _schedules(model)[name]
    noise = comfy.sample.prepare_noise(torch.zeros(LATENT), 5)
    patched = _apply(pack, model, None)
    with caplog.at_level(logging.WARNING):
        out = comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                         *conditioning, torch.zeros(LATENT), disable_pbar=True, seed=5)
    assert torch.isfinite(out).all()
    assert caplog.text.count("sigmas do not decrease") == 1
    assert patched.model_options["transformer_options"]["hyca"].source.solver_map is None
    assert list(tmp_path.iterdir()) == []


def test_patches_a_hook_adds_while_the_run_is_prepared_are_the_samplers(pack, flux, solver_map, conditioning,
                                                                        caplog):
    """A TransformerOptionsHook on the conditioning adds its patches to every call once ComfyUI prepares the
    run: the sampler's calls, not another node's."""
    import comfy.hooks

    def shift(inputs):
        return {**inputs, "img": inputs["img"] + 0.1}

    hooks = comfy.hooks.HookGroup()
    hooks.add(comfy.hooks.TransformerOptionsHook({"patches": {"post_input": [shift]}}))
    hooked = tuple(comfy.hooks.set_hooks_for_conditioning(c, hooks) for c in conditioning)
    full = _sample(flux, hooked)
    assert not torch.equal(full, _sample(flux, conditioning))  # the hook acts
    with caplog.at_level(logging.INFO):
        out = _sample(_apply(pack, flux, solver_map), hooked)
    assert "block calls computed" in caplog.text and "kept apart" not in caplog.text
    assert latent_psnr(out, full) > 60
