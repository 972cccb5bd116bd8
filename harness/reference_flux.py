"""The FLUX-layout reference model: a tiny ComfyUI FLUX over 32x32 geometric shapes.

- **Architecture**: ComfyUI's own ``comfy.ldm.flux.model.Flux`` with :data:`UNET_CONFIG`: width 128,
  2 double-stream and 4 single-stream blocks, 2 heads of 64, patch 2, 16 latent channels, a text
  stream (``txt_in`` from :data:`CONTEXT_DIM`-wide tokens) and a pooled vector (``vector_in``, FLUX's
  CLIP slot), no guidance embedding: like FLUX.1-schnell it is sampled at cfg 1 without guidance,
  and ComfyUI's model config for it is ``FluxSchnell`` (flow, multiplier 1).
- **Weights**: :data:`WEIGHTS`, fp16, ComfyUI's FLUX key names (``img_in.weight``,
  ``double_blocks.0.img_attn.qkv.weight`` ...). Trained by ``python -m harness.train_reference
  --model flux`` on :mod:`harness.shapes_data`.
- **Loading**: :func:`load`, not ``comfy.sd.load_diffusion_model``: ComfyUI's detection reads every
  size of a FLUX file from its weights but the head count and the rope axes, which it fixes at
  FLUX.1's 24 heads of 128 (``axes_dim`` [16, 56, 56]), so a FLUX of width 128 would be built with
  head width 5. :func:`load` takes ComfyUI's detection, sets those two to :data:`HEADS`, and then
  builds, loads and wraps the model exactly as ``comfy.sd.load_diffusion_model_state_dict`` does.
- **"Latent"**: no VAE; the Wan reference model's pixel-unshuffle mapping
  (:func:`harness.reference_model.image_to_model_space`), without the frame axis, under ComfyUI's
  FLUX latent format (``process_out(z) = z / 0.3611 + 0.1159``): (B, 16, 16, 16).
- **Conditioning**: class ``c`` is a fixed, seeded sequence of :data:`CONTEXT_TOKENS` Gaussian
  tokens (the text stream) and a seeded Gaussian pooled vector, in ComfyUI's format
  ``[[context, {"pooled_output": pooled}]]``; index :data:`NUM_CLASSES` is the unconditional /
  negative one (10% of training samples), so cfg > 1 works too.
- **Sampling**: rectified flow, timestep = sigma (FLUX's multiplier 1); :func:`load` applies
  :data:`SHIFT` as ModelSamplingSD3 does (``with_shift``, multiplier 1); euler / simple,
  :data:`STEPS` steps, cfg :data:`CFG`.
"""

from __future__ import annotations

import contextlib
import functools
import torch

from . import comfy_runtime, flux_training, model_files, sampling
from . import reference_model as wan_reference
from . import shapes_data
from .class_prompts import ClassPrompts
from .reference_model import ASSETS, Classifier  # the judging classifier is the Wan model's CNN
from .shapes_data import NUM_CLASSES

WEIGHTS = ASSETS / "reference_flux.safetensors"
CLASSIFIER_WEIGHTS = ASSETS / "reference_flux_classifier.safetensors"
# The data recipe, public under the name harness/train_reference.py reads from every model module.
DATA = shapes_data

# What detection cannot read from a FLUX file (see the module docstring).
HEADS = dict(num_heads=2, axes_dim=[8, 28, 28])
# The full config: comfy.model_detection.detect_unet_config's result for WEIGHTS, with HEADS.
UNET_CONFIG = dict(
    image_model="flux", axes_dim=HEADS["axes_dim"], num_heads=HEADS["num_heads"], mlp_ratio=4.0, theta=10000,
    out_channels=16, qkv_bias=True, in_channels=16, hidden_size=128, context_in_dim=64, patch_size=2,
    vec_in_dim=64, depth=2, depth_single_blocks=4, guidance_embed=False,
)
CONTEXT_DIM = UNET_CONFIG["context_in_dim"]
POOLED_DIM = UNET_CONFIG["vec_in_dim"]
CONTEXT_TOKENS = 4
CONTEXT_SEED = 2000
LATENT_CHANNELS = 16
LATENT_SIZE = wan_reference.LATENT_SIZE

SHIFT = 2.0  # recommended sampling shift (ModelSamplingSD3); 1 to 8 all read as well
STEPS = 30  # recommended steps, euler / simple
# Recommended guidance: cfg 1, as FLUX.1-schnell, where the shipped weights' full-compute samples
# already clear the classifier bar (train_reference's final evaluation; the figures are in the README).
CFG = 1.0
TIMESTEP_SCALE = 1.0  # FLUX's model_sampling multiplier: the network sees sigma itself
# The trainer's defaults for this model (harness/train_reference.py); see its log for the shipped run.
TRAINING = dict(steps=2800, minutes=55.0, batch=32, lr=1.5e-3, warmup=150, ema=0.998)
# The probe the shipped solver map comes from: one pair, N=6.
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3, cfg=1.0)


