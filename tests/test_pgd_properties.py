"""Property tests of the PGD kernel (kernels/pgd.py) with hypothesis.

Random batches (B 1–3, H/W 1–40), clean images on and off the 8-bit grid, masks (none, binary,
soft; never all-zero per image), ε 1–32 /255, steps, L∞/L2, cheap stand-in objectives (pull
towards a random target, push away from a random point, a saturating one with a target),
1–5 iterations, random start and quantisation on/off. Tensors are drawn from a seeded torch
generator (hypothesis draws the seed and the shape), so each example is cheap.

Deterministic in CI: ``derandomize=True``; the example counts below add up to 1,300.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from immunize.kernels.errors import ProtectionFailed  # noqa: E402
from immunize.kernels.pgd import (ObjectiveOutput, PGDConfig, check_protected, project,  # noqa: E402
                                  protect, quantize_within_budget)

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TOL = 2e-6  # float32 slack (the 8-bit snap itself allows 1e-4/255 ≈ 4e-7)


# ------------------------------------------------------------------ stand-in objectives
@dataclass
class Pull:
    """Pull towards a random target image: loss = ‖x − target‖²."""

    target: torch.Tensor
    name: str = "pull"
    weight: float = 1.0

    def bind(self, clean):
        t = self.target.to(clean)
        return lambda x: ObjectiveOutput(loss=(x - t).pow(2).flatten(1).sum(1))


@dataclass
class Push:
    """Push away from a random point: loss = −‖x − p‖²."""

    point: torch.Tensor
    name: str = "push"
    weight: float = 0.5

    def bind(self, clean):
        p = self.point.to(clean)
        return lambda x: ObjectiveOutput(loss=-(x - p).pow(2).flatten(1).sum(1))


@dataclass
class Saturating:
    """Saturates: max(0, mean|x − target| − margin); reports its target reached at 0 (early stop)."""

    target: torch.Tensor
    margin: float
    name: str = "saturating"
    weight: float = 2.0

    def bind(self, clean):
        t = self.target.to(clean)

        def fn(x):
            loss = ((x - t).abs().flatten(1).mean(1) - self.margin).clamp_min(0)
            return ObjectiveOutput(loss=loss, logs={"gap": loss.detach()}, reached=loss.detach() <= 0)
        return fn


# ------------------------------------------------------------------ strategies
@st.composite
def problems(draw, mask_kinds=("none", "binary", "soft")):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    on_grid = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(b, 3, h, w, generator=g)
    if on_grid:
        clean = torch.round(clean * 255) / 255
    if draw(st.booleans()):  # saturated pixels, where projection onto [0, 1] matters
        clean = torch.where(torch.rand(clean.shape, generator=g) < 0.2, clean.round(), clean)
    kind = draw(st.sampled_from(mask_kinds))
    mask = None
    if kind != "none":
        m = (torch.rand(b, 1, h, w, generator=g) < draw(st.floats(0.1, 0.9))).float()
        for i in range(b):  # never all-zero per image
            if not bool(m[i].any()):
                m[i, 0, int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))] = 1.0
        if kind == "soft":
            m = m * (0.25 + 0.75 * torch.rand(b, 1, h, w, generator=g))
        if draw(st.booleans()) and b > 1 and kind == "binary":
            m = m[:1]  # one mask for the whole batch
        mask = m
    eps = draw(st.integers(1, 32)) / 255
    return clean, mask, kind, eps, on_grid, g


def _objectives(draw, clean, g):
    kind = draw(st.sampled_from(["pull", "push", "saturating", "pull+push", "all"]))
    target = torch.rand(clean.shape, generator=g)
    point = torch.rand(clean.shape, generator=g)
    margin = draw(st.floats(0.0, 0.5))
    objs = {"pull": [Pull(target)], "push": [Push(point)], "saturating": [Saturating(target, margin)],
            "pull+push": [Pull(target), Push(point)],
            "all": [Pull(target), Push(point), Saturating(target, margin)]}[kind]
    return objs


def _config(draw, eps):
    return PGDConfig(
        eps=eps,
        step=draw(st.sampled_from([0.01, 0.5, 1.0, 1.275, 2.0, 4.0, 16.0])) / 255,
        iterations=draw(st.integers(1, 5)),
        norm=draw(st.sampled_from(["linf", "l2"])),
        random_start=draw(st.booleans()),
        seed=draw(st.integers(0, 1000)),
        early_stop=draw(st.booleans()),
        quantize=draw(st.booleans()),
    )


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def assert_in_budget(clean, out, eps, norm, mask, binary_mask, quantized, on_grid):
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    delta = out.double() - clean.double()
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + TOL, f"L∞ {float(delta.abs().max()) * 255:.6f}/255 > ε {eps * 255}"
    else:
        n = delta[0].numel()
        norms = delta.flatten(1).norm(dim=1)
        assert bool((norms <= eps * math.sqrt(n) * (1 + 1e-6) + TOL).all()), (
            f"‖δ‖₂ {norms.tolist()} > ε√N {eps * math.sqrt(n)}")
    inside = torch.ones_like(delta, dtype=torch.bool)
    if mask is not None:
        inside = (mask.expand(clean.shape[0], 1, *clean.shape[2:]) > 0).expand_as(delta)
    if quantized:  # where pixels may change, on the grid; outside a mask, the clean pixels as they were
        q = out.double() * 255
        assert _max((q - q.round()).abs()[inside]) <= 1e-3, "not on the 8-bit grid"
    if mask is not None and binary_mask:
        assert _max(delta.abs()[~inside]) == 0.0, "a pixel outside the mask changed"


# ------------------------------------------------------------------ properties
@settings(max_examples=500, **SETTINGS)
@given(problems(), st.data())
def test_protect_stays_in_budget_range_mask_and_grid(problem, data):
    """protect(): output finite, in [0, 1], within the ε-ball (L∞, or ‖δ‖₂ ≤ ε√N), unchanged
    outside a binary mask, on the 8-bit grid when quantising."""
    clean, mask, kind, eps, on_grid, g = problem
    objs = _objectives(data.draw, clean, g)
    cfg = _config(data.draw, eps)
    res = protect(clean, objs, cfg, mask)
    assert res.protected.shape == clean.shape
    assert 1 <= res.steps_run <= cfg.iterations
    assert_in_budget(clean, res.protected, eps, cfg.norm, mask, kind == "binary", cfg.quantize, on_grid)


@settings(max_examples=100, **SETTINGS)
@given(problems(mask_kinds=("binary", "soft")), st.data())
def test_protect_refuses_a_mask_that_is_all_zero_in_some_image(problem, data):
    clean, mask, _, eps, _, g = problem
    bad = data.draw(st.integers(0, clean.shape[0] - 1))
    mask = mask.expand(clean.shape[0], 1, *clean.shape[2:]).clone()
    mask[bad] = 0.0
    with pytest.raises(ProtectionFailed, match=r"mask allows no pixel to change"):
        protect(clean, _objectives(data.draw, clean, g), _config(data.draw, eps), mask)


@settings(max_examples=300, **SETTINGS)
@given(problems(), st.data())
def test_check_protected_accepts_changed_quantized_results_and_rejects_unchanged(problem, data):
    """Every quantised protect() result on an 8-bit clean image that moved each image by at
    least one 8-bit step passes check_protected; the clean image itself never does."""
    clean, mask, kind, eps, on_grid, g = problem
    clean = torch.round(clean * 255) / 255  # what Load Image gives PGD Protect
    cfg = _config(data.draw, eps)
    cfg.quantize = True
    res = protect(clean, _objectives(data.draw, clean, g), cfg, mask)
    moved = (res.protected.double() - clean.double()).flatten(1).abs().amax(1) * 255
    if bool((moved >= 1 - 1e-4).all()):
        stats = check_protected(clean, res.protected, eps, cfg.norm, mask)
        assert bool((stats["linf_255"] >= 1).all())
    else:
        with pytest.raises(ProtectionFailed, match="unchanged"):
            check_protected(clean, res.protected, eps, cfg.norm, mask)
    with pytest.raises(ProtectionFailed, match="unchanged"):
        check_protected(clean, clean.clone(), eps, cfg.norm, mask)


@settings(max_examples=400, **SETTINGS)
@given(problems(), st.sampled_from(["linf", "l2"]), st.floats(0.0, 1.0))
def test_quantize_within_budget_alone_keeps_every_budget(problem, norm, scale):
    """quantize_within_budget on any adversarial image within the budget (projected random
    δ, scaled): on the grid, in [0, 1], within ε (L∞), unchanged outside a binary mask."""
    clean, mask, kind, eps, on_grid, g = problem
    raw = (torch.rand(clean.shape, generator=g) * 2 - 1) * eps * 3 * scale
    if torch.rand(1, generator=g).item() < 0.3:  # δ exactly at ±ε (the float32 7.9999 case)
        raw = torch.sign(raw) * eps
    delta = project(raw, clean, eps, norm, mask)
    q = quantize_within_budget(clean, clean + delta, eps, norm, mask)
    assert_in_budget(clean, q, eps, norm, mask, kind == "binary", True, on_grid)


# ------------------------------------------------------------------ clean images off the 8-bit grid
# Load Image never gives one, but a node upstream of PGD Protect can (blur, resize, blend): the
# rounding of the clean pixels counts against an L2 budget, and outside a mask the clean pixels
# come back exactly as they were.

def test_quantized_l2_budget_holds_for_off_grid_images():
    clean = torch.full((1, 3, 4, 4), 100.4 / 255)
    eps = 1 / 255
    delta = torch.zeros_like(clean)
    delta[0, 0, 0, 0] = eps * math.sqrt(clean[0].numel())  # the whole L2 budget in one pixel
    q = quantize_within_budget(clean, clean + delta, eps, "l2")
    n = float((q.double() - clean.double()).flatten(1).norm(dim=1).max())
    assert n <= eps * math.sqrt(clean[0].numel()) + TOL, f"‖q − clean‖₂ = {n * 255:.3f}/255 > ε√N = 6.928/255"


def test_check_protected_accepts_a_masked_result_of_an_off_grid_image():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 16, 16, generator=g)  # off the 8-bit grid
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    res = protect(clean, [Pull(torch.rand(clean.shape, generator=g))], PGDConfig(eps=8 / 255, iterations=3), mask)
    check_protected(clean, res.protected, 8 / 255, "linf", mask)
