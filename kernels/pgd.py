"""Projected gradient descent over a set of objectives.

The optimiser knows nothing about faces or diffusion. It receives *objectives* and owns the
budget, the projection, 8-bit quantisation safety, masking, seeding, progress and early stop.

Units: images are ``[B, C, H, W]`` floats in ``[0, 1]``; ``eps`` and ``step`` are fractions of
the pixel range (8/255 ≈ 0.0314), never /255 integers.

An :class:`Objective` is configured once (by a node) and *bound* to the clean batch by PGD:
``objective.bind(clean)`` computes everything that depends only on the clean image (face
boxes, clean embeddings, clean latents) once, and returns a callable evaluated every step:

    bound(x_adv [B,C,H,W]) -> ObjectiveOutput(loss [B], logs {name: [B]}, reached [B] | None)

PGD *minimises* the weighted sum of the objectives. With several objectives the gradient of
each one is L2-normalised per sample before the weighted sum (IDGuardian's dual-gradient rule):

    g = Σ_k w_k · ∇_δ L_k / ‖∇_δ L_k‖₂

and the step is ``δ ← Π(δ − α·sign(g))`` for L∞ or ``δ ← Π(δ − α·√N·g/‖g‖₂)`` for L2, where Π
projects onto the budget, the optional mask and the valid pixel range.

L2 budget convention: ``eps`` is an RMS budget per pixel value, so ‖δ‖₂ ≤ eps·√N with N = C·H·W;
the same number then means a similar visibility at any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .errors import EmptyBatchError, ProtectionFailed


@dataclass
class ObjectiveOutput:
    """What a bound objective returns for one PGD step.

    loss: ``[B]`` per-sample loss to *minimise*; it must keep the autograd graph to ``x_adv``.
    logs: ``{name: [B]}`` detached numbers to record (similarities, distances, ...).
    reached: ``[B]`` bool, True where the objective's own target is met (for early stop), or
        None when the objective has no target.
    restart: ``[B]`` bool, True where PGD should put the perturbation back to its start δ₀ after
        this step (the objective begins a new phase that the current δ would only hinder, e.g.
        detector poisoning switching from shrinking the face box to growing it). It resets the
        whole image, so every chained objective starts that image again.
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    reached: Optional[Tensor] = None
    restart: Optional[Tensor] = None


BoundObjective = Callable[[Tensor], ObjectiveOutput]


class Objective(Protocol):
    """A loss configured once and bound to a clean batch by :func:`protect`."""

    name: str
    weight: float

    def bind(self, clean: Tensor) -> BoundObjective:  # clean [B,C,H,W] in [0,1]
        ...


MAX_EPS = 32 / 255  # the largest budget accepted (fraction of the pixel range)


@dataclass
class PGDConfig:
    """Budget and schedule. ``eps`` and ``step`` are fractions of the [0, 1] pixel range."""

    eps: float = 8 / 255
    step: float = 0.005
    iterations: int = 200
    norm: str = "linf"  # "linf" | "l2"
    random_start: bool = False
    seed: int = 0
    early_stop: bool = True
    quantize: bool = True  # return pixels on the 8-bit grid, still within eps of the clean image

    def validate(self) -> None:
        """Refuse budgets and schedules that cannot protect: NaN/inf, ε outside [1/255, 32/255]
        under L∞ (below one 8-bit step nothing survives saving; above 32/255 the change is
        plainly visible), a step ≤ 0, a negative iteration count or an unknown norm."""
        for name, v in (("eps", self.eps), ("step", self.step)):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}. Use e.g. eps 8/255, step 1.275/255.")
        if not (0.0 < self.eps <= MAX_EPS + 1e-9):
            raise ValueError(
                f"eps must be in (0, 32/255]; got {self.eps * 255:.3g}/255. "
                "Use a budget between 1 and 32 (in /255 units); 8 is the usual choice, above 16 it shows."
            )
        if self.norm == "linf" and self.eps * 255 < 1 - 1e-6:
            raise ValueError(
                f"eps {self.eps * 255:.3g}/255 is below one 8-bit step: the saved image would be unchanged. "
                "Use at least 1 (in /255 units); 8 is the usual choice."
            )
        if self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step * 255:.3g}/255. Use e.g. 1.275 (/255).")
        if isinstance(self.iterations, bool) or int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"iterations must be a whole number >= 0, got {self.iterations!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")


