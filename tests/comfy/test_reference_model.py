"""The trained reference model: stock ComfyUI loading, its samples' unused channels, the exact latent
mapping."""

import numpy as np
import pytest
import torch

from harness import reference_data, reference_model
from harness.metrics import latent_psnr


@pytest.fixture(scope="module")
def model():
    return reference_model.load()


def test_weights_load_through_comfy_stock_loader():
    import comfy.ldm.wan.model
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    path = reference_model.WEIGHTS
    assert path.stat().st_size < 20e6
    state = comfy.utils.load_torch_file(str(path))
    assert "patch_embedding.weight" in state and "blocks.0.self_attn.q.weight" in state
    detected = comfy.model_detection.detect_unet_config(state, "")
    assert detected == reference_model.UNET_CONFIG

    patcher = comfy.sd.load_diffusion_model(str(path))  # what the UNETLoader node calls
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(patcher.model.model_config, comfy.supported_models.WAN21_T2V)
    wan = patcher.model.diffusion_model
    assert type(wan) is comfy.ldm.wan.model.WanModel
    assert len(wan.blocks) == reference_model.UNET_CONFIG["num_layers"]
    assert wan.text_dim == reference_model.TEXT_DIM
    for key, value in wan.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    assert patcher.model.model_sampling.shift == 8.0  # the stock WAN21_T2V setting

    shifted = reference_model.load()
    assert shifted.get_model_object("model_sampling").shift == reference_model.SHIFT


def test_samples_leave_unused_channels_near_zero(model):
    """The 4 latent channels the image mapping leaves empty stay near their model-space zero in samples
    (the class check of the samples is shared: test_reference_models.py)."""
    labels = np.arange(reference_data.NUM_CLASSES)
    latent = reference_model.sample(model, labels, seed=2024, steps=20, cfg=reference_model.CFG)
    assert latent.shape == (len(labels), 16, 1, 16, 16)
    assert reference_model.decode(latent).shape == (len(labels), 32, 32, 3)
    mean, std = reference_model.latent_stats(latent.device, latent.dtype)
    z = (latent - mean) / std
    assert z[:, reference_model.IMAGE_CHANNELS:].abs().mean() < 0.1


def test_encode_decode_are_exact_inverses():
    import comfy.latent_formats

    images, _ = reference_data.make_dataset(8, seed=3)
    pixels = torch.from_numpy(images).float() / 255
    latent = reference_model.encode(pixels)
    assert latent.shape == (8, 16, 1, 16, 16)
    assert torch.allclose(reference_model.decode(latent), pixels, atol=1e-6)
    random = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reference_model.decode(reference_model.encode(random)), random, atol=1e-6)
    # ComfyUI's own process_in gives the model-space latent: image channels in [-1, 1], the rest zero
    z = comfy.latent_formats.Wan21().process_in(latent)
    assert torch.allclose(z, reference_model.image_to_model_space(pixels), atol=1e-5)
    assert z[:, :reference_model.IMAGE_CHANNELS].abs().max() <= 1 + 1e-5
    assert z[:, reference_model.IMAGE_CHANNELS:].abs().max() < 1e-5


def test_conditioning_format():
    positive = reference_model.conditioning(3)
    assert len(positive) == 1 and positive[0][1] == {}
    assert positive[0][0].shape == (1, reference_model.CONTEXT_TOKENS, reference_model.TEXT_DIM)
    assert torch.equal(positive[0][0], reference_model.conditioning(3)[0][0])  # fixed, seeded
    assert not torch.equal(positive[0][0], reference_model.conditioning(4)[0][0])
    batch = reference_model.conditioning([0, 1, 2])[0][0]
    assert batch.shape[0] == 3 and torch.equal(batch[2:3], reference_model.conditioning(2)[0][0])
    negative = reference_model.unconditional()[0][0]
    assert not any(torch.equal(negative, reference_model.conditioning(c)[0][0]) for c in range(10))


def test_default_hyca_beats_fewer_steps_and_uniform_taylor(pack, model):
    """HyCa Apply with its default knobs (N=6) and the shipped map, on the trained model: closer to
    50-step full compute than ComfyUI's best stock sampler run for as many steps as HyCa computes,
    and than uniform first-order Taylor on the same schedule. Measured (10 images): HyCa 40.0 dB,
    dpmpp_2m 36.3 dB, Taylor 1 36.4 dB."""
    interval, steps = 6, 50
    labels = list(range(reference_data.NUM_CLASSES))
    node = pack.nodes.apply_node.HyCaApply
    defaults = {i.id: i.default for i in node.define_schema().inputs
                if getattr(i, "default", None) is not None}

    def output(patched, sampler="euler", count=steps):
        sampled = reference_model.sample(patched, labels, seed=100, steps=count, sampler=sampler)
        return reference_model.decode(sampled)

    full = output(model)
    (hyca,) = node.execute(model, **{**defaults, "interval": interval}).result
    # the warm-up HyCa Apply runs (no map given)
    schedule = pack.hyca_core.schedule.Schedule(interval=interval)
    taylor = pack.nodes.apply_hyca.apply_hyca(model, None, schedule, fitted=False,
                                              single_solver=("taylor1", "step"))
    computed = int(schedule.mask(steps).sum())
    outputs = {"hyca": output(hyca), "taylor": output(taylor), "fewer": output(model, "dpmpp_2m", computed)}
    quality = {name: latent_psnr(out, full) for name, out in outputs.items()}
    assert quality["hyca"] >= quality["fewer"] + 1.0, quality
    assert quality["hyca"] >= quality["taylor"] + 1.5, quality
