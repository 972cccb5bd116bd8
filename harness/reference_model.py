"""The trained reference model: a tiny Wan 2.1 diffusion transformer over 32x32 coloured digits.

What it is (HyCa's quality benchmarks need a model whose features have real, learned dynamics):

- **Architecture**: ComfyUI's own ``comfy.ldm.wan.model.WanModel`` (text-to-video Wan 2.1) with
  :data:`UNET_CONFIG`: dim 128, 6 blocks, FFN 512, patch (1, 2, 2), 16 latent channels. Every
  value in it is what ``comfy.model_detection.detect_unet_config`` infers from the weights file,
  which fixes some of them: the head count is ``dim // 128`` (so one head of 128 at dim 128),
  ``freq_dim`` is 256, and ``text_dim`` is not inferred, so it stays WanModel's default 4096.
- **Weights**: :data:`WEIGHTS` (``harness/assets/reference_wan.safetensors``), fp16, ComfyUI's
  prefix-free key names (``patch_embedding.weight``, ``blocks.0.self_attn.q.weight`` ...). It loads
  through the stock path, ``comfy.sd.load_diffusion_model`` (the UNETLoader node), as WAN21_T2V.
  Trained by ``harness/train_reference.py`` on :mod:`harness.reference_data`.
- **"Latent"**: no VAE. An RGB image in [0, 1] is mapped to [-1, 1] and pixel-unshuffled by 2 into
  12 channels at 16x16; 4 channels of zeros complete the 16; that tensor ``z`` is the model-space
  latent (what ComfyUI feeds the transformer after ``Wan21.process_in``). The latent ComfyUI holds
  outside the model (EmptyLatent, KSampler's output) is ``process_out(z) = z * std + mean`` with
  Wan21's per-channel statistics, shaped as a one-frame video (B, 16, 1, 16, 16).
  :func:`encode` and :func:`decode` convert exactly (decode clamps to [0, 1]).
- **Conditioning**: class ``c`` is a fixed, seeded sequence of :data:`CONTEXT_TOKENS` Gaussian
  vectors of 4096 dims (seed ``CONTEXT_SEED + c``), in ComfyUI's format ``[[context, {}]]``; the
  unconditional/negative one is the sequence for index :data:`NUM_CLASSES`. Training dropped the
  class for 10% of the samples, so classifier-free guidance (cfg > 1) works too.
- **Flow matching**: rectified flow in model space, as ComfyUI's Wan sampling expects
  (``ModelSamplingDiscreteFlow``, CONST): ``x_t = (1 - s) z + s noise``, timestep ``1000 s``, the
  network predicts the velocity ``noise - z``; training draws ``s`` logit-normally (0, 1).
- **Sampling shift**: the stock WAN21_T2V config says shift 8.0 (tuned for 480p video, far too
  much for 64 tokens). :func:`load` applies :data:`SHIFT` the way the ModelSamplingSD3 node does
  (an object patch of ``model_sampling``); in a ComfyUI graph: Load Diffusion Model ->
  ModelSamplingSD3 (shift :data:`SHIFT`) -> KSampler, euler / simple, :data:`STEPS` steps.
- **Classifier**: :class:`Classifier`, a small CNN trained on the same data
  (:data:`CLASSIFIER_WEIGHTS`), to score whether a sample shows its class.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import comfy_runtime, sampling
from . import reference_data
from .reference_data import IMAGE_SIZE, NUM_CLASSES

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "reference_wan.safetensors"
CLASSIFIER_WEIGHTS = ASSETS / "reference_classifier.safetensors"
# The data recipe, public under the name harness/train_reference.py reads from every model module.
DATA = reference_data

# The unet_config comfy.model_detection.detect_unet_config infers from WEIGHTS (checked by the tests).
UNET_CONFIG = dict(
    image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, num_heads=1, ffn_dim=512,
    num_layers=6, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
    cross_attn_norm=True, eps=1e-6, in_dim=16,
)
TEXT_DIM = 4096  # WanModel's default text_dim; detection never infers another
CONTEXT_TOKENS = 4
CONTEXT_SEED = 1000
LATENT_CHANNELS = 16
IMAGE_CHANNELS = 12  # of the 16: 3 RGB x 2 x 2 pixel-unshuffled; the other 4 are zeros
LATENT_SIZE = IMAGE_SIZE // 2

SHIFT = 2.0  # recommended sampling shift (ModelSamplingSD3), see module docstring
STEPS = 30  # recommended steps, euler / simple
# Recommended guidance: the setting at which the classifier reads the shipped weights' full-compute
# samples as their class most often (train_reference's final evaluation; the figures are in the README).
CFG = 2.0
# The trainer's defaults for this model (harness/train_reference.py): the shipped run.
TRAINING = dict(steps=6500, minutes=58.0, batch=32, lr=1.5e-3, warmup=150, ema=0.998)
# The probe the shipped solver map comes from (and quality benchmark's calibration): one pair, N=6.
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3, cfg=1.0)


# ----------------------------------------------------------------------------------------------
# latent <-> image


def latent_stats(device, dtype):
    """Wan 2.1's per-channel latent mean and std (ComfyUI's Wan21 latent format)."""
    comfy_runtime.load()
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    return fmt.latents_mean.to(device, dtype), fmt.latents_std.to(device, dtype)


def image_to_model_space(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """ComfyUI IMAGE (B, 32, 32, 3) in [0, 1] -> model-space latent z (B, 16, 1, 16, 16); another
    model's ``size`` (the SD3-layout model's 64) gives a latent of half that size."""
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"expected images of shape (B, {size}, {size}, 3), "
                         f"got {tuple(images.shape)}")
    x = images.movedim(-1, 1).float() * 2 - 1
    z = F.pixel_unshuffle(x, 2)
    pad = z.new_zeros(z.shape[0], LATENT_CHANNELS - IMAGE_CHANNELS, *z.shape[2:])
    return torch.cat([z, pad], dim=1).unsqueeze(2)


def model_space_to_image(z: torch.Tensor) -> torch.Tensor:
    """Model-space latent (B, 16, 1, H, W) -> ComfyUI IMAGE (B, 2H, 2W, 3), clamped to [0, 1]."""
    x = F.pixel_shuffle(z[:, :IMAGE_CHANNELS, 0].float(), 2)
    return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


def encode(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """ComfyUI IMAGE (B, 32, 32, 3) in [0, 1] -> the latent ComfyUI holds (B, 16, 1, 16, 16)."""
    z = image_to_model_space(images, size)
    mean, std = latent_stats(z.device, z.dtype)
    return z * std + mean  # Wan21.process_out


def decode(latent: torch.Tensor) -> torch.Tensor:
    """The latent ComfyUI holds (e.g. ``comfy.sample.sample``'s output) -> IMAGE (B, 2H, 2W, 3)."""
    mean, std = latent_stats(latent.device, latent.float().dtype)
    return model_space_to_image((latent.float() - mean) / std)  # Wan21.process_in


def empty_latent(batch: int) -> torch.Tensor:
    """An empty latent batch (what EmptyLatent gives) of the model's shape."""
    return torch.zeros(batch, LATENT_CHANNELS, 1, LATENT_SIZE, LATENT_SIZE)


# ----------------------------------------------------------------------------------------------
# conditioning


def _context_row(index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(CONTEXT_SEED + index)
    return torch.randn(CONTEXT_TOKENS, TEXT_DIM, generator=generator)


_CONTEXTS = None


def contexts() -> torch.Tensor:
    """All context sequences (NUM_CLASSES + 1, CONTEXT_TOKENS, TEXT_DIM); the last is unconditional."""
    global _CONTEXTS
    if _CONTEXTS is None:
        _CONTEXTS = torch.stack([_context_row(i) for i in range(NUM_CLASSES + 1)])
    return _CONTEXTS


def context_batch(labels) -> torch.Tensor:
    """(B, CONTEXT_TOKENS, TEXT_DIM) for class labels; label NUM_CLASSES (or -1) is unconditional."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    labels = torch.where(labels < 0, torch.full_like(labels, NUM_CLASSES), labels)
    if (labels > NUM_CLASSES).any():
        raise ValueError(f"class labels must be in [0, {NUM_CLASSES})")
    return contexts()[labels]


def conditioning(class_id) -> list:
    """ComfyUI conditioning for one class (int) or one class per batch item (sequence of ints)."""
    return [[context_batch(class_id), {}]]


def unconditional(batch: int = 1) -> list:
    """The unconditional / negative conditioning."""
    return [[context_batch([NUM_CLASSES] * batch), {}]]


# ----------------------------------------------------------------------------------------------
# model


def model_config(unet_config: dict = UNET_CONFIG):
    """ComfyUI's model config for ``unet_config`` (WAN21_T2V for :data:`UNET_CONFIG`)."""
    comfy_runtime.load()
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if config is None:
        raise RuntimeError(f"ComfyUI recognizes no model family for the reference config {unet_config}")
    return config


def init_weights(wan: torch.nn.Module, seed: int) -> None:
    """Seeded initialization for training from scratch: Wan's own scheme, output head and
    cross-attention output projections zeroed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for name, module in wan.named_modules():
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        module.bias.zero_()
            torch.nn.init.xavier_uniform_(wan.patch_embedding.weight.flatten(1))
            wan.patch_embedding.bias.zero_()
            for sequential in (wan.text_embedding, wan.time_embedding):
                for module in sequential:
                    if isinstance(module, torch.nn.Linear):
                        torch.nn.init.normal_(module.weight, std=0.02)
            for name, param in wan.named_parameters():
                if name.endswith("modulation"):
                    param.copy_(torch.randn_like(param) / wan.dim**0.5)
                elif "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                elif "norm" in name and name.endswith("bias"):
                    param.zero_()
            wan.head.head.weight.zero_()
            wan.head.head.bias.zero_()
            # zero cross-attention outputs: the class path starts silent instead of as noise the
            # network learns to suppress (with Wan's default init it never learned to use the class)
            for block in wan.blocks:
                block.cross_attn.o.weight.zero_()
                block.cross_attn.o.bias.zero_()
    finally:
        torch.random.set_rng_state(generator_state)


def build_untrained(seed: int = 0, unet_config: dict = UNET_CONFIG, init=init_weights):
    """A fresh (BaseModel, diffusion model) pair in fp32 on the CPU, initialized for training by
    ``init(model, seed)`` (the Wan model's by default)."""
    config = model_config(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "")
    init(base.diffusion_model, seed)
    return base, base.diffusion_model


def param_groups(wan: torch.nn.Module) -> list[dict]:
    """AdamW groups. The first text-embedding layer reads dense 4096-dim contexts: Adam moves every
    weight by ~lr per step, which moves its outputs by ~lr * sum|context| (~2.6 at lr 8e-4), so the
    class signal would be noise the network learns to ignore; its learning rate is scaled by
    1/sqrt(4096)."""
    text_in = wan.text_embedding[0].weight
    groups = {"text_in": [], "decay": [], "other": []}
    for n, p in wan.named_parameters():
        key = "text_in" if p is text_in else "decay" if p.ndim >= 2 and "modulation" not in n else "other"
        groups[key].append(p)
    text_scale = 1 / math.sqrt(TEXT_DIM)
    return [{"params": groups["text_in"], "weight_decay": 0.0, "name": "text_in", "lr_scale": text_scale},
            {"params": groups["decay"], "weight_decay": 0.01, "name": "decay", "lr_scale": 1.0},
            {"params": groups["other"], "weight_decay": 0.0, "name": "other", "lr_scale": 1.0}]


def weight_decay_groups(net: torch.nn.Module) -> list[dict]:
    """AdamW groups of the adaLN-zero models (FLUX, SD3 layouts): weight decay on matrices, none on
    biases and norm scales."""
    decay = [p for p in net.parameters() if p.ndim >= 2]
    other = [p for p in net.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.01, "name": "decay", "lr_scale": 1.0},
            {"params": other, "weight_decay": 0.0, "name": "other", "lr_scale": 1.0}]


@contextlib.contextmanager
def pytorch_attention(module):
    """ComfyUI's model ``module`` attends with PyTorch's SDPA while this lasts (ComfyUI picks
    sub-quadratic attention on CPU; same math, faster there for training)."""
    import comfy.ldm.modules.attention as attention

    original = module.optimized_attention
    module.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        module.optimized_attention = original


@contextlib.contextmanager
def training_forward(wan: torch.nn.Module):
    """Yields ``velocity(z_t, sigma, labels)``, Wan's forward with PyTorch's SDPA for attention."""
    import comfy.ldm.wan.model as wan_module

    def velocity(z_t, sigma, labels):
        return wan(z_t, sigma * 1000, context_batch(labels).to(z_t.device))

    with pytorch_attention(wan_module):
        yield velocity


def state_dict_for_file(net: torch.nn.Module, dtype=torch.float16) -> dict:
    """The weights file's contents: ComfyUI's prefix-free key names, buffers the file carries included."""
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}


def with_shift(model, shift: float, multiplier: float = 1000):
    """A clone of ``model`` sampling with ``shift``, exactly as ComfyUI's ModelSamplingSD3 node does it."""
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    patched = model.clone()
    sampling = ModelSamplingAdvanced(model.model.model_config)
    sampling.set_parameters(shift=shift, multiplier=multiplier)
    patched.add_object_patch("model_sampling", sampling)
    return patched


def load(path=None, shift: float | None = SHIFT, model_flag: str = "wan", multiplier: float = 1000):
    """The reference model as ComfyUI's UNETLoader loads it (``comfy.sd.load_diffusion_model``).

    With ``shift`` (default :data:`SHIFT`) the result samples with that shift, like the graph
    Load Diffusion Model -> ModelSamplingSD3; ``shift=None`` keeps the stock WAN21_T2V shift 8.0.
    Other models that load through the stock loader pass their ``--model`` flag and multiplier.
    """
    comfy_runtime.load()
    import comfy.sd

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: train it with "
                                f"`python -m harness.train_reference --model {model_flag}`")
    model = comfy.sd.load_diffusion_model(str(path))
    return with_shift(model, shift, multiplier) if shift is not None else model


# one latent per class label (model, labels, seed, steps, cfg, sampler, scheduler); decode with decode()
sample = functools.partial(sampling.class_samples, conditioning, unconditional, empty_latent, steps=STEPS,
                           cfg=1.0)


# ----------------------------------------------------------------------------------------------
# classifier


class Classifier(torch.nn.Module):
    """Small CNN: ComfyUI IMAGE (B, 32, 32, 3) in [0, 1] -> class logits (B, 10)."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout),
                    torch.nn.ReLU(inplace=True)]

        self.features = torch.nn.Sequential(
            *block(3, w), *block(w, w), torch.nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), torch.nn.MaxPool2d(2),
            *block(2 * w, 4 * w), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(4 * w, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.movedim(-1, 1).float() * 2 - 1
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])
        finally:
            self.train(was_training)


def load_classifier(path=None) -> Classifier:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_WEIGHTS
    state = load_file(str(path))
    classifier = Classifier(width=int(state["head.weight"].shape[1]) // 4)
    classifier.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return classifier.eval()
