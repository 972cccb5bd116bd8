"""Closeness of a sampled latent to a reference, as the tests and the demo report it."""

import torch


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak."""
    peak = reference.max() - reference.min()
    return float(10 * torch.log10(peak**2 / ((output - reference) ** 2).mean()))


def image_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over a batch of the per-image PSNR in dB, pixels in [0, 1] (peak 1)."""
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())
