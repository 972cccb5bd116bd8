"""The FLUX-layout reference model: its loader, the exact latent mapping, and the out-of-place training
forward it was trained with (its samples' class check is shared: test_reference_models.py)."""

import pytest
import torch

from harness import flux_training, reference_flux, shapes_data, tiny_models


def test_stock_detection_cannot_size_a_small_flux():
    """Why the model ships with its own loader: ComfyUI's detection fixes FLUX.1's 24 heads of 128,
    so the stock loader fails on a width-128 FLUX."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(str(reference_flux.WEIGHTS))
    detected = comfy.model_detection.detect_unet_config(state, "")
    assert {**detected, **reference_flux.HEADS} == reference_flux.UNET_CONFIG
    assert (detected["num_heads"], detected["axes_dim"]) == (24, [16, 56, 56])
    with pytest.raises(ValueError, match="Hidden size 128 must be divisible by num_heads 24"):
        comfy.sd.load_diffusion_model(str(reference_flux.WEIGHTS))


def test_weights_load_as_comfy_flux():
    import comfy.ldm.flux.model
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    path = reference_flux.WEIGHTS
    assert path.stat().st_size <= 10e6
    state = comfy.utils.load_torch_file(str(path))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert "img_in.weight" in state and "double_blocks.0.img_attn.qkv.weight" in state
    assert "single_blocks.0.linear1.weight" in state and "vector_in.in_layer.weight" in state

    patcher = reference_flux.load(shift=None)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert type(patcher.model.model_config) is comfy.supported_models.FluxSchnell
    flux = patcher.model.diffusion_model
    assert type(flux) is comfy.ldm.flux.model.Flux
    assert (len(flux.double_blocks), len(flux.single_blocks)) == (2, 4)
    assert flux.num_heads == reference_flux.HEADS["num_heads"]
    for key, value in flux.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    assert patcher.model.model_sampling.shift == 1.0  # FluxSchnell's stock setting
    shifted = reference_flux.load()
    assert shifted.get_model_object("model_sampling").shift == reference_flux.SHIFT
    assert shifted.get_model_object("model_sampling").multiplier == 1.0


def test_encode_decode_are_exact_inverses():
    import comfy.latent_formats

    images, _ = shapes_data.make_dataset(8, seed=3)
    pixels = torch.from_numpy(images).float() / 255
    latent = reference_flux.encode(pixels)
    assert latent.shape == (8, 16, 16, 16)
    assert torch.allclose(reference_flux.decode(latent), pixels, atol=1e-6)
    z = comfy.latent_formats.Flux().process_in(latent)  # what ComfyUI feeds the transformer
    assert torch.allclose(z, reference_flux.image_to_model_space(pixels), atol=1e-5)
    assert z[:, 12:].abs().max() < 1e-5


def test_conditioning_format():
    (context, options), = reference_flux.conditioning(3)
    assert context.shape == (1, reference_flux.CONTEXT_TOKENS, reference_flux.CONTEXT_DIM)
    assert options["pooled_output"].shape == (1, reference_flux.POOLED_DIM)
    again = reference_flux.conditioning(3)[0]
    assert torch.equal(context, again[0]) and torch.equal(options["pooled_output"], again[1]["pooled_output"])
    batch_context, batch_options = reference_flux.conditioning([0, 3])[0]
    assert torch.equal(batch_context[1:], context)
    assert torch.equal(batch_options["pooled_output"][1:], options["pooled_output"])
    negative = reference_flux.unconditional()[0][0]
    assert not any(torch.equal(negative, reference_flux.conditioning(c)[0][0]) for c in range(10))


def test_out_of_place_forward_equals_comfy_and_trains():
    """On random (not adaLN-zero) weights the training forward gives ComfyUI's output, and unlike
    ComfyUI's in-place blocks it can be differentiated."""
    _, flux = reference_flux.build_untrained(seed=0)
    tiny_models.initialize(flux, seed=1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 16, 16, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9])
    context, pooled = reference_flux.condition_tensors([0, 4, shapes_data.NUM_CLASSES])
    assert flux_training.check_matches_comfy(flux, x, t, context, pooled, atol=1e-4) < 1e-4

    with pytest.raises(RuntimeError, match="inplace"):
        flux(x, t, context, y=pooled, transformer_options={}).square().mean().backward()
    flux.zero_grad()
    with reference_flux.training_forward(flux) as velocity:
        velocity(x, t, [0, 4, shapes_data.NUM_CLASSES]).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flux.parameters())
    assert flux.double_blocks[0].img_attn.qkv.weight.grad.abs().sum() > 0
