"""The Qwen-Image-layout reference model (not shipped yet: its weights are not trained to the bar): its
loader's checks, the exact latent mapping, its conditioning and negative prompt, and a training forward
that is ComfyUI's own."""

import pytest
import torch

from harness import model_files, reference_qwen, textures_data, tiny_models


def test_loader_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model qwen"):
        reference_qwen.load(tmp_path / "absent.safetensors")
    from harness import reference_flux

    with pytest.raises(ValueError, match="no qwen_image diffusion model"):
        model_files.load_diffusion_model(reference_flux.WEIGHTS, "qwen_image", {}, "qwen")


def test_encode_decode_are_exact_inverses():
    import comfy.latent_formats

    images, _ = textures_data.make_dataset(4, seed=3)
    pixels = torch.from_numpy(images).float() / 255
    latent = reference_qwen.encode(pixels)
    assert latent.shape == (4, 16, 1, 32, 32)  # 256 image tokens at patch 2
    assert torch.allclose(reference_qwen.decode(latent), pixels, atol=1e-5)
    z = comfy.latent_formats.Wan21().process_in(latent)  # Qwen-Image's latent format
    assert torch.allclose(z, reference_qwen.image_to_model_space(pixels), atol=1e-5)


def test_textures_are_seeded_and_balanced():
    images, labels = textures_data.make_dataset(20, seed=5)
    again, _ = textures_data.make_dataset(10, seed=5, start=10)
    assert images.shape == (20, 64, 64, 3) and images.dtype.name == "uint8"
    assert (images[10:] == again).all()
    assert sorted(labels[:10]) == list(range(10))
    with pytest.raises(ValueError, match="class_id"):
        textures_data.render(10, None)


def test_conditioning_and_negative_prompt():
    (context, options), = reference_qwen.conditioning(3)
    assert context.shape == (1, reference_qwen.CONTEXT_TOKENS, reference_qwen.CONTEXT_DIM) and options == {}
    assert torch.equal(reference_qwen.conditioning([0, 3])[0][0][1:], context)
    negative = reference_qwen.unconditional()[0][0]
    assert not any(torch.equal(negative, reference_qwen.conditioning(c)[0][0]) for c in range(10))
    with pytest.raises(ValueError, match="class labels"):
        reference_qwen.conditioning(11)


def test_training_forward_is_comfys_and_trains():
    """The training forward only swaps ComfyUI's CPU attention for SDPA (same math): on random weights
    it gives ComfyUI's output, and Qwen-Image's out-of-place blocks differentiate."""
    import comfy.ldm.qwen_image.model as qwen_module

    _, qwen = reference_qwen.build_untrained(seed=0)
    tiny_models.initialize(qwen, seed=1)
    x = torch.randn(2, 16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        comfy_out = qwen(x, sigma, reference_qwen.context_batch([1, 10]))
    attention = qwen_module.optimized_attention_masked
    with reference_qwen.training_forward(qwen) as velocity:
        ours = velocity(x, sigma, [1, 10])
        ours.square().mean().backward()
    assert qwen_module.optimized_attention_masked is attention  # restored
    assert torch.allclose(ours, comfy_out, atol=1e-4)
    # Qwen-Image drops the text stream after the last block, so that block's text output layers get none
    last = f"transformer_blocks.{len(qwen.transformer_blocks) - 1}."
    unused = (last + "txt_mlp.", last + "attn.to_add_out.")
    for name, p in qwen.named_parameters():
        assert (p.grad is None) == name.startswith(unused), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert qwen.txt_in.weight.grad.abs().sum() > 0
