"""Encoder attack (PhotoGuard's encoder attack, Mist's textural loss): fool the VAE encoder.

Latent diffusion never sees pixels: every edit, img2img pass or fine-tune starts from the
VAE latent E(x). If a small perturbation δ moves E(x+δ) somewhere useless, everything built
on it inherits the damage (Salman et al. 2023, "Raising the Cost of Malicious AI-Powered
Image Editing", eq. 1; Liang et al. 2023, Mist's textural loss).

Toward a target latent (PhotoGuard: a flat gray image; Mist: a texture image):

    min_δ  L(δ) = mean ‖E(x + δ) − E(x_target)‖²        s.t. ‖δ‖∞ ≤ ε

Away from the clean latent (untargeted):

    min_δ  L(δ) = − mean ‖E(x + δ) − (E(x) + ξ)‖²

where ξ is a tiny seeded offset (``jitter`` × the latent's RMS): the distance has a zero
gradient at δ = 0, so without ξ PGD (which starts at δ = 0) would never move.

``mean`` is over latent elements, per sample, so the loss does not scale with image size.

The encoder is any differentiable callable ``images [B,3,H,W] in [0,1] → latents [B,c,h,w]``
whose H and W must be multiples of ``multiple`` (8 for SD's VAE): the objective pads the
image by reflection to the next multiple and never resizes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .pgd import BoundObjective, ObjectiveOutput

Encoder = Callable[[Tensor], Tensor]

MODES = ("toward_target", "away")


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad ``x`` ``[B,C,H,W]`` at the bottom/right to the next multiple of ``multiple``.

    Reflection padding (replicate where the image is too small to reflect), so the encoder
    sees plausible content and gradients on the padding flow back into the image. Cropping
    ``[..., :H, :W]`` undoes it.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def fit_target(target: Tensor, like: Tensor) -> Tensor:
    """The target image ``[Bt,C,Ht,Wt]`` brought to the batch and size of ``like`` ``[B,C,H,W]``.

    The target is not the user's image, so it may be resized (bilinear, antialiased); a batch
    of one is broadcast, otherwise targets are cycled over the batch.
    """
    target = target.to(like)
    if target.shape[1] == 1:  # gray-scale target
        target = target.expand(-1, like.shape[1], -1, -1)
    target = target[:, : like.shape[1]]  # drop an alpha channel
    if target.shape[-2:] != like.shape[-2:]:
        target = F.interpolate(target, size=like.shape[-2:], mode="bilinear",
                               align_corners=False, antialias=True).clamp(0, 1)
    idx = torch.arange(like.shape[0], device=target.device) % target.shape[0]
    return target[idx]


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference per sample, ``[B, ...]`` → ``[B]``."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


@dataclass
class EncoderAttack:
    """PhotoGuard/Mist encoder attack as a PGD :class:`~kernels.pgd.Objective`.

    encoder: images ``[B,3,H,W]`` in [0,1] → latents; H, W multiples of ``multiple``.
    mode: ``"toward_target"`` (minimise the latent distance to ``E(target)``) or ``"away"``
        (maximise the latent distance to ``E(clean)``).
    target: ``[Bt,3,Ht,Wt]`` in [0,1], or None for a flat image of value ``gray`` (PhotoGuard's
        choice). Only used with ``"toward_target"``.
    Logs ``latent_rms``: RMS latent distance to the target (toward) or to the clean latent (away).

    Example:
        >>> obj = EncoderAttack(encoder=vae_encode, mode="toward_target")
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=100))
    """

    encoder: Encoder
    mode: str = "toward_target"
    target: Optional[Tensor] = None
    gray: float = 0.5
    multiple: int = 8
    jitter: float = 1e-3
    seed: int = 0
    weight: float = 1.0
    name: str = "encoder"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encoder attack mode must be one of {MODES}, got {self.mode!r}")

    def _encode(self, x: Tensor) -> Tensor:
        return self.encoder(pad_to_multiple(x, self.multiple))

    def bind(self, clean: Tensor) -> BoundObjective:
        """Encode the reference latent once: the target's (toward) or the clean image's (away)."""
        clean = clean.detach().clone()
        with torch.no_grad():
            if self.mode == "away":
                ref = self._encode(clean).detach().float()
                gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
                xi = torch.randn(ref.shape, generator=gen).to(ref.device)
                rms = ref.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (ref.dim() - 1)))
                ref = ref + self.jitter * rms * xi
                sign = -1.0
            else:
                if self.target is None:
                    target = torch.full_like(clean, float(self.gray))
                else:
                    target = fit_target(self.target.detach().clone(), clean)
                ref = self._encode(target).detach().float()
                sign = 1.0

        def bound(x_adv: Tensor) -> ObjectiveOutput:
            z = self._encode(x_adv)
            dist = latent_mse(z, ref.to(z.device))
            return ObjectiveOutput(
                loss=sign * dist.to(x_adv.device),
                logs={"latent_rms": dist.detach().sqrt()},
                reached=None,
            )

        return bound
