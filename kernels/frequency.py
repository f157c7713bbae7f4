"""Patch-wise frequency guidance (AntiPure, arXiv 2509.13922): perturbations that survive
diffusion purification.

A mimic can *purify* a protected photo before fine-tuning on it: noise it to a moderate level
t* and denoise it (SDEdit / DiffPure / GrIDPure). The denoiser regenerates the high spatial
frequencies from its prior, which is exactly where an imperceptible perturbation lives, so the
perturbation is erased. AntiPure adds guidance that keeps the model from taking over the high
frequencies of the purified image. We model the purifier by its one-step estimate of the clean
image at t* (the quantity every DDPM/DDIM step is built on):

    z₀ = E(x + δ),   z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε,   ε ~ N(0, I),  t ~ U[t_min, t_max]
    ẑ₀ = (z_t − √(1−ᾱ_t)·ε_θ(z_t, t, c)) / √ᾱ_t,      x̂₀(x + δ, t) = D(ẑ₀)

and compare x̂₀ with the protected image x + δ patch by patch in the 2-D DCT domain. For a
p×p patch X the orthonormal DCT-II is a pair of matrix products, 𝒞(X) = D X Dᵀ with

    D[k, i] = a_k · cos(π (2i + 1) k / (2p)),   a_0 = √(1/p),  a_k = √(2/p)  (k ≥ 1),

so D Dᵀ = I (energy-preserving, exactly invertible by Dᵀ 𝒞 D, differentiable). The high band
of a patch is the set of coefficients (u, v) with u + v ≥ cutoff (an anti-diagonal cut of the
patch's DCT index grid; u + v ranges over 0 … 2p − 2); H(·) keeps those and zeroes the rest.

Loss (our formulation; the paper states the idea, not a closed form). Per sample, the mean
over channels, patches and high-band coefficients (N_H of them), so that it does not depend on
the image size (units: pixel², [0, 1] scale):

    L_freq(δ) = (1/N_H) Σ_patches ‖H(𝒞(x̂₀)) − sg[H(𝒞(x + δ))]‖²

We do not divide by the reference's high-band energy: that energy grows with δ itself, so the
ratio would fall as the perturbation gets stronger whatever the purifier does, and it blows up
on flat images. :func:`high_band_energy_retained` gives the readable fraction instead.

PGD minimises it. ``sg`` (stop-gradient) on the reference is deliberate: without it the
cheapest way to lower L is to smooth x + δ itself (no high band left to lose), which erases the
protection instead of making it survive; with it the gradient only flows through the purifier,
so δ is shaped such that what the purifier outputs keeps the protected image's high band.

Metric: :func:`high_band_energy_retained` ρ = ⟨H(P), H(R)⟩ / ‖H(R)‖², the share of the
reference's high-band signal that the purified image reproduces (the coefficient of the
projection of H(P) on H(R)): 1 = kept, 0 = erased or replaced by unrelated detail (a purifier
that *invents* texture does not score, unlike a plain energy ratio). Applied to the
perturbation itself, ρ(x̂₀(x+δ) − x̂₀(x), δ) with the same noise, it says how much of δ's high
band survives purification.

Units: images ``[B, C, H, W]`` in [0, 1]; patch sizes in pixels; timesteps are integer DDPM
steps 0 … T−1 (T = 1000). Images that are not a multiple of the patch (or of the VAE's
multiple) are reflect-padded at the bottom/right and cropped back, never resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .denoising import Denoiser, add_noise, check_timestep_range, draw_t_noise
from .encoder import pad_to_multiple
from .pgd import BoundObjective, ObjectiveOutput

PATCH_MIN, PATCH_MAX = 2, 64


# --------------------------------------------------------------------------- DCT


def dct_matrix(n: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix ``[n, n]``: row k is the k-th cosine basis vector.

    ``D @ x`` is the 1-D DCT of a length-n signal ``x``; ``D @ D.T == I``.

    Example:
        >>> D = dct_matrix(8); torch.allclose(D @ D.T, torch.eye(8), atol=1e-6)
        True
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def to_patches(x: Tensor, patch: int) -> Tensor:
    """``[B,C,H,W]`` (H, W multiples of ``patch``) → ``[B,C,H/p,W/p,p,p]`` non-overlapping tiles."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 2, 4, 3, 5)


def from_patches(tiles: Tensor) -> Tensor:
    """Inverse of :func:`to_patches`: ``[B,C,nh,nw,p,p]`` → ``[B,C,nh·p,nw·p]``."""
    b, c, nh, nw, p, q = tiles.shape
    return tiles.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * p, nw * q)


def dct2_patches(x: Tensor, patch: int) -> Tensor:
    """Per-patch 2-D orthonormal DCT-II, 𝒞(X) = D X Dᵀ.

    x: ``[B,C,H,W]``; it is reflect-padded at the bottom/right to a multiple of ``patch``.
    Returns ``[B,C,nh,nw,p,p]`` coefficients, index ``[..., u, v]`` (u vertical, v horizontal
    frequency). Differentiable; device and dtype follow ``x``.
    """
    d = dct_matrix(patch, x.device, x.dtype)
    tiles = to_patches(pad_to_multiple(x, patch), patch)
    return d @ tiles @ d.T


