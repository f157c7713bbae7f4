"""Image-quality and budget metrics on ``[B,C,H,W]`` images in [0, 1].

PSNR and SSIM come from kornia (Gaussian 11x11 window, σ = 1.5, data range 1, as in
Wang et al. 2004 and skimage's ``gaussian_weights=True`` mode); the budget is reported in
8-bit steps (/255) because that is the unit users set ε in.
"""

from __future__ import annotations

import torch
from kornia.metrics import ssim as _ssim
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample. a, b: ``[B,C,H,W]`` in [0, 1] → ``[B]``.

    Identical images give +inf.
    """
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean structural similarity per sample (Gaussian window 11, σ 1.5). ``[B,C,H,W]`` → ``[B]``."""
    return _ssim(a.float(), b.float(), window_size=11, max_val=1.0, padding="valid").flatten(1).mean(1)


def linf_255(a: Tensor, b: Tensor) -> Tensor:
    """Largest absolute pixel difference per sample, in 8-bit steps (/255). → ``[B]``."""
    return (a.float() - b.float()).abs().flatten(1).amax(1) * 255.0


def l2_rms_255(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square pixel difference per sample, in 8-bit steps (/255). → ``[B]``."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt() * 255.0
