"""Erroneous timestep guidance (AntiPure, arXiv 2509.13922): make the denoiser misjudge the
noise level of the protected image.

Diffusion purification (SDEdit / DiffPure) works because the denoiser removes exactly the noise
that belongs to the timestep it is told: at t* it strips a t*-sized amount of noise and, with
it, the perturbation's fine structure. AntiPure disturbs this *timestep-dependent* behaviour:
on the protected image the prediction at the true t should look like the prediction the model
makes at a wrong timestep t′ far from t, so every purification step removes the wrong amount
and the purified image keeps artefacts that customisation then learns. Our formulation (the
paper states the idea; the closed form is ours):

    z₀ = E(x + δ),   z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε,   ε ~ N(0, I)
    L_ts(δ) = (1/K) Σ_{k=1..K} mean ‖ε_θ(z_{t_k}, t_k, c) − sg[ε_θ(z_{t_k}, t′_k, c)]‖²

over a set of K timesteps per PGD step, stratified over [t_min, t_max] (one uniform draw in
each of K equal sub-ranges), with one ε per timestep. PGD minimises L_ts. The stop-gradient
``sg`` keeps the wrong-timestep prediction as a moving *target*: the gradient changes how the
model reads the image at the true t, not how it reads it at t′ (without it, PGD could meet
halfway by also distorting the t′ prediction, which is not what purification uses).

The wrong timestep t′ (integer DDPM steps, T = 1000):

- ``mirror``: t′ = T − 1 − t (a mildly noised image is read as a heavily noised one and the
  reverse; for t near T/2 the two are close, so use a range away from the middle);
- ``offset``: t′ = t + offset when that lies in [0, T − 1], else t − offset (reflected), so t′
  is always |offset| away from t. A positive offset makes the model over-denoise (it sees
  more noise than there is), a negative one under-denoise.

Logs: ``ts_gap`` — the loss, i.e. the mean squared ε-prediction gap between t and t′ (smaller
= the model's reading of the protected image at t is closer to its reading at t′); and
``eps_mse`` — ‖ε_θ(z_t, t) − ε‖², the denoising error at the true t (the purifier's error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .denoising import Denoiser, add_noise, check_timestep_range
from .encoder import pad_to_multiple
from .pgd import BoundObjective, ObjectiveOutput

MODES = ("mirror", "offset")


def wrong_timestep(t: Tensor, mode: str = "mirror", offset: int = 500, steps: int = 1000) -> Tensor:
    """t′ for integer timesteps ``t`` ``[B]`` (see the module docstring); same shape and dtype."""
    if mode == "mirror":
        return (steps - 1) - t
    if mode == "offset":
        up = t + int(offset)
        return torch.where((up >= 0) & (up <= steps - 1), up, t - int(offset))
    raise ValueError(f"wrong-timestep mode must be one of {MODES}, got {mode!r}")


def check_offset(mode: str, offset: int, steps: int = 1000) -> None:
    if mode not in MODES:
        raise ValueError(f"t_prime_mode must be one of {MODES}, got {mode!r}")
    if mode == "offset" and not (1 <= abs(int(offset)) <= steps // 2):
        raise ValueError(
            f"t_prime_offset must satisfy 1 <= |offset| <= {steps // 2} so that t′ = t ± offset "
            f"always exists and differs from t; got {offset}. 300–500 is a typical choice."
        )


def stratified_timesteps(batch: int, count: int, t_min: int, t_max: int,
                         generator: torch.Generator) -> Tensor:
    """``[count, batch]`` long: row k is uniform in the k-th of ``count`` equal sub-ranges of
    [t_min, t_max] (inclusive), so every PGD step covers the whole range."""
    span = t_max - t_min + 1
    edges = torch.linspace(0, span, count + 1)
    lo, hi = edges[:-1].view(-1, 1), edges[1:].view(-1, 1)
    u = torch.rand(count, batch, generator=generator)
    t = t_min + torch.floor(lo + u * (hi - lo)).long()
    return t.clamp(t_min, t_max)


def timestep_gap(z0: Tensor, denoiser: Denoiser, cond: Any, t: Tensor, t_wrong: Tensor,
                 noise: Tensor) -> tuple[Tensor, Tensor]:
    """(mean ‖ε_θ(z_t, t) − sg[ε_θ(z_t, t′)]‖² ``[B]`` with grad, mean ‖ε_θ(z_t, t) − ε‖² ``[B]``).

    z0, noise: ``[B,c,h,w]`` in the denoiser's latent space; t, t_wrong: ``[B]`` long.
    """
    z_t = add_noise(z0, noise, t, denoiser.alphas_cumprod)
    pred = denoiser.eps(z_t, t, cond).float()
    with torch.no_grad():
        target = denoiser.eps(z_t.detach(), t_wrong, cond).float()
    gap = (pred - target.to(pred.device)).pow(2).flatten(1).mean(1)
    err = (pred.detach() - noise.to(pred.device).float()).pow(2).flatten(1).mean(1)
    return gap, err


@dataclass
class TimestepGuidance:
    """AntiPure's erroneous timestep guidance as a PGD :class:`~kernels.pgd.Objective`.

    encoder: images ``[B,3,H,W]`` in [0,1] (H, W multiples of ``multiple``) → z₀ in the
        denoiser's latent space; denoiser: see :class:`~kernels.denoising.Denoiser`;
    t_min, t_max: inclusive timestep range (DDPM steps); count: timesteps K per PGD step;
    mode, offset: how t′ is chosen (see :func:`wrong_timestep`); seed: the draws of PGD step k
    use seed·1_000_003 + k.

    Example:
        >>> obj = TimestepGuidance(encoder=enc, denoiser=unet, cond=c, t_min=50, t_max=300)
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=100))
    """

    encoder: Callable[[Tensor], Tensor]
    denoiser: Denoiser
    cond: Any = None
    t_min: int = 50
    t_max: int = 300
    count: int = 2
    mode: str = "mirror"
    offset: int = 500
    seed: int = 0
    multiple: int = 8
    weight: float = 1.0
    name: str = "timestep"

    def __post_init__(self) -> None:
        steps = len(self.denoiser.alphas_cumprod)
        check_timestep_range(self.t_min, self.t_max, steps)
        check_offset(self.mode, self.offset, steps)
        if self.count < 1:
            raise ValueError(f"timestep count must be >= 1, got {self.count}")

    def draws(self, batch: int, latent_shape: tuple[int, ...], step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(t ``[K,B]``, t′ ``[K,B]``, ε ``[K,B,c,h,w]``) of PGD step ``step``, drawn on the CPU."""
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1_000_003 + int(step))
        t = stratified_timesteps(batch, self.count, self.t_min, self.t_max, gen)
        noise = torch.randn((self.count, *latent_shape), generator=gen)
        t_wrong = wrong_timestep(t, self.mode, self.offset, len(self.denoiser.alphas_cumprod))
        return t, t_wrong, noise

    def gap(self, x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(L_ts ``[B]`` with grad, ε-error at the true t ``[B]``) of images ``x`` at ``step``.

        Deterministic in (seed, step), so clean and protected images can be compared on the
        same draws.
        """
        z0 = self.encoder(pad_to_multiple(x, self.multiple))
        t, t_wrong, noise = self.draws(z0.shape[0], tuple(z0.shape), step)
        gap = torch.zeros(z0.shape[0], device=z0.device)
        err = torch.zeros(z0.shape[0], device=z0.device)
        for k in range(self.count):
            g, e = timestep_gap(z0, self.denoiser, self.cond, t[k].to(z0.device),
                                t_wrong[k].to(z0.device), noise[k].to(z0.device))
            gap, err = gap + g.to(z0.device), err + e.to(z0.device)
        return gap / self.count, err / self.count

    def bind(self, clean: Tensor) -> BoundObjective:
        """Nothing depends on the clean image alone: fresh timesteps and noise every call."""
        counter = {"step": 0}

        def bound(x_adv: Tensor) -> ObjectiveOutput:
            gap, err = self.gap(x_adv, counter["step"])
            counter["step"] += 1
            return ObjectiveOutput(
                loss=gap.to(x_adv.device),
                logs={"ts_gap": gap.detach(), "eps_mse": err.detach()},
                reached=None,
            )

        return bound


def mean_gap(objective: TimestepGuidance, images: Tensor, steps: int = 4, offset: int = 10_000) -> Tensor:
    """Average L_ts ``[B]`` over ``steps`` fixed draws (seeds ``offset …``), without gradients."""
    with torch.no_grad():
        return torch.stack([objective.gap(images, offset + k)[0] for k in range(steps)]).mean(0)


__all__ = [
    "MODES", "wrong_timestep", "check_offset", "stratified_timesteps", "timestep_gap",
    "TimestepGuidance", "mean_gap",
]