# ----------------------------------------------------------------------------------------------
# latent <-> image


def _latent_format():
    comfy_runtime.load()
    import comfy.latent_formats

    return comfy.latent_formats.Flux()


def image_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, 32, 32, 3) in [0, 1] -> model-space latent z (B, 16, 16, 16)."""
    return wan_reference.image_to_model_space(images)[:, :, 0]


def encode(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, 32, 32, 3) in [0, 1] -> the latent ComfyUI holds (B, 16, 16, 16)."""
    return _latent_format().process_out(image_to_model_space(images))


def decode(latent: torch.Tensor) -> torch.Tensor:
    """The latent ComfyUI holds (e.g. ``comfy.sample.sample``'s output) -> IMAGE (B, 32, 32, 3)."""
    return wan_reference.model_space_to_image(_latent_format().process_in(latent.float()).unsqueeze(2))


def empty_latent(batch: int) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)


# ----------------------------------------------------------------------------------------------
# conditioning


PROMPTS = ClassPrompts(NUM_CLASSES, CONTEXT_TOKENS, CONTEXT_DIM, POOLED_DIM, CONTEXT_SEED)
condition_tensors = PROMPTS.tensors  # (context, pooled) for class labels; NUM_CLASSES (or -1): unconditional
conditioning = PROMPTS.conditioning
unconditional = PROMPTS.unconditional


# ----------------------------------------------------------------------------------------------
# model


def init_weights(flux: torch.nn.Module, seed: int) -> None:
    """Seeded initialization for training from scratch, DiT's adaLN-zero: PyTorch's default linear
    init, every modulation and the output layer zeroed (each block starts as the identity), the
    timestep / pooled-vector embedders at std 0.02, q/k norm scales at 1."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in flux.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(module)
        for embedder in (flux.time_in, flux.vector_in):
            for layer in (embedder.in_layer, embedder.out_layer):
                torch.nn.init.normal_(layer.weight, std=0.02)
                layer.bias.zero_()
        for name, param in flux.named_parameters():
            if name.endswith(".scale"):
                param.fill_(1.0)
        zeroed = [flux.final_layer.linear, flux.final_layer.adaLN_modulation[-1]]
        zeroed += [m.lin for b in flux.double_blocks for m in (b.img_mod, b.txt_mod)]
        zeroed += [b.modulation.lin for b in flux.single_blocks]
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()


def build_untrained(seed: int = 0):
    """A fresh (BaseModel, Flux) pair in fp32 on the CPU (ComfyUI's FluxSchnell config), initialized
    for training."""
    return wan_reference.build_untrained(seed, UNET_CONFIG, init_weights)


param_groups = wan_reference.weight_decay_groups


@contextlib.contextmanager
def training_forward(flux: torch.nn.Module):
    """Yields ``velocity(z_t, sigma, labels)``: the differentiable forward of
    :mod:`harness.flux_training`; on exit, checks that it matches ComfyUI's forward on the trained
    weights (at adaLN-zero init both are trivially equal)."""

    def velocity(z_t, sigma, labels):
        context, pooled = (t.to(z_t.device) for t in condition_tensors(labels))
        options = flux_training.out_of_place_options(flux)
        return flux(z_t, sigma * TIMESTEP_SCALE, context, y=pooled, transformer_options=options)

    yield velocity
    device = next(flux.parameters()).device
    x = torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    context, pooled = (t.to(device) for t in condition_tensors([1, NUM_CLASSES]))
    timestep = torch.tensor([0.3, 0.8], device=device)
    flux_training.check_matches_comfy(flux, x.to(device), timestep, context, pooled)


state_dict_for_file = wan_reference.state_dict_for_file


with_shift = functools.partial(wan_reference.with_shift, multiplier=TIMESTEP_SCALE)


def load(path=None, shift: float | None = SHIFT):
    """The reference FLUX as ComfyUI's UNETLoader would load it if its detection read the head
    count (see the module docstring); ``shift=None`` keeps FluxSchnell's stock shift 1.0."""
    model = model_files.load_diffusion_model(path if path is not None else WEIGHTS, "flux", HEADS, "flux")
    return with_shift(model, shift) if shift is not None else model


# one latent per class label (model, labels, seed, steps, cfg, sampler, scheduler); decode with decode()
sample = functools.partial(sampling.class_samples, conditioning, unconditional, empty_latent, steps=STEPS,
                           cfg=CFG)


def load_classifier(path=None) -> Classifier:
    return wan_reference.load_classifier(path if path is not None else CLASSIFIER_WEIGHTS)
