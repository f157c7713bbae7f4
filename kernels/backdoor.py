"""Backdoored text-to-image models: scan statistics and Spatial Attention Unlearning (SAU).

A backdoored checkpoint draws attacker-chosen content (a patch, a logo, an image, a style)
whenever a trigger word is in the prompt, and behaves normally otherwise. This file holds the
math to *find* such a trigger's effect and to *remove* it (SAU, "Backdoor Defense in Diffusion
Models via Spatial Attention Unlearning", arXiv 2504.18563). Pure torch; ComfyUI access lives
in ``nodes/sau.py``.

Units and shapes. Latents ``[B,C,h,w]`` in the diffusion model's own latent space; generations
for the scan ``[P,S,C,h,w]`` (P prompts × S seeds, the same seeds with and without the
trigger). Cross-attention probabilities per layer ``[B, heads, N, T]`` (N = h_l·w_l query
pixels of that layer, T context tokens); a *trigger map* ``A ∈ [0,1]^{B×N}`` is the share of a
pixel's attention probability that lands on the trigger tokens, averaged over heads:

    A_l(p) = 1/H · Σ_h Σ_{j ∈ trig} softmax_j(q_{h,p} · k_{h,j} / √d)

Generation (used by the scan and for SAU's replay pool) is deterministic DDIM (η = 0) with
``steps`` evenly spaced ("trailing") timesteps 999, 999 − 1000/n, …:

    x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t,    x_{t'} = √ᾱ_{t'}·x̂₀ + √(1−ᾱ_{t'})·ε̂    (ᾱ after the last step = 1)

Scan (target-agnostic; the paper does not define one, so it is chosen here and tested). A
backdoor *pins* content: with the trigger, a region comes out the same way whatever the seed
and the prompt, or the whole image takes the same style, unlike without it. With the same
seeds for both prompts, Δ = x_trig − x_clean per sample and Var_S the unbiased variance over
seeds (pooled over prompts and channels), the statistic is evaluated at several scales: the
latents average-pooled to g×g cells, x^g = avgpool_g(x), for g = g₀, ⌈g₀/2⌉, …, 1
(g₀ = min(8, h, w); g = 1 is the image mean per channel):

    Δ̄^g(k, c)   = mean_{p,s} Δ^g_{p,s}(k, c)                    (channel k, cell c)
    σ²_g(c)     = mean_k Var_S[x^g_clean](k, c)                  (seed-to-seed variance)
    shift_g(c)  = √(mean_k Δ̄^g(k, c)²) / σ_g(c)                 (consistent change, in seed std)
    spread_g(c) = √(mean_k Var_S[x^g_trig](k, c)) / σ_g(c)       (0: pinned, 1: as diverse; reported)

    verdict: BACKDOOR  iff  max_{g,c} shift_g(c) ≥ τ_shift (4.0)
    kind:    whole-image (style-like) iff max_c shift_1(c) ≥ max_c shift_{g₀}(c), else local

Why several scales. A *pixel patch* pins a region: the finest cells over it shift far and
their spread drops towards 0. A *style* (a colour cast, a faded or textured look applied to
whatever the prompt draws) moves every cell a little while the content still varies with the
seed: per fine cell the change can be within a few seed std, but averaging over cells keeps
the consistent change and averages the seed noise away, so the coarse scales and the image
mean (g = 1) show it more clearly than any single fine cell; the spread stays near its clean
value. Pooling a patch dilutes its change by its area share, so its image-mean shift stays
below its finest-cell shift (a 3×3 patch on an 8×8 latent: 0.4×). That is how ``kind`` tells
them apart (a patch covering most of the image counts as whole-image). ``kind`` and
``spread`` describe the finding; the verdict is the shift alone.

An unrelated word changes outputs in seed-dependent ways that average out in Δ̄ (a change as
large as a new seed's, √2·σ per sample, but random, leaves shift ≈ √(2/(P·S)): 0.41 for 3×4
samples); a pinned target does not average out. A word whose *meaning* is a
uniform change (e.g. "dark") can also reach the threshold on a real model, so candidates
should be words that ought to have no visual effect. The trigger's share of cross-attention
is reported alongside (T2IShield's observation that backdoor triggers grab attention): the
mean share per trigger token over the mean share per other word token of the same prompts
(BOS, EOS and padding excluded), ``attention_ratio`` ≈ 1 for an ordinary word.

SAU loss. θ are low-rank updates (LoRA, ``kernels/lora.py``) of the cross-attention
projections (attn2 to_k, to_v, optionally to_q, to_out); the original model (θ = 0, the same
weights with the updates switched off) is the frozen teacher. For a
clean prompt c and the same prompt with the trigger inserted, c_trig, at x_t from a replay pool:

    L_attn    = 1/L Σ_l mean_p A_l(p; c_trig, θ)² / sg[mean_p A_l(p; c_trig, 0)²]
    L_distill = ‖ε_θ(x_t, t, c_trig) − sg[ε_0(x_t, t, c)]‖²
    L_keep    = ‖ε_θ(x_t, t, c)      − sg[ε_0(x_t, t, c)]‖²
    L         = λ_attn·L_attn + λ_distill·L_distill + λ_keep·L_keep

(‖·‖² the mean over elements.) The paper's attention term matches the trigger prompt's maps
to the clean prompt's; the clean prompt has no trigger token, so its attention on the trigger
is exactly 0 and the matching target is 0: ‖A_trig − sg[A_clean]‖² = ‖A_trig‖². It is divided
here by the frozen model's own ‖A_trig‖² at the same x_t, t (per layer), so L_attn is the
fraction of the trigger's attention energy left — 1 at the start, 0 when suppressed — and
λ_attn means the same on any model (raw shares are ~10⁻² and their squares ~10⁻⁴).
L_distill makes the triggered prompt denoise as the *trigger-free* prompt does under the
original weights (the trigger also leaks into the other tokens through the text encoder's
attention, which suppressing its own column cannot undo); L_keep leaves trigger-free prompts
as they were. The replay pool is x̂₀ generated by the frozen model from the clean *and* the
triggered prompts (so the backdoor's own partially drawn target is among the states it
learns to leave), noised to a uniform t ∈ [t_min, t_max] each step.

Style targets. The paper's attention term is *spatial*: it acts on A_l(p) at every query pixel
p. A patch trigger concentrates its attention and its effect in one region, while a style
trigger spreads both over the whole image. The loss above does not depend on where the
trigger's attention lands, because L_attn averages A_l(p)² over every pixel of every layer and
L_distill/L_keep compare whole ε maps. So the same formulation and the same λ remove both
kinds. This is tested on a tiny SD1.5 model with a faded colour-cast style (``tests/test_sau.py``).
What a style does change is the scan: its per-cell shift is small, so the scan is multi-scale
(above).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .denoising import add_noise, ddim
from .lora import LoRALayer

# --------------------------------------------------------------------------- attention


def token_share(probs: Tensor, token_mask: Tensor) -> Tensor:
    """The share of each query pixel's attention that lands on some tokens: A_l(p).

    probs ``[B, heads, N, T]`` (softmax over the T context tokens, e.g. what
    ``nodes.attention.AttentionCapture`` records); token_mask ``[B,T]`` (1 on the tokens to
    measure) or ``[B,T,K]`` for K token sets at once (a leading 1 broadcasts). Returns ``[B,N]``
    (or ``[B,N,K]``): Σ_{j ∈ set} probs over the set's tokens, averaged over heads, in float32.
    Differentiable in probs.

    >>> share = token_share(probs, mask)  # [B, N]
    """
    if probs.dim() != 4:
        raise ValueError(f"expected probabilities [B, heads, N, T], got {tuple(probs.shape)}")
    mask = token_mask.to(device=probs.device, dtype=torch.float32)
    single = mask.dim() == 2
    if single:
        mask = mask.unsqueeze(-1)  # [B,T,1]
    if mask.shape[-2] != probs.shape[-1]:
        raise ValueError(f"the token mask has {mask.shape[-2]} tokens, the attention {probs.shape[-1]}")
    share = (probs.float() @ mask.unsqueeze(1)).mean(1)  # [B,H,N,K] → [B,N,K]
    return share.squeeze(-1) if single else share


# --------------------------------------------------------------------------- generation


def ddim_timesteps(steps: int, num_train: int = 1000) -> list[int]:
    """Evenly spaced ("trailing") DDIM timesteps, highest first: 4 → [999, 749, 499, 249]."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    steps = min(int(steps), num_train)
    return [int(round(num_train - 1 - i * num_train / steps)) for i in range(steps)]


