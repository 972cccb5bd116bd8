"""FLUX's text-token projection, pooled-vector embedding and rotary position embedding read the prompt or
the token grid alone: under HyCa they compute once per run and conditioning, give the same bits, let LoRA
patches reach their weights, and hold nothing after the run."""

import functools
import sys

import torch
from harness import sampling
from torch.overrides import TorchFunctionMode


class _LinearCalls(TorchFunctionMode):
    """Counts F.linear calls by the weight they multiply with."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.calls = {name: 0 for name in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            for name, w in self.weights.items():
                if weight is w:
                    self.calls[name] += 1
        return func(*args, **kwargs)


def _run_constant_layer_calls(model, run, monkeypatch):
    """The text layers' calls by their weights; the position embedder's by its rotary function's calls
    (one per axis)."""
    diffusion_model = model.model.diffusion_model
    counter = _LinearCalls({"txt_in": diffusion_model.txt_in.weight,
                            "vector_in": diffusion_model.vector_in.in_layer.weight})
    layers = sys.modules[type(diffusion_model.pe_embedder).__module__]
    rope, axes = layers.rope, len(diffusion_model.pe_embedder.axes_dim)
    rope_calls = [0]

    def counted_rope(*args):
        rope_calls[0] += 1
        return rope(*args)

    with monkeypatch.context() as patch, counter:
        patch.setattr(layers, "rope", counted_rope)
        out = run()
    assert rope_calls[0] % axes == 0
    return out, {**counter.calls, "pe_embedder": rope_calls[0] // axes}


def _without_run_constant_layers(pack, model):
    plain = model.clone()
    for path in [p for p, patch in plain.object_patches.items()
                 if isinstance(patch, pack.nodes.run_constant_layers.OncePerRun)]:
        del plain.object_patches[path]
    return plain


def test_run_constant_layers_compute_once_per_run_with_the_same_bits(pack, flux, solver_map, conditioning,
                                                                     latent, steps, apply_every, monkeypatch):
    hyca = apply_every(flux, solver_map, 4)
    plain = _without_run_constant_layers(pack, hyca)
    cfg2 = dict(cfg=2.0, seed=5)
    for settings in (dict(seed=5), cfg2):  # one conditioning, then a positive and a negative
        run, run_plain = (functools.partial(sampling.sample, model, *conditioning, latent, steps=steps,
                                            **settings) for model in (hyca, plain))
        out, calls = _run_constant_layer_calls(flux, run, monkeypatch)
        expected, plain_calls = _run_constant_layer_calls(flux, run_plain, monkeypatch)
        assert torch.equal(out, expected)
        assert plain_calls["txt_in"] == plain_calls["vector_in"] == plain_calls["pe_embedder"] >= steps
        assert 1 <= calls["txt_in"] == calls["vector_in"] <= 2
        assert calls["pe_embedder"] == 1  # one token grid, whatever the prompt
    held = [patch.seen for patch in hyca.object_patches.values()
            if isinstance(patch, pack.nodes.run_constant_layers.OncePerRun)]
    assert len(held) == 3 and not any(held)  # released at the end of the run


def test_a_lora_on_the_text_projection_reaches_it(pack, flux, solver_map, conditioning, latent, steps,
                                                  apply_every):
    """A weight patch on txt_in applies under HyCa: at N=1 (every step computed) the run is the patched
    model's without HyCa, and differs from the unpatched one."""
    lora = flux.clone()
    weight = flux.model.diffusion_model.txt_in.weight
    lora.add_patches({"diffusion_model.txt_in.weight": ("diff", (0.5 * torch.ones_like(weight),))}, 1.0)
    hyca = apply_every(lora, solver_map, 1)
    out = sampling.sample(hyca, *conditioning, latent, steps=steps, seed=5)
    assert torch.equal(out, sampling.sample(lora, *conditioning, latent, steps=steps, seed=5))
    assert not torch.equal(out, sampling.sample(flux, *conditioning, latent, steps=steps, seed=5))
