"""The SD3-layout reference model, weight-free: the stock loader reads its file, the exact latent
mapping, its conditioning with a pooled vector and negative prompt, an initialization with no
uninitialized memory left, and a training forward that is ComfyUI's own."""

import pytest
import torch
from safetensors.torch import save_file

from harness import reference_sd3, textures_data, tiny_models


@pytest.fixture(scope="module")
def untrained():
    return reference_sd3.build_untrained(seed=0)[1]


def test_the_stock_loader_reads_its_file(tmp_path, untrained):
    with pytest.raises(FileNotFoundError, match="--model sd3"):
        reference_sd3.load(tmp_path / "absent.safetensors")
    path = tmp_path / "sd3.safetensors"
    save_file(reference_sd3.state_dict_for_file(untrained), str(path))
    model = reference_sd3.load(path)
    assert type(model.model).__name__ == "SD3"
    assert model.model.diffusion_model.hidden_size == reference_sd3.WIDTH
    assert model.get_model_object("model_sampling").multiplier == reference_sd3.TIMESTEP_SCALE
    assert torch.equal(model.model.diffusion_model.pos_embed.float(), untrained.pos_embed.half().float())


def test_initialization_leaves_no_uninitialized_memory(untrained):
    """ComfyUI builds layers from torch.empty and skips their init: every value must come from ours."""
    again = reference_sd3.build_untrained(seed=0)[1]
    for (name, a), b in zip(untrained.state_dict().items(), again.state_dict().values()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
        assert a.abs().max() < 10, name


def test_encode_decode_are_exact_inverses():
    import comfy.latent_formats

    images, _ = textures_data.make_dataset(4, seed=3)
    pixels = torch.from_numpy(images).float() / 255
    latent = reference_sd3.encode(pixels)
    assert latent.shape == (4, 16, 32, 32)  # 256 image tokens at patch 2
    assert torch.allclose(reference_sd3.decode(latent), pixels, atol=1e-5)
    z = comfy.latent_formats.SD3().process_in(latent)
    assert torch.allclose(z, reference_sd3.image_to_model_space(pixels), atol=1e-5)


def test_textures_are_seeded_and_balanced():
    images, labels = textures_data.make_dataset(20, seed=5)
    again, _ = textures_data.make_dataset(10, seed=5, start=10)
    assert images.shape == (20, 64, 64, 3) and images.dtype.name == "uint8"
    assert (images[10:] == again).all()
    assert sorted(labels[:10]) == list(range(10))
    with pytest.raises(ValueError, match="class_id"):
        textures_data.render(10, None)


def test_conditioning_has_a_pooled_vector_and_a_negative_prompt():
    (context, options), = reference_sd3.conditioning(3)
    assert context.shape == (1, reference_sd3.CONTEXT_TOKENS, reference_sd3.CONTEXT_DIM)
    assert options["pooled_output"].shape == (1, reference_sd3.POOLED_DIM)
    both = reference_sd3.conditioning([0, 3])[0]
    assert torch.equal(both[0][1:], context)
    assert torch.equal(both[1]["pooled_output"][1:], options["pooled_output"])
    negative, negative_options = reference_sd3.unconditional()[0]
    for c in range(10):
        positive, positive_options = reference_sd3.conditioning(c)[0]
        assert not torch.equal(negative, positive)
        assert not torch.equal(negative_options["pooled_output"], positive_options["pooled_output"])
    with pytest.raises(ValueError, match="class labels"):
        reference_sd3.conditioning(11)


def test_training_forward_is_comfys_and_trains():
    """The training forward only swaps ComfyUI's CPU attention for SDPA (same math): on random weights
    it gives ComfyUI's output, and MMDiT's out-of-place blocks differentiate."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    _, mmdit = reference_sd3.build_untrained(seed=0)
    tiny_models.initialize(mmdit, seed=1)
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    context, pooled = reference_sd3.PROMPTS.tensors([1, 10])
    with torch.no_grad():
        comfy_out = mmdit(x, sigma * reference_sd3.TIMESTEP_SCALE, context=context, y=pooled)
    attention = mmdit_module.optimized_attention
    with reference_sd3.training_forward(mmdit) as velocity:
        ours = velocity(x, sigma, [1, 10])
        ours.square().mean().backward()
    assert mmdit_module.optimized_attention is attention  # restored
    assert torch.allclose(ours, comfy_out, atol=1e-4)
    for name, p in mmdit.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert mmdit.y_embedder.mlp[0].weight.grad.abs().sum() > 0
    assert mmdit.context_embedder.weight.grad.abs().sum() > 0
