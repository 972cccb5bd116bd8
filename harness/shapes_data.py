"""Offline image data set for the FLUX-layout reference model: dark geometric shapes on light colour fields.

Ten classes of filled shapes (:data:`CLASS_NAMES`) as 32x32 RGB images, drawn with Pillow and
numpy only. It differs on purpose from the Wan model's digits (:mod:`harness.reference_data`):
light, textured backgrounds under dark ink instead of dark gradients under bright ink, and
polygon silhouettes instead of glyphs, so the two models' channel dynamics differ.

Recipe for one image (every random choice comes from ``numpy.random.default_rng([seed, index])``,
as for the digits, so image ``index`` of a data set is the same whatever the data set's size):

1. Background: a light colour drawn uniformly from [150, 255]^3 plus a smooth texture (a 4x4 grid
   of Gaussian values, amplitude 18 per channel, bicubically enlarged to 32x32).
2. Shape mask, drawn at 128x128 (4x) and box-averaged to 32x32 (anti-aliased edges): the class's
   outline with radius 40 to 50 px at 4x (10 to 12.5 px), rotated by -12 to +12 degrees, its centre
   within 8 px at 4x (2 px) of the image centre.
3. Ink: drawn uniformly from RGB until its luminance is at least 80 (of 255) below the background's
   darkest luminance (after 50 tries: black), composited with the mask as alpha.

Shapes that are one turn of another (square / diamond, plus / X) stay apart because rotations
stay within 12 degrees. The images are identical for a given seed and Pillow version.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from . import reference_data
from .reference_data import IMAGE_SIZE, NUM_CLASSES, grid  # noqa: F401  (the digits' size, classes and grid)

RECIPE = 1  # bump whenever a change below alters the images (names the cached data sets)
CLASS_NAMES = ("circle", "square", "triangle", "star", "plus", "ring", "diamond", "crescent", "frame",
               "cross")
_SCALE = 4
_RENDER = _SCALE * IMAGE_SIZE
_RADII = (40.0, 50.0)
_MAX_ROTATION = 12.0
_MAX_OFFSET = 8.0
_MIN_CONTRAST = 80.0
_BACKGROUND = (150.0, 255.0)
_TEXTURE = 18.0


def _rotated(points, angle: float, centre, radius: float):
    """Unit-radius outline points, rotated by ``angle`` (radians), scaled and moved to ``centre``."""
    c, s = math.cos(angle), math.sin(angle)
    return [(centre[0] + radius * (x * c - y * s), centre[1] + radius * (x * s + y * c)) for x, y in points]


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2):
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star():
    outer, inner = _regular(5), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _plus(arm: float = 0.32):
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
            (-a, -a)]


def _square(half: float):
    return [(-half, -half), (half, -half), (half, half), (-half, half)]


def _polygons(class_id: int):
    """(filled outlines, cut-out outlines) in unit coordinates; circles are ("circle", dx, dy, r)."""
    name = CLASS_NAMES[class_id]
    circle = lambda r, dx=0.0: ("circle", dx, 0.0, r)  # noqa: E731
    return {
        "circle": ([circle(0.9)], []),
        "square": ([_square(0.78)], []),
        "triangle": ([_regular(3)], []),
        "star": ([_star()], []),
        "plus": ([_plus()], []),
        "ring": ([circle(0.95)], [circle(0.55)]),
        "diamond": ([_regular(4)], []),
        "crescent": ([circle(0.9)], [circle(0.78, 0.5)]),
        "frame": ([_square(0.85)], [_square(0.48)]),
        "cross": ([[(x * math.cos(math.pi / 4) - y * math.sin(math.pi / 4),
                     x * math.sin(math.pi / 4) + y * math.cos(math.pi / 4)) for x, y in _plus(0.26)]], []),
    }[name]


def _mask(class_id: int, rng: np.random.Generator) -> np.ndarray:
    radius = float(rng.uniform(*_RADII))
    angle = math.radians(float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)))
    centre = _RENDER / 2 + rng.uniform(-_MAX_OFFSET, _MAX_OFFSET, size=2)
    canvas = Image.new("L", (_RENDER, _RENDER), 0)
    draw = ImageDraw.Draw(canvas)
    filled, cut = _polygons(class_id)
    for outlines, fill in ((filled, 255), (cut, 0)):
        for outline in outlines:
            if outline[0] == "circle":
                _, dx, dy, r = outline
                (x, y), = _rotated([(dx, dy)], angle, centre, radius)
                draw.ellipse((x - r * radius, y - r * radius, x + r * radius, y + r * radius), fill=fill)
            else:
                draw.polygon(_rotated(outline, angle, centre, radius), fill=fill)
    return np.asarray(canvas.reduce(_SCALE), dtype=np.float64)[..., None] / 255.0


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def render(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``class_id`` as uint8 (32, 32, 3)."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    base = rng.uniform(*_BACKGROUND, size=3)
    texture = rng.normal(0.0, _TEXTURE, size=(4, 4, 3)).astype(np.float32)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    smooth = np.stack([np.asarray(Image.fromarray(texture[..., c], "F").resize(size, Image.BICUBIC))
                       for c in range(3)], -1)
    background = np.clip(base + smooth, 0, 255)
    darkest = float(_luminance(background.reshape(-1, 3)).min())
    for _ in range(50):
        ink = rng.uniform(0, 255, size=3)
        if darkest - float(_luminance(ink)) >= _MIN_CONTRAST:
            break
    else:
        ink = np.zeros(3)
    alpha = _mask(class_id, rng)
    image = background * (1 - alpha) + ink * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_dataset(n: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+n-1`` of the data set ``seed``: uint8 (n, 32, 32, 3) and int64 labels (n,)."""
    return reference_data.make_dataset(n, seed, start, render=render)
