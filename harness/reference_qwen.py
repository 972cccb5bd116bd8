"""The Qwen-Image-layout reference model: a tiny ComfyUI Qwen-Image over 64x64 textures, real CFG.

- **Architecture**: ComfyUI's own ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel`` with
  :data:`UNET_CONFIG`: width 128 (2 heads of 64), 4 joint blocks (an image and a text stream with
  their own modulation and MLPs, one joint attention), patch 2, 16 latent channels, text tokens
  through ``txt_norm`` / ``txt_in``; no pooled vector and no guidance embedding: like Qwen-Image it
  is sampled with real classifier-free guidance, cfg :data:`CFG`, against a negative prompt.
- **Weights**: :data:`WEIGHTS`, fp16, ComfyUI's Qwen-Image key names (``img_in.weight``,
  ``transformer_blocks.0.attn.to_q.weight`` ...). Trained by ``python -m harness.train_reference
  --model qwen`` on :mod:`harness.textures_data`.
- **Loading**: :func:`load` through :func:`harness.model_files.load_diffusion_model`: ComfyUI's
  detection reads only the input width and the block count of a Qwen-Image file and fixes the rest
  at Qwen-Image's 24 heads of 128 and 3584-wide text tokens; :data:`UNDETECTED` sets those.
- **"Latent"**: no VAE; the Wan reference model's pixel-unshuffle mapping
  (:func:`harness.reference_model.image_to_model_space`) at 64x64, under Qwen-Image's latent format
  (Wan 2.1's): (B, 16, 1, 32, 32), 256 image tokens.
- **Conditioning**: class ``c`` is a fixed, seeded sequence of :data:`CONTEXT_TOKENS` Gaussian tokens
  of :data:`CONTEXT_DIM` dims, ``[[context, {}]]``; row :data:`NUM_CLASSES` is the negative prompt
  (the unconditional row, 15% of training samples).
- **Sampling**: rectified flow, timestep = sigma (ComfyUI's multiplier 1; the model scales by 1000
  itself); :func:`load` applies :data:`SHIFT` as ModelSamplingAuraFlow does; euler / simple,
  :data:`STEPS` steps, cfg :data:`CFG`.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import model_files, sampling
from . import reference_model as wan_reference
from . import textures_data
from .class_prompts import ClassPrompts
from .reference_model import Classifier
from .textures_data import NUM_CLASSES

WEIGHTS = wan_reference.ASSETS / "reference_qwen.safetensors"
CLASSIFIER_WEIGHTS = wan_reference.ASSETS / "reference_qwen_classifier.safetensors"
DATA = textures_data

# What detection cannot read from a Qwen-Image file (see the module docstring).
UNDETECTED = dict(num_attention_heads=2, attention_head_dim=64, joint_attention_dim=64,
                  axes_dims_rope=(8, 28, 28))
UNET_CONFIG = dict(image_model="qwen_image", in_channels=64, num_layers=4, **UNDETECTED)
CONTEXT_DIM = UNDETECTED["joint_attention_dim"]
CONTEXT_TOKENS = 32
CONTEXT_SEED = 3000
LATENT_CHANNELS = 16
IMAGE_SIZE = textures_data.IMAGE_SIZE
LATENT_SIZE = IMAGE_SIZE // 2

SHIFT = 3.0  # recommended sampling shift (ModelSamplingAuraFlow), as Qwen-Image's workflows use ~3
STEPS = 30  # recommended steps, euler / simple
CFG = 4.0  # real classifier-free guidance, as Qwen-Image (train_reference's log has the accuracy)
TIMESTEP_SCALE = 1.0
TRAINING = dict(steps=4000, minutes=45.0, batch=32, lr=1.5e-3, warmup=150, ema=0.998, uncond=0.15)
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3, cfg=CFG)


# ----------------------------------------------------------------------------------------------
# latent <-> image


def image_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, 64, 64, 3) in [0, 1] -> model-space latent z (B, 16, 1, 32, 32)."""
    return wan_reference.image_to_model_space(images, IMAGE_SIZE)


