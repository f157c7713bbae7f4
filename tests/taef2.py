"""Test helper (not a test file): the real tiny VAE "TAEF2" from the shared fixtures.

TAEF2 is madebyollin's tiny autoencoder for the FLUX.2 latent space (MIT): 32 latent channels,
8x downscale, images in [0, 1]. ComfyUI's own TAESD loader does not know its "mid-block
group-norm" variant, so the network is rebuilt here from the description in
``shared/README.md`` and the fp16 state dicts are loaded into it (as float32).

Usage (tests/ is reachable as the namespace package ``immunize.tests``):

    >>> from immunize.tests.taef2 import load_taef2
    >>> enc, dec = load_taef2(fixtures / "models" / "taef2")
    >>> z = enc(img)            # [B,3,H,W] in [0,1] -> [B,32,H/8,W/8]
    >>> rec = dec(z)            # -> [B,3,H,W], roughly in [0,1]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def _conv(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class _Block(nn.Module):
    """conv3x3 → ReLU → conv3x3 → ReLU → conv3x3, plus a skip, ReLU after the sum.

    With ``pool`` (the three lowest-resolution blocks), ``x + pool(x)`` is taken first, where
    pool = 1x1 conv (64→256) → GroupNorm(4, 256) → ReLU → 1x1 conv (256→64).
    """

    def __init__(self, c_in: int, c_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(c_in, c_out), nn.ReLU(), _conv(c_out, c_out), nn.ReLU(), _conv(c_out, c_out)
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c_in, 256, 1, bias=False), nn.GroupNorm(4, 256), nn.ReLU(),
                nn.Conv2d(256, c_in, 1, bias=False),
            )
            if pool
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + self.skip(x))


class _Clamp(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


def taef2_encoder(latent_channels: int = 32) -> nn.Sequential:
    """[B,3,H,W] in [0,1] → [B,32,H/8,W/8]; indices match the state dict."""
    layers: list[nn.Module] = [_conv(3, 64), _Block(64, 64)]
    for level in range(3):
        pool = level == 2
        layers += [nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)]
        layers += [_Block(64, 64, pool) for _ in range(3)]
    layers += [_conv(64, latent_channels)]
    return nn.Sequential(*layers)


def taef2_decoder(latent_channels: int = 32) -> nn.Sequential:
    """[B,32,h,w] → [B,3,8h,8w] (about [0,1]); indices match the state dict."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, 64), nn.ReLU()]
    for level in range(3):
        pool = level == 0
        layers += [_Block(64, 64, pool) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]
    layers += [_Block(64, 64), _conv(64, 3)]
    return nn.Sequential(*layers)


def load_taef2(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """Build TAEF2 and load ``taef2_encoder.pth`` / ``taef2_decoder.pth`` (fp16 → float32).

    Returns ``(encoder, decoder)`` in eval mode with ``requires_grad`` off (gradients still
    flow to the input).
    """
    folder = Path(folder)
    out = []
    for name, build in (("encoder", taef2_encoder), ("decoder", taef2_decoder)):
        net = build()
        sd = torch.load(folder / f"taef2_{name}.pth", map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        out.append(net.to(device).eval().requires_grad_(False))
    return out[0], out[1]


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample PSNR in dB between images in [0, 1], ``[B, ...]`` → ``[B]``."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)
