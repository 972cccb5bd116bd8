"""Offline image data set for the trained reference model: coloured digits on gradient backgrounds.

Ten classes, the digits ``0`` to ``9``, as 32x32 RGB images rendered procedurally, with nothing
downloaded and nothing read from disk but the font that ships inside Pillow.

Recipe for one image (every random choice comes from ``numpy.random.default_rng([seed, index])``,
so image ``index`` of a data set is the same whatever the data set's size):

1. Background, at 64x64: a linear gradient between two dark colours drawn uniformly from
   [0, 140]^3, along a direction drawn uniformly from the circle.
2. Glyph: the digit in Pillow's built-in font (``ImageFont.load_default(size=...)``, the Aileron
   face embedded in Pillow >= 10.1, which needs Pillow's FreeType support), size 40 to 46 px,
   thickened by a stroke of 3 px, rotated by -6 to +6 degrees, its ink box centred within
   4 px (2 px at 32x32) of the image centre and kept inside a 3 px margin.
3. Ink colour: drawn uniformly from RGB until its luminance exceeds the luminance of both
   gradient ends by at least 80 (of 255) (after 50 tries: white); the glyph is composited over
   the background with its anti-aliased mask as alpha.
4. The 64x64 image is box-averaged to 32x32 (``Image.reduce(2)``), which anti-aliases the edges.

Classes differ only in the glyph's shape; colour, position, size, rotation and background vary
independently of the class, so a classifier must read the digit. The ink is always brighter than
the background and the digit roughly centred, so each class also has its own mean image: with
random ink polarity and free placement the class changed the pixel mean hardly at all, and a
first trained model ignored its class conditioning entirely; with sizes 34-46, strokes 2-3,
rotations of 12 degrees and 6 px offsets a CPU hour of training gave shapeless blobs. The images are
identical for a given seed and Pillow version (font rasterization may change across Pillow/FreeType
releases).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NUM_CLASSES = 10
RECIPE = 3  # bump whenever a change below alters the images (names the cached data sets)
CLASS_NAMES = tuple(str(d) for d in range(NUM_CLASSES))
IMAGE_SIZE = 32
_RENDER = 2 * IMAGE_SIZE  # rendered at twice the size, then box-averaged

_FONT_SIZES = (40, 46)
_STROKES = (3, 3)
_MAX_ROTATION = 6.0
_MAX_OFFSET = 4  # glyph centre from image centre, at the 64x64 rendering
_MARGIN = 3
_MIN_CONTRAST = 80.0
_MAX_BACKGROUND = 140.0


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; "
                           "the reference data needs its scalable default font")
    return font


def _luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _glyph_mask(class_id: int, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(_FONT_SIZES[0], _FONT_SIZES[1] + 1))
    stroke = int(rng.integers(_STROKES[0], _STROKES[1] + 1))
    angle = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    canvas = Image.new("L", (2 * _RENDER, 2 * _RENDER), 0)
    ImageDraw.Draw(canvas).text((_RENDER, _RENDER), CLASS_NAMES[class_id], fill=255, font=_font(size),
                                anchor="mm", stroke_width=stroke, stroke_fill=255)
    canvas = canvas.rotate(angle, resample=Image.BICUBIC, center=(_RENDER, _RENDER))
    left, top, right, bottom = canvas.getbbox()
    glyph = canvas.crop((left, top, right, bottom))
    width, height = glyph.size
    if width > _RENDER - 2 * _MARGIN or height > _RENDER - 2 * _MARGIN:  # never with the sizes above
        scale = (_RENDER - 2 * _MARGIN) / max(width, height)
        glyph = glyph.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.BICUBIC)
        width, height = glyph.size
    x_low = max(_MARGIN, (_RENDER - width) // 2 - _MAX_OFFSET)
    x_high = min(_RENDER - _MARGIN - width, (_RENDER - width) // 2 + _MAX_OFFSET)
    y_low = max(_MARGIN, (_RENDER - height) // 2 - _MAX_OFFSET)
    y_high = min(_RENDER - _MARGIN - height, (_RENDER - height) // 2 + _MAX_OFFSET)
    x = int(rng.integers(x_low, max(x_low, x_high) + 1))
    y = int(rng.integers(y_low, max(y_low, y_high) + 1))
    mask = Image.new("L", (_RENDER, _RENDER), 0)
    mask.paste(glyph, (x, y))
    return mask


def render(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``class_id`` as uint8 (32, 32, 3)."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    start, end = rng.uniform(0, _MAX_BACKGROUND, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(_RENDER) + 0.5) / _RENDER - 0.5
    along = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
    t = np.clip(along / (math.sqrt(0.5) * 2) + 0.5, 0.0, 1.0)[..., None]
    background = start * (1 - t) + end * t

    ends = (_luminance(start), _luminance(end))
    for _ in range(50):
        ink = rng.uniform(0, 255, size=3)
        if _luminance(ink) - max(ends) >= _MIN_CONTRAST:
            break
    else:
        ink = np.full(3, 255.0)

    alpha = np.asarray(_glyph_mask(class_id, rng), dtype=np.float64)[..., None] / 255.0
    image = background * (1 - alpha) + ink * alpha
    image = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB").reduce(2)
    return np.asarray(image, dtype=np.uint8)


def labels_for(n: int, seed: int) -> np.ndarray:
    """Balanced class labels of a data set: index i has class (i + seed) % 10."""
    return ((np.arange(n) + seed) % NUM_CLASSES).astype(np.int64)


def make_dataset(n: int, seed: int, start: int = 0, render=render,
                 size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+n-1`` of the data set ``seed``: uint8 (n, size, size, 3) and int64 labels (n,).

    ``render(class_id, rng)`` draws one image (the digits by default; other data sets pass theirs)."""
    labels = labels_for(start + n, seed)[start:]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render(int(label), np.random.default_rng([seed, start + i]))
    return images, labels


def grid(images: np.ndarray, columns: int, scale: int = 3) -> Image.Image:
    """uint8 (n, H, W, 3) images tiled row by row into one picture, each enlarged ``scale`` times."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        sheet[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images[i]
    picture = Image.fromarray(sheet)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
