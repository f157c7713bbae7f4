"""LoRA and the DreamBooth loss: the attacker's customisation step, in pure torch.

A mimic who wants a model of someone's face fine-tunes Stable Diffusion on a few photos of
them. Protection is measured against exactly this step, so it is reproduced here as the
attackers run it (Ruiz et al. 2023, "DreamBooth", eq. 2; Hu et al. 2022, "LoRA", eq. 3).

LoRA (low-rank adaptation) freezes a weight W ``[out, in]`` and learns a low-rank update:

    W' = W + ΔW,    ΔW = (α / r) · B A,    A ∈ ℝ^{r×in} (down),  B ∈ ℝ^{out×r} (up)

with rank r ≪ min(out, in). A starts uniform in ±1/√in (as ``nn.Linear``'s default init),
B starts at zero, so W' = W before the first step. For a convolution A is a conv with W's
kernel, stride and padding (``[r, in, kh, kw]``) and B a 1×1 conv (``[out, r, 1, 1]``);
ΔW = (α/r) · (B A) reshaped to W's shape.

DreamBooth fits the model to the instance images (the protected photos, prompt c_inst such as
"a photo of sks person") with the DDPM ε-prediction loss, and keeps the class prior (images of
"a person", prompt c_cls) with a second term — prior preservation:

    L(θ) = E_{z, t, ε} ‖ε_θ(x_t, t, c_inst) − ε‖²  +  λ_prior · E_{z', t', ε'} ‖ε_θ(x'_t', t', c_cls) − ε'‖²
    x_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε,    t ~ U{t_min … t_max},  ε ~ N(0, I)

z are the instance latents, z' the class latents; ‖·‖² is the mean over elements. θ here are
only the LoRA factors (A, B) of the chosen layers.

Protocols (any model can be plugged in):

- eps_fn: ``(x_t [B,c,h,w], t [B] long, cond) → ε̂ [B,c,h,w]``, differentiable in θ;
- alphas_cumprod: ``[T]`` tensor of ᾱ_t, t = 0 … T−1.

Example:
    >>> layers = inject_lora(unet, lora_targets(unet), rank=4, alpha=4.0, seed=0)
    >>> history = fine_tune(denoiser.eps, denoiser.alphas_cumprod, lora_parameters(layers),
    ...                     z_inst, c_inst, FineTuneConfig(steps=400, lr=1e-4), z_cls, c_cls)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoising import add_noise, check_timestep_range

# Linear layers of the UNet's self- (attn1) and cross-attention (attn2) blocks: the layers
# DreamBooth-LoRA trains (diffusers' train_dreambooth_lora, kohya's default for attention).
ATTENTION_TARGETS = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


# --------------------------------------------------------------------------- layers


def _init_down(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform(a=√5), nn.Linear's default
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = base(x) + (α/r)·B(A x)``.

    base: the linear layer (kept as is; its parameters are not trained);
    rank r ≥ 1, alpha α > 0; ``down`` A ``[r, in]``, ``up`` B ``[out, r]`` (zero at start), float32.
    x ``[..., in]`` → y ``[..., out]`` in the base layer's output dtype.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        check_rank_alpha(rank, alpha)
        out_dim, in_dim = base.weight.shape
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = base.weight.device
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.down = nn.Parameter(_init_down((self.rank, in_dim), in_dim, gen).to(device))
        self.up = nn.Parameter(torch.zeros(out_dim, self.rank, device=device))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> Tensor:
        """ΔW = (α/r)·B A, ``[out, in]`` float32."""
        return self.scale * (self.up @ self.down)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        low = F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)
        return y + (self.scale * low).to(y.dtype)


class LoRAConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` plus a trainable low-rank update (see the module docstring).

    ``down`` A ``[r, in, kh, kw]`` uses the base conv's stride, padding and dilation; ``up`` B
    ``[out, r, 1, 1]`` starts at zero. Grouped convs and non-zero padding modes are refused.
    x ``[B, in, H, W]`` → ``[B, out, H', W']``.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        check_rank_alpha(rank, alpha)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRA on a convolution needs groups=1 and zero padding")
        out_ch, in_ch, kh, kw = base.weight.shape
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = base.weight.device
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.down = nn.Parameter(_init_down((self.rank, in_ch, kh, kw), in_ch * kh * kw, gen).to(device))
        self.up = nn.Parameter(torch.zeros(out_ch, self.rank, 1, 1, device=device))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> Tensor:
        """ΔW = (α/r)·(B A) reshaped to the conv weight ``[out, in, kh, kw]``, float32."""
        flat = self.up.flatten(1) @ self.down.flatten(1)
        return self.scale * flat.view(self.base.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        b = self.base
        h = F.conv2d(x.to(self.down.dtype), self.down, None, b.stride, b.padding, b.dilation)
        return y + (self.scale * F.conv2d(h, self.up)).to(y.dtype)


LoRALayer = Union[LoRALinear, LoRAConv2d]


def check_rank_alpha(rank: int, alpha: float) -> None:
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not float(alpha) > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")


def lora_targets(root: nn.Module, pattern: str = ATTENTION_TARGETS) -> list[str]:
    """Names (relative to ``root``) of the Linear/Conv2d modules whose name matches ``pattern``."""
    regex = re.compile(pattern)
    return [name for name, m in root.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and regex.search("." + name)]


def inject_lora(root: nn.Module, names: Iterable[str], rank: int, alpha: float,
                seed: int = 0) -> dict[str, LoRALayer]:
    """Replace each named Linear/Conv2d in ``root`` (in place: pass a private copy) by its LoRA
    wrapper; returns ``{name: layer}``. A's initial values come from ``seed``, in name order."""
    gen = torch.Generator().manual_seed(int(seed))
    layers: dict[str, LoRALayer] = {}
    for name in sorted(names):
        module = root.get_submodule(name)
        if isinstance(module, nn.Linear):
            layer: LoRALayer = LoRALinear(module, rank, alpha, gen)
        elif isinstance(module, nn.Conv2d):
            layer = LoRAConv2d(module, rank, alpha, gen)
        else:
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear/Conv2d")
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer)
        layers[name] = layer
    if not layers:
        raise ValueError("no LoRA target layers were found in the model")
    return layers


