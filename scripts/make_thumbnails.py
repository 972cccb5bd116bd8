"""Draws the template-browser thumbnail of every example workflow: example_workflows/<name>.jpg.

ComfyUI's frontend (1.32) shows a custom node's example workflow as a card whose title is the file's
name and whose picture is ``/api/workflow_templates/<folder>/<name>.jpg``, a square JPEG served from
the same folder. The cards here carry the workflow's title, what it shows, and the pack icon's
motif: steps computed fully (solid) and predicted (outlined).

    python scripts/make_thumbnails.py    # after adding or renaming an example
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
SIZE = 512
BACKGROUND, COMPUTED, PREDICTED, TEXT, MUTED = "#1f2430", "#f2a93b", "#5fb3d9", "#ffffff", "#b8c0cc"
# what each example shows, under its title (the file name)
SUBTITLES = {
    "FLUX.1 dev - text to image": "Calibrate once, inspect the map, sample with fewer block computations",
    "FLUX.1 dev - with a LoRA": "The base model's map serves its LoRAs",
    "FLUX.1 schnell - four steps": "Caching within a few steps",
    "Qwen-Image - text to image": "The first run calibrates, the next ones reuse its map",
    "Qwen-Image Edit - editing": "Caching an image edit",
    "Wan 2.1 - text to video": "Caching a video model",
}


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # the Aileron face inside Pillow: no system font needed


def _fitting(draw: ImageDraw.ImageDraw, text: str, size: int) -> ImageFont.FreeTypeFont:
    """The font of at most ``size`` pixels in which ``text`` fits the card's width."""
    while draw.textlength(text, font=_font(size)) > SIZE - 80:
        size -= 2
    return _font(size)


def thumbnail(title: str, subtitle: str) -> Image.Image:
    """The model (the title before " - ") large, the task under it, then the subtitle."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((40, 36), "HyCa", font=_font(40), fill=COMPUTED)
    model, task = title.split(" - ", 1)
    draw.text((40, 110), model, font=_fitting(draw, model, 64), fill=TEXT)
    draw.text((40, 190), task, font=_fitting(draw, task, 44), fill=TEXT)
    y = 250
    for line in textwrap.wrap(subtitle, 30):
        draw.text((40, y + 12), line, font=_font(28), fill=MUTED)
        y += 36
    for i in range(5):  # one full step, three predicted, one full: the icon's motif
        x = 40 + i * 92
        full = i in (0, 4)
        draw.rounded_rectangle((x, 400, x + 64, 472), radius=10, width=8,
                               fill=COMPUTED if full else None, outline=COMPUTED if full else PREDICTED)
    return image


def main() -> None:
    names = sorted(path.stem for path in EXAMPLES.glob("*.json"))
    if sorted(SUBTITLES) != names:
        raise SystemExit(f"SUBTITLES names {sorted(SUBTITLES)}, the examples are {names}")
    for name in names:
        thumbnail(name, SUBTITLES[name]).save(EXAMPLES / f"{name}.jpg", quality=90)
        print(f"wrote {EXAMPLES / name}.jpg")


if __name__ == "__main__":
    main()
