"""Sampling through ComfyUI's own entry point (the one KSampler uses)."""

from __future__ import annotations

import torch


def flux_conditioning(context_dim: int, pooled_dim: int, tokens: int = 8, seed: int = 0):
    """A positive/negative conditioning pair in ComfyUI's format for FLUX-family models."""
    generator = torch.Generator().manual_seed(seed)

    def cond():
        context = torch.randn(1, tokens, context_dim, generator=generator)
        return [[context, {"pooled_output": torch.randn(1, pooled_dim, generator=generator)}]]

    return cond(), cond()


def sample(model, positive, negative, latent: torch.Tensor, steps: int = 20, cfg: float = 1.0,
           sampler: str = "euler", scheduler: str = "simple", seed: int = 0, denoise: float = 1.0):
    """``comfy.sample.sample`` with noise prepared as KSampler prepares it."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
        denoise=denoise, disable_pbar=True, seed=seed,
    )
