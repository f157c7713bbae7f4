"""TSDF: one perturbation, two jobs — interrupt the forgery and poison the attacker's data.

Zheng et al. 2025, "Boosting Active Defense Persistence: A Two-Stage Defense Framework
Combining Interruption and Poisoning Against Deepfake" (arXiv 2508.07795). An interruption-only
perturbation distorts what a forgery model makes of the protected photo, but an attacker who
collects protected photos and retrains adapts to it. TSDF's perturbation also *poisons the
data preparation* of that retraining (here: the face detector that finds and crops the faces,
``kernels/detector.py``), and separates the two roles by intensity.

Interruption (stage 1). A forgery pipeline G maps an image to its forged version. In ComfyUI
G is a diffusion edit (img2img with the user's MODEL and an edit prompt); the perturbation
maximises the masked distortion of G's output over an ensemble of pipelines G_p:

    L_int(δ) = − (1/P) Σ_p E_s[ D_M( G_p(x + δ; s), G_p(x; s) ) ]

    D_M(a, b) = Σ_{c,i} M_i · (â_ci − b̂_ci)² / (C · Σ_i M_i),   â = 2a − 1  (images in [−1, 1])

M is the face region (a binary mask, the whole image when none is given), s the pipeline's
noise seed (the expectation is over a fixed pool of ``seeds`` seeds, one per PGD step in turn,
so the clean outputs G_p(x; s) are computed once). D_M is the "L2_mask" of the deepfake-
disruption literature (Ruiz et al. 2020; TSDF's tables): a forgery counts as *disrupted* when
D_M ≥ 0.05 (:func:`distortion_success_rate`).

The diffusion edit G (:class:`DiffusionEdit`) is img2img with η = 0 DDIM (Song et al. 2021):

    z₀ = E(x),  t₀ = round(strength · T) − 1,  z_{t₀} = √ᾱ_{t₀} z₀ + √(1−ᾱ_{t₀}) ε_s
    for t_k in (t₀, t₀·(n−1)/n, …, t₀/n):
        ε̂ = ε_θ(z_{t_k}, t_k, c),  ẑ₀ = (z_{t_k} − √(1−ᾱ_{t_k}) ε̂)/√ᾱ_{t_k}
        z_{t_{k+1}} = √ᾱ_{t_{k+1}} ẑ₀ + √(1−ᾱ_{t_{k+1}}) ε̂          (ᾱ after the last step = 1)
    G(x; s) = D(z_final)

with n = ``steps`` (1–2 keep the attack affordable; the gradient flows end to end through the
encoder, every UNet call and the decoder). On ComfyUI's own SD1.5 classes with tiny random
weights, 25 steps at 8/255 give a D_M 60–90x that of ±8/255 random noise, on unseen seeds.

Poisoning (stage 2): :class:`kernels.detector.DetectorPoisonObjective` — the detector misses or
misplaces (IoU < 0.7) the face.

Intensity separation (the paper describes the mechanism only in words; this is our precise
version of it, :func:`two_stage_protect`). With the user's L∞ budget ε:

    stage 1:  δ₁ = PGD_{‖δ‖∞ ≤ ε₁}( L_int ; x ),                    ε₁ = s₁ · ε
    stage 2:  δ₂ = PGD_{‖δ‖∞ ≤ ε₂}( L_poison( x + Π_ε(δ₁ + s₂·δ₂) ) ; x + δ₁ )   (inner budget ε₂)
    combine:  δ  = Π_ε( δ₁ + s₂ · δ₂ )                               (clip to ε and to [0, 1])
    refine:   δ* = PGD_{‖δ‖∞ ≤ ε}( w_int·L_int ⊕ w_poi·L_poison ; x ), started at δ

s₁ (``interruption_strength``) sets how much of the budget the interruption owns, ε₂ how hard
the poisoning searches (ε₂ > ε − ε₁ lets δ₂ override δ₁ where it must) and s₂
(``poison_strength``) how strongly its result is laid over δ₁. Stage 2 is optimised *through*
the projection: its objective sees x + Π_ε(δ₁ + s₂·δ₂), the image that will be kept, so the
clip cannot undo the poisoning (a poisoning that holds only at the edge — MTCNN's scores hover
at its thresholds — would not survive a clip applied afterwards). The clip does take back part
of δ₁ where δ₂ overrides it, so a short refinement on both objectives (PGD's normalised-
gradient sum, starting at the combined δ, never leaving ε of the clean image) restores the
interruption. Each image finally keeps the refined result if the poisoning still holds there,
else the combined one if *it* holds (the poisoning's real check decides), else the refined one.
The result is 8-bit quantised within ε.

Persistence (what the paper's title is about). The attacker collects the protected photos, runs
their detector over them and fine-tunes the forgery model on the face crops it returns
(:func:`crop_faces`: the largest face of each photo, a square with a margin, resized to the
training size; a photo without a detected face drops out). :func:`persistence_scores` then
measures the interruption with the fine-tuned model θ₁ next to the base model θ₀ and next to an
unprotected control of the same budget (:func:`random_sign_noise`, ±ε with random signs):

    D(θ, x') = E_s D_M( G_θ(x'; s), G_θ(x; s) ),   persistence = D(θ₁, x+δ) / D(θ₀, x+δ)

When the detector kept nothing the attacker has no training data and θ₁ does not exist — the
poisoning's way of making the interruption persist. :func:`tsdf_score_row` and
:func:`persistence_score_rows` turn both sets of numbers into Score Report rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .denoising import Denoiser, add_noise, ddim
from .encoder import pad_to_multiple
from .pgd import (
    BoundObjective, Objective, ObjectiveOutput, PGDConfig, PGDResult, StepCallback, StepRecord,
    _unique_names, project, protect, quantize_within_budget,
)

SUCCESS_THRESHOLD = 0.05  # D_M above which a forgery counts as disrupted (Ruiz et al. 2020, TSDF)


# --------------------------------------------------------------------------- metrics


def masked_l2(a: Tensor, b: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """D_M: mean squared difference inside the mask, images rescaled to [−1, 1] → ``[B]``.

    a, b: ``[B,C,H,W]`` in [0, 1]; mask: ``[B or 1,1,H,W]`` (weights in [0, 1]) or None for the
    whole image. Differentiable. Identical images give 0; a white and a black image give 4.
    """
    d = (2.0 * (a.float() - b.float())).pow(2)  # (â − b̂)² with â = 2a − 1
    if mask is None:
        return d.flatten(1).mean(1)
    m = mask.to(d).expand(d.shape[0], 1, *d.shape[2:])
    return (d * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * d.shape[1]).clamp_min(1e-9)


def distortion_success_rate(distortion: Tensor, threshold: float = SUCCESS_THRESHOLD) -> float:
    """Share of forgeries whose D_M is ≥ ``threshold`` (0.05 as in TSDF)."""
    return float((distortion.float() >= threshold).float().mean())


# --------------------------------------------------------------------------- forgery pipelines


class ForgeryPipeline(Protocol):
    """A differentiable forgery: ``(images [B,3,H,W] in [0,1], seed) → forged [B,3,H,W] in [0,1]``.

    Deterministic for a given seed, so the clean and protected images can be compared on the
    same noise.
    """

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        ...


def ddim_timesteps(strength: float, steps: int, total: int = 1000) -> list[int]:
    """The img2img DDIM schedule: t₀ = round(strength·T) − 1, then t₀·(n−k)/n for k < n."""
    if not (0.0 < strength <= 1.0):
        raise ValueError(f"edit strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"edit steps must be >= 1, got {steps}")
    t0 = min(total - 1, max(0, int(round(strength * total)) - 1))
    ts = [int(round(t0 * (steps - k) / steps)) for k in range(steps)]
    out: list[int] = []
    for t in ts:  # very low strengths can collapse neighbours: keep them distinct
        if not out or t < out[-1]:
            out.append(t)
    return out


@dataclass
class DiffusionEdit:
    """img2img with a few deterministic DDIM steps (see the module docstring), differentiable.

    encode: images ``[B,3,H',W']`` in [0,1] (H', W' multiples of ``multiple``) → z₀ in the
    denoiser's latent space; decode: z₀ → images in [0,1]; denoiser: a
    :class:`~kernels.denoising.Denoiser`; cond: passed to it (the edit prompt);
    strength: share of the noise schedule to re-noise (0.3–0.6 is a typical edit);
    steps: DDIM steps back to t = 0. Images are reflect-padded to ``multiple`` and cropped back.
    inpaint_mask: ``[B or 1,1,H,W]`` in [0,1], 1 where the forger repaints (an inpainting edit,
    e.g. the face), or None (img2img everywhere). Inpainting blends the latent after every step
    with the input's own latent noised to the same level, as latent-mask samplers do
    (m = the mask area-resized to the latent grid):

        z_{t_{k+1}} ← m · z_{t_{k+1}} + (1 − m) · (√ā_{t_{k+1}} z₀ + √(1 − ā_{t_{k+1}}) n),   z₀ kept at t = 0

    Example:
        >>> edit = DiffusionEdit(vae_enc, vae_dec, unet, text, strength=0.5, steps=2)
        >>> forged = edit(images, seed=0)
    """

    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    denoiser: Denoiser
    cond: Any = None
    strength: float = 0.5
    steps: int = 2
    multiple: int = 8
    inpaint_mask: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self.schedule = ddim_timesteps(self.strength, self.steps, len(self.denoiser.alphas_cumprod))
        if self.inpaint_mask is not None and (self.inpaint_mask.dim() != 4 or self.inpaint_mask.shape[1] != 1):
            raise ValueError(f"the inpaint mask must be [B or 1,1,H,W], got {tuple(self.inpaint_mask.shape)}")

    def _latent_mask(self, images: Tensor, z0: Tensor) -> Optional[Tensor]:
        if self.inpaint_mask is None:
            return None
        m = self.inpaint_mask.to(z0.device, torch.float32)
        if tuple(m.shape[-2:]) != tuple(images.shape[-2:]) or m.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"the inpaint mask {tuple(m.shape)} does not fit the images {tuple(images.shape)}: "
                             "use one mask, or one per image, of the images' own size")
        m = pad_to_multiple(m, self.multiple)
        return torch.nn.functional.interpolate(m, size=z0.shape[-2:], mode="area").clamp(0, 1)

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        h, w = images.shape[-2:]
        z0 = self.encode(pad_to_multiple(images, self.multiple)).float()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        acp = self.denoiser.alphas_cumprod.to(z0.device, torch.float32)
        batch = z0.shape[0]
        t0 = torch.full((batch,), self.schedule[0], dtype=torch.long, device=z0.device)
        z = add_noise(z0, noise, t0, acp)
        m = self._latent_mask(images, z0)
        blend = None
        if m is not None:  # outside the mask: the input itself, noised to the next level
            blend = lambda i, z, a: m * z + (1 - m) * (a.sqrt() * z0 + (1 - a).sqrt() * noise)  # noqa: E731
        z = ddim(z, self.schedule, lambda z, t, i: self.denoiser.eps(z, t, self.cond), acp, blend)
        return self.decode(z).float()[..., :h, :w]


@dataclass
class ImagePromptGeneration:
    """IP-Adapter face generation as a forgery, differentiable in the reference photo.

    The forger feeds the photo to an IP-Adapter as an image prompt and generates from pure noise
    with a few deterministic DDIM steps (strength 1): G(x; s) = D(DDIM_{T→0}(z_T = n_s | c_text,
    c_img = P(CLIP(x)))). The photo enters only through its image tokens c_img, so the whole
    output changes with it; there is no spatial correspondence to the photo, so D_M is taken
    over the whole generated image.

    image_tokens: images ``[B,3,H,W]`` in [0,1] → c_img ``[B,N,D]`` (differentiable; CLIP's
    resize and normalisation included); denoiser: ``eps(z_t, t [B], tokens) → ε̂`` with an
    ``alphas_cumprod``; decode: latent → images in [0,1]; latent_shape: (channels, downscale)
    of the latent space (e.g. (4, 8) for SD); size: the generated image's (H, W) in pixels
    (default: the photo's, rounded down to a multiple of downscale); steps: DDIM steps.
    """

    image_tokens: Callable[[Tensor], Tensor]
    denoiser: Any
    decode: Callable[[Tensor], Tensor]
    latent_shape: tuple = (4, 8)
    size: Optional[tuple] = None
    steps: int = 2

    def __post_init__(self) -> None:
        self.schedule = ddim_timesteps(1.0, self.steps, len(self.denoiser.alphas_cumprod))

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        channels, down = (int(v) for v in self.latent_shape)
        h, w = self.size or images.shape[-2:]
        lh, lw = max(1, int(h) // down), max(1, int(w) // down)
        tokens = self.image_tokens(images).float()
        b = images.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn((b, channels, lh, lw), generator=gen).to(images.device)
        acp = self.denoiser.alphas_cumprod.to(images.device, torch.float32)
        z = ddim(z, self.schedule, lambda z, t, i: self.denoiser.eps(z, t, tokens), acp)
        return self.decode(z).float()


# --------------------------------------------------------------------------- interruption


@dataclass
class InterruptionObjective:
    """PGD objective: maximise the masked distortion D_M of every forgery pipeline's output.

    pipelines: :class:`ForgeryPipeline` callables (an ensemble; the loss is their mean);
    mask: ``[B or 1,1,H,W]`` region where the distortion counts (the face), or None (whole
    image), or a callable ``clean → mask`` evaluated in ``bind``;
    seeds: size of the noise-seed pool (each PGD step uses the next seed; the clean outputs for
    every seed are computed once in ``bind``); seed: first seed of the pool;
    target: early-stop when every image's D_M ≥ target (None: no target).
    Logs ``distortion`` (D_M on this step's seed, mean over pipelines).

    Example:
        >>> obj = InterruptionObjective([DiffusionEdit(...)], mask=face_mask)
        >>> protect(img, [obj], PGDConfig(eps=8/255, iterations=50))
    """

    pipelines: Sequence[ForgeryPipeline]
    mask: Any = None
    seeds: int = 2
    seed: int = 0
    target: Optional[float] = None
    weight: float = 1.0
    name: str = "interruption"

    def __post_init__(self) -> None:
        if not self.pipelines:
            raise ValueError("the interruption objective needs at least one forgery pipeline")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")

    def region(self, clean: Tensor) -> Optional[Tensor]:
        mask = self.mask(clean) if callable(self.mask) else self.mask
        if mask is None:
            return None
        mask = mask.to(clean.device, torch.float32)
        if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != tuple(clean.shape[-2:]):
            raise ValueError(f"the distortion mask must be [B or 1,1,H,W] matching the image "
                             f"{tuple(clean.shape[-2:])}; got {tuple(mask.shape)}")
        return mask

    def bind(self, clean: Tensor) -> BoundObjective:
        mask = self.region(clean)
        pool = [int(self.seed) + k for k in range(self.seeds)]
        with torch.no_grad():
            refs = [[p(clean, s).detach() for s in pool] for p in self.pipelines]
        counter = {"step": 0}

        def evaluate(x_adv: Tensor) -> ObjectiveOutput:
            k = counter["step"] % len(pool)
            if torch.is_grad_enabled():
                counter["step"] += 1
            d = torch.stack([masked_l2(p(x_adv, pool[k]), refs[i][k], mask)
                             for i, p in enumerate(self.pipelines)]).mean(0)
            reached = None if self.target is None else d.detach() >= self.target
            return ObjectiveOutput(loss=-d, logs={"distortion": d.detach()}, reached=reached)

        return evaluate


def forgery_distortion(pipelines: Sequence[ForgeryPipeline], clean: Tensor, protected: Tensor,
                       mask: Optional[Tensor] = None, seeds: Sequence[int] = (1000, 1001)) -> Tensor:
    """D_M ``[B]`` between the forgeries of ``protected`` and of ``clean``, averaged over the
    pipelines and over evaluation ``seeds`` (fresh ones, not those PGD used). No gradient."""
    return forgery_distortions(pipelines, clean, [protected], mask, seeds)[0]


def forgery_distortions(pipelines: Sequence[ForgeryPipeline], clean: Tensor, variants: Sequence[Tensor],
                        mask: Optional[Tensor] = None, seeds: Sequence[int] = (1000, 1001)) -> list[Tensor]:
    """:func:`forgery_distortion` for several altered versions of ``clean`` at once (e.g. the
    protected photo and a noise control): the clean forgery of each pipeline and seed is made
    once. → one ``[B]`` per variant."""
    vals: list[list[Tensor]] = [[] for _ in variants]
    with torch.no_grad():
        for p in pipelines:
            for s in seeds:
                ref = p(clean, s)
                for k, v in enumerate(variants):
                    vals[k].append(masked_l2(p(v, s), ref, mask))
    return [torch.stack(v).mean(0) for v in vals]


class Deferred:
    """A forgery pipeline built on first use (``build()`` → pipeline), so that a function taking
    several heavy pipelines (:func:`persistence_scores`) holds one model copy at a time."""

    def __init__(self, build: Callable[[], ForgeryPipeline]):
        self.build = build


def _built(pipeline: "ForgeryPipeline | Deferred | None") -> Optional[ForgeryPipeline]:
    return pipeline.build() if isinstance(pipeline, Deferred) else pipeline


def center_crop_to(mask: Tensor, height: int, width: int) -> Tensor:
    """Crop ``[B,1,H,W]`` to ``height``x``width`` about its centre (as ComfyUI's VAE Encode crops
    an image to a multiple of 8), so a mask made on the clean photo fits its forged output."""
    h, w = mask.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"the forged image ({width}x{height}) is larger than the photo ({w}x{h}); "
                         "forge at the photo's own size")
    top, left = (h - height) // 2, (w - width) // 2
    return mask[..., top:top + height, left:left + width]


def tsdf_scores(clean: Tensor, protected: Tensor, forged_clean: Tensor, forged_protected: Tensor,
                detect: Callable[[Tensor], list[Tensor]], iou: float = 0.7,
                threshold: float = SUCCESS_THRESHOLD) -> dict:
    """TSDF's numbers for a batch, as a JSON-ready dict.

    clean, protected: ``[B,3,H,W]`` in [0,1]; forged_clean, forged_protected: the same forgery
    (same seed) applied to each, ``[B,3,H',W']`` with H' ≤ H, W' ≤ W (centre crop, as VAE Encode
    does); detect: the real detector (images → B boxes ``[F,4]``).
    - interruption: D_M per image inside the clean photo's face boxes (whole image where no face
      is found), its mean, and the success rate (share ≥ ``threshold``);
    - poisoning: the detector on the clean photos is the ground truth; on the protected photos,
      precision/recall at IoU ≥ ``iou``, FDFR (no face at all) and the miss-or-misplace rate;
      FDFR on the clean photos for reference.
    """
    from .detector import detector_precision_recall, face_mask, fdfr, miss_or_misplace_rate

    if clean.shape != protected.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and protected {tuple(protected.shape)} images differ in shape")
    if forged_clean.shape != forged_protected.shape:
        raise ValueError(f"the two forged batches differ in shape: {tuple(forged_clean.shape)} vs "
                         f"{tuple(forged_protected.shape)}; forge both at the same size")
    if forged_clean.shape[0] != clean.shape[0]:
        raise ValueError(f"{forged_clean.shape[0]} forged images for {clean.shape[0]} photos")
    truth = detect(clean)
    pred = detect(protected)
    mask = center_crop_to(face_mask(truth, *clean.shape[-2:]), *forged_clean.shape[-2:])
    dist = masked_l2(forged_protected, forged_clean, mask)
    pr = detector_precision_recall(pred, truth, iou)
    return {
        "images": int(clean.shape[0]),
        "interruption": {
            "distortion_l2_mask": [round(float(v), 6) for v in dist],
            "mean_distortion_l2_mask": float(dist.mean()),
            "success_rate": distortion_success_rate(dist, threshold),
            "success_threshold": threshold,
        },
        "poisoning": {
            "iou": iou,
            "precision": pr.precision,
            "recall": pr.recall,
            "true_faces": pr.true,
            "detections": pr.predicted,
            "fdfr_protected": fdfr(pred),
            "fdfr_clean": fdfr(truth),
            "miss_or_misplace_rate": miss_or_misplace_rate(pred, truth, iou),
        },
    }


def format_scores(scores: dict) -> str:
    """A short human-readable summary of :func:`tsdf_scores`."""
    i, p = scores["interruption"], scores["poisoning"]
    return "\n".join([
        f"TSDF scores over {scores['images']} image(s)",
        f"interruption: mean L2_mask {i['mean_distortion_l2_mask']:.4f}, success "
        f"{i['success_rate'] * 100:.0f}% (L2_mask ≥ {i['success_threshold']})",
        f"poisoning: detector precision {p['precision']:.2f} / recall {p['recall']:.2f} at IoU {p['iou']}, "
        f"FDFR {p['fdfr_protected'] * 100:.0f}% (clean {p['fdfr_clean'] * 100:.0f}%), "
        f"missed or misplaced {p['miss_or_misplace_rate'] * 100:.0f}%",
    ])


# --------------------------------------------------------------------------- persistence


def largest_box(boxes: Tensor) -> Optional[Tensor]:
    """The largest box ``[4]`` (x1, y1, x2, y2) of ``[F,4]``, or None when F = 0."""
    if boxes.numel() == 0:
        return None
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    return boxes[int(area.argmax())]


def crop_square(box: Tensor, height: int, width: int, margin: float = 0.3) -> tuple[int, int, int]:
    """The attacker's crop window for a face box: a square of side s = max(w, h)·(1 + margin)
    about the box centre, at most the image's shorter side, shifted to lie inside the image →
    integer ``(top, left, side)`` in pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1.0 + float(margin))
    side = int(round(min(max(side, 1.0), height, width)))
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left = int(round(min(max(cx - side / 2.0, 0.0), width - side)))
    top = int(round(min(max(cy - side / 2.0, 0.0), height - side)))
    return top, left, side