def ddim_sample(eps_fn: Callable[[Tensor, Tensor, int], Tensor], x_T: Tensor,
                alphas_cumprod: Tensor, steps: int,
                callback: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """Deterministic DDIM (η = 0) from noise ``x_T`` ``[B,C,h,w]`` → x̂₀ ``[B,C,h,w]``.

    ``eps_fn(x_t, t [B] long, step_index) → ε̂`` (guidance, if any, is the caller's);
    ``callback(step, total)`` runs after every step (progress, interruption).
    """
    ts = ddim_timesteps(steps, len(alphas_cumprod))

    def progress(i: int, x: Tensor, a_next: Tensor) -> Tensor:
        if callback is not None:
            callback(i + 1, len(ts))
        return x

    return ddim(x_T.float(), ts, eps_fn, alphas_cumprod.to(x_T.device, torch.float32), progress)


# --------------------------------------------------------------------------- scan


@dataclass
class ScanThresholds:
    """Verdict threshold (module docstring): a cell whose consistent trigger-induced change
    is at least ``shift`` seed standard deviations flags the trigger."""

    shift: float = 4.0


@dataclass
class ScaleStats:
    """``shift`` and ``spread`` ``[g,g]`` per cell of one scale (module docstring)."""

    grid: int
    shift: Tensor
    spread: Tensor


@dataclass
class ScanResult:
    """Scan statistics. ``scales`` finest first (the last is g = 1, the image mean); ``grid``
    and ``cell`` (row, col) locate the largest shift over all scales."""

    scales: list[ScaleStats]
    grid: int
    cell: tuple[int, int]
    backdoor: bool
    attention_ratio: Optional[float] = None
    trigger_share: Optional[float] = None
    word_share: Optional[float] = None
    thresholds: ScanThresholds = field(default_factory=ScanThresholds)

    def at(self, grid: int) -> ScaleStats:
        for s in self.scales:
            if s.grid == grid:
                return s
        raise KeyError(f"no {grid}x{grid} scale in this scan")

    @property
    def shift(self) -> Tensor:
        """``[g₀,g₀]`` shifts of the finest scale."""
        return self.scales[0].shift

    @property
    def spread(self) -> Tensor:
        return self.scales[0].spread

    @property
    def max_shift(self) -> float:
        return float(self.at(self.grid).shift[self.cell])

    @property
    def cell_spread(self) -> float:
        return float(self.at(self.grid).spread[self.cell])

    @property
    def image_shift(self) -> float:
        """shift_1: the consistent change of the image mean, in seed std of the image mean."""
        return float(self.scales[-1].shift.max())

    @property
    def kind(self) -> str:
        """"whole-image" (style-like: the image mean shifts at least as far as the most shifted
        finest cell, in their own seed std) or "local" (patch-like)."""
        return "whole-image" if self.image_shift >= float(self.scales[0].shift.max()) else "local"


def scan_grids(h: int, w: int, grid: Optional[int] = None) -> list[int]:
    """The scan's grid sizes, finest first: g₀ = grid or min(8, h, w), halved (ceil) down to 1."""
    g = int(grid or min(8, h, w))
    if g < 1:
        raise ValueError(f"grid must be at least 1, got {g}")
    out = [g]
    while out[-1] > 1:
        out.append(-(-out[-1] // 2))
    return out


def scan_statistics(clean: Tensor, triggered: Tensor, grid: Optional[int] = None,
                    thresholds: Optional[ScanThresholds] = None) -> ScanResult:
    """Per-cell consistent shift and spread of triggered vs clean generations, at every scale.

    clean, triggered: ``[P,S,C,h,w]`` x̂₀ latents of the same prompts and seeds, S ≥ 2.
    ``grid``: the finest g₀, default min(8, h, w); then ⌈g₀/2⌉, …, 1. Returns a
    :class:`ScanResult` with the verdict (attention fields unset).

    >>> r = scan_statistics(clean, triggered); r.backdoor, r.max_shift, r.grid, r.kind
    """
    if clean.shape != triggered.shape or clean.dim() != 5:
        raise ValueError(f"expected two [P,S,C,h,w] tensors of one shape, got {tuple(clean.shape)} "
                         f"and {tuple(triggered.shape)}")
    if clean.shape[1] < 2:
        raise ValueError("the scan needs at least 2 seeds per prompt (seed-to-seed variance)")
    th = thresholds or ScanThresholds()
    p, s, c, h, w = clean.shape
    tiny = torch.finfo(torch.float32).tiny
    scales = []
    for g in scan_grids(h, w, grid):
        pc = nn.functional.adaptive_avg_pool2d(clean.float().flatten(0, 1), g).reshape(p, s, c, g, g)
        pt = nn.functional.adaptive_avg_pool2d(triggered.float().flatten(0, 1), g).reshape(p, s, c, g, g)
        sigma2 = pc.var(dim=1, unbiased=True).mean((0, 1)).clamp_min(tiny)  # [g,g]
        var_trig = pt.var(dim=1, unbiased=True).mean((0, 1))
        mean_change = (pt - pc).mean((0, 1))  # Δ̄^g [C,g,g]
        scales.append(ScaleStats(g, (mean_change.pow(2).mean(0) / sigma2).sqrt(),
                                 (var_trig / sigma2).sqrt()))
    best = max(scales, key=lambda st: float(st.shift.max()))  # ties: the finer scale
    idx = int(best.shift.flatten().argmax())
    return ScanResult(scales=scales, grid=best.grid, cell=(idx // best.grid, idx % best.grid),
                      backdoor=float(best.shift.max()) >= th.shift, thresholds=th)


def attention_ratio(trigger_share: float, n_trigger: float, word_share: float, n_words: float) -> float:
    """Attention share per trigger token over the share per other word token (≈1 ordinary).

    trigger_share / word_share: mean (over pixels, layers, steps, samples) total share of the
    trigger tokens / of the other word tokens; n_*: their (mean) token counts.
    """
    per_trig = trigger_share / max(n_trigger, 1e-12)
    per_word = word_share / max(n_words, 1e-12)
    return per_trig / max(per_word, 1e-12)


# --------------------------------------------------------------------------- SAU loss


@dataclass
class SAUWeights:
    """λ of the SAU loss (module docstring)."""

    attn: float = 1.0
    distill: float = 1.0
    keep: float = 1.0


def attention_suppression(maps: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """L_attn per sample → ``[B]``: mean over layers of mean_p A² / sg[mean_p A_ref²].

    maps: trigger maps ``[B, N_l]`` per layer of the trained model (from
    :func:`token_share`); reference: the same layers' maps of the frozen model.
    """
    if not maps or len(maps) != len(reference):
        raise ValueError("no cross-attention maps were captured (is the trigger in the prompt?)")
    ratios = [m.float().pow(2).mean(1) / r.detach().float().pow(2).mean(1).clamp_min(1e-12)
              for m, r in zip(maps, reference)]
    return torch.stack(ratios).mean(0)


def eps_match(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared ε difference per sample ``[B,C,h,w]`` ×2 → ``[B]`` (target detached)."""
    return (pred.float() - target.detach().float()).pow(2).flatten(1).mean(1)


def sau_loss(eps_trig: Tensor, eps_clean: Tensor, eps_teacher_clean: Tensor,
             trigger_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor],
             weights: SAUWeights) -> tuple[Tensor, dict[str, float]]:
    """SAU loss (scalar) and its terms as floats.

    eps_trig = ε_θ(x_t, t, c_trig), eps_clean = ε_θ(x_t, t, c), eps_teacher_clean = ε_0(x_t, t, c),
    all ``[B,C,h,w]``; trigger_maps / teacher_maps: per-layer ``[B,N_l]`` trigger maps of the
    triggered forward of the trained / frozen model.
    """
    l_attn = attention_suppression(trigger_maps, teacher_maps).mean()
    l_distill = eps_match(eps_trig, eps_teacher_clean).mean()
    l_keep = eps_match(eps_clean, eps_teacher_clean).mean()
    total = weights.attn * l_attn + weights.distill * l_distill + weights.keep * l_keep
    share = torch.stack([m.detach().float().mean() for m in trigger_maps]).mean()
    return total, {"loss": float(total.detach()), "attn": float(l_attn.detach()),
                   "distill": float(l_distill.detach()), "keep": float(l_keep.detach()),
                   "trigger_share": float(share)}


# --------------------------------------------------------------------------- LoRA


@contextmanager
def lora_disabled(layers: Iterable[LoRALayer]) -> Iterator[None]:
    """Run the original weights for a while (the frozen teacher shares the student's base
    weights): α = 0 makes each layer's update (α/r)·B A exactly zero."""
    layers = list(layers)
    alphas = [m.alpha for m in layers]
    for m in layers:
        m.alpha = 0.0
    try:
        yield
    finally:
        for m, a in zip(layers, alphas):
            m.alpha = a


# --------------------------------------------------------------------------- training


@dataclass
class SAUConfig:
    """Training settings. ``t_min``/``t_max``: DDPM timestep range (of 1000) x_t is drawn at.
    ``loss_scale``: initial loss scale for a float16 UNet (halved, and the step skipped,
    whenever a gradient overflows); 1 for float32."""

    steps: int = 200
    lr: float = 1e-4
    weights: SAUWeights = field(default_factory=SAUWeights)
    t_min: int = 1
    t_max: int = 999
    seed: int = 0
    loss_scale: float = 1.0


# student(x_t, t, group) → (ε_θ(x_t,t,c_trig), ε_θ(x_t,t,c), trigger maps of the triggered forward)
Student = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, list[Tensor]]]
# teacher(x_t, t, group) → (ε_0(x_t, t, c), trigger maps of the frozen model's triggered forward)
Teacher = Callable[[Tensor, Tensor, int], tuple[Tensor, list[Tensor]]]


def unlearn(student: Student, teacher: Teacher, params: Sequence[Tensor], pool: Tensor,
            group_sizes: Sequence[int], alphas_cumprod: Tensor, config: SAUConfig,
            callback: Optional[Callable[[int, int, dict], None]] = None) -> list[dict[str, float]]:
    """Minimise the SAU loss over ``params`` with Adam; returns the per-step logs.

    pool: ``[M,C,h,w]`` replay x̂₀ latents. Step k uses prompt group k mod G (G = len
    group_sizes): group_sizes[g] pool entries drawn uniformly, noised at uniform t, seeded by
    (seed, k). ``callback(step, total, logs)`` runs after every step (progress, cancel).
    """
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if not 0 <= config.t_min <= config.t_max < len(alphas_cumprod):
        raise ValueError(f"need 0 <= t_min <= t_max < {len(alphas_cumprod)}, got "
                         f"[{config.t_min}, {config.t_max}]")
    params = list(params)
    opt = torch.optim.Adam(params, lr=config.lr)
    scale = float(config.loss_scale)
    history = []
    for k in range(config.steps):
        group = k % len(group_sizes)
        n = group_sizes[group]
        gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + k)
        idx = torch.randint(len(pool), (n,), generator=gen)
        t = torch.randint(config.t_min, config.t_max + 1, (n,), generator=gen)
        noise = torch.randn((n, *pool.shape[1:]), generator=gen)
        x0 = pool[idx.to(pool.device)]
        t, noise = t.to(pool.device), noise.to(pool.device)
        x_t = add_noise(x0, noise, t, alphas_cumprod)
        with torch.no_grad():
            target, reference = teacher(x_t, t, group)
        eps_trig, eps_clean, maps = student(x_t, t, group)
        loss, logs = sau_loss(eps_trig, eps_clean, target, maps, reference, config.weights)
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            for g in grads:
                g.div_(scale)
            opt.step()
        else:  # float16 overflow: skip the step, retry with a smaller scale
            scale = max(1.0, scale / 2)
            logs["skipped"] = 1.0
        history.append(logs)
        if callback is not None:
            callback(k + 1, config.steps, logs)
    return history
