"""Closeness of a sampled latent to a reference, as the tests and the demo report it."""

import torch


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak."""
    peak = reference.max() - reference.min()
    return float(10 * torch.log10(peak**2 / ((output - reference) ** 2).mean()))
