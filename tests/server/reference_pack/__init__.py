"""Test-only ComfyUI nodes for the reference model of ``harness/reference_model.py`` (never shipped).

The server tests copy this folder into the throw-away ``custom_nodes/`` next to the HyCa package.
The reference model has no VAE and no text encoder, so two small nodes stand in for them:

- **ReferenceClassConditioning**: the CONDITIONING of one digit class (``-1``: the unconditional one),
  exactly what ``harness.reference_model.conditioning`` gives the in-process tests;
- **ReferenceDecode**: LATENT -> IMAGE by ``harness.reference_model.decode`` (the latent is the pixels,
  pixel-unshuffled), so stock SaveImage writes a PNG.

The repository root comes from ``HYCA_TEST_REPO``; it is appended to ``sys.path`` (last, so that
the repository's ``nodes/`` never shadows ComfyUI's ``nodes.py``, which is imported long before).
"""

import os
import sys

_repo = os.environ["HYCA_TEST_REPO"]
if _repo not in sys.path:
    sys.path.append(_repo)

# After the sys.path line above: harness is importable only from the repository root it appends.
from harness import reference_model  # noqa: E402
from harness.reference_data import NUM_CLASSES  # noqa: E402


class ReferenceClassConditioning:
    CATEGORY = "reference_model_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"class_id": ("INT", {"default": 0, "min": -1, "max": NUM_CLASSES - 1})}}

    def encode(self, class_id):
        if class_id < 0:
            return (reference_model.unconditional(),)
        return (reference_model.conditioning(class_id),)


class ReferenceDecode:
    CATEGORY = "reference_model_test"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        return (reference_model.decode(samples["samples"]),)


NODE_CLASS_MAPPINGS = {
    "ReferenceClassConditioning": ReferenceClassConditioning,
    "ReferenceDecode": ReferenceDecode,
}
