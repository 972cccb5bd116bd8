"""The SD3-layout reference model: a tiny ComfyUI MMDiT over 64x64 textures, sampled with real CFG.

- **Architecture**: ComfyUI's own ``comfy.ldm.modules.diffusionmodules.mmdit`` MMDiT (SD3 medium's
  layout) with :data:`UNET_CONFIG`: depth 3, so width 192 and 3 heads of 64 (MMDiT fixes both from
  the depth), 3 joint blocks (an image and a text stream with their own modulation and MLPs, one
  joint attention; the last block's text stream ends before its MLP), patch 2, 16 latent channels,
  a learned-free 2D sin-cos position table of :data:`POS_EMBED_MAX_SIZE` squared patches (centre-cropped
  to the latent, so sizes up to 96x96 images sample), text tokens through ``context_embedder`` and a
  pooled vector through ``y_embedder`` (SD3's CLIP slot). Like SD3 it is sampled with real
  classifier-free guidance, cfg :data:`CFG`, against a negative prompt.
- **Weights**: :data:`WEIGHTS`, fp16, ComfyUI's SD3 key names (``x_embedder.proj.weight``,
  ``joint_blocks.0.x_block.attn.qkv.weight`` ...). Trained by ``python -m harness.train_reference
  --model sd3`` on :mod:`harness.textures_data` in five stages, each ``--init`` of the one before
  (the README's "third model" has their commands and figures): its classifier reads 92% of its
  full-compute samples as their class at cfg 4, and its map ships in ``calibrations/``.
- **Loading**: :func:`load` through ComfyUI's own ``comfy.sd.load_diffusion_model`` (UNETLoader):
  detection reads every size of an MMDiT file from its weights, and the file is ComfyUI's SD3 model
  config (flow, multiplier 1000, shift 3).
- **"Latent"**: no VAE; the Wan reference model's pixel-unshuffle mapping
  (:func:`harness.reference_model.image_to_model_space`) at 64x64 without the frame axis, under
  ComfyUI's SD3 latent format: (B, 16, 32, 32), 256 image tokens.
- **Conditioning**: :data:`PROMPTS`, :data:`CONTEXT_TOKENS` seeded tokens and a pooled vector per
  class; the last row is the negative prompt (15% of training samples).
- **Sampling**: rectified flow, timestep = 1000 sigma; :func:`load` applies :data:`SHIFT` as
  ModelSamplingSD3 does; euler / simple, :data:`STEPS` steps, cfg :data:`CFG`.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from . import comfy_runtime, sampling, textures_data
from . import reference_model as wan_reference
from .class_prompts import ClassPrompts
from .reference_model import ASSETS, Classifier
from .textures_data import NUM_CLASSES

WEIGHTS = ASSETS / "reference_sd3.safetensors"
CLASSIFIER_WEIGHTS = ASSETS / "reference_sd3_classifier.safetensors"
DATA = textures_data

DEPTH = 3
WIDTH = 64 * DEPTH
CONTEXT_DIM = 64
POOLED_DIM = 64
CONTEXT_TOKENS = 8
POS_EMBED_MAX_SIZE = 24
LATENT_CHANNELS = 16
IMAGE_SIZE = textures_data.IMAGE_SIZE
LATENT_SIZE = IMAGE_SIZE // 2
# comfy.model_detection.detect_unet_config's result for WEIGHTS
UNET_CONFIG = dict(
    in_channels=LATENT_CHANNELS, patch_size=2, out_channels=LATENT_CHANNELS, depth=DEPTH, input_size=None,
    adm_in_channels=POOLED_DIM, num_patches=POS_EMBED_MAX_SIZE ** 2, pos_embed_max_size=POS_EMBED_MAX_SIZE,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM,
                                                                     "out_features": WIDTH}},
    pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
PROMPTS = ClassPrompts(NUM_CLASSES, CONTEXT_TOKENS, CONTEXT_DIM, POOLED_DIM, seed=4000)
conditioning = PROMPTS.conditioning
unconditional = PROMPTS.unconditional

SHIFT = 3.0  # recommended sampling shift (ModelSamplingSD3), SD3's own
STEPS = 30  # recommended steps, euler / simple
CFG = 4.0  # real classifier-free guidance, as SD3 (train_reference's log has the accuracy)
TIMESTEP_SCALE = 1000.0  # SD3's model_sampling multiplier
# the time budget ends it (5,619 steps in 55 minutes on both cores: the README's "third model")
TRAINING = dict(steps=8000, minutes=55.0, batch=32, lr=1.5e-3, warmup=150, ema=0.998, uncond=0.15)
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3, cfg=CFG)


# ----------------------------------------------------------------------------------------------
# latent <-> image


def _latent_format():
    comfy_runtime.load()
    import comfy.latent_formats

    return comfy.latent_formats.SD3()


def image_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, 64, 64, 3) in [0, 1] -> model-space latent z (B, 16, 32, 32)."""
    return wan_reference.image_to_model_space(images, IMAGE_SIZE)[:, :, 0]


