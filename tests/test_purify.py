"""Purifiers (issue 4): kernels on real fixture photos and the real TAEF2 VAE; nodes through real
ComfyUI classes (tiny SD1.5-shaped model and VAE from ``test_diffusion_nodes``, a tiny real
spandrel upscaler), executed under ``torch.inference_mode()`` as the executor runs them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from immunize.kernels import purify as P
from immunize.kernels.metrics import psnr
from immunize.tests.test_diffusion_nodes import tiny  # noqa: F401  (module fixture, reused)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _load(path, size=None) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def photos(fixtures):
    """Two real 256x256 face photos of different people, [2,3,256,256] in [0,1]."""
    faces = fixtures / "faces"
    return torch.stack([_load(faces / "angelina_jolie" / "1.png"), _load(faces / "george_clooney" / "1.png")])


@pytest.fixture(scope="module")
def taef2(fixtures):
    from immunize.tests.taef2 import load_taef2

    return load_taef2(fixtures / "models" / "taef2")


def _laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(x, k, groups=3).pow(2).flatten(1).mean(1)


def _sd_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule, ᾱ for T = 1000."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# --------------------------------------------------------------------------- JPEG


def test_jpeg_q100_is_nearly_identity(photos):
    out = P.jpeg(photos, 100)
    assert out.shape == photos.shape and out.dtype == photos.dtype
    assert (psnr(out, photos) > 40).all()  # measured 42.5 / 46.5 dB (4:2:0 chroma)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-3)  # 8-bit output
    assert (psnr(P.jpeg(photos, 10), photos) < 32).all()  # and quality matters: 27.9 dB


@pytest.mark.parametrize("rounding", P.ROUNDINGS)
def test_differentiable_jpeg_matches_real_codec(photos, rounding):
    x = photos.clone().requires_grad_(True)
    approx = P.jpeg_differentiable(x, 75, rounding)
    real = P.jpeg(photos, 75)
    # measured 47.5 / 48.3 dB: it is PIL's codec up to libjpeg's integer maths
    assert (psnr(approx.detach(), real) > 42).all()
    # and it really compresses like JPEG: loses as much as the codec does (36.0 / 37.0 dB)
    loss_real, loss_approx = psnr(real, photos), psnr(approx.detach(), photos)
    assert ((loss_approx - loss_real).abs() < 1.5).all(), (loss_real, loss_approx)
    approx.sum().backward()
    grad = x.grad.abs().mean()
    assert torch.isfinite(x.grad).all() and grad > 0.05, grad  # cubic 0.25, ste 0.85
    assert torch.equal(photos, x.detach())  # input untouched


def test_differentiable_jpeg_odd_size_and_low_quality(photos):
    crop = photos[:1, :, 13:113, 7:82]  # 100x75: padded to the 16-px MCU grid and cropped back
    out = P.jpeg_differentiable(crop, 75)
    assert out.shape == crop.shape
    assert psnr(out, P.jpeg(crop, 75)) > 42  # measured 50.7 dB
    assert psnr(P.jpeg_differentiable(photos[:1], 10), P.jpeg(photos[:1], 10)) > 38  # measured 43.2 dB


# --------------------------------------------------------------------------- filters


def test_blur_and_resize_remove_high_frequencies(photos):
    before = _laplacian_energy(photos)
    blurred = P.gaussian_blur(photos, sigma=1.0)
    assert blurred.shape == photos.shape
    assert (_laplacian_energy(blurred) < 0.2 * before).all()  # measured 0.10×
    resized = P.resize_down_up(photos, 0.5, "bicubic")
    assert resized.shape == photos.shape
    assert (_laplacian_energy(resized) < 0.3 * before).all()  # measured 0.16×
    assert (psnr(resized, photos) > 27).all()  # still the same picture (30.3 dB)
    odd = photos[:, :, :37, :50]
    assert P.resize_down_up(odd, 0.3, "area").shape == odd.shape
    assert P.gaussian_blur(odd[:, :, :5, :5], sigma=3.0).shape == (2, 3, 5, 5)  # kernel clipped to the image


def test_gaussian_noise_is_seeded_and_has_its_sigma():
    gray = torch.full((2, 3, 64, 64), 0.5)
    a, b = P.gaussian_noise(gray, 0.05, seed=3), P.gaussian_noise(gray, 0.05, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, P.gaussian_noise(gray, 0.05, seed=4))
    assert abs(float((a - gray).std()) - 0.05) < 0.0025


def test_adverse_cleaner_removes_added_noise(photos):
    clean = photos[:, :, 64:192, 64:192].contiguous()  # 128² keeps 64 bilateral passes quick
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(clean.shape, generator=gen) * 2 - 1) * 8 / 255
    noisy = (clean + noise).clamp(0, 1)
    cleaned_noisy, cleaned_clean = P.adverse_cleaner(noisy), P.adverse_cleaner(clean)
    assert cleaned_noisy.shape == clean.shape
    e_noise = (noisy - clean).pow(2).flatten(1).mean(1)
    e_left = (cleaned_noisy - cleaned_clean).pow(2).flatten(1).mean(1)  # the noise that survives
    assert (e_left < 0.5 * e_noise).all(), (e_left / e_noise)  # measured 0.29× / 0.34×
    # while the photo itself survives the cleaner
    assert (psnr(cleaned_clean, clean) > 33).all(), psnr(cleaned_clean, clean)  # 38.8 / 37.6 dB


# --------------------------------------------------------------------------- VAE, SDEdit, IMPRESS


def test_taef2_round_trip_keeps_a_clean_photo(photos, taef2):
    enc, dec = taef2
    with torch.no_grad():
        out = P.sdedit(photos[:1], enc, dec, eps_fn=None, alphas_cumprod=_sd_alphas_cumprod(), strength=0.0)
    assert out.shape == (1, 3, 256, 256)
    assert psnr(out, photos[:1]) >= 28  # measured 32.7 dB


def test_sdedit_strength_zero_is_identity_and_ddim_inverts_an_oracle():
    ac = _sd_alphas_cumprod()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 21, 19, generator=gen)
    ident = lambda z: z  # noqa: E731
    assert torch.equal(P.sdedit(x, ident, ident, eps_fn=None, alphas_cumprod=ac, strength=0.0, multiple=1), x)

    # An oracle that knows z₀: DDIM (η = 0) must land exactly on it from any noise level.
    z0 = x.clone()

    def oracle(x_t, t):
        a = ac.float()[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * z0) / (1 - a).sqrt()

    for strength, steps in ((0.1, 20), (0.6, 7), (1.0, 50)):
        out = P.sdedit(x, ident, ident, oracle, ac, strength=strength, steps=steps, seed=5, multiple=1)
        assert torch.allclose(out, x, atol=2e-4), (strength, (out - x).abs().max())

    # A denoiser that predicts nothing leaves seeded noise: deterministic per seed, different across seeds
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    a = P.sdedit(x, ident, ident, zero, ac, strength=0.5, steps=5, seed=0, multiple=1)
    b = P.sdedit(x, ident, ident, zero, ac, strength=0.5, steps=5, seed=0, multiple=1)
    c = P.sdedit(x, ident, ident, zero, ac, strength=0.5, steps=5, seed=1, multiple=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="strength"):
        P.sdedit(x, ident, ident, zero, ac, strength=1.5)


def test_impress_restores_vae_consistency_on_taef2(photos, taef2):
    enc, dec = taef2
    x = photos[:1, :, 96:160, 96:160].contiguous()  # 64² keeps 8 steps through TAEF2 quick
    before = P.vae_consistency(x, enc, dec)
    out = P.impress(x, enc, dec, steps=8, lr=0.01, noise=0.0, seed=0)
    after = P.vae_consistency(out, enc, dec)
    assert out.shape == x.shape and not out.requires_grad
    assert (after < 0.6 * before).all(), (before, after)  # measured 0.0040 → 0.0014
    assert (psnr(out, x) > 35).all()  # measured 40.4 dB: still the same image


# --------------------------------------------------------------------------- GrIDPure


def test_gridpure_covers_every_pixel_and_blends():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 70, 45, generator=gen)
    sizes = []

    def add_one(t):
        sizes.append(tuple(t.shape))
        return t + 1

    gamma, rounds = 0.25, 3
    out = P.gridpure(x, add_one, crop=32, stride=16, iterations=rounds, gamma=gamma)
    # every pixel is covered, every copy is x + 1, so each round adds exactly (1 − γ)
    assert torch.allclose(out, x + rounds * (1 - gamma), atol=1e-5)
    # rows 0,16,32,38 × cols 0,13 → 8 tiles per image, plus the corner mosaic, in one call
    assert sizes == [(2 * 8 + 2, 3, 32, 32)] * rounds

    small = torch.rand(1, 3, 20, 30, generator=gen)  # smaller than the crop: one tile, the image
    sizes.clear()
    out = P.gridpure(small, add_one, crop=256, stride=128, iterations=2, gamma=0.1, corner_mosaic=False)
    assert sizes == [(1, 3, 20, 30)] * 2
    assert torch.allclose(out, small + 2 * 0.9, atol=1e-6)


def test_gridpure_averages_overlaps():
    x = torch.zeros(1, 3, 64, 48)
    calls = []

    def tile_index(t):  # tile i → constant i
        calls.append(t.shape[0])
        return torch.arange(t.shape[0], dtype=t.dtype).view(-1, 1, 1, 1).expand_as(t).clone()

    out = P.gridpure(x, tile_index, crop=32, stride=16, iterations=1, gamma=0.0, corner_mosaic=False)
    rows, cols = [0, 16, 32], [0, 16]  # expected tile grid, row-major
    expected = torch.zeros(64, 48)
    count = torch.zeros(64, 48)
    for i, (r, c) in enumerate([(r, c) for r in rows for c in cols]):
        expected[r:r + 32, c:c + 32] += i
        count[r:r + 32, c:c + 32] += 1
    assert (count > 0).all()
    assert torch.allclose(out[0, 0], expected / count)

    # with the mosaic (tile index 6), corner pixels average their grid tile with it
    out = P.gridpure(x, tile_index, crop=32, stride=16, iterations=1, gamma=0.0)
    assert math.isclose(float(out[0, 0, 0, 0]), (0 + 6) / 2, abs_tol=1e-6)
    assert math.isclose(float(out[0, 0, 63, 47]), (5 + 6) / 2, abs_tol=1e-6)
    assert math.isclose(float(out[0, 0, 20, 20]), float(expected[20, 20] / count[20, 20]), abs_tol=1e-6)


# --------------------------------------------------------------------------- nodes


def _as_image(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return x.movedim(1, -1).contiguous().clone()


def _run(node, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return node.execute(**kwargs)[0]


@pytest.fixture(scope="module")
def small_image(fixtures):
    """Two real photos at 42x37 (not multiples of 8), ComfyUI layout, made in inference mode."""
    faces = fixtures / "faces"
    x = torch.stack([_load(faces / "katy_perry" / "1.png", (37, 42)), _load(faces / "matt_damon" / "1.png", (37, 42))])
    return _as_image(x)


def _check(out, image, before):
    assert out.shape == image.shape, (out.shape, image.shape)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(image, before)  # the input IMAGE is not modified


def test_signal_nodes_under_inference_mode(comfy, small_image):
    from immunize.nodes import purify as N

    before = small_image.clone()
    cases = [
        (N.ImmunizePurifyJPEG, dict(quality=75)),
        (N.ImmunizePurifyGaussianBlur, dict(sigma=1.0, kernel_size=0)),
        (N.ImmunizePurifyResizeDownUp, dict(factor=0.5, mode="bicubic")),
        (N.ImmunizePurifyGaussianNoise, dict(sigma=0.05, seed=0)),
        (N.ImmunizePurifyAdverseCleaner, dict(bilateral_iterations=64, diameter=5, sigma_color=8.0, sigma_space=8.0,
                                              guided_iterations=4, guided_radius=4, guided_eps=16.0)),
    ]
    for node, kwargs in cases:
        out = _run(node, image=small_image, **kwargs)
        _check(out, small_image, before)
        assert not torch.equal(out, small_image), node.__name__


def test_vae_round_trip_and_sdedit_nodes(comfy, tiny, small_image):  # noqa: F811
    from immunize.nodes import purify as N

    patcher, cond = tiny["sd15"]
    vae = tiny["vae"]
    before = small_image.clone()
    rt = _run(N.ImmunizePurifyVAERoundTrip, image=small_image, vae=vae)
    _check(rt, small_image, before)

    kw = dict(image=small_image, model=patcher, vae=vae, positive=cond, steps=3, cfg=1.0,
              sampler_name="ddim", scheduler="normal", seed=7)
    out = _run(N.ImmunizePurifySDEdit, strength=0.3, **kw)
    _check(out, small_image, before)
    assert torch.equal(out, _run(N.ImmunizePurifySDEdit, strength=0.3, **kw))  # seeded
    assert not torch.allclose(out, rt, atol=1e-3)  # the diffusion model did something
    # strength 0 is the plain VAE round trip
    assert torch.allclose(_run(N.ImmunizePurifySDEdit, strength=0.0, **kw), rt, atol=1e-6)
    # DiffPure's default sampler (ancestral DDPM) and guidance with a negative also run
    out = _run(N.ImmunizePurifySDEdit, **{**kw, "sampler_name": "ddpm", "cfg": 2.0}, strength=0.2, negative=cond)
    _check(out, small_image, before)
    with pytest.raises(ValueError, match="negative"):
        _run(N.ImmunizePurifySDEdit, **{**kw, "cfg": 3.0}, strength=0.2)


def test_gridpure_node(comfy, tiny, small_image):  # noqa: F811
    from immunize.nodes import purify as N

    patcher, cond = tiny["sd15"]
    before = small_image.clone()
    out = _run(N.ImmunizePurifyGrIDPure, image=small_image, model=patcher, vae=tiny["vae"], positive=cond,
               strength=0.05, steps=2, cfg=1.0, sampler_name="ddim", scheduler="normal", seed=0,
               crop=32, stride=16, iterations=2, gamma=0.1, corner_mosaic=True)
    _check(out, small_image, before)


def test_noisy_upscale_node(comfy, small_image):
    from spandrel import ImageModelDescriptor, ModelLoader
    from spandrel.architectures.Compact import Compact

    from immunize.nodes import purify as N

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2, act_type="prelu")
    model = ModelLoader().load_from_state_dict(net.state_dict()).eval()  # the loader node's path
    assert isinstance(model, ImageModelDescriptor) and model.scale == 2
    before = small_image.clone()
    out = _run(N.ImmunizePurifyNoisyUpscale, image=small_image, upscale_model=model, sigma=0.05, seed=0)
    _check(out, small_image, before)
    # without noise it is exactly the upscale model's output brought back to the input size
    plain = _run(N.ImmunizePurifyNoisyUpscale, image=small_image, upscale_model=model, sigma=0.0, seed=0)
    with torch.no_grad():
        up = model(small_image.movedim(-1, 1).clone()).clamp(0, 1)
        expected = F.interpolate(up, size=(42, 37), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(plain, expected.clamp(0, 1).movedim(1, -1), atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-3)  # the noise went in first


def test_impress_node(comfy, tiny, small_image):  # noqa: F811
    from immunize.nodes import purify as N

    vae = tiny["vae"]
    weights = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    before = small_image.clone()
    out = _run(N.ImmunizePurifyIMPRESS, image=small_image, vae=vae, steps=3, lr=0.01, alpha=0.1, bound=0.1,
               noise=0.1, closeness="ssim", seed=0)
    _check(out, small_image, before)
    assert not torch.equal(out, small_image)
    after = vae.first_stage_model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # the user's VAE is untouched


def test_bad_image_is_a_clear_error(comfy):
    from immunize.nodes import purify as N

    with torch.inference_mode(), pytest.raises(ValueError, match="alpha"):
        N.ImmunizePurifyJPEG.execute(image=torch.rand(1, 8, 8, 4), quality=75)


def test_schemas(comfy):
    from immunize.nodes import purify as N

    ids = set()
    for node in N.NODES:
        schema = node.define_schema()
        assert schema.category == "Immunize/purify"
        assert schema.node_id.startswith("ImmunizePurify")
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        assert info["output"] == ["IMAGE"], info["output"]
        ids.add(schema.node_id)
    assert len(ids) == len(N.NODES) == 10
