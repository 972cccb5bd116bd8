"""The test runtime is the real ComfyUI: its model classes, ModelPatcher and samplers."""

import torch

from harness import sampling, tiny_models


def test_tiny_flux_samples_20_steps_through_comfy_sampler():
    import comfy.ldm.flux.model
    import comfy.model_patcher

    patcher = tiny_models.build(tiny_models.FLUX)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(patcher.model.diffusion_model, comfy.ldm.flux.model.Flux)

    calls = []
    patcher.set_model_unet_function_wrapper(lambda apply, args: calls.append(args["timestep"])
                                            or apply(args["input"], args["timestep"], **args["c"]))
    positive, negative = sampling.flux_conditioning(tiny_models.FLUX["context_in_dim"],
                                                    tiny_models.FLUX["vec_in_dim"])
    latent = torch.zeros(1, 16, 16, 16)
    out = sampling.sample(patcher, positive, negative, latent, steps=20, seed=3)

    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert len(calls) == 20  # cfg 1: one model call per Euler step
    again = sampling.sample(patcher, positive, negative, latent, steps=20, seed=3)
    assert torch.equal(out, again)  # deterministic on CPU
    other_seed = sampling.sample(patcher, positive, negative, latent, steps=20, seed=4)
    assert not torch.allclose(out, other_seed)