def encode(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, 64, 64, 3) in [0, 1] -> the latent ComfyUI holds (B, 16, 32, 32)."""
    return _latent_format().process_out(image_to_model_space(images))


def decode(latent: torch.Tensor) -> torch.Tensor:
    """The latent ComfyUI holds (e.g. ``comfy.sample.sample``'s output) -> IMAGE (B, 64, 64, 3)."""
    return wan_reference.model_space_to_image(_latent_format().process_in(latent.float()).unsqueeze(2))


def empty_latent(batch: int) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)


# ----------------------------------------------------------------------------------------------
# model


def init_weights(mmdit: torch.nn.Module, seed: int) -> None:
    """Seeded initialization for training from scratch, as SD3's: PyTorch's default linear / conv
    init, adaLN-zero (every modulation and the output projection zeroed, so each block starts as
    the identity), the timestep / pooled embedders at std 0.02, the fixed 2D sin-cos position table."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in mmdit.modules():  # the torch classes' init: ComfyUI's layer classes skip it
            for layer in (torch.nn.Linear, torch.nn.Conv2d):
                if isinstance(module, layer):
                    layer.reset_parameters(module)
        for embedder in (mmdit.t_embedder, mmdit.y_embedder):
            for layer in (embedder.mlp[0], embedder.mlp[2]):
                torch.nn.init.normal_(layer.weight, std=0.02)
                layer.bias.zero_()
        table = get_2d_sincos_pos_embed(WIDTH, POS_EMBED_MAX_SIZE).astype(np.float32)
        mmdit.pos_embed.copy_(torch.from_numpy(table).unsqueeze(0))
        zeroed = [mmdit.final_layer.linear, mmdit.final_layer.adaLN_modulation[-1]]
        zeroed += [s.adaLN_modulation[-1] for b in mmdit.joint_blocks for s in (b.context_block, b.x_block)]
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()


def build_untrained(seed: int = 0):
    """A fresh (BaseModel, MMDiT) pair in fp32 on the CPU (ComfyUI's SD3 config), initialized for
    training."""
    return wan_reference.build_untrained(seed, UNET_CONFIG, init_weights)


param_groups = wan_reference.weight_decay_groups  # the position table is a buffer: no group of its own


@contextlib.contextmanager
def training_forward(mmdit: torch.nn.Module):
    """Yields ``velocity(z_t, sigma, labels)``: ComfyUI's own forward (MMDiT's blocks add their
    residuals out of place, so autograd runs through it), with PyTorch's SDPA for attention."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    def velocity(z_t, sigma, labels):
        context, pooled = (t.to(z_t.device) for t in PROMPTS.tensors(labels))
        return mmdit(z_t, sigma * TIMESTEP_SCALE, context=context, y=pooled)

    with wan_reference.pytorch_attention(mmdit_module):
        yield velocity


state_dict_for_file = wan_reference.state_dict_for_file  # the position table included

with_shift = functools.partial(wan_reference.with_shift, multiplier=TIMESTEP_SCALE)


def load(path=None, shift: float | None = SHIFT):
    """The reference SD3 as ComfyUI's UNETLoader loads it; ``shift=None`` keeps SD3's stock shift 3."""
    return wan_reference.load(path if path is not None else WEIGHTS, shift, model_flag="sd3",
                              multiplier=TIMESTEP_SCALE)


# one latent per class label (model, labels, seed, steps, cfg, sampler, scheduler); decode with decode()
sample = functools.partial(sampling.class_samples, conditioning, unconditional, empty_latent, steps=STEPS,
                           cfg=CFG)


def load_classifier(path=None) -> Classifier:
    return wan_reference.load_classifier(path if path is not None else CLASSIFIER_WEIGHTS)
