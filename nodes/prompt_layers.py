"""Layers whose output depends on the prompt alone, computed once per sampling run instead of at every step.

FLUX projects its 4096-wide text tokens (``txt_in``) and embeds its pooled vector (``vector_in``) at every
model call, from the same conditioning; on a predicted step that is most of what the model still computes
outside its blocks (the README's "What a predicted step costs"). Each such layer's ``forward`` is replaced
through an object patch (its weights stay where LoRA patches find them) by one that returns a copy of the
output it gave for an equal input earlier in the run. Copies, as the blocks may add into their inputs in
place (FLUX's do). The memory goes when the run ends (`forget`).
"""

from __future__ import annotations

import torch

# Layers under diffusion_model that read the conditioning and nothing else, per family package.
PROMPT_LAYERS = {
    "comfy.ldm.flux.": ("txt_in", "vector_in"),
    "comfy.ldm.modules.diffusionmodules.mmdit": ("context_embedder", "y_embedder"),
    "comfy.ldm.wan.": ("text_embedding",),
    "comfy.ldm.qwen_image.": ("txt_in",),
}
MAX_INPUTS = 4  # per layer and run: the positive and negative prompt, and a guidance node's own


class OncePerRun:
    """A layer's forward that computes once per distinct input in a run."""

    def __init__(self, forward):
        self.forward = forward
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for before, out in self.seen:
            if (before.shape == x.shape and before.dtype == x.dtype and before.device == x.device
                    and torch.equal(before, x)):
                return out.clone()
        out = self.forward(x)
        if len(self.seen) < MAX_INPUTS:
            self.seen.append((x.detach().clone(), out.detach().clone()))
        return out

    def forget(self) -> None:
        self.seen.clear()


def _paths(diffusion_model) -> list[str]:
    name = type(diffusion_model).__module__ + "."
    layers = next((names for package, names in PROMPT_LAYERS.items() if name.startswith(package)), ())
    return [f"diffusion_model.{n}.forward" for n in layers if getattr(diffusion_model, n, None) is not None]


def add(patched) -> None:
    """Put a fresh `OncePerRun` on each prompt layer of the clone ``patched`` (an earlier HyCa's replaced)."""
    for path in _paths(patched.model.diffusion_model):
        forward = patched.get_model_object(path)
        if isinstance(forward, OncePerRun):
            forward = forward.forward
        patched.add_object_patch(path, OncePerRun(forward))


def forget(patched) -> None:
    """Release what the clone's prompt layers hold (at the end of each run)."""
    for patch in patched.object_patches.values():
        if isinstance(patch, OncePerRun):
            patch.forget()
