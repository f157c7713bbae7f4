"""Attention mask guidance against malicious text-guided editing (DANP).

DANP (Zhang et al. 2025, "Dual Attention Guided Defense Against Malicious Edits",
arXiv 2512.14333) perturbs an image so that a text-guided editor (SDEdit/img2img, inpainting,
instruction edits on Stable Diffusion) both *looks in the wrong place* and *denoises badly*:

1. Masks, computed once on the clean image x at each timestep t of a fixed set 𝒯. With
   A_t^i(x) ∈ [0, 1]^{h×w} the cross-attention map of text token i (averaged over heads and
   layers, on the latent grid) for the noised clean latent, the dynamic threshold is

       M_t^i = 1[ A_t^i(x) > μ(A_t^i(x)) + k · σ(A_t^i(x)) ]     (μ, σ over the h·w positions)
       M_t   = ⋃_{i ∈ S} M_t^i                                    (text-relevant region)

2. Attention guidance: lower the attention of the edit prompt inside M_t, raise it outside,

       Ā_t(x') = (1/|S|) Σ_{i∈S} A_t^i(x')
       L_attn  = (1/|𝒯|) Σ_t [ mean_{p ∈ M_t} Ā_t(x')_p − mean_{p ∉ M_t} Ā_t(x')_p ] / mean_p Ā_t(x)_p

3. Noise discrepancy (maximised, as AdvDM):

       L_noise = −(1/|𝒯|) Σ_t ‖ε_θ(x'_t, t, c) − ε_t‖² / N,   x'_t = √ᾱ_t·E(x') + √(1−ᾱ_t)·ε_t

   PGD minimises  L = λ_attn · L_attn + λ_noise · L_noise  under ‖x' − x‖∞ ≤ ε.

Choices where the paper leaves room (documented here, tested in tests/test_danp.py):

- Tokens S: a list of positions in the conditioning's token sequence (position 0 is the start
  token; for CLIP, position i ≥ 1 is the i-th BPE token of the prompt, so "1-3" covers a
  three-word prompt of common words). Default: every token except position 0 — the start token
  is an attention sink (it takes most of the probability everywhere) and carries no content.
- The attention term is divided by the clean image's mean attention of S (per sample and
  timestep), so it is dimensionless, like the per-element noise MSE, and λ's are comparable
  across prompts and models.
- ε_t is drawn once per timestep (seeded) and kept for the whole optimisation, the same as used
  for the masks: the objective is deterministic and the masks match the noise level the
  attention is measured at. A timestep whose mask is empty for a sample (k too high) adds no
  attention term for that sample; if all are empty, binding raises a ValueError.
- Balance: the two terms differ in scale by large factors that depend on the model and the
  prompt (on the tiny random test UNets the noise gradient is 6–8× the attention one). With
  ``balance`` (default) each term is divided once, at binding, by the mean L2 norm of its own
  gradient with respect to the pixels on the clean image, so λ_attn and λ_noise are shares of
  the initial gradient (PGD's rule between objectives, applied once inside this one):

      L = λ_attn · L_attn / ‖∇ₓL_attn(x)‖ + λ_noise · L_noise / ‖∇ₓL_noise(x)‖

  ``balance=False`` gives the paper's raw weighted sum. With one λ at 0 there is nothing to
  balance (PGD normalises each objective's gradient anyway) and the extra pass is skipped.
- Memory: each timestep keeps a UNet graph until the backward pass; ``per_step`` > 0 evaluates
  only that many timesteps per PGD step, cycling through 𝒯.

Protocol of the denoiser (a ComfyUI adapter lives in nodes/danp.py):
``alphas_cumprod`` ``[T]`` and ``eps_and_maps(x_t [B,c,h,w], t [B] long, cond) → (ε̂ [B,c,h,w],
maps [B, tokens, h, w])`` — maps are probabilities over the tokens at each latent position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoising import add_noise, check_timestep_range
from .encoder import pad_to_multiple
from .pgd import BoundObjective, ObjectiveOutput


class AttentionDenoiser(Protocol):
    """An ε-prediction diffusion model that also reports its text cross-attention maps."""

    alphas_cumprod: Tensor  # [T]

    def eps_and_maps(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        ...


# --------------------------------------------------------------------------- masks


def threshold_masks(maps: Tensor, k: float) -> Tensor:
    """Dynamic threshold per map: ``maps > mean + k·std`` over the spatial positions.

    maps: ``[B, T, h, w]`` → bool ``[B, T, h, w]``; std is the population std (ddof = 0).
    A constant map gives an empty mask for any k ≥ 0.

    Example:
        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, 1, 1] = 1.0
        >>> threshold_masks(m, 1.0)[0, 0].nonzero().tolist()
        [[1, 1]]
    """
    flat = maps.float().flatten(2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, unbiased=False, keepdim=True)
    return (flat > mean + float(k) * std).view_as(maps)


def select_tokens(num_tokens: int, tokens: Optional[Sequence[int]]) -> list[int]:
    """Validated token positions: ``tokens``, or every position but 0 when None/empty."""
    if not tokens:
        if num_tokens < 2:
            raise ValueError("the conditioning has a single token; there is no text to guide")
        return list(range(1, num_tokens))
    out = sorted({int(i) for i in tokens})
    bad = [i for i in out if not 0 <= i < num_tokens]
    if bad:
        raise ValueError(
            f"tokens {bad} are outside the conditioning's {num_tokens} token positions "
            f"(0 … {num_tokens - 1}); use positions that exist, e.g. 1-{min(num_tokens - 1, 5)}"
        )
    return out


def relevant_mask(maps: Tensor, tokens: Sequence[int], k: float) -> Tensor:
    """M = ⋃_{i∈tokens} 1[A^i > μ + kσ]: ``[B, T, h, w]`` → float ``[B, 1, h, w]`` in {0, 1}."""
    return threshold_masks(maps[:, list(tokens)], k).any(dim=1, keepdim=True).float()


def region_means(attn: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``attn`` ``[B,1,h,w]`` inside and outside the binary ``mask`` → ``([B], [B])``.

    An empty region has mean 0 (its count is clamped to 1).
    """
    a, m = attn.flatten(1), mask.to(attn).flatten(1)
    inside = (a * m).sum(1) / m.sum(1).clamp_min(1.0)
    outside = (a * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1.0)
    return inside, outside


