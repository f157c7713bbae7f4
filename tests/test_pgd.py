"""PGD kernel: budgets, quantisation safety, masks, gradient combination, early stop."""

import math

import numpy as np
import pytest
import torch

from immunize.kernels.pgd import (
    ObjectiveOutput, PGDConfig, combine_gradients, protect, quantize_within_budget,
)


class PullTo:
    """Toy objective: squared distance of the image to a target (minimised)."""

    def __init__(self, target, weight=1.0, name="pull", stop_below=None):
        self.target, self.weight, self.name, self.stop_below = target, weight, name, stop_below

    def bind(self, clean):
        def f(x):
            d = (x - self.target).pow(2).flatten(1).mean(1)
            reached = None if self.stop_below is None else d < self.stop_below
            return ObjectiveOutput(loss=d, logs={"mse": d.detach()}, reached=reached)
        return f


def _img(b=2, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, 3, h, w), generator=g) / 255.0).float()


def test_linf_budget_holds_after_8bit_save_like_comfyui():
    clean = _img()
    res = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=8 / 255, step=2 / 255, iterations=10))
    # ComfyUI's SaveImage: uint8(clip(255·x)) — truncation, not rounding
    saved = np.clip(255.0 * res.protected.numpy(), 0, 255).astype(np.uint8).astype(int)
    orig = np.clip(255.0 * clean.numpy(), 0, 255).astype(np.uint8).astype(int)
    assert np.abs(saved - orig).max() == 8  # the budget is used fully and never exceeded
    assert torch.equal(res.protected * 255, torch.round(res.protected * 255))


def test_quantize_respects_budget_for_off_grid_inputs():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(1, 3, 16, 16, generator=g)
    adv = (clean + (torch.rand(clean.shape, generator=g) * 2 - 1) * 0.05).clamp(0, 1)
    q = quantize_within_budget(clean, adv, eps=6 / 255, norm="linf")
    c8 = torch.round(clean * 255)
    assert (q * 255 - c8).abs().max() <= 6
    assert (torch.floor(q * 255 + 1e-4) == torch.round(q * 255)).all()
    # a perturbation at the budget's edge, as PGD's sign steps leave it, on a clean image a hair
    # off the grid (where a blind snap to the next whole 8-bit step would overshoot ε): still within ε
    clean = (torch.randint(8, 248, clean.shape, generator=g) + (torch.rand(clean.shape, generator=g) - 0.5)
             * 2e-3) / 255
    edge = clean + torch.sign(torch.rand(clean.shape, generator=g) - 0.5) * 6 / 255
    q = quantize_within_budget(clean, edge, eps=6 / 255, norm="linf")
    assert (q - clean).abs().max() <= 6 / 255 + 1e-6


def test_quantize_keeps_the_whole_linf_budget_of_8bit_images():
    # float32 makes 255·(c + 8/255) − 255·c land just under 8 for some c: those steps must stay 8
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 256, (1, 3, 64, 64), generator=g).float() / 255
    sign = torch.randint(0, 2, clean.shape, generator=g).float() * 2 - 1
    adv = (clean + sign * 8 / 255).clamp(0, 1)
    d = quantize_within_budget(clean, adv, eps=8 / 255, norm="linf") * 255 - torch.round(clean * 255)
    room = torch.where(sign > 0, 255 - clean * 255, clean * 255).round().clamp(max=8)  # 8 unless clipped at 0/255
    assert torch.equal(d.round().abs(), room)


def test_objective_can_restart_an_image_from_its_start():
    clean = _img(seed=4)
    target = torch.ones_like(clean)

    class RestartFirst(PullTo):  # asks PGD to start image 0 again after step 3, image 1 never
        def bind(self, clean):
            inner, step = super().bind(clean), [0]

            def f(x):
                out = inner(x)
                out.restart = torch.tensor([step[0] == 3, False])
                step[0] += 1
                return out
            return f

    cfg = PGDConfig(eps=16 / 255, step=4 / 255, iterations=5)
    plain = protect(clean, [PullTo(target)], cfg)
    res = protect(clean, [RestartFirst(target)], cfg)
    assert torch.equal(res.protected[1], plain.protected[1])  # untouched image: same path
    moved = lambda r: float(((r.protected[0] - clean[0]).abs().max() * 255).round())  # noqa: E731
    # image 0 had 4 steps undone: one step of 4/255 from its start (a jitter of ≤ 2/255), where
    # plain PGD reached 16/255
    assert moved(plain) == 16 and moved(res) <= 6