def crop_faces(images: Tensor, boxes: Sequence[Tensor], size: int, margin: float = 0.3) -> tuple[Tensor, Tensor]:
    """The attacker's data preparation: one training crop per photo whose detector found a face.

    images: ``[B,3,H,W]`` in [0,1]; boxes: the detector's ``[F,4]`` boxes per image (e.g.
    :func:`kernels.detector.detect_boxes`); size: the training size in pixels; margin: extra
    context around the largest face (:func:`crop_square`). A photo without a face yields nothing
    (it drops out of the training set). → (crops ``[K,3,size,size]`` in [0,1], kept ``[B]`` bool)
    with K = kept.sum(), possibly 0. Resized with antialiased bicubic, as PIL-based pipelines do.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W], got shape {tuple(images.shape)}")
    if len(boxes) != images.shape[0]:
        raise ValueError(f"{len(boxes)} box lists for {images.shape[0]} images")
    if size < 8:
        raise ValueError(f"crop size must be >= 8 px, got {size}")
    h, w = images.shape[-2:]
    crops, kept = [], []
    for img, bx in zip(images, boxes):
        box = largest_box(bx)
        kept.append(box is not None)
        if box is None:
            continue
        top, left, side = crop_square(box, h, w, margin)
        patch = img[None, :, top:top + side, left:left + side].float()
        crops.append(torch.nn.functional.interpolate(patch, size=(size, size), mode="bicubic",
                                                     align_corners=False, antialias=True).clamp(0, 1))
    out = torch.cat(crops) if crops else images.new_zeros((0, 3, size, size), dtype=torch.float32)
    return out, torch.tensor(kept, dtype=torch.bool)


def random_sign_noise(clean: Tensor, eps: float, seed: int = 0, mask: Optional[Tensor] = None) -> Tensor:
    """The unprotected baseline of the same budget: x + n, n = ±ε with random signs (seeded),
    8-bit quantised within ε (so it is what a saved PNG holds). clean ``[B,3,H,W]`` in [0,1]."""
    gen = torch.Generator().manual_seed(int(seed))
    noise = (torch.randint(0, 2, clean.shape, generator=gen).float() * 2 - 1).to(clean) * eps
    if mask is not None:
        noise = noise * mask.to(clean)
    return quantize_within_budget(clean, (clean + noise).clamp(0, 1), eps, "linf", mask)


def _distortion_block(d: Tensor, threshold: float) -> dict:
    return {"distortion_l2_mask": [round(float(v), 6) for v in d], "mean_distortion_l2_mask": float(d.mean()),
            "success_rate": distortion_success_rate(d, threshold)}


def persistence_scores(clean: Tensor, protected: Tensor, baseline: Tensor, before: ForgeryPipeline,
                       after: Optional[ForgeryPipeline], kept: int, after_baseline: Optional[ForgeryPipeline] = None,
                       mask: Optional[Tensor] = None, seeds: Sequence[int] = (1000, 1001),
                       threshold: float = SUCCESS_THRESHOLD, baseline_name: str = "random-sign noise") -> dict:
    """Does the interruption persist once the attacker fine-tunes on the photos their detector kept?

    clean, protected, baseline: ``[B,3,H,W]`` in [0,1] (baseline: the unprotected control of the
    same budget, e.g. :func:`random_sign_noise`); every pipeline may be a :class:`Deferred`
    (built when needed and dropped after use); before: the forgery G_θ₀ with the attacker's
    base model; after: G_θ₁ with θ₁ = DreamBooth-LoRA(θ₀) fine-tuned on the ``kept`` crops the
    detector found in the protected photos (None when ``kept`` is 0: nothing to train on);
    after_baseline: the forgery with a model fine-tuned on the *baseline's* crops (default: θ₁);
    mask: ``[B or 1,1,H,W]`` face region of D_M (None: whole image); seeds: fresh noise seeds.

        D(θ, x') = (1/|S|) Σ_s D_M( G_θ(x'; s), G_θ(x; s) )                 per image
        before = D(θ₀, x + δ),   after = D(θ₁, x + δ)
        baseline_before = D(θ₀, x + n),   baseline_after = D(θ_b, x + n)      (θ_b = θ₁ by default)
        persistence = mean(after) / mean(before)     (1: fine-tuning did not weaken the interruption)
        advantage   = mean(after) / mean(baseline_after)   (how far above the noise floor of ε)

    When the detector kept no protected photo (``kept`` = 0) the attacker has no training data:
    θ₁ does not exist, the "after" numbers are None with that reason, and the forgery the
    attacker can still make is the base model's (``before``). JSON-ready dict.
    """
    if not (clean.shape == protected.shape == baseline.shape):
        raise ValueError(f"clean {tuple(clean.shape)}, protected {tuple(protected.shape)} and baseline "
                         f"{tuple(baseline.shape)} must have one shape")
    n = int(clean.shape[0])
    if not 0 <= int(kept) <= n:
        raise ValueError(f"kept must be between 0 and {n} (the number of protected photos), got {kept}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("persistence needs at least one evaluation seed")
    if int(kept) > 0 and after is None:
        raise ValueError("the attacker kept training photos, so the fine-tuned forgery ('after') is needed")
    trained = int(kept) > 0
    out: dict = {
        "images": n, "seeds": seeds, "success_threshold": threshold, "baseline": baseline_name,
        "attacker": {"photos": n, "kept": int(kept), "dropped": n - int(kept), "trained": trained},
    }
    b_prot, b_base = forgery_distortions([_built(before)], clean, [protected, baseline], mask, seeds)
    out["before"] = {"protected": _distortion_block(b_prot, threshold), "baseline": _distortion_block(b_base, threshold)}
    out["advantage_before"] = float(b_prot.mean() / b_base.mean().clamp_min(1e-12))
    if not trained:
        out["after"] = None
        out["persistence"] = out["advantage_after"] = None
        out["reason"] = (f"attacker has no training data: the detector dropped all {n} protected photo(s), "
                         "so no fine-tuned model exists; the forgery left to the attacker is the base model's")
        return out
    if after_baseline is None:
        a_prot, a_base = forgery_distortions([_built(after)], clean, [protected, baseline], mask, seeds)
    else:
        a_prot = forgery_distortion([_built(after)], clean, protected, mask, seeds)
        a_base = forgery_distortion([_built(after_baseline)], clean, baseline, mask, seeds)
    out["after"] = {"protected": _distortion_block(a_prot, threshold), "baseline": _distortion_block(a_base, threshold)}
    out["persistence"] = float(a_prot.mean() / b_prot.mean().clamp_min(1e-12))
    out["advantage_after"] = float(a_prot.mean() / a_base.mean().clamp_min(1e-12))
    out["baseline_model"] = "fine-tuned on the baseline's own crops" if after_baseline is not None else \
        "the model fine-tuned on the protected crops"
    return out


def format_persistence(p: dict) -> str:
    """A short human-readable summary of :func:`persistence_scores`."""
    a, b = p["attacker"], p["before"]
    lines = [
        f"TSDF persistence over {p['images']} photo(s): the attacker's detector kept {a['kept']}, dropped {a['dropped']}",
        f"before fine-tuning: L2_mask protected {b['protected']['mean_distortion_l2_mask']:.4f} "
        f"(success {b['protected']['success_rate'] * 100:.0f}%) vs {p['baseline']} "
        f"{b['baseline']['mean_distortion_l2_mask']:.5f}",
    ]
    if p["after"] is None:
        lines.append(p["reason"])
    else:
        f = p["after"]
        lines.append(
            f"after fine-tuning on {a['kept']} crop(s): L2_mask protected {f['protected']['mean_distortion_l2_mask']:.4f} "
            f"(success {f['protected']['success_rate'] * 100:.0f}%) vs {p['baseline']} "
            f"{f['baseline']['mean_distortion_l2_mask']:.5f}; persistence {p['persistence']:.2f}x, "
            f"{p['advantage_after']:.1f}x the baseline")
    return "\n".join(lines)


# --------------------------------------------------------------------------- PROTECT_SCORES rows


def tsdf_score_row(name: str, scores: dict):
    """:func:`tsdf_scores` as one :class:`kernels.scores.ScoreRow` for Score Report: ``tsdf/l2_mask``,
    ``tsdf/success_rate``, ``detector/precision``, ``detector/recall``, ``detector/fdfr``,
    ``detector/miss_or_misplace_rate`` and ``detector/fdfr_clean`` (reference)."""
    from .scores import ScoreRow

    i, p = scores["interruption"], scores["poisoning"]
    row = ScoreRow(name)
    row.set("tsdf/l2_mask", i["mean_distortion_l2_mask"], per_image=i["distortion_l2_mask"])
    row.set("tsdf/success_rate", i["success_rate"])
    reason = "MTCNN found no face on the clean photo(s): nothing to compare with"
    row.set("detector/precision", p["precision"] if p["true_faces"] else None, reason)
    row.set("detector/recall", p["recall"] if p["true_faces"] else None, reason)
    row.set("detector/fdfr", p["fdfr_protected"])
    row.set("detector/miss_or_misplace_rate", p["miss_or_misplace_rate"] if p["true_faces"] else None, reason)
    row.set("detector/fdfr_clean", p["fdfr_clean"])
    row.notes["tsdf"] = (f"L2_mask in the clean photo's face boxes, images in [-1, 1]; success when ≥ "
                         f"{i['success_threshold']}; detector MTCNN, IoU {p['iou']} against its boxes on the clean photo")
    return row


def persistence_score_rows(label: str, p: dict) -> list:
    """:func:`persistence_scores` as :class:`kernels.scores.ScoreRow` s, one per condition:
    ``{label}: protected, base model``, ``{label}: baseline, base model``, and the same two
    after fine-tuning — unavailable, with the reason ("attacker has no training data"), when the
    detector kept nothing. Metrics: ``tsdf/l2_mask``, ``tsdf/success_rate``,
    ``attacker/training_photos``, and on the protected rows ``tsdf/vs_baseline`` (and, after
    fine-tuning, ``tsdf/persistence``)."""
    from .scores import ScoreRow

    rows = []
    kept = p["attacker"]["kept"]
    for stage, model in (("before", "base model"), ("after", "fine-tuned")):
        for cond in ("protected", "baseline"):
            what = "protected" if cond == "protected" else p["baseline"]
            row = ScoreRow(f"{label}: {what}, {model}")
            block = None if p[stage] is None else p[stage][cond]
            reason = p.get("reason", "")
            row.set("tsdf/l2_mask", None if block is None else block["mean_distortion_l2_mask"], reason,
                    per_image=None if block is None else block["distortion_l2_mask"])
            row.set("tsdf/success_rate", None if block is None else block["success_rate"], reason)
            if stage == "after":
                row.set("attacker/training_photos", kept)
            if cond == "protected":
                row.set("tsdf/vs_baseline", p[f"advantage_{stage}"], reason)
                if stage == "after":
                    row.set("tsdf/persistence", p["persistence"], reason)
            row.notes["persistence"] = (f"D_M of forgery(x') vs forgery(clean) with the {model}; seeds {p['seeds']}; "
                                        f"attacker's detector kept {kept} of {p['images']} protected photo(s)")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- two stages


@dataclass
class TwoStageConfig:
    """Budgets and schedule of :func:`two_stage_protect` (fractions of the [0, 1] range).

    eps: the user's final L∞ budget ε; interruption_strength: s₁, stage 1 gets ε₁ = s₁·ε;
    inner_eps: ε₂, stage 2's search budget around x + δ₁; poison_strength: s₂, weight of δ₂ in
    the combination; *_iterations: PGD steps per stage (refine: the final joint stage);
    step: PGD step; weights: (w_int, w_poi) in the refinement.
    """

    eps: float = 8 / 255
    interruption_strength: float = 0.5
    inner_eps: float = 8 / 255
    poison_strength: float = 1.0
    stage1_iterations: int = 40
    stage2_iterations: int = 100
    refine_iterations: int = 20
    step: float = 1 / 255
    weights: tuple = (1.0, 1.0)
    seed: int = 0

    def validate(self) -> None:
        PGDConfig(eps=self.eps, step=self.step).validate()
        if not (0.0 < self.interruption_strength <= 1.0):
            raise ValueError(f"interruption_strength must be in (0, 1], got {self.interruption_strength}")
        if not (0.0 < self.inner_eps <= 32 / 255 + 1e-9):
            raise ValueError(f"inner_eps must be in (0, 32/255], got {self.inner_eps * 255:.3g}/255")
        if not (0.0 <= self.poison_strength <= 2.0):
            raise ValueError(f"poison_strength must be in [0, 2], got {self.poison_strength}")
        for name in ("stage1_iterations", "stage2_iterations", "refine_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stage1_iterations + self.stage2_iterations + self.refine_iterations == 0:
            raise ValueError("all three stages have 0 iterations: the image would not be protected. "
                             "Give at least one stage iterations (defaults 40 / 500 / 20).")


@dataclass
class TwoStageResult:
    protected: Tensor  # [B,C,H,W] on the 8-bit grid, within eps of the clean image
    result: PGDResult  # all stages together (for ProtectionReport); config.eps = the user's ε
    stages: dict[str, PGDResult] = field(default_factory=dict)  # "interruption" (stage 1), "poison" (stage 2)
    combined: Optional[Tensor] = None  # Π_ε(δ₁ + s₂δ₂) + x, before the refinement
    chose_combined: Optional[Tensor] = None  # [B] bool: the refinement broke the poisoning there


def _final_logs(bound, names, image):
    logs, losses, reached = {}, {}, []
    with torch.no_grad():
        for name, fn in zip(names, bound):
            out = fn(image)
            losses[name] = out.loss.detach().float().cpu()
            logs.update({f"{name}/{k}": v.detach().float().cpu() for k, v in out.logs.items()})
            if out.reached is not None:
                reached.append(out.reached.detach().cpu())
    ok = torch.stack(reached).all(0) if reached else None
    return logs, losses, ok


def two_stage_protect(
    clean: Tensor,
    interruption: Sequence[Objective],
    poison: Sequence[Objective],
    config: TwoStageConfig = TwoStageConfig(),
    mask: Optional[Tensor] = None,
    callback: Optional[StepCallback] = None,
) -> TwoStageResult:
    """TSDF's two-stage, intensity-separated protection (see the module docstring).

    clean: ``[B,3,H,W]`` in [0,1]; interruption, poison: objectives of each role (at least one
    each); mask: ``[B or 1,1,H,W]`` where pixels may change, or None; callback(step, total, x,
    record) as in :func:`kernels.pgd.protect`, with steps counted over all stages.
    Returns a :class:`TwoStageResult`; ``protected`` is on the 8-bit grid within ``config.eps``.

    Example:
        >>> res = two_stage_protect(img, [InterruptionObjective([edit])],
        ...                         [DetectorPoisonObjective()], TwoStageConfig(eps=8/255))
    """
    config.validate()
    if not interruption or not poison:
        raise ValueError("two-stage protection needs an interruption objective and a poisoning objective")
    if clean.dim() != 4:
        raise ValueError(f"expected an image batch [B,C,H,W], got shape {tuple(clean.shape)}")
    clean = clean.detach().clone().float()
    if mask is not None:
        mask = mask.detach().to(clean).expand(clean.shape[0], 1, *clean.shape[2:]).clone()
    c = config
    total = c.stage1_iterations + c.stage2_iterations + c.refine_iterations

    def shifted(offset: int):
        if callback is None:
            return None
        return lambda s, _t, x, rec: callback(offset + s, total, x, rec)

    eps1 = c.interruption_strength * c.eps
    r1 = protect(clean, interruption, PGDConfig(eps=eps1, step=c.step, iterations=c.stage1_iterations,
                                                seed=c.seed, early_stop=False, quantize=False),
                 mask, shifted(0))
    x1 = r1.protected
    delta1 = x1 - clean
    seen = [_ThroughCombination(o, clean, delta1, c.eps, c.poison_strength, mask) for o in poison]
    r2 = protect(x1, seen, PGDConfig(eps=c.inner_eps, step=c.step, iterations=c.stage2_iterations,
                                     seed=c.seed + 1, early_stop=True, quantize=False),
                 mask, shifted(c.stage1_iterations))
    delta = project(delta1 + c.poison_strength * (r2.protected - x1), clean, c.eps, "linf", mask)
    combined = quantize_within_budget(clean, clean + delta, c.eps, "linf", mask)

    offset = c.stage1_iterations + c.stage2_iterations
    objectives = [_weighted(o, c.weights[0]) for o in interruption] + [_weighted(o, c.weights[1]) for o in poison]
    r3 = protect(clean, objectives, PGDConfig(eps=c.eps, step=c.step, iterations=c.refine_iterations,
                                              seed=c.seed + 2, early_stop=False, quantize=True),
                 mask, shifted(offset), init=combined - clean)
    refined, hist3 = r3.protected, r3.history
    with torch.no_grad():  # the bindings PGD just used (``_weighted`` keeps them): nothing recomputed
        bound = [o.bind(clean) for o in objectives]

    names = _unique_names([o.name for o in objectives])
    _, _, poison_ok = _final_logs(bound[len(interruption):], names[len(interruption):], refined)
    chose = torch.zeros(clean.shape[0], dtype=torch.bool)
    final = refined
    if poison_ok is not None and not bool(poison_ok.all()):
        _, _, comb_ok = _final_logs(bound[len(interruption):], names[len(interruption):], combined)
        chose = (~poison_ok) & comb_ok
        if bool(chose.any()):
            sel = chose.to(clean.device).view(-1, 1, 1, 1)
            final = torch.where(sel, combined, refined)
    final_logs, final_losses, _ = _final_logs(bound, names, final)

    history = []
    for k, rec in enumerate(r1.history + r2.history + hist3):
        prefix = "stage1" if k < len(r1.history) else "stage2" if k < len(r1.history) + len(r2.history) else None
        losses_k = rec.losses if prefix is None else {f"{prefix}:{n}": v for n, v in rec.losses.items()}
        history.append(StepRecord(step=k, total=rec.total, losses=losses_k, logs=rec.logs))
    merged = PGDResult(
        protected=final.detach(), history=history, steps_run=len(history), stopped_early=r2.stopped_early,
        config=PGDConfig(eps=c.eps, step=c.step, iterations=total, norm="linf", seed=c.seed,
                         early_stop=False, quantize=True),
        final_logs=final_logs, final_losses=final_losses,
    )
    return TwoStageResult(protected=final.detach(), result=merged,
                          stages={"interruption": r1, "poison": r2}, combined=combined, chose_combined=chose)


class _ThroughCombination:
    """Stage 2's view of a poisoning objective: PGD moves x₁ + δ₂ within ε₂ of x₁, but the
    objective — bound to the *clean* image — is evaluated on the image that will actually be
    kept, x + Π_ε(δ₁ + s₂·δ₂). So the poisoning is optimised *through* the projection (the clip
    passes the gradient where it is not active) and its real check and early stop judge the
    combined, 8-bit image rather than an intermediate one."""

    def __init__(self, objective: Objective, clean: Tensor, delta1: Tensor, eps: float, strength: float,
                 mask: Optional[Tensor]):
        self.objective, self.name, self.weight = objective, objective.name, objective.weight
        self.clean, self.delta1, self.eps, self.strength, self.mask = clean, delta1, eps, strength, mask

    def bind(self, x1: Tensor) -> BoundObjective:
        inner = self.objective.bind(self.clean)

        def evaluate(x_adv: Tensor) -> ObjectiveOutput:
            d = project(self.delta1 + self.strength * (x_adv - x1), self.clean, self.eps, "linf", self.mask)
            return inner(self.clean + d)

        return evaluate


class _weighted:
    """An objective with another weight (the refinement's w_int, w_poi), same name and binding.

    It keeps its last binding: binding again to an equal clean image returns the same callable,
    so the final checks after the refinement reuse what PGD bound (clean forgeries, detector
    ground truth) instead of computing it twice."""

    def __init__(self, objective: Objective, factor: float):
        self.objective, self.name = objective, objective.name
        self.weight = float(objective.weight) * float(factor)
        self._bound: Optional[tuple[Tensor, BoundObjective]] = None

    def bind(self, clean: Tensor) -> BoundObjective:
        if self._bound is not None and self._bound[0].shape == clean.shape and torch.equal(self._bound[0], clean):
            return self._bound[1]
        fn = self.objective.bind(clean)
        self._bound = (clean.detach().clone(), fn)
        return fn


__all__ = [
    "SUCCESS_THRESHOLD", "DiffusionEdit", "ForgeryPipeline", "InterruptionObjective", "TwoStageConfig",
    "TwoStageResult", "center_crop_to", "crop_faces", "crop_square", "ddim_timesteps", "distortion_success_rate",
    "Deferred", "forgery_distortion", "forgery_distortions", "format_persistence", "format_scores", "largest_box", "masked_l2", "persistence_score_rows",
    "persistence_scores", "random_sign_noise", "tsdf_score_row", "tsdf_scores", "two_stage_protect",
]
