"""Purifiers: what an attacker runs on a protected image before customising a model on it.

A protection is only worth its name if it survives these. Each purifier is a pure function on
images ``[B,3,H,W]`` in ``[0,1]`` that returns a new tensor of the same shape (nothing is
modified in place), batched, on the input's device and dtype. Model-based purifiers receive
their models as small callables, so this file never imports ComfyUI:

- ``encode(images [B,3,H,W] in [0,1]) -> latent`` and ``decode(latent) -> images`` (a VAE; H, W
  multiples of ``multiple``, the functions here pad and crop);
- ``eps_fn(x_t [B,c,h,w], t [B] long) -> ε̂`` (a DDPM ε-predictor in the latent space of
  ``encode``) with its ``alphas_cumprod`` ``[T]``;
- ``purify_fn(crops [N,3,h,w]) -> crops`` (any purifier, for GrIDPure's grid).

Signal processing
    :func:`jpeg` (the real codec, through PIL), :func:`jpeg_differentiable` (a differentiable
    approximation for EOT), :func:`gaussian_blur`, :func:`resize_down_up`, :func:`gaussian_noise`.

AdverseCleaner (lllyasviel/AdverseCleaner, 2023)
    64 passes of a bilateral filter (diameter 5, σ_color = 8, σ_space = 8, 8-bit units), then
    4 passes of a guided filter (radius 4, ε = 16 in 8-bit² units) whose guide is the *input*
    image: :func:`adverse_cleaner`.

DiffPure / SDEdit (Nie et al. 2022; Meng et al. 2022)
    z₀ = E(x);  z_{t*} = √ᾱ_{t*}·z₀ + √(1−ᾱ_{t*})·ε;  then denoise z_{t*} back to ẑ₀ and decode,
    with t* = strength·T: :func:`sdedit`.

GrIDPure (Zhao et al., CVPR 2024, "Can Protective Perturbation Safeguard Personal Data from
Being Exploited by Stable Diffusion?")
    DiffPure on overlapping ``crop``×``crop`` tiles at stride ``stride`` (plus one mosaic of the
    four corners), overlaps averaged, and ``x_{k+1} = (1−γ)·merge(purify(tiles(x_k))) + γ·x_k``
    for ``iterations`` rounds: :func:`gridpure`.

IMPRESS (Cao et al., NeurIPS 2023, eq. 4.1)
    min_{x_pur}  ‖x_pur − D(E(x_pur))‖² + α·max(d(x_pur, x) − Δ, 0),   x_pur⁰ = x + N(0, σ²):
    :func:`impress`.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .denoising import ddim
from .encoder import pad_to_multiple

Codec = Callable[[Tensor], Tensor]
EpsFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


def check_images(x: Tensor, name: str = "x") -> None:
    """Raise a ValueError unless ``x`` is an image batch ``[B,3,H,W]``."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"'{name}' must be an RGB image batch [B,3,H,W] in [0,1]; got {shape}.")


# --------------------------------------------------------------------------- JPEG


def jpeg(x: Tensor, quality: int = 75) -> Tensor:
    """The real JPEG codec (PIL/libjpeg, 4:2:0 chroma subsampling, the IJG tables scaled by
    ``quality``): every image is rounded to 8 bits, encoded, decoded. Not differentiable.

    x: ``[B,3,H,W]`` in [0,1]; quality: 1..100 (75 is PIL's and most benchmarks' default).
    Returns ``[B,3,H,W]`` on the 8-bit grid, same device and dtype.

    Example:
        >>> y = jpeg(img, quality=75)
    """
    from PIL import Image

    check_images(x)
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}.")
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
    return y.to(device=x.device, dtype=x.dtype)


# JPEG standard (ITU T.81, Annex K) quantisation tables, natural (row-major) order.
_LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]
_CHROMA_TABLE = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32

ROUNDINGS = ("cubic", "ste")


