"""Metrics against independent computations (scikit-image)."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from immunize.kernels import metrics


def _pair(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 40, 48, generator=g)
    b = (a + 0.03 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_ssim_match_skimage(seed):
    a, b = _pair(seed)
    p, s = metrics.psnr(a, b), metrics.ssim(a, b)
    for i in range(2):
        x, y = a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy()
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-3)
        ref = structural_similarity(x, y, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert s[i].item() == pytest.approx(ref, abs=1e-4)


def test_linf_and_rms_in_8bit_steps():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 8 / 255
    assert metrics.linf_255(a, b).item() == pytest.approx(8.0)
    assert metrics.l2_rms_255(a, b).item() == pytest.approx(8.0 / np.sqrt(48))
    assert torch.isinf(metrics.psnr(a, a)).all()