def latent_mask_to_pixels(mask: Tensor, size: tuple[int, int], scale: int) -> Tensor:
    """A latent-grid mask ``[B,1,h,w]`` → image resolution ``[B,1,H,W]`` (nearest, then crop).

    The latent grid covers the image padded to a multiple of ``scale``; the padding is cropped
    away, never resized.
    """
    up = F.interpolate(mask.float(), scale_factor=scale, mode="nearest")
    return up[..., : int(size[0]), : int(size[1])]


# --------------------------------------------------------------------------- objective


@dataclass
class CleanState:
    """What binding computes once on the clean image, per timestep (lists of length |𝒯|).

    masks ``[B,1,h,w]`` (text-relevant region), noises ``[B,c,h,w]`` (ε_t), scales ``[B]``
    (clean mean attention of S), attn_in/attn_out ``[B]`` (clean region means), tokens (S).
    """

    image: Tensor
    timesteps: list[int]
    masks: list[Tensor]
    noises: list[Tensor]
    scales: list[Tensor]
    attn_in: list[Tensor]
    attn_out: list[Tensor]
    tokens: list[int]
    valid: list[Tensor] = field(default_factory=list)  # [B] float: mask non-empty
    term_scales: Optional[tuple[float, float]] = None  # (attention, noise) balance factors

    def mask_fraction(self) -> Tensor:
        """Fraction of timesteps at which each latent position is relevant: ``[B,1,h,w]``."""
        return torch.stack(self.masks).mean(0)

    def to(self, device: torch.device | str) -> "CleanState":
        mv = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return CleanState(self.image, list(self.timesteps), mv(self.masks), mv(self.noises),
                          mv(self.scales), mv(self.attn_in), mv(self.attn_out), list(self.tokens),
                          mv(self.valid), self.term_scales)


