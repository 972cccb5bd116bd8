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

from harness import reference_flux, reference_model, reference_sd3


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
    main_cfg: float  # the guidance of the calibration and the main sections (the matrix runs 1 and cfg)
    sizes: tuple[int, ...]  # image sizes in px, the trained one first
    classifier_size: int  # the size the classifier was trained at
    # the whole benchmark's evaluation batch and how many of `sizes` its main tables cover (the sampler
    # matrix always samples two): sized so that the run of every model fits 90 minutes on 2 cores (a
    # main table at a second size took 1,299 s of the FLUX model's 2,549 s, README)
    pairs: int = 32
    main_sizes: int = 1


def classify(spec: ModelSpec, classifier, images: torch.Tensor) -> torch.Tensor:
    """Class ids of IMAGEs of any size, resized to what the classifier was trained at."""
    if images.shape[1] != spec.classifier_size:
        images = F.interpolate(images.movedim(-1, 1), size=(spec.classifier_size,) * 2, mode="bilinear",
                               antialias=True, align_corners=False).movedim(1, -1)
    return classifier.predict(images)


def reference(module, title: str, blocks: Callable[[Any], list], entry: Callable[[Any], Any],
              frames: bool, main_cfg: float = 1.0, **plan) -> ModelSpec:
    """A trained reference model of the harness: every such module names its weights, classifier,
    loader, conditioning and latent the same way; what differs is its layout (`blocks`, `entry`, and
    whether its latent has a frame axis, as video models' do), the guidance of the main sections and
    the whole benchmark's `plan` (`pairs`, `main_sizes`)."""
    frame_axis = (1,) if frames else ()
    trained = module.LATENT_SIZE * 2  # the latent is the image pixel-unshuffled by 2
    return ModelSpec(
        title=title,
        weights=module.WEIGHTS,
        classifier_weights=module.CLASSIFIER_WEIGHTS,
        load=module.load,
        load_classifier=module.load_classifier,
        conditioning=module.conditioning,
        negative=module.unconditional,
        latent=lambda batch, size: torch.zeros(batch, module.LATENT_CHANNELS, *frame_axis, size // 2,
                                               size // 2),
        decode=module.decode,
        blocks=blocks,
        entry=entry,
        classes=module.NUM_CLASSES,
        cfg=module.CFG,
        main_cfg=main_cfg,
        sizes=(trained, trained * 5 // 4),  # a larger size whose latent still splits into 2x2 patches
        classifier_size=trained,
        **plan,
    )


WAN = reference(reference_model, "reference Wan-2.1-layout DiT (harness/reference_model.py)",
                blocks=lambda model: list(model.model.diffusion_model.blocks),
                entry=lambda model: model.model.diffusion_model.patch_embedding, frames=True)

# FLUX's double-stream blocks (image and text streams) run first, then its single-stream blocks over
# the joined sequence: HyCa caches both kinds; every pass starts with the image patch embedding.
FLUX = reference(reference_flux, "reference FLUX-layout DiT, cfg 1 (harness/reference_flux.py)",
                 blocks=lambda model: [*model.model.diffusion_model.double_blocks,
                                       *model.model.diffusion_model.single_blocks],
                 entry=lambda model: model.model.diffusion_model.img_in, frames=False)

# SD3's MMDiT: joint blocks over the image and text streams, sampled with real CFG against a negative
# prompt; every pass starts with the image patch embedding. A run of it costs about 7 of the Wan
# model's (64 px, a doubled batch for CFG): the whole benchmark gives it 12 pairs.
SD3 = reference(reference_sd3, "reference SD3-layout MMDiT, cfg 4 (harness/reference_sd3.py)",
                blocks=lambda model: list(model.model.diffusion_model.joint_blocks),
                entry=lambda model: model.model.diffusion_model.x_embedder, frames=False,
                main_cfg=reference_sd3.CFG, pairs=12)

MODELS: dict[str, ModelSpec] = {"wan": WAN, "flux": FLUX, "sd3": SD3}
