"""How close a sampled latent comes to a reference: the measure closed-loop tuning ranks by."""

import torch


def latent_psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of a whole latent batch, the reference's value range (max - min) as the peak (a latent
    has no fixed range)."""
    output, reference = output.float(), reference.float()
    peak = reference.max() - reference.min()
    return float(10 * torch.log10(peak**2 / ((output - reference) ** 2).mean()))
