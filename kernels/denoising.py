"""Denoising-loss attack (AdvDM; Anti-DreamBooth's ASPL without the fine-tuning half).

DreamBooth, LoRA and textual inversion all fit a diffusion model to the user's photos by
minimising the DDPM training loss. AdvDM (Liang et al. 2023, "Adversarial Example Does Good",
eq. 5) and Anti-DreamBooth (Van Le et al. 2023, eq. 3) perturb the photos so that this loss
is as *large* as possible, so the model cannot learn them:

    max_δ  E_{t ~ U[t_min, t_max], ε ~ N(0, I)} ‖ε_θ(x_t, t, c) − ε‖²     s.t. ‖δ‖∞ ≤ ε_budget
    x_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε,    z₀ = E(x + δ)

PGD minimises, so the loss is the negative mean squared ε-mismatch per sample. Each PGD step
draws fresh (t, ε) — a one-sample Monte-Carlo estimate of the expectation, as in the papers —
from a generator seeded with ``(seed, step)``, so a run is reproducible.

Protocols (kept tiny so any model can be plugged in):

- encoder: ``images [B,3,H,W] in [0,1] → z₀ [B,c,h,w]`` in the denoiser's latent space
  (scaled as the diffusion model expects), differentiable; H, W multiples of ``multiple``.
- denoiser: ``alphas_cumprod`` (``[T]`` tensor, ᾱ_t of the T = 1000 DDPM steps) and
  ``eps(x_t [B,c,h,w], t [B] long, cond) → ε̂ [B,c,h,w]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .encoder import pad_to_multiple
from .pgd import BoundObjective, ObjectiveOutput


class Denoiser(Protocol):
    """An ε-prediction diffusion model in DDPM parameterisation."""

    alphas_cumprod: Tensor  # [T] float, ᾱ_t for t = 0 .. T-1

    def eps(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:  # [B,c,h,w], [B] long → ε̂
        ...


def add_noise(z0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDPM forward process x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε; ``t`` ``[B]`` long, shapes as z₀."""
    a = alphas_cumprod.to(z0.device, torch.float32)[t.to(z0.device)]
    a = a.view(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def ddim(z: Tensor, timesteps: Sequence[int], eps_fn: Callable[[Tensor, Tensor, int], Tensor],
         alphas_cumprod: Tensor, after_step: Optional[Callable[[int, Tensor, Tensor], Tensor]] = None) -> Tensor:
    """Deterministic DDIM (η = 0) from z at ``timesteps[0]`` through ``timesteps`` (highest first),
    the last step straight to ᾱ = 1; returns z at t = 0 (= the last x̂₀):

        x̂₀ = (z − √(1−ᾱ_t)·ε̂) / √ᾱ_t,   z ← √ᾱ_next·x̂₀ + √(1−ᾱ_next)·ε̂

    ``eps_fn(z_t, t [B] long, i) → ε̂``; ``after_step(i, z, ᾱ_next) → z`` may change z after
    step i (an inpainting blend) or report progress. ``alphas_cumprod`` ``[T]`` (its dtype is
    the precision of the ᾱ arithmetic). Differentiable in z and through ``eps_fn``.
    """
    ac = alphas_cumprod if alphas_cumprod.device.type == "cpu" else alphas_cumprod.to(z.device)
    for i, t in enumerate(timesteps):
        a_t = ac[t]
        eps = eps_fn(z, torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device), i).to(z)
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        a_next = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), dtype=ac.dtype, device=ac.device)
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if after_step is not None:
            z = after_step(i, z, a_next)
    return z


