"""The models the benchmark runs, each a description the rest of the benchmark reads.

A model here is everything the benchmark needs to sample it, score it and count its blocks; adding
one is adding a :class:`ModelSpec` to :data:`MODELS` (``--model`` picks by its key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness import reference_data, reference_model


@dataclass(frozen=True)
class ModelSpec:
    title: str  # one line for the report
    weights: Path
    classifier_weights: Path
    load: Callable[[Path], Any]  # weights -> a ModelPatcher ready to sample (its shift applied)
    load_classifier: Callable[[Path], Any]  # -> an object whose predict(IMAGE) gives class ids
    conditioning: Callable[[list[int]], list]  # one class per batch item -> positive conditioning
    negative: Callable[[int], list]  # batch -> negative conditioning
    latent: Callable[[int, int], torch.Tensor]  # (batch, image size in px) -> empty latent
    decode: Callable[[torch.Tensor], torch.Tensor]  # sampled latent -> IMAGE (B, H, W, 3) in [0, 1]
    blocks: Callable[[Any], list[torch.nn.Module]]  # ModelPatcher -> the transformer blocks HyCa caches
    entry: Callable[[Any], torch.nn.Module]  # ModelPatcher -> the module each model pass runs first
    classes: int
    cfg: float  # the guidance the model is meant to be sampled at
    sizes: tuple[int, ...]  # image sizes in px, the trained one first
    classifier_size: int  # the size the classifier was trained at


def classify(spec: ModelSpec, classifier, images: torch.Tensor) -> torch.Tensor:
    """Class ids of IMAGEs of any size, resized to what the classifier was trained at."""
    if images.shape[1] != spec.classifier_size:
        images = F.interpolate(images.movedim(-1, 1), size=(spec.classifier_size,) * 2, mode="bilinear",
                               antialias=True, align_corners=False).movedim(1, -1)
    return classifier.predict(images)


WAN = ModelSpec(
    title="reference Wan-2.1-layout DiT (harness/reference_model.py)",
    weights=reference_model.WEIGHTS,
    classifier_weights=reference_model.CLASSIFIER_WEIGHTS,
    load=reference_model.load,
    load_classifier=reference_model.load_classifier,
    conditioning=reference_model.conditioning,
    negative=reference_model.unconditional,
    latent=lambda batch, size: torch.zeros(batch, reference_model.LATENT_CHANNELS, 1, size // 2, size // 2),
    decode=reference_model.decode,
    blocks=lambda model: list(model.model.diffusion_model.blocks),
    entry=lambda model: model.model.diffusion_model.patch_embedding,
    classes=reference_data.NUM_CLASSES,
    cfg=reference_model.CFG,
    sizes=(32, 40),
    classifier_size=32,
)

MODELS: dict[str, ModelSpec] = {"wan": WAN}