def quantization_tables(quality: int) -> tuple[Tensor, Tensor]:
    """The luma and chroma tables ``[8,8]`` libjpeg uses at ``quality`` (IJG scaling):
    s = 5000/q below 50, else 200 − 2q; T_q = clamp(⌊(T·s + 50)/100⌋, 1, 255)."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 / q if q < 50 else 200 - 2 * q
    out = []
    for table in (_LUMA_TABLE, _CHROMA_TABLE):
        t = torch.tensor(table, dtype=torch.float64).view(8, 8)
        out.append(torch.floor((t * scale + 50) / 100).clamp(1, 255).float())
    return out[0], out[1]


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal 8-point DCT-II matrix D (rows = frequencies); 2-D DCT of a block B is D·B·Dᵀ,
    which is exactly JPEG's F(u,v) = ¼ C(u)C(v) Σ f(x,y) cos((2x+1)uπ/16) cos((2y+1)vπ/16)."""
    k = torch.arange(8, dtype=torch.float64).view(8, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, 8)
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * 0.5
    d[0] = d[0] / math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def _round(x: Tensor, rounding: str) -> Tensor:
    r = torch.round(x).detach()
    if rounding == "cubic":  # Shin & Song 2017: ⌊x⌉ + (x − ⌊x⌉)³, gradient 3(x − ⌊x⌉)²
        return r + (x - r) ** 3
    return x + (r - x).detach()  # straight-through: exact rounding forward, identity backward


