"""Each PSNR of harness.metrics measures against the peak its name says."""

import numpy as np
import pytest
import torch

from harness.metrics import image_psnr, latent_psnr, psnr_8bit


def test_latent_psnr_takes_the_references_value_range_as_peak():
    reference = torch.tensor([-2.0, 0.0, 2.0, 0.0])  # range 4
    output = reference + torch.tensor([0.1, -0.1, 0.1, -0.1])  # MSE 0.01
    assert latent_psnr(output, reference) == pytest.approx(10 * np.log10(16 / 0.01), rel=1e-5)
    assert latent_psnr(output * 10, reference * 10) == pytest.approx(latent_psnr(output, reference), rel=1e-5)


def test_image_psnr_is_the_mean_of_each_images_psnr_at_peak_one():
    reference = torch.zeros(2, 4, 4, 3)
    output = reference.clone()
    output[0] += 0.1  # MSE 0.01: 20 dB
    output[1] += 0.01  # MSE 1e-4: 40 dB
    assert image_psnr(output, reference) == pytest.approx(30.0, rel=1e-5)


def test_psnr_8bit_takes_255_as_peak():
    reference = np.zeros((4, 4, 3), np.uint8)
    output = reference + np.uint8(1)  # MSE 1: unsigned subtraction must not wrap
    assert psnr_8bit(reference, output) == pytest.approx(20 * np.log10(255), rel=1e-9)