def idct2_patches(coeffs: Tensor) -> Tensor:
    """Inverse of :func:`dct2_patches` (before cropping): ``[B,C,nh,nw,p,p]`` → ``[B,C,nh·p,nw·p]``."""
    d = dct_matrix(coeffs.shape[-1], coeffs.device, coeffs.dtype)
    return from_patches(d.T @ coeffs @ d)


def check_patch_cutoff(patch: int, cutoff: int) -> None:
    """ValueError unless ``PATCH_MIN ≤ patch ≤ PATCH_MAX`` and ``1 ≤ cutoff ≤ 2·patch − 2``."""
    if not (PATCH_MIN <= int(patch) <= PATCH_MAX):
        raise ValueError(f"patch_size must be between {PATCH_MIN} and {PATCH_MAX} pixels, got {patch}")
    if not (1 <= int(cutoff) <= 2 * int(patch) - 2):
        raise ValueError(
            f"cutoff_band must be between 1 and 2·patch_size − 2 = {2 * int(patch) - 2} for "
            f"{patch}px patches (the DCT indices u + v run from 0 to {2 * int(patch) - 2}); got "
            f"{cutoff}. About patch_size keeps the upper half of the frequencies."
        )


def high_band_mask(patch: int, cutoff: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """``[p, p]`` 0/1 mask of the DCT coefficients (u, v) with u + v ≥ ``cutoff``."""
    u = torch.arange(patch, device=device).view(-1, 1)
    v = torch.arange(patch, device=device).view(1, -1)
    return ((u + v) >= int(cutoff)).to(dtype)


def high_band(x: Tensor, patch: int, cutoff: int) -> Tensor:
    """H(𝒞(x)): the high-band DCT coefficients of every patch, ``[B,C,nh,nw,p,p]`` (rest zero)."""
    coeffs = dct2_patches(x.float(), patch)
    return coeffs * high_band_mask(patch, cutoff, coeffs.device, coeffs.dtype)


def high_band_energy(x: Tensor, patch: int, cutoff: int) -> Tensor:
    """Σ over channels and patches of the high-band energy ``[B]`` (pixels², i.e. ‖H(𝒞(x))‖²)."""
    return high_band(x, patch, cutoff).pow(2).flatten(1).sum(1)


def high_band_energy_retained(purified: Tensor, reference: Tensor, patch: int = 16,
                              cutoff: int = 16) -> Tensor:
    """ρ = ⟨H(𝒞(P)), H(𝒞(R))⟩ / ‖H(𝒞(R))‖² per sample → ``[B]``.

    purified P, reference R: ``[B,C,H,W]`` of the same shape (images, or differences such as
    a perturbation and what is left of it after purification). 1 = R's high band is kept,
    0 = erased (or replaced by detail unrelated to R), < 0 = inverted. Pure, no gradients kept.

    Example:
        >>> rho = high_band_energy_retained(purify(x + d) - purify(x), d, patch=16, cutoff=16)
    """
    if purified.shape != reference.shape:
        raise ValueError(f"shapes differ: purified {tuple(purified.shape)} vs reference "
                         f"{tuple(reference.shape)}")
    check_patch_cutoff(patch, cutoff)
    with torch.no_grad():
        hp = high_band(purified, patch, cutoff).flatten(1)
        hr = high_band(reference.to(purified.device), patch, cutoff).flatten(1)
        return (hp * hr).sum(1) / hr.pow(2).sum(1).clamp_min(1e-12)


def high_band_loss(purified: Tensor, reference: Tensor, patch: int, cutoff: int) -> Tensor:
    """L = (1/N_H) Σ‖H(𝒞(P)) − sg[H(𝒞(R))]‖² per sample → ``[B]`` (gradient to P only).

    purified P, reference R: ``[B,C,H,W]``; N_H = C · patches · high-band coefficients per patch.
    """
    hp = high_band(purified, patch, cutoff)
    with torch.no_grad():
        hr = high_band(reference.detach(), patch, cutoff)
    n_high = hp[0, ..., 0, 0].numel() * float(high_band_mask(patch, cutoff).sum())
    return (hp - hr).pow(2).flatten(1).sum(1) / n_high


# --------------------------------------------------------------------------- purification


def one_step_x0(z0: Tensor, denoiser: Denoiser, cond: Any, t: Tensor, noise: Tensor) -> Tensor:
    """ẑ₀ = (z_t − √(1−ᾱ_t)·ε_θ(z_t, t, c)) / √ᾱ_t with z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε.

    z0, noise: ``[B,c,h,w]`` in the denoiser's latent space; t: ``[B]`` long. Differentiable.
    """
    z_t = add_noise(z0, noise, t, denoiser.alphas_cumprod)
    eps = denoiser.eps(z_t, t, cond).to(z0.device).float()
    a = denoiser.alphas_cumprod.to(z0.device, torch.float32)[t.to(z0.device)].view(-1, 1, 1, 1)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


@dataclass
class FrequencyGuidance:
    """AntiPure's patch-wise frequency guidance as a PGD :class:`~kernels.pgd.Objective`.

    encoder: images ``[B,3,H,W]`` in [0,1] (H, W multiples of ``multiple``) → z₀ in the
        denoiser's latent space; decoder: z₀ → images ``[B,3,H,W]`` in [0,1]; both differentiable.
    denoiser: see :class:`~kernels.denoising.Denoiser`; cond: passed to ``denoiser.eps``.
    t_min, t_max: inclusive range of the purification level t* (DDPM steps, 0 … T−1);
    patch: DCT patch size in pixels; cutoff: high band = u + v ≥ cutoff;
    draws: (t*, ε) pairs averaged per PGD step; seed: draws of step k use seed·1_000_003 + k.
    Logs ``hf_loss`` (L_freq, pixel²) and ``hf_retained`` (ρ of x̂₀ against x + δ; larger = better).

    Example:
        >>> obj = FrequencyGuidance(encoder=enc, decoder=dec, denoiser=unet, cond=c)
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=100))
    """

    encoder: Callable[[Tensor], Tensor]
    decoder: Callable[[Tensor], Tensor]
    denoiser: Denoiser
    cond: Any = None
    t_min: int = 50
    t_max: int = 250
    patch: int = 16
    cutoff: int = 16
    draws: int = 1
    seed: int = 0
    multiple: int = 8
    weight: float = 1.0
    name: str = "frequency"

    def __post_init__(self) -> None:
        check_timestep_range(self.t_min, self.t_max, len(self.denoiser.alphas_cumprod))
        check_patch_cutoff(self.patch, self.cutoff)
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")

    def purify(self, x: Tensor, step: int, draw: int = 0) -> tuple[Tensor, Tensor]:
        """One-step purified estimate x̂₀ ``[B,3,H,W]`` of ``x`` and its t* ``[B]``.

        The draw is fixed by (seed, step, draw): purifying two images at the same step uses
        the same t* and ε, so their difference isolates the effect of the perturbation.
        """
        h, w = x.shape[-2:]
        z0 = self.encoder(pad_to_multiple(x, self.multiple))
        seed = int(self.seed) * 1_000_003 + int(step) * self.draws + int(draw)
        t, noise = draw_t_noise(tuple(z0.shape), self.t_min, self.t_max, seed, z0.device)
        x0 = self.decoder(one_step_x0(z0, self.denoiser, self.cond, t, noise))
        return x0[..., :h, :w].to(x.device).float(), t

    def loss(self, x: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(L_freq ``[B]`` with grad, ρ ``[B]``, mean t* ``[B]``) of images ``x`` at PGD step ``step``."""
        total = torch.zeros(x.shape[0], device=x.device)
        rho = torch.zeros(x.shape[0], device=x.device)
        t_sum = torch.zeros(x.shape[0])
        for k in range(self.draws):
            x0, t = self.purify(x, step, k)
            total = total + high_band_loss(x0, x, self.patch, self.cutoff)
            rho = rho + high_band_energy_retained(x0, x, self.patch, self.cutoff)
            t_sum += t.float().cpu()
        return total / self.draws, rho / self.draws, t_sum / self.draws

    def bind(self, clean: Tensor) -> BoundObjective:
        """Nothing depends on the clean image alone: fresh (t*, ε) draws every call."""
        counter = {"step": 0}

        def bound(x_adv: Tensor) -> ObjectiveOutput:
            loss, rho, t_mean = self.loss(x_adv, counter["step"])
            counter["step"] += 1
            return ObjectiveOutput(
                loss=loss,
                logs={"hf_loss": loss.detach(), "hf_retained": rho.detach(), "t": t_mean},
                reached=None,
            )

        return bound


def perturbation_retained(objective: FrequencyGuidance, clean: Tensor, protected: Tensor,
                          steps: int = 4, offset: int = 10_000) -> Tensor:
    """How much of δ = protected − clean survives purification, ``[B]``, without gradients.

    ρ(x̂₀(x + δ) − x̂₀(x), δ) averaged over ``steps`` fixed (t*, ε) draws (seeds ``offset …``,
    away from those PGD used); clean and protected share each draw.
    """
    vals = []
    with torch.no_grad():
        for k in range(steps):
            p_prot, _ = objective.purify(protected, offset + k)
            p_clean, _ = objective.purify(clean, offset + k)
            vals.append(high_band_energy_retained(p_prot - p_clean, protected - clean,
                                                  objective.patch, objective.cutoff))
    return torch.stack(vals).mean(0)


__all__ = [
    "dct_matrix", "to_patches", "from_patches", "dct2_patches", "idct2_patches", "high_band_mask",
    "high_band", "high_band_energy", "high_band_energy_retained", "high_band_loss",
    "check_patch_cutoff", "one_step_x0", "FrequencyGuidance", "perturbation_retained",
]