def test_pgd_lowers_its_objective_and_moves_toward_target():
    clean = _img(seed=3)
    target = torch.ones_like(clean)
    res = protect(clean, [PullTo(target)], PGDConfig(eps=16 / 255, step=4 / 255, iterations=8))
    before = (clean - target).pow(2).mean()
    after = (res.protected - target).pow(2).mean()
    assert after < before - 1e-3
    assert res.steps_run == 8 and len(res.history) == 8
    assert float(res.history[-1].total.mean()) < float(res.history[0].total.mean())


def test_mask_confines_changes():
    clean = _img(b=1, h=16, w=16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    res = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=8 / 255, step=2 / 255, iterations=5), mask=mask)
    diff = (res.protected - clean).abs()
    assert diff[..., 8:, :].max() == 0
    assert diff[..., :8, :].max() > 0


def test_l2_budget_is_rms_per_pixel():
    clean = torch.full((1, 3, 32, 32), 0.5)
    res = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=4 / 255, step=2 / 255, iterations=10, norm="l2"))
    rms = (res.protected - clean).pow(2).mean().sqrt() * 255
    assert 2.0 < rms <= 4.0 + 1e-4


def test_gradients_are_normalised_per_objective():
    big = torch.full((2, 3, 4, 4), 1000.0)
    small = torch.zeros(2, 3, 4, 4)
    small[:, :, 0, 0] = 1e-3
    g = combine_gradients([big, small], [1.0, 1.0])
    # after normalisation neither objective dominates: both unit-norm contributions survive
    assert torch.allclose(g[:, :, 0, 0], torch.full((2, 3), 1 / math.sqrt(48) + 1 / math.sqrt(3)), atol=1e-5)
    assert torch.allclose(g[:, :, 1, 1], torch.full((2, 3), 1 / math.sqrt(48)), atol=1e-5)


def test_two_objectives_are_balanced_by_normalisation():
    clean = torch.full((1, 3, 8, 8), 0.5)
    up = torch.ones_like(clean)  # pulls every pixel up, with a 1000x larger loss
    down = clean.clone()
    down[..., :4] = 0.0  # pulls only the left half down
    big = PullTo(up, name="up")
    big_bind = big.bind

    def scaled(c):
        f = big_bind(c)
        return lambda x: ObjectiveOutput(loss=1000 * f(x).loss)

    big.bind = scaled
    res = protect(clean, [big, PullTo(down, name="down")],
                  PGDConfig(eps=8 / 255, step=2 / 255, iterations=4, early_stop=False))
    d = res.protected - clean
    # unnormalised, the 1000x loss would win everywhere; normalised, the left half's per-pixel
    # pull down (1/sqrt(96)) beats the spread-out pull up (1/sqrt(192))
    assert (d[..., 4:] > 0).all() and (d[..., :4] < 0).all()


def test_early_stop_when_target_reached():
    clean = torch.full((1, 3, 8, 8), 0.5)
    obj = PullTo(torch.full_like(clean, 0.52), stop_below=1e-5)
    res = protect(clean, [obj], PGDConfig(eps=16 / 255, step=1 / 255, iterations=100))
    assert res.stopped_early and res.steps_run < 100
    off = protect(clean, [obj], PGDConfig(eps=16 / 255, step=1 / 255, iterations=20, early_stop=False))
    assert not off.stopped_early and off.steps_run == 20


def test_random_start_is_seeded_and_in_budget():
    clean = torch.full((1, 3, 8, 8), 0.5)
    obj = PullTo(clean.clone())
    cfg = PGDConfig(eps=8 / 255, iterations=0, random_start=True, seed=7)
    a = protect(clean, [obj], cfg).protected
    b = protect(clean, [obj], cfg).protected
    c = protect(clean, [obj], PGDConfig(eps=8 / 255, iterations=0, random_start=True, seed=8)).protected
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - clean).abs().max() * 255 <= 8 + 1e-4