def _blockwise(y: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to every 8x8 block of ``y`` ``[B,C,H,W]`` (H, W multiples of 8), blocks
    presented as ``[B,C,H/8,W/8,8,8]``."""
    b, c, h, w = y.shape
    blocks = y.view(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    blocks = fn(blocks)
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def jpeg_differentiable(x: Tensor, quality: int = 75, rounding: str = "cubic") -> Tensor:
    """A differentiable JPEG (encode + decode) for expectation over transformation.

    Follows libjpeg's baseline path with PIL's defaults: RGB → YCbCr (JFIF, full range, 8-bit
    samples) → 4:2:0 chroma (2x2 average) → level shift −128 → 8x8 DCT → divide by the IJG
    tables scaled by ``quality`` → round → multiply → inverse DCT → chroma upsampled with the
    triangle ("fancy") filter, i.e. bilinear ×2 → RGB → 8-bit output. The image is padded to a
    multiple of 16 by edge replication, as the codec does, and cropped back.

    The quantisation of the DCT coefficients (where JPEG loses information) uses ``rounding``:
    ``"cubic"`` (Shin & Song 2017, "JPEG-resistant adversarial images": ⌊x⌉ + (x − ⌊x⌉)³, a
    forward value within 1/8 of a quantisation step of the true one, gradient 3(x − ⌊x⌉)²) or
    ``"ste"`` (straight-through: the exact rounding forward, the identity backward). The
    roundings to 8-bit samples (YCbCr in, RGB out; half an 8-bit level) are always
    straight-through, so they do not shrink the gradient. The integer DCT and fixed-point
    colour maths of libjpeg are replaced by float ones. Measured on the 256² fixture photos at
    quality 75: 47–48 dB PSNR to PIL's output with either rounding.

    x: ``[B,3,H,W]`` in [0,1] → ``[B,3,H,W]`` in [0,1], differentiable with respect to x.
    """
    check_images(x)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    h, w = x.shape[-2:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    img = F.pad(x.to(dtype) * 255.0, (0, (-w) % 16, 0, (-h) % 16), mode="replicate")
    r, g, b = img.unbind(1)
    ycc = torch.stack([
        0.299 * r + 0.587 * g + 0.114 * b,
        -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
        0.5 * r - 0.418688 * g - 0.081312 * b + 128.0,
    ], 1)
    ycc = _round(ycc, "ste").clamp(0, 255)
    luma, chroma = ycc[:, :1], F.avg_pool2d(ycc[:, 1:], 2)

    d = _dct_matrix(dtype, x.device)
    q_luma, q_chroma = (t.to(device=x.device, dtype=dtype) for t in quantization_tables(quality))

    def codec(plane: Tensor, table: Tensor) -> Tensor:
        def per_block(blocks: Tensor) -> Tensor:
            coef = d @ (blocks - 128.0) @ d.T
            coef = _round(coef / table, rounding) * table
            return d.T @ coef @ d + 128.0

        return _blockwise(plane, per_block).clamp(0, 255)

    luma = codec(luma, q_luma)
    chroma = codec(chroma, q_chroma)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    y, cb, cr = torch.cat([luma, chroma], 1).unbind(1)
    cb, cr = cb - 128.0, cr - 128.0
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    rgb = _round(rgb, "ste").clamp(0, 255)[..., :h, :w] / 255.0
    return rgb.to(x.dtype)


# --------------------------------------------------------------------------- simple filters


def gaussian_blur(x: Tensor, sigma: float = 1.0, kernel: int = 0) -> Tensor:
    """Gaussian blur (kornia), reflect borders. sigma in pixels; kernel: odd size, or 0 for
    2·⌈3σ⌉ + 1. ``[B,3,H,W]`` → ``[B,3,H,W]``."""
    from kornia.filters import gaussian_blur2d

    check_images(x)
    if sigma <= 0:
        return x.clone()
    k = int(kernel) if kernel else 2 * math.ceil(3 * float(sigma)) + 1
    if k % 2 == 0 or k < 3:
        raise ValueError(f"blur kernel_size must be odd and >= 3 (or 0 for automatic), got {kernel}.")
    k = min(k, 2 * min(x.shape[-2:]) - 1)  # reflect padding needs k // 2 < the image size
    return gaussian_blur2d(x, (k, k), (float(sigma), float(sigma)), border_type="reflect")


RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest")


def resize_down_up(x: Tensor, factor: float = 0.5, mode: str = "bicubic") -> Tensor:
    """Downscale by ``factor`` (0 < factor ≤ 1, antialiased) and back to the exact input size.
    ``[B,3,H,W]`` → ``[B,3,H,W]`` in [0,1]."""
    check_images(x)
    if not 0 < float(factor) <= 1:
        raise ValueError(f"resize factor must be in (0, 1], got {factor}.")
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}.")
    h, w = x.shape[-2:]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    aa = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
    down = F.interpolate(x, size=small, mode=mode, **kw, **aa)
    return F.interpolate(down, size=(h, w), mode=mode, **kw).clamp(0, 1)


def gaussian_noise(x: Tensor, sigma: float = 0.05, seed: int = 0) -> Tensor:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` (fraction of the [0,1] range)
    drawn from a CPU generator seeded with ``seed`` (same numbers on every device), clamp."""
    check_images(x)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return (x + float(sigma) * noise).clamp(0, 1)


# --------------------------------------------------------------------------- AdverseCleaner


def adverse_cleaner(
    x: Tensor,
    bilateral_iterations: int = 64,
    diameter: int = 5,
    sigma_color: float = 8 / 255,
    sigma_space: float = 8.0,
    guided_iterations: int = 4,
    radius: int = 4,
    eps: float = 16 / 255**2,
) -> Tensor:
    """AdverseCleaner: repeated bilateral filtering, then a guided filter guided by the input.

    The public cleaner (lllyasviel/AdverseCleaner, ``clean.py``) runs OpenCV on 0–255 float
    images: 64× ``bilateralFilter(d=5, sigmaColor=8, sigmaSpace=8)``, then 4× ximgproc
    ``guidedFilter(guide=original, src=y, radius=4, eps=16)``. Here the same filters come from
    kornia on [0,1] images, so the 8-bit parameters are rescaled: σ_color = 8/255 and
    ε = 16/255². The colour distance is OpenCV's for colour images (sum of absolute channel
    differences); the window is the full d×d square (OpenCV drops the corners outside the
    circle of diameter d, which with σ_space = 8 changes little); borders reflect.

    x: ``[B,3,H,W]`` in [0,1] → ``[B,3,H,W]`` in [0,1].
    """
    from kornia.filters import bilateral_blur, guided_blur

    check_images(x)
    if diameter < 1 or diameter % 2 == 0:
        raise ValueError(f"bilateral diameter must be odd and >= 1, got {diameter}.")
    if min(x.shape[-2:]) <= max(diameter, 2 * radius + 1) // 2:
        raise ValueError(f"image {tuple(x.shape[-2:])} is too small for the AdverseCleaner filters.")
    guide = x.float()
    y = guide
    for _ in range(int(bilateral_iterations)):
        y = bilateral_blur(y, diameter, float(sigma_color), (float(sigma_space), float(sigma_space)),
                           border_type="reflect", color_distance_type="l1")
    for _ in range(int(guided_iterations)):
        y = guided_blur(guide, y, 2 * int(radius) + 1, float(eps), border_type="reflect")
    return y.clamp(0, 1).to(x.dtype)


# --------------------------------------------------------------------------- DiffPure / SDEdit


def sdedit(
    x: Tensor,
    encode: Codec,
    decode: Codec,
    eps_fn: EpsFn,
    alphas_cumprod: Tensor,
    strength: float = 0.1,
    steps: int = 20,
    seed: int = 0,
    multiple: int = 8,
) -> Tensor:
    """DiffPure / SDEdit in a latent space, deterministic for a seed.

    With T = len(ᾱ) and t* = round(strength·T) diffusion steps of noise (timestep index
    k = t* − 1, as DiffPure indexes ᾱ):

        z₀ = E(x),   z = √ᾱ_k·z₀ + √(1 − ᾱ_k)·ε,   ε ~ N(0, I) from a CPU generator (seed)

    then ``n = min(steps, t*)`` deterministic DDIM steps (η = 0) over the timesteps
    k_i = round(t*·(n − i)/n) − 1, the last one straight to ᾱ = 1:

        ẑ₀ = (z − √(1 − ᾱ_{k_i})·ε̂) / √ᾱ_{k_i},   z ← √ᾱ_{k_{i+1}}·ẑ₀ + √(1 − ᾱ_{k_{i+1}})·ε̂

    and D(z) is returned. ``strength = 0`` adds no noise and runs no step: the result is the
    plain VAE round trip D(E(x)). The image is padded to ``multiple`` and cropped back.

    x: ``[B,3,H,W]`` in [0,1]; encode/decode: see the module docstring; eps_fn(x_t, t [B] long);
    alphas_cumprod: ``[T]``. Returns ``[B,3,H,W]`` in [0,1].
    """
    check_images(x)
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    h, w = x.shape[-2:]
    ac = alphas_cumprod.detach().double().cpu()
    total = ac.numel()
    z = encode(pad_to_multiple(x, multiple))
    t_star = min(int(round(float(strength) * total)), total)
    if t_star > 0:
        n = min(int(steps), t_star)
        ks = [round(t_star * (n - i) / n) - 1 for i in range(n)]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(z.shape, generator=gen, dtype=torch.float32).to(z)
        a = float(ac[ks[0]])
        z = math.sqrt(a) * z + math.sqrt(1 - a) * noise
        z = ddim(z, ks, lambda z, t, i: eps_fn(z, t), ac)
    return decode(z)[..., :h, :w].clamp(0, 1).to(x.dtype)


# --------------------------------------------------------------------------- GrIDPure


def grid_offsets(size: int, crop: int, stride: int) -> list[int]:
    """Top-left offsets 0, stride, 2·stride, … ≤ size − crop, plus size − crop so the last
    tile touches the border. ``crop`` ≤ ``size``."""
    offs = list(range(0, size - crop + 1, stride))
    if offs[-1] != size - crop:
        offs.append(size - crop)
    return offs


def gridpure(
    x: Tensor,
    purify_fn: Callable[[Tensor], Tensor],
    crop: int = 256,
    stride: int = 128,
    iterations: int = 20,
    gamma: float = 0.1,
    corner_mosaic: bool = True,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """GrIDPure: iterate a purifier over overlapping tiles, averaging overlaps.

    Each of ``iterations`` rounds cuts every image into ``crop``×``crop`` tiles at offsets
    :func:`grid_offsets` (rows and columns; a crop larger than the image is clipped to it, so a
    small image is one tile), plus, with ``corner_mosaic``, one tile made of the four
    (crop/2)² corners (GrIDPure's trick: the corners, covered by a single tile otherwise, get a
    second, differently-contexted purification). All tiles of the batch go to ``purify_fn`` in
    one call; each pixel becomes the mean of its purified copies, and

        x_{k+1} = (1 − γ)·merged_k + γ·x_k.

    Paper defaults (GrIDPure README, a 512² image and a 256² pixel diffusion model): crop 256,
    stride 128, 20 iterations, γ = 0.1, with DiffPure at 10 of 1000 noise steps per tile.

    x: ``[B,3,H,W]`` in [0,1]; purify_fn: ``[N,3,h,w] → [N,3,h,w]`` (h, w = the tile size).
    callback(k, iterations, x_k) after each round. Returns ``[B,3,H,W]``.
    """
    check_images(x)
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got crop={crop}, stride={stride}.")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    b, c, h, w = x.shape
    ch, cw = min(int(crop), h), min(int(crop), w)
    boxes = [(y0, x0) for y0 in grid_offsets(h, ch, int(stride)) for x0 in grid_offsets(w, cw, int(stride))]
    hh, hw = ch // 2, cw // 2
    mosaic = bool(corner_mosaic) and hh > 0 and hw > 0
    corners = [(0, 0), (0, w - hw), (h - hh, 0), (h - hh, w - hw)]
    slots = [(0, 0), (0, hw), (hh, 0), (hh, hw)]

    cur = x.detach().clone()
    for it in range(int(iterations)):
        tiles = torch.cat([cur[..., y0:y0 + ch, x0:x0 + cw] for y0, x0 in boxes], 0)  # [n·B, ...]
        acc = torch.zeros_like(cur)
        count = torch.zeros((1, 1, h, w), dtype=cur.dtype, device=cur.device)
        if mosaic:
            mos = cur.new_empty((b, c, 2 * hh, 2 * hw))
            for (cy, cx), (sy, sx) in zip(corners, slots):
                mos[..., sy:sy + hh, sx:sx + hw] = cur[..., cy:cy + hh, cx:cx + hw]
            if (2 * hh, 2 * hw) == (ch, cw):
                out = purify_fn(torch.cat([tiles, mos], 0))
                out, mos_out = out[: tiles.shape[0]], out[tiles.shape[0]:]
            else:
                out, mos_out = purify_fn(tiles), purify_fn(mos)
            for (cy, cx), (sy, sx) in zip(corners, slots):
                acc[..., cy:cy + hh, cx:cx + hw] += mos_out[..., sy:sy + hh, sx:sx + hw].to(acc)
                count[..., cy:cy + hh, cx:cx + hw] += 1
        else:
            out = purify_fn(tiles)
        if out.shape != tiles.shape:
            raise ValueError(f"purify_fn returned {tuple(out.shape)} for tiles {tuple(tiles.shape)}")
        for i, (y0, x0) in enumerate(boxes):
            acc[..., y0:y0 + ch, x0:x0 + cw] += out[i * b:(i + 1) * b].to(acc)
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
        cur = (1 - gamma) * (acc / count) + gamma * cur
        if callback is not None:
            callback(it + 1, int(iterations), cur)
    return cur


# --------------------------------------------------------------------------- IMPRESS

CLOSENESS = ("ssim", "l2")


def closeness_distance(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """d(a, b) ``[B]`` for IMPRESS's closeness hinge on [0,1] images: ``"ssim"``: 1 − SSIM
    (Gaussian 11x11 window); ``"l2"``: RMS pixel difference (fraction of the range)."""
    if kind == "ssim":
        from .metrics import ssim

        return lambda a, b: 1.0 - ssim(a, b)
    if kind == "l2":
        return lambda a, b: (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12).sqrt()
    raise ValueError(f"closeness must be one of {CLOSENESS}, got {kind!r}.")


def vae_consistency(x: Tensor, encode: Codec, decode: Codec, multiple: int = 8) -> Tensor:
    """IMPRESS's consistency error per sample: mean (D(E(x)) − x)² on images scaled to
    [−1, 1] (as the paper's code), x ``[B,3,H,W]`` in [0,1] → ``[B]``. Differentiable."""
    h, w = x.shape[-2:]
    rec = decode(encode(pad_to_multiple(x, multiple)))[..., :h, :w]
    return (2 * (rec.float() - x.float())).pow(2).flatten(1).mean(1)


def impress(
    x: Tensor,
    vae_encode: Codec,
    vae_decode: Codec,
    steps: int = 3000,
    lr: float = 0.01,
    alpha: float = 0.1,
    bound: float = 0.1,
    noise: float = 0.1,
    closeness: str = "ssim",
    distance_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    seed: int = 0,
    multiple: int = 8,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """IMPRESS purification (Cao et al. 2023, eq. 4.1 and Algorithm 1).

    Protective perturbations make an image inconsistent with the VAE (D(E(x)) ≠ x). IMPRESS
    finds a nearby image that the VAE reproduces:

        min_{x_p}  mean (x_p − D(E(x_p)))²  +  α · max(d(x_p, x) − Δ, 0)

    on images scaled to [−1, 1] (so ``lr``, ``noise`` are in those units, as in the paper's
    code), starting from x_p = x + N(0, noise²), with Adam (ε = 1e-5), the learning rate
    cosine-annealed from ``lr`` to 1e-5 over ``steps``, and x_p clamped after every step.

    d is LPIPS(VGG) in the paper; LPIPS weights are not available offline, so d is ``1 − SSIM``
    (``closeness="ssim"``) or the RMS difference on [0,1] pixels (``"l2"``), or any callable
    ``distance_fn(x_p, x) → [B]`` on [0,1] images (e.g. a real LPIPS) when given.

    Defaults are the paper's setting against Glaze (appendix B): Δ = 0.1, α = 0.1, 3000 steps,
    lr = 0.01, noise σ = 0.1. Its setting against PhotoGuard: 1000 steps, lr = 0.005,
    α = 0.01, σ = 0.05.

    x: ``[B,3,H,W]`` in [0,1]; vae_encode/vae_decode: differentiable (see module docstring).
    callback(step, steps, x_p in [0,1]) after each step. Returns ``[B,3,H,W]`` in [0,1], detached.
    """
    check_images(x)
    if int(steps) < 0 or lr <= 0:
        raise ValueError(f"IMPRESS needs steps >= 0 and lr > 0; got steps={steps}, lr={lr}.")
    dist = distance_fn if distance_fn is not None else closeness_distance(closeness)
    if distance_fn is None and closeness == "ssim" and min(x.shape[-2:]) < 11:
        raise ValueError("closeness 'ssim' needs images of at least 11x11 pixels; use closeness 'l2'.")
    with torch.enable_grad():
        ref = x.detach().float().clone()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        init = 2 * ref - 1 + float(noise) * torch.randn(ref.shape, generator=gen).to(ref)
        xp = init.clamp(-1, 1).requires_grad_(True)
        opt = torch.optim.Adam([xp], lr=float(lr), eps=1e-5)
        total = int(steps)
        for step in range(total):
            cur = (xp + 1) / 2
            loss = vae_consistency(cur, vae_encode, vae_decode, multiple)
            if alpha:
                loss = loss + float(alpha) * F.relu(dist(cur, ref) - float(bound))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            for group in opt.param_groups:  # cosine annealing to 1e-5 (step + 1 of total)
                group["lr"] = 1e-5 + (float(lr) - 1e-5) * (1 + math.cos(math.pi * (step + 1) / total)) / 2
            with torch.no_grad():
                xp.clamp_(-1, 1)
            if callback is not None:
                callback(step + 1, total, ((xp.detach() + 1) / 2))
    return ((xp.detach() + 1) / 2).clamp(0, 1).to(x.dtype)