def draw_t_noise(shape: tuple[int, ...], t_min: int, t_max: int, seed: int,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Seeded draw of timesteps ``[B]`` (uniform on [t_min, t_max], inclusive) and ε ``shape``.

    Drawn on the CPU so the same seed gives the same numbers on every device.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    t = torch.randint(int(t_min), int(t_max) + 1, (shape[0],), generator=gen)
    noise = torch.randn(shape, generator=gen)
    return t.to(device), noise.to(device)


def eps_mismatch(z0: Tensor, denoiser: Denoiser, cond: Any, t: Tensor, noise: Tensor) -> Tensor:
    """Per-sample ‖ε_θ(x_t, t, c) − ε‖² / N for given latents, timesteps and noise → ``[B]``."""
    x_t = add_noise(z0, noise, t, denoiser.alphas_cumprod)
    pred = denoiser.eps(x_t, t, cond)
    return (pred.float() - noise.to(pred.device).float()).pow(2).flatten(1).mean(1)


def check_timestep_range(t_min: int, t_max: int, steps: int = 1000) -> None:
    if not (0 <= int(t_min) <= int(t_max) < steps):
        raise ValueError(
            f"timestep range must satisfy 0 <= t_min <= t_max < {steps}; got [{t_min}, {t_max}]"
        )


@dataclass
class DenoisingLoss:
    """AdvDM / Anti-DreamBooth objective: maximise the denoiser's ε-mismatch on E(x + δ).

    encoder: images → z₀ (denoiser latent space); denoiser: see :class:`Denoiser`;
    cond: passed through to ``denoiser.eps`` (a text embedding, a ComfyUI CONDITIONING, ...);
    t_min, t_max: inclusive DDPM timestep range to draw from (0 … T−1);
    draws: (t, ε) pairs averaged per PGD step (1 = the papers' estimator);
    seed: the (t, ε) of PGD step k come from seed ``seed · 1_000_003 + k``.
    Logs ``eps_mse`` (the ε-mismatch, larger = better protection) and ``t`` (mean timestep).

    Example:
        >>> obj = DenoisingLoss(encoder=vae_to_latent, denoiser=unet, cond=text_emb)
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=100))
    """

    encoder: Callable[[Tensor], Tensor]
    denoiser: Denoiser
    cond: Any = None
    t_min: int = 0
    t_max: int = 999
    draws: int = 1
    seed: int = 0
    multiple: int = 8
    weight: float = 1.0
    name: str = "denoising"

    def __post_init__(self) -> None:
        check_timestep_range(self.t_min, self.t_max, len(self.denoiser.alphas_cumprod))
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")

    def encode(self, x: Tensor) -> Tensor:
        """z₀ = E(pad(x)): the image is reflect-padded to a multiple of ``multiple``."""
        return self.encoder(pad_to_multiple(x, self.multiple))

    def mismatch(self, x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """ε-mismatch ``[B]`` of images ``x`` with the (t, ε) draws of PGD step ``step``.

        Also returns the mean timestep ``[B]``. Deterministic in (seed, step): evaluating the
        clean and the protected image at the same ``step`` compares them on the same noise.
        """
        z0 = self.encode(x)
        total = torch.zeros(z0.shape[0], device=z0.device)
        t_sum = torch.zeros(z0.shape[0])
        for k in range(self.draws):
            seed = int(self.seed) * 1_000_003 + int(step) * max(1, self.draws) + k
            t, noise = draw_t_noise(tuple(z0.shape), self.t_min, self.t_max, seed, z0.device)
            total = total + eps_mismatch(z0, self.denoiser, self.cond, t, noise).to(z0.device)
            t_sum += t.float().cpu()
        return total / self.draws, t_sum / self.draws

    def bind(self, clean: Tensor) -> BoundObjective:
        """Nothing depends on the clean image alone: a fresh (t, ε) is drawn per call."""
        counter = {"step": 0}

        def bound(x_adv: Tensor) -> ObjectiveOutput:
            mse, t_mean = self.mismatch(x_adv, counter["step"])
            counter["step"] += 1
            return ObjectiveOutput(
                loss=-mse.to(x_adv.device),
                logs={"eps_mse": mse.detach(), "t": t_mean},
                reached=None,
            )

        return bound


def mean_mismatch(objective: DenoisingLoss, images: Tensor, steps: int = 8,
                  offset: int = 10_000) -> Tensor:
    """Average ε-mismatch ``[B]`` over ``steps`` fixed (t, ε) draws, without gradients.

    For evaluation: clean and protected images are scored on the same draws (seeds
    ``offset … offset + steps − 1``, away from those PGD used).
    """
    with torch.no_grad():
        vals = [objective.mismatch(images, offset + k)[0] for k in range(steps)]
    return torch.stack(vals).mean(0)


__all__ = [
    "Denoiser", "DenoisingLoss", "add_noise", "draw_t_noise", "eps_mismatch", "mean_mismatch",
    "check_timestep_range",
]
