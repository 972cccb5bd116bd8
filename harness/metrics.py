"""Closeness of a sampled output to a reference: three PSNRs, each named for its peak, and SSIM.

The peak decides what a dB means, so one name per peak: a latent (no fixed range) is measured
against the reference's own value range; decoded images in [0, 1] image by image; 8-bit images
(a ComfyUI server's PNGs) against 255.
"""

import numpy as np
import torch
import torch.nn.functional as F

from hyca_core.closeness import latent_psnr  # noqa: F401 (the measure tuning ranks by; one definition)


def image_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of each image's PSNR in dB; images (B, ...) in [0, 1], peak 1."""
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def psnr_8bit(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of 8-bit images (any shape, values 0..255), peak 255."""
    error = np.mean((np.asarray(output, np.float64) - np.asarray(reference, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / error))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: torch.Tensor, reference: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, per RGB channel, valid
    positions only, K1 = 0.01, K2 = 0.03, data range 1. Images (B, H, W, 3) in [0, 1]."""
    x = images.movedim(-1, 1).double()
    y = reference.movedim(-1, 1).double()
    channels = x.shape[1]
    window = _gaussian_window(size, sigma).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim_map.flatten(1).mean(1).mean())