@dataclass
class StepRecord:
    """One PGD step: total loss and each objective's loss and logs, all ``[B]`` CPU tensors."""

    step: int
    total: Tensor
    losses: dict[str, Tensor]
    logs: dict[str, Tensor]


@dataclass
class PGDResult:
    protected: Tensor  # [B,C,H,W] in [0,1], detached
    history: list[StepRecord]
    steps_run: int
    stopped_early: bool
    config: PGDConfig
    final_logs: dict[str, Tensor] = field(default_factory=dict)  # objectives' logs on ``protected``
    final_losses: dict[str, Tensor] = field(default_factory=dict)


class Interrupted(Exception):
    """Raised by a callback to stop the optimisation; PGD lets it propagate."""


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample of ``t`` ``[B, ...]``, shaped ``[B, 1, 1, 1]`` for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, clean: Tensor, eps: float, norm: str, mask: Optional[Tensor] = None) -> Tensor:
    """Project a perturbation onto the budget, the mask and the valid pixel range.

    delta, clean: ``[B,C,H,W]``; mask: ``[B,1,H,W]`` in [0, 1] or None. Returns a new tensor.
    """
    if mask is not None:
        delta = delta * mask
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        budget = eps * math.sqrt(delta[0].numel())
        delta = delta * (budget / _per_sample_norm(delta)).clamp(max=1.0)
    return (clean + delta).clamp(0.0, 1.0) - clean


def quantize_within_budget(
    clean: Tensor, adv: Tensor, eps: float, norm: str, mask: Optional[Tensor] = None
) -> Tensor:
    """Snap ``adv`` to the 8-bit grid so that what SaveImage writes still respects the budget.

    The clean image is taken on its own 8-bit grid, c8 = round(255·clean); the perturbation in
    8-bit steps is rounded *toward zero*, d = trunc(255·adv − c8), and clipped to
    |d| ≤ floor(255·eps). Then |d| ≤ 255·|δ| per pixel, so both the L∞ and the L2 budgets
    hold after quantisation (under L2, on an image off the grid, the steps are shrunk until the
    rounding of the clean pixels fits too); pixels outside a binary mask are returned exactly
    as they were (the clean values, on the grid or not).
    Under L∞ a step within 10⁻³ of the next whole 8-bit step counts as that step: float32
    rounding makes 255·(c + 8/255) − 255·c land at 7.99999 for about one pixel in ten, and a
    plain trunc would silently spend 7/255 of an 8/255 budget there (taken only where it keeps
    |q − clean| ≤ ε + 4·10⁻⁷, which matters for a clean image off the 8-bit grid).
    k/255 in float32 survives SaveImage's ``uint8(255·x)`` exactly for every k (checked in tests).
    """
    c8 = torch.round(clean * 255.0).clamp(0, 255)
    v = adv * 255.0 - c8
    d = torch.trunc(v)
    if norm == "linf":
        # the snap is taken only where it keeps |q − clean| ≤ ε (a clean image off the 8-bit grid)
        snap = torch.trunc(v + torch.sign(v) * 1e-3)
        d = torch.where((c8 + snap - clean * 255.0).abs() <= eps * 255.0 + 1e-4, snap, d)
        lim = math.floor(eps * 255.0 + 1e-6)
        d = d.clamp(-lim, lim)
    q = (c8 + d).clamp(0, 255)
    if norm == "l2":
        # on an image off the 8-bit grid the rounding c8 − 255·clean counts against the budget
        # too: shrink the steps of an image until ‖q − clean‖₂ ≤ ε·√N holds
        budget = eps * 255.0 * math.sqrt(clean[0].numel()) + 1e-4
        shape = (-1, *([1] * (d.dim() - 1)))
        for _ in range(64):
            kept = q if mask is None else torch.where(mask > 0, q, clean * 255.0)  # as returned below
            norm = (kept - clean * 255.0).flatten(1).norm(dim=1)
            over = norm > budget
            if not bool(over.any()):
                break
            ratio = (budget / norm.clamp_min(1e-12)).clamp(max=0.98).view(shape)
            d = torch.where(over.view(shape), torch.trunc(d * ratio), d)
            q = (c8 + d).clamp(0, 255)
    q = q / 255.0
    if mask is not None:  # outside the mask: the clean pixels themselves, untouched
        q = torch.where(mask > 0, q, clean)
    return q


