"""Offline image data set for the SD3-layout reference model: two-colour textures at 64x64.

Ten classes of patterns (:data:`CLASS_NAMES`) filling the whole image, drawn
with numpy and Pillow only. It differs on purpose from the digits (:mod:`harness.reference_data`:
one bright glyph on a dark gradient) and the shapes (:mod:`harness.shapes_data`: one dark silhouette
on a light field): no object and no background, the class is a texture's orientation, frequency
layout and topology across every token, at twice the size (64x64, so a 32x32 latent).

Recipe for one image (every random choice from ``numpy.random.default_rng([seed, index])``, so
image ``index`` of a data set is the same whatever the data set's size):

1. Two colours drawn uniformly from RGB until their luminances differ by at least 70 (of 255).
2. A field ``f(x, y)`` of the class on a 128x128 grid (2x), in coordinates rotated by -10 to +10
   degrees, with a period of 16 to 28 px (at 64x64: 4 to 7 image tokens; recipe 1's 10 to 16 px, under
   3 tokens, trained into blocky noise) and a random phase; the mask ``f > 0`` is box-averaged to 64x64
   (anti-aliased edges). Two classes are single shapes rather than periodic: one straight edge across
   the image at any angle ("halves") and one large disc ("disc"). Recipes 2 and 3 had a checkerboard
   and a grid there, lattices a token must line up in both directions: the 3-block model never drew
   them (0% and 15% of its samples read as their class at cfg 4, periods up to 44 px).
3. The colours composited by the mask, plus a linear light gradient of up to +-20 per channel
   across the image (a colour field under the texture).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from . import reference_data
from .reference_data import NUM_CLASSES, grid  # noqa: F401  (the classes' count and the grid)

RECIPE = 4  # bump whenever a change below alters the images (names the cached data sets)
IMAGE_SIZE = 64
CLASS_NAMES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "halves", "dots", "rings",
               "sunburst", "waves", "disc", "spots")
_SCALE = 2
_RENDER = _SCALE * IMAGE_SIZE
_PERIOD = (16.0, 28.0)
_MAX_ROTATION = 10.0
_MIN_CONTRAST = 70.0
_GRADIENT = 20.0


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _field(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """The class's field on the render grid; the texture's first colour where it is positive."""
    name = CLASS_NAMES[class_id]
    period = float(rng.uniform(*_PERIOD)) * _SCALE
    angle = math.radians(float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)))
    phase = float(rng.uniform(0, 2 * math.pi))
    axis = np.arange(_RENDER) - _RENDER / 2 + 0.5
    y0, x0 = np.meshgrid(axis, axis, indexing="ij")
    x = x0 * math.cos(angle) - y0 * math.sin(angle)
    y = x0 * math.sin(angle) + y0 * math.cos(angle)
    w = 2 * math.pi / period
    if name == "horizontal stripes":
        return np.sin(w * y + phase)
    if name == "vertical stripes":
        return np.sin(w * x + phase)
    if name == "diagonal stripes":
        return np.sin(w * (x + y) / math.sqrt(2) + phase)
    if name == "halves":  # the edge at any angle (the phase), through a point near the centre
        return x0 * math.cos(phase) + y0 * math.sin(phase) - float(rng.uniform(-0.2, 0.2)) * _RENDER
    if name == "dots":
        return np.cos(w * x + phase) + np.cos(w * y + phase) - 1.0
    if name == "rings":
        cx, cy = rng.uniform(-0.15, 0.15, size=2) * _RENDER
        return np.sin(w * np.hypot(x - cx, y - cy) + phase)
    if name == "sunburst":
        cx, cy = rng.uniform(-0.15, 0.15, size=2) * _RENDER
        return np.sin(int(rng.integers(6, 10)) * np.arctan2(y - cy, x - cx) + phase)
    if name == "waves":
        amplitude = float(rng.uniform(0.15, 0.3)) * period
        return np.sin(w * (y + amplitude * np.sin(0.5 * w * x)) + phase)
    if name == "disc":  # 13 to 22 px radius at 64x64
        cx, cy = rng.uniform(-0.15, 0.15, size=2) * _RENDER
        return float(rng.uniform(0.2, 0.35)) * _RENDER - np.hypot(x - cx, y - cy)
    # spots: a smooth random field (6x6 Gaussian values, bicubically enlarged), cut at its median
    coarse = rng.normal(size=(6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, "F").resize((_RENDER, _RENDER), Image.BICUBIC))
    return smooth - np.median(smooth)


def render(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``class_id`` as uint8 (64, 64, 3)."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    for _ in range(50):
        first, second = rng.uniform(0, 255, size=(2, 3))
        if abs(_luminance(first) - _luminance(second)) >= _MIN_CONTRAST:
            break
    else:
        first, second = np.full(3, 230.0), np.full(3, 30.0)
    mask = (_field(class_id, rng) > 0).astype(np.float32) * 255
    alpha = np.asarray(Image.fromarray(mask, "F").reduce(_SCALE), dtype=np.float64)[..., None] / 255.0
    ramp = np.linspace(-1, 1, IMAGE_SIZE)
    direction = rng.uniform(-1, 1, size=2)
    light = (direction[0] * ramp[None, :] + direction[1] * ramp[:, None])[..., None] * _GRADIENT
    image = first * alpha + second * (1 - alpha) + light
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_dataset(n: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+n-1`` of the data set ``seed``: uint8 (n, 64, 64, 3) and int64 labels (n,)."""
    return reference_data.make_dataset(n, seed, start, render=render, size=IMAGE_SIZE)