@dataclass
class AttentionMaskGuidance:
    """DANP as a PGD :class:`~kernels.pgd.Objective` (see the module docstring).

    encoder: images ``[B,3,H,W]`` in [0,1] → z₀ in the denoiser's latent space (H, W multiples
    of ``multiple``; the image is reflect-padded, never resized); denoiser: see
    :class:`AttentionDenoiser`; cond: passed through (the edit prompt's conditioning);
    timesteps: the DDPM timesteps 𝒯 (0 … T−1); k: threshold in standard deviations;
    tokens: positions S (None = all but the start token); attention_weight, noise_weight: λ's;
    per_step: timesteps evaluated per PGD step (0 = all); balance: normalise each term by its
    clean-image gradient norm (see the module docstring); seed: ε_t comes from
    ``seed·1_000_003 + index of t``.
    Logs ``attn_in``, ``attn_out`` (mean attention of S inside/outside the clean mask, raw
    probabilities), ``attn_contrast`` (the normalised difference) and ``eps_mse``.

    Example:
        >>> obj = AttentionMaskGuidance(encoder=to_latent, denoiser=unet_with_maps, cond=edit,
        ...                             timesteps=[100, 300, 500], k=1.0)
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=100))
    """

    encoder: Callable[[Tensor], Tensor]
    denoiser: AttentionDenoiser
    cond: Any = None
    timesteps: Sequence[int] = (100, 300, 500, 700)
    k: float = 1.0
    tokens: Optional[Sequence[int]] = None
    attention_weight: float = 1.0
    noise_weight: float = 1.0
    per_step: int = 0
    balance: bool = True
    seed: int = 0
    multiple: int = 8
    weight: float = 1.0
    name: str = "attention_mask"
    clean_state: Optional[CleanState] = None  # reused by bind when it was made for this image

    def __post_init__(self) -> None:
        self.timesteps = [int(t) for t in self.timesteps]
        if not self.timesteps:
            raise ValueError("timesteps is empty: give at least one DDPM timestep, e.g. 100, 300, 500")
        n = len(self.denoiser.alphas_cumprod)
        for t in self.timesteps:
            check_timestep_range(t, t, n)
        if not torch.isfinite(torch.tensor(float(self.k))):
            raise ValueError(f"k must be a finite number of standard deviations, got {self.k}")
        if self.per_step < 0:
            raise ValueError(f"per_step must be >= 0 (0 = all timesteps), got {self.per_step}")
        if self.attention_weight < 0 or self.noise_weight < 0 or (
                self.attention_weight == 0 and self.noise_weight == 0):
            raise ValueError("attention_weight and noise_weight must be >= 0 and not both 0 "
                             f"(got {self.attention_weight}, {self.noise_weight})")

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(pad_to_multiple(x, self.multiple))

    def _noise(self, index: int, shape: tuple[int, ...]) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1_000_003 + index)
        return torch.randn(shape, generator=gen)

    def _forward(self, z0: Tensor, t: int, noise: Tensor) -> tuple[Tensor, Tensor]:
        tt = torch.full((z0.shape[0],), int(t), dtype=torch.long, device=z0.device)
        x_t = add_noise(z0, noise.to(z0), tt, self.denoiser.alphas_cumprod)
        eps, maps = self.denoiser.eps_and_maps(x_t, tt, self.cond)
        if maps.shape[-2:] != z0.shape[-2:]:
            raise ValueError(f"attention maps {tuple(maps.shape[-2:])} are not on the latent grid "
                             f"{tuple(z0.shape[-2:])}")
        return eps, maps

    def compute_clean_state(self, clean: Tensor) -> CleanState:
        """Masks, noises and clean statistics at every timestep (no gradients)."""
        with torch.no_grad():
            z0 = self.encode(clean).float()
            masks, noises, scales, ins, outs, valid = [], [], [], [], [], []
            tokens: list[int] = []
            for i, t in enumerate(self.timesteps):
                noise = self._noise(i, tuple(z0.shape)).to(z0)
                _, maps = self._forward(z0, t, noise)
                tokens = select_tokens(maps.shape[1], self.tokens)
                mask = relevant_mask(maps, tokens, self.k)
                attn = maps[:, tokens].float().mean(1, keepdim=True)
                a_in, a_out = region_means(attn, mask)
                masks.append(mask)
                noises.append(noise)
                scales.append(attn.flatten(1).mean(1).clamp_min(1e-8))
                ins.append(a_in)
                outs.append(a_out)
                valid.append((mask.flatten(1).sum(1) > 0).float())
        empty = torch.stack(valid).sum(0) == 0
        if bool(empty.any()):
            raise ValueError(
                f"k = {self.k} is too high: no position of the edit prompt's attention exceeds "
                f"mean + k·std at any timestep (image(s) {empty.nonzero().flatten().tolist()}); "
                "lower k (1.0 is typical)"
            )
        state = CleanState(clean.detach().cpu(), list(self.timesteps), masks, noises, scales,
                           ins, outs, tokens, valid)
        if self.balance and self.attention_weight > 0 and self.noise_weight > 0:
            state.term_scales = self.balance_scales(clean, state)
        return state

    def balance_scales(self, clean: Tensor, state: CleanState) -> tuple[float, float]:
        """1 / mean_b ‖∇ₓ L_term‖₂ on the clean image, for the attention and the noise term."""
        scales = []
        with torch.enable_grad():
            x = clean.detach().clone().requires_grad_(True)
            r = self.evaluate(x, state)
            for key, retain in (("attn_term", True), ("noise_term", False)):
                (g,) = torch.autograd.grad(r[key].sum(), x, retain_graph=retain)
                norm = float(g.flatten(1).norm(dim=1).mean())
                scales.append(1.0 / norm if norm > 0 else 1.0)
        return scales[0], scales[1]

    def evaluate(self, x: Tensor, state: CleanState, indices: Optional[Sequence[int]] = None
                 ) -> dict[str, Tensor]:
        """Loss terms of images ``x`` against the clean state, averaged over the timesteps.

        Returns ``[B]`` tensors: ``attn_term`` (normalised in − out, with the graph),
        ``noise_term`` (mean ε-MSE, with the graph), ``attn_in``, ``attn_out``.
        """
        indices = list(range(len(state.timesteps))) if indices is None else list(indices)
        z0 = self.encode(x).float()
        state = state.to(z0.device)
        attn_terms, mses, ins, outs = [], [], [], []
        for i in indices:
            eps, maps = self._forward(z0, state.timesteps[i], state.noises[i])
            attn = maps[:, state.tokens].float().mean(1, keepdim=True)
            a_in, a_out = region_means(attn, state.masks[i])
            attn_terms.append((a_in - a_out) / state.scales[i] * state.valid[i])
            mses.append((eps.float() - state.noises[i].to(eps)).pow(2).flatten(1).mean(1))
            ins.append(a_in)
            outs.append(a_out)
        mean = lambda ts: torch.stack(ts).mean(0)  # noqa: E731
        return dict(attn_term=mean(attn_terms), noise_term=mean(mses), attn_in=mean(ins),
                    attn_out=mean(outs))

    def _state_for(self, clean: Tensor) -> CleanState:
        s = self.clean_state
        if (s is not None and s.image.shape == clean.shape
                and torch.allclose(s.image, clean.detach().cpu(), atol=1e-6)):
            return s
        return self.compute_clean_state(clean)

    def bind(self, clean: Tensor) -> BoundObjective:
        """Compute the masks on the clean image once (or reuse ``clean_state``), then score."""
        state = self._state_for(clean.detach()).to(clean.device)
        n = len(state.timesteps)
        per = n if self.per_step <= 0 else min(self.per_step, n)
        counter = {"step": 0}

        def bound(x_adv: Tensor) -> ObjectiveOutput:
            start = (counter["step"] * per) % n
            counter["step"] += 1
            idx = [(start + j) % n for j in range(per)]
            r = self.evaluate(x_adv, state, idx)
            sa, sn = state.term_scales or (1.0, 1.0)
            loss = (self.attention_weight * sa * r["attn_term"]
                    - self.noise_weight * sn * r["noise_term"])
            return ObjectiveOutput(
                loss=loss.to(x_adv.device),
                logs={"attn_in": r["attn_in"].detach(), "attn_out": r["attn_out"].detach(),
                      "attn_contrast": r["attn_term"].detach(), "eps_mse": r["noise_term"].detach()},
                reached=None,
            )

        return bound


__all__ = [
    "AttentionDenoiser", "AttentionMaskGuidance", "CleanState", "latent_mask_to_pixels",
    "region_means", "relevant_mask", "select_tokens", "threshold_masks",
]