@pytest.mark.parametrize("eps", [0.0, -1 / 255, 65 / 255])
def test_bad_budget_is_rejected_with_advice(eps):
    with pytest.raises(ValueError, match="/255"):
        protect(torch.zeros(1, 3, 4, 4), [PullTo(torch.ones(1, 3, 4, 4))], PGDConfig(eps=eps))


def test_objective_without_image_dependence_is_reported():
    class Const:
        name, weight = "const", 1.0

        def bind(self, clean):
            return lambda x: ObjectiveOutput(loss=torch.zeros(x.shape[0], requires_grad=True))

    with pytest.raises(RuntimeError, match="does not depend on the image"):
        protect(torch.zeros(1, 3, 4, 4), [Const()], PGDConfig(iterations=1))


def test_callback_can_cancel():
    class Stop(Exception):
        pass

    calls = []

    def cb(step, total, x, rec):
        calls.append(step)
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        protect(_img(b=1), [PullTo(torch.ones(1, 3, 24, 20))], PGDConfig(iterations=50), callback=cb)
    assert calls == [1, 2, 3]


def test_works_inside_inference_mode_callers():
    # ComfyUI calls nodes under inference_mode: inputs are inference tensors
    with torch.inference_mode():
        clean = _img(b=1)
        target = torch.ones_like(clean)
    with torch.inference_mode(False):
        res = protect(clean, [PullTo(target.clone())], PGDConfig(iterations=2), mask=torch.ones(1, 1, 24, 20))
    assert res.protected.shape == clean.shape and not res.protected.is_inference()


def test_init_continues_from_a_given_perturbation():
    """``init`` is the start: 0 iterations return it (projected, quantised); splitting a run in
    two with ``init`` gives exactly the uninterrupted run (same steps from the same δ)."""
    clean = _img(seed=4)
    target = torch.ones_like(clean)
    cfg = dict(eps=8 / 255, step=1 / 255, early_stop=False, quantize=False)
    start = torch.full_like(clean, 20 / 255)  # beyond ε: projected onto the budget and [0, 1]
    zero = protect(clean, [PullTo(target)], PGDConfig(iterations=0, **cfg), init=start)
    assert torch.allclose(zero.protected, (clean + 8 / 255).clamp(0, 1))
    whole = protect(clean, [PullTo(target)], PGDConfig(iterations=6, **cfg), init=start * 0.1)
    half = protect(clean, [PullTo(target)], PGDConfig(iterations=3, **cfg), init=start * 0.1)
    rest = protect(clean, [PullTo(target)], PGDConfig(iterations=3, **cfg), init=half.protected - clean)
    assert torch.allclose(rest.protected, whole.protected, atol=1e-6)
    assert (rest.protected - clean).abs().max() <= 8 / 255 + 1e-6
    with pytest.raises(ValueError, match="random_start"):
        protect(clean, [PullTo(target)], PGDConfig(iterations=1, random_start=True, **cfg), init=start)
    with pytest.raises(ValueError, match="init"):
        protect(clean, [PullTo(target)], PGDConfig(iterations=1, **cfg), init=start[..., :4])


# --- never a false "protected" -----------------------------------------------------------------

from immunize.kernels.errors import EmptyBatchError, ImmunizeError, ProtectionFailed  # noqa: E402
from immunize.kernels.pgd import check_protected  # noqa: E402


class NaNAfter:
    """An objective whose loss turns NaN at a given step (a model overflowing in fp16)."""

    name, weight = "nan", 1.0

    def __init__(self, at):
        self.at, self.calls = at, 0

    def bind(self, clean):
        def f(x):
            self.calls += 1
            d = (x - 1).pow(2).flatten(1).mean(1)
            return ObjectiveOutput(loss=d * float("nan") if self.calls > self.at else d)
        return f