def combine_gradients(grads: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """IDGuardian's rule: Σ_k w_k · g_k / ‖g_k‖₂, the norm taken per sample."""
    total = torch.zeros_like(grads[0])
    for g, w in zip(grads, weights):
        total = total + w * g / _per_sample_norm(g)
    return total


StepCallback = Callable[[int, int, Tensor, StepRecord], None]


def protect(
    clean: Tensor,
    objectives: Sequence[Objective],
    config: PGDConfig = PGDConfig(),
    mask: Optional[Tensor] = None,
    callback: Optional[StepCallback] = None,
    init: Optional[Tensor] = None,
) -> PGDResult:
    """Optimise a protective perturbation of ``clean`` that minimises the objectives.

    clean: ``[B,C,H,W]`` in [0, 1] (any size); objectives: at least one :class:`Objective`;
    mask: ``[B or 1, 1, H, W]`` in [0, 1] — only where it is > 0 may pixels change;
    callback(step, total_steps, x_adv, record) is called after every step (progress, preview,
    cancellation: raise :class:`Interrupted` or any exception to stop);
    init: a starting perturbation δ₀ ``[B or 1,C,H,W]`` (fractions of the pixel range, e.g. an
    earlier result minus ``clean``) to continue from. It is projected onto the budget, the mask
    and the pixel range, and replaces the seeded start (so ``random_start`` must be off).

    Early stop: when ``config.early_stop`` and every objective that reports ``reached`` reports
    it for every sample, the optimisation stops (fewer visible changes). Samples are not dropped
    individually; the batch stops together.

    Returns a :class:`PGDResult` whose ``protected`` is detached and, with ``config.quantize``,
    on the 8-bit grid within the budget.

    Example:
        >>> res = protect(img, [IdentityObjective(...)], PGDConfig(eps=8/255, iterations=50))
    """
    config.validate()
    if not objectives:
        raise ValueError("PGD needs at least one objective to optimise.")
    clean, mask = check_inputs(clean, mask)

    with torch.no_grad():
        bound = [obj.bind(clean) for obj in objectives]
    names = _unique_names([obj.name for obj in objectives])
    weights = [float(obj.weight) for obj in objectives]

    gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
    if init is not None:
        if config.random_start:
            raise ValueError("PGD got both a starting perturbation (init) and random_start: pick one")
        if init.dim() != 4 or init.shape[1:] != clean.shape[1:] or init.shape[0] not in (1, clean.shape[0]):
            raise ValueError(f"init must be a perturbation shaped like the image {tuple(clean.shape)} "
                             f"(or one for all), got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init (the starting perturbation) contains NaN or infinite values.")
        delta = project(init.detach().to(clean).expand_as(clean).clone(), clean, config.eps, config.norm, mask)
    elif config.random_start:
        noise = torch.rand(clean.shape, generator=gen) * 2 - 1
        delta = noise.to(clean) * config.eps
        if config.norm == "l2":
            delta = delta / math.sqrt(3.0)  # uniform noise on [-eps, eps] has RMS eps/√3
        delta = project(delta, clean, config.eps, config.norm, mask)
    else:
        # δ = 0 is a stationary point of similarity losses (cos and distances are extremal
        # there, so the gradient is exactly 0 and sign steps never move): start from a seeded
        # jitter of half a step instead. It is far below one 8-bit level.
        jitter = (torch.rand(clean.shape, generator=gen) * 2 - 1) * 0.5 * min(config.step, config.eps)
        delta = project(jitter.to(clean), clean, config.eps, config.norm, mask)

    start = delta.detach().clone()
    history: list[StepRecord] = []
    stopped_early = False
    steps_run = 0
    for step in range(config.iterations):
        delta.requires_grad_(True)
        x_adv = clean + delta
        grads, losses, logs, reached_all = [], {}, {}, True
        any_target = False
        restart = None  # [B] bool: images an objective asks to start again
        for name, fn in zip(names, bound):
            out = fn(x_adv)
            (g,) = torch.autograd.grad(out.loss.sum(), delta, retain_graph=False, allow_unused=True)
            if g is None:
                raise RuntimeError(
                    f"objective {name!r} does not depend on the image: its loss has no gradient "
                    "with respect to the pixels"
                )
            _check_finite(name, step, out.loss, g)
            grads.append(g)
            losses[name] = out.loss.detach().cpu()
            for k, v in out.logs.items():
                logs[f"{name}/{k}"] = v.detach().float().cpu()
            if out.reached is not None:
                any_target = True
                reached_all = reached_all and bool(out.reached.all())
            if out.restart is not None:
                r = out.restart.to(clean.device, torch.bool)
                restart = r if restart is None else restart | r
            del out
            # the graph of x_adv is rebuilt per objective: keeps peak memory to one objective
            if len(bound) > 1:
                x_adv = clean + delta
        total = sum(w * losses[n] for n, w in zip(names, weights))
        record = StepRecord(step=step, total=total, losses=losses, logs=logs)
        history.append(record)
        steps_run = step + 1

        if config.early_stop and any_target and reached_all:
            stopped_early = True
            delta = delta.detach()
            if callback is not None:
                callback(step + 1, config.iterations, (clean + delta).detach(), record)
            break

        with torch.no_grad():
            g = combine_gradients(grads, weights)
            if mask is not None:
                g = g * mask
            if config.norm == "linf":
                delta = delta - config.step * g.sign()
            else:
                scale = config.step * math.sqrt(clean[0].numel())
                delta = delta - scale * g / _per_sample_norm(g)
            delta = project(delta, clean, config.eps, config.norm, mask)
            if restart is not None and bool(restart.any()):
                delta = torch.where(restart.view(-1, 1, 1, 1), start, delta)
        if callback is not None:
            callback(step + 1, config.iterations, (clean + delta).detach(), record)

    adv = (clean + delta.detach()).clamp(0, 1)
    if config.quantize:
        adv = quantize_within_budget(clean, adv, config.eps, config.norm, mask)
    final_logs, final_losses = {}, {}
    with torch.no_grad():  # what the objectives say of the image actually returned
        for name, fn in zip(names, bound):
            out = fn(adv)
            _check_finite(name, config.iterations, out.loss)
            final_losses[name] = out.loss.detach().float().cpu()
            for k, v in out.logs.items():
                final_logs[f"{name}/{k}"] = v.detach().float().cpu()
    return PGDResult(
        protected=adv.detach(), history=history, steps_run=steps_run,
        stopped_early=stopped_early, config=config, final_logs=final_logs, final_losses=final_losses,
    )


def check_inputs(clean: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Refuse what cannot be protected, before any work: not a ``[B,C,H,W]`` batch, an empty
    batch, NaN/inf pixels, a mask with NaN/inf or one that allows no pixel of some image to change.
    Returns float copies ``(clean [B,C,H,W], mask [B,1,H,W] | None)``."""
    if clean.dim() != 4:
        raise ValueError(f"expected an image batch [B,C,H,W], got shape {tuple(clean.shape)}")
    if clean.shape[0] == 0 or clean.numel() == 0:
        raise EmptyBatchError(
            f"the image batch is empty (shape {tuple(clean.shape)}): the node that feeds it produced no image "
            "(e.g. Detector Crop drops every photo in which it finds no face). Nothing can be protected; "
            "check the images upstream."
        )
    clean = clean.detach().clone().float()
    if not bool(torch.isfinite(clean).all()):
        raise ValueError("the image contains NaN or infinite pixel values; load it again or fix the node upstream.")
    if mask is None:
        return clean, None
    if not bool(torch.isfinite(mask).all()):
        raise ValueError("the mask contains NaN or infinite values; use a MASK in [0, 1].")
    mask = mask.detach().to(clean).expand(clean.shape[0], 1, *clean.shape[2:]).clone()
    empty = [i for i in range(mask.shape[0]) if not bool((mask[i] > 0).any())]
    if empty:
        raise ProtectionFailed(
            f"the mask allows no pixel to change in image(s) {empty}: nothing would be protected. Use a mask "
            "that is 1 where the image may change (Load Image's MASK is 1 where the picture is transparent: "
            "for a cut-out face, invert it with Invert Mask), or leave 'mask' unconnected."
        )
    return clean, mask


def _check_finite(name: str, step: int, loss: Tensor, grad: Optional[Tensor] = None) -> None:
    """Stop at the first non-finite loss or gradient: a sign step of NaN would turn the whole
    image into NaN (an all-black PNG)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    what = "loss"
    if not bad and grad is not None and not bool(torch.isfinite(grad).all()):
        bad, what = True, "gradient"
    if bad:
        raise ProtectionFailed(
            f"objective {name!r} produced a non-finite {what} (NaN or inf) at PGD step {step}: the protection "
            "would be garbage, so nothing is returned. Check the objective's inputs (models in fp16 can "
            "overflow; an image without the face or text the objective needs), or lower its weight."
        )


def check_protected(clean: Tensor, protected: Tensor, eps: float, norm: str,
                    mask: Optional[Tensor] = None, quantized: bool = True) -> dict[str, Tensor]:
    """The guarantees a "protected" image must meet before a node returns it; raises
    :class:`ProtectionFailed` naming the cause otherwise.

    clean, protected: ``[B,C,H,W]`` in [0, 1]; eps: budget (fraction); norm: "linf" | "l2";
    mask ``[B or 1,1,H,W]`` or None; quantized: the image is meant to be on the 8-bit grid.
    Checks: finite, in [0, 1], within the budget (L∞: max |δ| ≤ ε; L2: ‖δ‖₂ ≤ ε·√N), on the
    8-bit grid, unchanged outside a mask, and changed in every image (L∞ ≥ one 8-bit step).
    Returns ``{"linf_255": [B], "psnr_db": [B]}`` as measured.
    """
    if not bool(torch.isfinite(protected).all()):
        raise ProtectionFailed("the protected image contains NaN or infinite values; nothing is returned.")
    if protected.shape != clean.shape:
        raise ProtectionFailed(f"the protected image is {tuple(protected.shape)}, the input {tuple(clean.shape)}.")
    if float(protected.min()) < 0 or float(protected.max()) > 1:
        raise ProtectionFailed("the protected image leaves the pixel range [0, 1].")
    delta = (protected.double() - clean.double())
    tol = 1e-5
    if quantized:
        q = protected.double() * 255
        off = (q - q.round()).abs() > 1e-3
        if mask is not None:  # outside the mask the clean pixels are returned as they were
            off = off & (mask.to(off.device).expand(off.shape[0], 1, *off.shape[2:]) > 0)
        if bool(off.any()):
            raise ProtectionFailed("the protected image is not on the 8-bit grid: saving would change it.")
    if norm == "linf":
        over = delta.flatten(1).abs().amax(1) > eps + tol
    else:
        over = delta.flatten(1).norm(dim=1) > eps * math.sqrt(delta[0].numel()) * (1 + 1e-6) + tol
    if bool(over.any()):
        raise ProtectionFailed(f"image(s) {over.nonzero().flatten().tolist()} exceed the budget ε = "
                               f"{eps * 255:.3g}/255 ({norm}); nothing is returned.")
    if mask is not None:
        outside = (mask.to(delta.device).expand(delta.shape[0], 1, *delta.shape[2:]) <= 0)
        if bool((delta.abs() * outside).amax() > tol):
            raise ProtectionFailed("pixels outside the mask changed; nothing is returned.")
    linf = torch.round(delta.flatten(1).abs().amax(1) * 255 * 1000) / 1000  # float32 k/255 is not exact
    unchanged = (linf < 0.5).nonzero().flatten().tolist()
    if unchanged:
        raise ProtectionFailed(
            f"image(s) {unchanged} came out unchanged (no pixel moved by one 8-bit step): they are NOT protected. "
            "Likely causes: the objectives' gradients vanish there (no face where a face recogniser looks, a "
            "mask that excludes the face), too few iterations, or a step too small to reach one 8-bit level. "
            "Raise iterations or step, or check the mask and the objectives."
        )
    mse = delta.pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-20))
    return {"linf_255": linf.float().cpu(), "psnr_db": psnr.float().cpu()}


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