def lora_parameters(layers: dict[str, LoRALayer]) -> list[nn.Parameter]:
    """The trainable factors (A, B) of every layer, in a fixed order."""
    return [p for name in sorted(layers) for p in (layers[name].down, layers[name].up)]


def lora_factors(layers: dict[str, LoRALayer]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{name: (down A, up B, alpha)}``: detached float32 CPU copies, as a LoRA file stores them."""
    return {name: (l.down.detach().float().cpu().clone(), l.up.detach().float().cpu().clone(), l.alpha)
            for name, l in sorted(layers.items())}


# --------------------------------------------------------------------------- loss


EpsFn = Callable[[Tensor, Tensor, Any], Tensor]


def eps_mse(eps_fn: EpsFn, alphas_cumprod: Tensor, z0: Tensor, cond: Any, t: Tensor,
            noise: Tensor) -> Tensor:
    """‖ε_θ(x_t, t, c) − ε‖² averaged over all elements (a scalar), x_t from z₀, t, ε."""
    x_t = add_noise(z0, noise.to(z0.device), t, alphas_cumprod)
    pred = eps_fn(x_t, t, cond)
    return F.mse_loss(pred.float(), noise.to(pred.device).float())


def dreambooth_loss(eps_fn: EpsFn, alphas_cumprod: Tensor,
                    z_instance: Tensor, cond_instance: Any, t: Tensor, noise: Tensor,
                    z_class: Optional[Tensor] = None, cond_class: Any = None,
                    t_class: Optional[Tensor] = None, noise_class: Optional[Tensor] = None,
                    prior_weight: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """DreamBooth loss (module docstring) for one batch → (scalar loss, logs).

    z_instance ``[B,c,h,w]`` with t ``[B]``, noise like z; the class batch likewise. Without a
    class batch (or with ``prior_weight == 0``) only the instance term is used. Logs
    ``instance``, ``prior`` (when used) and ``total`` as floats.
    """
    instance = eps_mse(eps_fn, alphas_cumprod, z_instance, cond_instance, t, noise)
    logs = {"instance": float(instance.detach())}
    loss = instance
    if z_class is not None and prior_weight != 0:
        if t_class is None or noise_class is None:
            raise ValueError("the class batch needs its own timesteps and noise")
        prior = eps_mse(eps_fn, alphas_cumprod, z_class, cond_class, t_class, noise_class)
        logs["prior"] = float(prior.detach())
        loss = instance + prior_weight * prior
    logs["total"] = float(loss.detach())
    return loss, logs


# --------------------------------------------------------------------------- training


@dataclass
class FineTuneConfig:
    """DreamBooth-LoRA training settings.

    steps: optimiser steps; lr: AdamW learning rate; batch_size: instance (and class) latents
    per step; t_min, t_max: inclusive DDPM timestep range; prior_weight: λ_prior;
    weight_decay: AdamW decay; max_grad_norm: gradient clipping (0 = off); seed: the draws of
    step k come from seed ``seed · 1_000_003 + k``.
    """

    steps: int = 400
    lr: float = 1e-4
    batch_size: int = 1
    t_min: int = 0
    t_max: int = 999
    prior_weight: float = 1.0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    loss_scale: float = 1.0

    def check(self, timesteps: int = 1000) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.loss_scale >= 1:
            raise ValueError(f"loss scale must be >= 1, got {self.loss_scale}")
        if self.prior_weight < 0:
            raise ValueError(f"prior weight must be >= 0, got {self.prior_weight}")
        check_timestep_range(self.t_min, self.t_max, timesteps)


def draw_batch(latents: Tensor, batch_size: int, t_min: int, t_max: int,
               gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (z, t, ε) batch: ``batch_size`` latents taken epoch-wise without repeats until
    every one was used, timesteps U{t_min … t_max} ``[B]``, noise like z. Drawn on the CPU."""
    n = latents.shape[0]
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-batch_size // n))])
    idx = order[:batch_size]
    t = torch.randint(int(t_min), int(t_max) + 1, (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *latents.shape[1:]), generator=gen)
    return latents[idx.to(latents.device)], t.to(latents.device), noise.to(latents.device)


def _unscale(params: list[nn.Parameter], scale: float) -> bool:
    """Divide the gradients by the loss scale; False if any is non-finite (step to skip)."""
    grads = [p.grad for p in params if p.grad is not None]
    if scale == 1.0:
        return True
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    for g in grads:
        g.div_(scale)
    return True


def fine_tune(eps_fn: EpsFn, alphas_cumprod: Tensor, params: list[nn.Parameter],
              instance_latents: Tensor, instance_cond: Any, config: FineTuneConfig,
              class_latents: Optional[Tensor] = None, class_cond: Any = None,
              callback: Optional[Callable[[int, int, dict[str, float]], None]] = None) -> list[dict[str, float]]:
    """Train ``params`` (the LoRA factors) with AdamW on the DreamBooth loss; returns the
    per-step logs (``instance``, ``prior`` when used, ``total``).

    instance_latents ``[N,c,h,w]`` (N ≥ 1) and class_latents ``[M,c,h',w']``, both already in
    the denoiser's latent space. ``callback(step, steps, logs)`` runs after every step
    (1-based): progress, cancellation (raise to stop).
    """
    config.check(len(alphas_cumprod))
    if instance_latents.shape[0] < 1:
        raise ValueError("fine-tuning needs at least one instance image")
    use_prior = class_latents is not None and config.prior_weight > 0
    if use_prior and class_latents.shape[0] < 1:
        raise ValueError("the class images batch is empty")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scale = float(config.loss_scale)
    history: list[dict[str, float]] = []
    for step in range(config.steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        z, t, noise = draw_batch(instance_latents, config.batch_size, config.t_min, config.t_max, gen)
        zc = tc = nc = None
        if use_prior:
            zc, tc, nc = draw_batch(class_latents, config.batch_size, config.t_min, config.t_max, gen)
        loss, logs = dreambooth_loss(eps_fn, alphas_cumprod, z, instance_cond, t, noise,
                                     zc, class_cond, tc, nc, config.prior_weight)
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()
        if _unscale(params, scale):
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
        else:  # half-precision overflow: skip this step, retry smaller
            scale = max(1.0, scale / 2)
        history.append(logs)
        if callback is not None:
            callback(step + 1, config.steps, logs)
    for p in params:
        p.requires_grad_(False)
    return history