encode = functools.partial(wan_reference.encode, size=IMAGE_SIZE)
decode = wan_reference.decode


def empty_latent(batch: int) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, 1, LATENT_SIZE, LATENT_SIZE)


# ----------------------------------------------------------------------------------------------
# conditioning


PROMPTS = ClassPrompts(NUM_CLASSES, CONTEXT_TOKENS, CONTEXT_DIM, 0, CONTEXT_SEED)
conditioning = PROMPTS.conditioning
unconditional = PROMPTS.unconditional


def context_batch(labels) -> torch.Tensor:
    """(B, CONTEXT_TOKENS, CONTEXT_DIM) for class labels; label NUM_CLASSES (or -1) is the negative."""
    return PROMPTS.tensors(labels)[0]


# ----------------------------------------------------------------------------------------------
# model


def init_weights(qwen: torch.nn.Module, seed: int) -> None:
    """Seeded initialization for training from scratch, adaLN-zero: PyTorch's default linear init,
    every modulation, the output modulation and projection zeroed (each block starts as the
    identity), the timestep embedder at std 0.02, RMSNorm scales at 1."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in qwen.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(module)
            elif "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
        embedder = qwen.time_text_embed.timestep_embedder
        for layer in (embedder.linear_1, embedder.linear_2):
            torch.nn.init.normal_(layer.weight, std=0.02)
            layer.bias.zero_()
        zeroed = [qwen.norm_out.linear, qwen.proj_out]
        zeroed += [m[-1] for b in qwen.transformer_blocks for m in (b.img_mod, b.txt_mod)]
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()


def build_untrained(seed: int = 0):
    """A fresh (BaseModel, QwenImageTransformer2DModel) pair in fp32 on the CPU, initialized for training."""
    return wan_reference.build_untrained(seed, UNET_CONFIG, init_weights)


def param_groups(qwen: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm scales."""
    decay = [p for p in qwen.parameters() if p.ndim >= 2]
    other = [p for p in qwen.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.01, "name": "decay", "lr_scale": 1.0},
            {"params": other, "weight_decay": 0.0, "name": "other", "lr_scale": 1.0}]


@contextlib.contextmanager
def training_forward(qwen: torch.nn.Module):
    """Yields ``velocity(z_t, sigma, labels)``: ComfyUI's own forward (Qwen-Image's blocks add their
    residuals out of place, so autograd runs through it), with PyTorch's SDPA for attention while it
    lasts (ComfyUI picks sub-quadratic attention on CPU; same math, faster there)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.qwen_image.model as qwen_module

    def velocity(z_t, sigma, labels):
        return qwen(z_t, sigma * TIMESTEP_SCALE, context_batch(labels).to(z_t.device))

    original = qwen_module.optimized_attention_masked
    qwen_module.optimized_attention_masked = attention.attention_pytorch
    try:
        yield velocity
    finally:
        qwen_module.optimized_attention_masked = original


state_dict_for_file = wan_reference.state_dict_for_file
with_shift = functools.partial(wan_reference.with_shift, multiplier=TIMESTEP_SCALE)


def load(path=None, shift: float | None = SHIFT):
    """The reference Qwen-Image as ComfyUI's UNETLoader would load it if its detection read the
    head count and text width (see the module docstring); ``shift=None`` keeps the stock shift."""
    model = model_files.load_diffusion_model(path if path is not None else WEIGHTS, "qwen_image", UNDETECTED,
                                             "qwen")
    return with_shift(model, shift) if shift is not None else model


# one latent per class label (model, labels, seed, steps, cfg, sampler, scheduler); decode with decode()
sample = functools.partial(sampling.class_samples, conditioning, unconditional, empty_latent, steps=STEPS,
                           cfg=CFG)


def load_classifier(path=None) -> Classifier:
    return wan_reference.load_classifier(path if path is not None else CLASSIFIER_WEIGHTS)