@pytest.mark.parametrize("at", [0, 3])
def test_nan_loss_stops_with_an_error_naming_objective_and_step(at):
    with pytest.raises(ProtectionFailed, match=rf"objective 'nan'.*non-finite loss.*step {at}"):
        protect(_img(), [NaNAfter(at)], PGDConfig(iterations=10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_and_settings_are_refused_before_work(bad):
    clean = _img()
    broken = clean.clone()
    broken[0, 1, 2, 3] = bad
    obj = PullTo(torch.ones_like(clean))
    with pytest.raises(ValueError, match="NaN or infinite pixel"):
        protect(broken, [obj], PGDConfig(iterations=2))
    for field in ("eps", "step"):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            protect(clean, [obj], PGDConfig(iterations=2, **{field: bad}))
    mask = torch.ones(1, 1, 24, 20)
    mask[..., 0, 0] = bad
    with pytest.raises(ValueError, match="mask contains NaN"):
        protect(clean, [obj], PGDConfig(iterations=2), mask=mask)


def test_budget_below_one_8bit_step_and_above_32_is_refused():
    obj = PullTo(torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="below one 8-bit step"):
        protect(torch.zeros(1, 3, 4, 4), [obj], PGDConfig(eps=0.5 / 255))
    with pytest.raises(ValueError, match=r"\(0, 32/255\]"):
        protect(torch.zeros(1, 3, 4, 4), [obj], PGDConfig(eps=33 / 255))


def test_empty_batch_and_empty_mask_say_what_happened_upstream():
    obj = PullTo(torch.ones(1, 3, 8, 8))
    with pytest.raises(EmptyBatchError, match="empty.*Detector Crop"):
        protect(torch.zeros(0, 3, 8, 8), [obj], PGDConfig(iterations=2))
    clean = _img(b=2, h=8, w=8)
    mask = torch.ones(2, 1, 8, 8)
    mask[1] = 0
    with pytest.raises(ProtectionFailed, match=r"no pixel to change in image\(s\) \[1\].*Invert Mask"):
        protect(clean, [obj], PGDConfig(iterations=2), mask=mask)


def test_check_protected_accepts_a_real_result_and_reports_what_it_measured():
    clean = _img()
    res = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=8 / 255, step=2 / 255, iterations=10))
    measured = check_protected(clean, res.protected, 8 / 255, "linf")
    assert measured["linf_255"].tolist() == [8.0, 8.0]
    assert (measured["psnr_db"] > 30).all() and (measured["psnr_db"] < 60).all()


def test_check_protected_refuses_every_kind_of_false_success():
    clean = _img(b=2)
    good = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=8 / 255, step=2 / 255,
                                                                        iterations=10)).protected
    with pytest.raises(ProtectionFailed, match=r"image\(s\) \[0, 1\] came out unchanged.*NOT protected"):
        check_protected(clean, torch.round(clean * 255) / 255, 8 / 255, "linf")
    half = good.clone()
    half[1] = torch.round(clean[1] * 255) / 255
    with pytest.raises(ProtectionFailed, match=r"image\(s\) \[1\] came out unchanged"):
        check_protected(clean, half, 8 / 255, "linf")
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ProtectionFailed, match="NaN"):
        check_protected(clean, nan, 8 / 255, "linf")
    with pytest.raises(ProtectionFailed, match="exceed the budget"):
        check_protected(clean, good, 7 / 255, "linf")
    with pytest.raises(ProtectionFailed, match="8-bit grid"):
        check_protected(clean, (good + 0.3 / 255).clamp(0, 1), 9 / 255, "linf")
    mask = torch.zeros(1, 1, 24, 20)
    mask[..., :12, :] = 1
    with pytest.raises(ProtectionFailed, match="outside the mask"):
        check_protected(clean, good, 8 / 255, "linf", mask)
    l2 = protect(clean, [PullTo(torch.ones_like(clean))], PGDConfig(eps=4 / 255, norm="l2", iterations=10))
    check_protected(clean, l2.protected, 4 / 255, "l2")
    with pytest.raises(ProtectionFailed, match="exceed the budget"):
        check_protected(clean, l2.protected, 1 / 255, "l2")


def test_errors_show_without_the_install_path():
    """ComfyUI shows ``module.QualName`` of an exception; the pack's modules are named after
    its install folder, so its errors say plain ``immunize``."""
    from immunize.kernels.identity import NoFaceError

    for cls in (ImmunizeError, ProtectionFailed, EmptyBatchError, NoFaceError):
        assert cls.__module__ == "immunize" and issubclass(cls, ValueError)
