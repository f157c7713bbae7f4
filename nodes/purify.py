"""Purifier nodes (IMAGE → IMAGE): what an attacker runs before customising a model on a
protected image. Use them between a protection and a customisation/metrics step to see whether
the protection survives. The math is in ``kernels/purify.py``; diffusion purifiers (SDEdit /
DiffPure, GrIDPure) sample with ComfyUI's own ``comfy.sample`` (any MODEL/VAE pair), Noisy
Upscale runs ComfyUI's own "Upscale Image (using Model)", IMPRESS optimises through a private
grad-usable copy of the VAE (``nodes/diffusion_access.py``).

Every node returns images of the input's size and batch, and never modifies its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from torch import Tensor

from ..kernels import purify as K
from ..kernels.encoder import pad_to_multiple
from .common import Node, Progress, bchw_to_image, device, image_to_bchw

CATEGORY = "Immunize/purify"

# Tiles per sampling call in GrIDPure (bounds memory on large images / batches).
GRID_TILE_BATCH = 16


def _image_input():
    return io.Image.Input("image", tooltip="Image(s) to purify (e.g. the protected output); any size, any batch.")


def _image_output():
    return [io.Image.Output("purified", display_name="purified", tooltip="The purified image(s), same size as the input.")]


def _seed_input(tooltip: str):
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip=tooltip)


# --------------------------------------------------------------------------- ComfyUI VAE / sampling


def vae_multiple(vae) -> int:
    """The VAE's spatial downscale factor (the size multiple its encoder needs)."""
    if getattr(vae, "first_stage_model", None) is None:
        raise ValueError("'vae' has no weights (first_stage_model is None): load a VAE or checkpoint.")
    ratio = vae.spacial_compression_encode()
    return int(ratio) if isinstance(ratio, int) else 8


def vae_encode(vae, x: Tensor) -> Tensor:
    """``[B,3,H,W]`` in [0,1], H and W multiples of :func:`vae_multiple` → the raw LATENT samples."""
    return vae.encode(x.movedim(1, -1).contiguous())


def vae_decode(vae, latent: Tensor) -> Tensor:
    """LATENT samples → ``[B,3,H,W]`` in [0,1] (video VAEs: frames flattened into the batch)."""
    img = vae.decode(latent)
    img = img.reshape(-1, *img.shape[-3:])[..., :3]
    return img.movedim(-1, 1).float().clamp(0, 1)


def vae_round_trip(vae, x: Tensor) -> Tensor:
    """D(E(x)) through ComfyUI's public VAE API; padded to the VAE's multiple and cropped back."""
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, vae_multiple(vae))
    return vae_decode(vae, vae_encode(vae, xp))[..., :h, :w].to(x.device)


def _sampler_callback(total: int):
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(total, 1))

    def callback(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(step + 1, total_steps)

    return callback


def diffuse(model, vae, positive, negative, x: Tensor, strength: float, steps: int, cfg: float,
            sampler_name: str, scheduler: str, seed: int) -> Tensor:
    """SDEdit / DiffPure with ComfyUI's own sampling (as KSampler with ``denoise = strength``):
    encode, noise the latent to the level of ``strength``, denoise with ``steps`` sampler steps,
    decode. ``strength = 0`` is the plain VAE round trip. ``[B,3,H,W]`` → ``[B,3,H,W]``."""
    import comfy.sample
    import comfy.utils

    h, w = x.shape[-2:]
    latent = vae_encode(vae, pad_to_multiple(x, vae_multiple(vae)))
    if strength > 0:
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, int(seed))
        latent = comfy.sample.sample(
            model, noise, int(steps), float(cfg), sampler_name, scheduler, positive,
            negative if negative is not None else positive, latent, denoise=float(strength),
            callback=_sampler_callback(int(steps)), disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=int(seed),
        )
    return vae_decode(vae, latent)[..., :h, :w].to(x.device)


def _check_guidance(cfg: float, negative) -> None:
    if negative is None and abs(float(cfg) - 1.0) > 1e-6:
        raise ValueError(
            f"cfg is {cfg} but no 'negative' conditioning is connected: connect one (e.g. a CLIP Text "
            "Encode with an empty prompt) or set cfg to 1.0 (unguided, as DiffPure)."
        )


def _diffusion_inputs(strength_default: float, steps_default: int, strength_tip: str, steps_tip: str):
    import comfy.samplers

    return [
        io.Model.Input("model", tooltip="The diffusion model that purifies (e.g. the SD checkpoint the "
                                        "attacker would fine-tune); it is only sampled, never modified."),
        io.Vae.Input("vae", tooltip="The VAE of that model (pixels ↔ latents)."),
        io.Conditioning.Input("positive", tooltip="Conditioning for the denoiser. DiffPure is unconditional: "
                                                  "connect a CLIP Text Encode with an empty prompt."),
        io.Float.Input("strength", default=strength_default, min=0.0, max=1.0, step=0.005, tooltip=strength_tip),
        io.Int.Input("steps", default=steps_default, min=1, max=1000, tooltip=steps_tip),
        io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                       tooltip="Classifier-free guidance. 1.0 = unguided (DiffPure); above 1 needs 'negative'."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddpm",
                       tooltip="ComfyUI sampler. ddpm = DiffPure's ancestral DDPM reverse process; "
                               "ddim = deterministic SDEdit."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       tooltip="ComfyUI noise schedule for the denoising steps."),
        _seed_input("Seed of the diffusion noise (the same seed gives the same result)."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Negative conditioning, only used when cfg ≠ 1."),
    ]


# --------------------------------------------------------------------------- signal processing


class ImmunizePurifyJPEG(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyJPEG",
            display_name="Purify: JPEG",
            category=CATEGORY,
            description="Re-encodes the image as JPEG with the real codec (PIL/libjpeg, 4:2:0) and decodes it.",
            inputs=[
                _image_input(),
                io.Int.Input("quality", default=75, min=1, max=100,
                             tooltip="JPEG quality 1–100 (75: PIL's default and the usual benchmark setting)."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, quality) -> io.NodeOutput:
        return io.NodeOutput(bchw_to_image(K.jpeg(image_to_bchw(image), int(quality))))


class ImmunizePurifyGaussianBlur(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyGaussianBlur",
            display_name="Purify: Gaussian Blur",
            category=CATEGORY,
            description="Gaussian blur: removes the high frequencies where most perturbations live.",
            inputs=[
                _image_input(),
                io.Float.Input("sigma", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Standard deviation of the Gaussian, in pixels (0 = no blur)."),
                io.Int.Input("kernel_size", default=0, min=0, max=127, step=1,
                             tooltip="Odd kernel size in pixels; 0 = automatic (2·⌈3σ⌉ + 1)."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, sigma, kernel_size) -> io.NodeOutput:
        x = image_to_bchw(image).to(device())
        return io.NodeOutput(bchw_to_image(K.gaussian_blur(x, float(sigma), int(kernel_size))))


class ImmunizePurifyResizeDownUp(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyResizeDownUp",
            display_name="Purify: Resize Down-Up",
            category=CATEGORY,
            description="Downscales the image (antialiased) and scales it back to its original size.",
            inputs=[
                _image_input(),
                io.Float.Input("factor", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Downscale factor (0.5 = half the width and height, then back)."),
                io.Combo.Input("mode", options=list(K.RESIZE_MODES), default="bicubic",
                               tooltip="Interpolation used both ways."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, factor, mode) -> io.NodeOutput:
        x = image_to_bchw(image).to(device())
        return io.NodeOutput(bchw_to_image(K.resize_down_up(x, float(factor), mode)))


class ImmunizePurifyGaussianNoise(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyGaussianNoise",
            display_name="Purify: Gaussian Noise",
            category=CATEGORY,
            description="Adds seeded Gaussian noise (drowns small perturbations; the first half of Noisy Upscale).",
            inputs=[
                _image_input(),
                io.Float.Input("sigma", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Noise standard deviation as a fraction of the pixel range "
                                       "(0.05 ≈ 12.75/255)."),
                _seed_input("Seed of the noise (the same seed gives the same noise)."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, sigma, seed) -> io.NodeOutput:
        x = image_to_bchw(image).to(device())
        return io.NodeOutput(bchw_to_image(K.gaussian_noise(x, float(sigma), int(seed))))


class ImmunizePurifyAdverseCleaner(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyAdverseCleaner",
            display_name="Purify: AdverseCleaner",
            category=CATEGORY,
            description=(
                "lllyasviel's AdverseCleaner: many passes of an edge-preserving bilateral filter, then a "
                "guided filter guided by the input image. No model needed. Defaults are the public "
                "cleaner's (OpenCV parameters in 8-bit units)."
            ),
            inputs=[
                _image_input(),
                io.Int.Input("bilateral_iterations", default=64, min=0, max=512,
                             tooltip="Bilateral filter passes (the cleaner: 64)."),
                io.Int.Input("diameter", default=5, min=1, max=31, step=2,
                             tooltip="Bilateral window diameter in pixels, odd (the cleaner: 5)."),
                io.Float.Input("sigma_color", default=8.0, min=0.1, max=255.0, step=0.5,
                               tooltip="Bilateral colour σ in 8-bit steps (/255), on the sum of the three "
                                       "channel differences (the cleaner: 8)."),
                io.Float.Input("sigma_space", default=8.0, min=0.1, max=100.0, step=0.5,
                               tooltip="Bilateral spatial σ in pixels (the cleaner: 8)."),
                io.Int.Input("guided_iterations", default=4, min=0, max=64,
                             tooltip="Guided filter passes (the cleaner: 4)."),
                io.Int.Input("guided_radius", default=4, min=1, max=64,
                             tooltip="Guided filter radius in pixels; the window is 2r + 1 (the cleaner: 4)."),
                io.Float.Input("guided_eps", default=16.0, min=0.01, max=10000.0, step=1.0,
                               tooltip="Guided filter regularisation ε in 8-bit units squared (/255²) "
                                       "(the cleaner: 16). Larger = smoother."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, bilateral_iterations, diameter, sigma_color, sigma_space, guided_iterations,
                guided_radius, guided_eps) -> io.NodeOutput:
        x = image_to_bchw(image).to(device())
        out = K.adverse_cleaner(
            x, bilateral_iterations=int(bilateral_iterations), diameter=int(diameter),
            sigma_color=float(sigma_color) / 255.0, sigma_space=float(sigma_space),
            guided_iterations=int(guided_iterations), radius=int(guided_radius),
            eps=float(guided_eps) / 255.0**2,
        )
        return io.NodeOutput(bchw_to_image(out))


# --------------------------------------------------------------------------- model-based


class ImmunizePurifyVAERoundTrip(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyVAERoundTrip",
            display_name="Purify: VAE Round Trip",
            category=CATEGORY,
            description=(
                "Encodes the image with a VAE and decodes it again (what every latent-diffusion edit or "
                "fine-tune does first). The image is padded to the VAE's size multiple and cropped back."
            ),
            inputs=[
                _image_input(),
                io.Vae.Input("vae", tooltip="Any ComfyUI VAE; it is only used, never modified."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, vae) -> io.NodeOutput:
        return io.NodeOutput(bchw_to_image(vae_round_trip(vae, image_to_bchw(image))))


class ImmunizePurifySDEdit(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifySDEdit",
            display_name="Purify: SDEdit / DiffPure",
            category=CATEGORY,
            description=(
                "DiffPure / SDEdit: noise the image's latent to a level t* = strength·T and denoise it back "
                "with the diffusion model (ComfyUI's KSampler with denoise = strength), then decode. The "
                "noise drowns the perturbation; the model restores a clean-looking image."
            ),
            inputs=[_image_input()] + _diffusion_inputs(
                0.1, 20,
                "Noise level t*/T (KSampler denoise). 0.1 = DiffPure's t* = 100 of 1000 as GrIDPure runs it "
                "(DiffPure used 0.1–0.15). 0 = VAE round trip only.",
                "Denoising steps actually run from t* down to 0.",
            ),
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, model, vae, positive, strength, steps, cfg, sampler_name, scheduler, seed,
                negative=None) -> io.NodeOutput:
        _check_guidance(cfg, negative)
        x = image_to_bchw(image)
        out = diffuse(model, vae, positive, negative, x, float(strength), int(steps), float(cfg),
                      sampler_name, scheduler, int(seed))
        return io.NodeOutput(bchw_to_image(out))


class ImmunizePurifyGrIDPure(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyGrIDPure",
            display_name="Purify: GrIDPure",
            category=CATEGORY,
            description=(
                "GrIDPure (Zhao et al., CVPR 2024): DiffPure applied to overlapping crop×crop tiles (plus a "
                "mosaic of the four corners), overlaps averaged, blended with the previous round by γ, "
                "repeated. Keeps the image's structure better than one strong DiffPure pass. Defaults "
                "are the paper's (256 tiles at stride 128, 20 rounds of 10/1000 noise steps, γ = 0.1)."
            ),
            inputs=[_image_input()] + _diffusion_inputs(
                0.01, 10,
                "Noise level per round, t*/T (GrIDPure: 10 of 1000 steps = 0.01).",
                "Denoising steps per round (10 at strength 0.01 = every DDPM step of the paper).",
            ) + [
                io.Int.Input("crop", default=256, min=16, max=4096, step=8,
                             tooltip="Tile size in pixels (GrIDPure: 256). Clipped to the image."),
                io.Int.Input("stride", default=128, min=8, max=4096, step=8,
                             tooltip="Tile stride in pixels (GrIDPure: 128, half the tile)."),
                io.Int.Input("iterations", default=20, min=1, max=200,
                             tooltip="Purification rounds (GrIDPure: 20)."),
                io.Float.Input("gamma", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend with the previous round: x ← (1−γ)·purified + γ·x (GrIDPure: 0.1)."),
                io.Boolean.Input("corner_mosaic", default=True,
                                 tooltip="Also purify a mosaic of the four corners (GrIDPure does)."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, model, vae, positive, strength, steps, cfg, sampler_name, scheduler, seed,
                crop, stride, iterations, gamma, corner_mosaic, negative=None) -> io.NodeOutput:
        import comfy.model_management

        _check_guidance(cfg, negative)
        x = image_to_bchw(image)
        calls = [0]

        def purify_fn(tiles: Tensor) -> Tensor:
            out = []
            for i in range(0, tiles.shape[0], GRID_TILE_BATCH):
                calls[0] += 1  # a fresh, reproducible seed per sampling call
                out.append(diffuse(model, vae, positive, negative, tiles[i:i + GRID_TILE_BATCH], float(strength),
                                   int(steps), float(cfg), sampler_name, scheduler, int(seed) + calls[0] - 1))
            return torch.cat(out, 0).to(tiles)

        def on_round(k, total, cur):
            comfy.model_management.throw_exception_if_processing_interrupted()

        out = K.gridpure(x, purify_fn, crop=int(crop), stride=int(stride), iterations=int(iterations),
                         gamma=float(gamma), corner_mosaic=bool(corner_mosaic), callback=on_round)
        return io.NodeOutput(bchw_to_image(out.clamp(0, 1)))


class ImmunizePurifyNoisyUpscale(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyNoisyUpscale",
            display_name="Purify: Noisy Upscale",
            category=CATEGORY,
            description=(
                "Noisy Upscaling (Hönig et al. 2024, 'Adversarial Perturbations Cannot Reliably Protect "
                "Artists From Generative AI'): add Gaussian noise, then let an upscale model (which also "
                "denoises) restore the image; the result is resized back to the input size. Uses ComfyUI's "
                "own Upscale Image (using Model)."
            ),
            inputs=[
                _image_input(),
                io.UpscaleModel.Input("upscale_model", tooltip="An upscale model from Load Upscale Model "
                                                               "(ESRGAN, SwinIR, ...)."),
                io.Float.Input("sigma", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Noise standard deviation as a fraction of the pixel range, added "
                                       "before upscaling (0.05 ≈ 12.75/255)."),
                _seed_input("Seed of the noise."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, upscale_model, sigma, seed) -> io.NodeOutput:
        from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

        x = image_to_bchw(image)
        noisy = K.gaussian_noise(x, float(sigma), int(seed))
        up = ImageUpscaleWithModel.execute(upscale_model, bchw_to_image(noisy))[0]
        up = up.movedim(-1, 1).float().to(x.device)
        if up.shape[-2:] != x.shape[-2:]:
            up = F.interpolate(up, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        return io.NodeOutput(bchw_to_image(up.clamp(0, 1)))


class ImmunizePurifyIMPRESS(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePurifyIMPRESS",
            display_name="Purify: IMPRESS",
            category=CATEGORY,
            description=(
                "IMPRESS (Cao et al., NeurIPS 2023): optimises a nearby image that the VAE reconstructs "
                "faithfully, min ‖x − D(E(x))‖² + α·max(d(x, input) − Δ, 0). Protective perturbations "
                "break that consistency, so restoring it removes them. The paper's d is LPIPS; without "
                "its weights offline, d is 1 − SSIM or an RMS distance. Defaults are the paper's setting "
                "against Glaze (3000 steps: slow); its PhotoGuard setting is 1000 steps, lr 0.005, "
                "α 0.01, noise 0.05."
            ),
            inputs=[
                _image_input(),
                io.Vae.Input("vae", tooltip="The VAE whose consistency is restored (the attacker's model's "
                                            "VAE); a private copy is used, the VAE is not modified."),
                io.Int.Input("steps", default=3000, min=0, max=20000,
                             tooltip="Optimisation steps (paper: 3000 against Glaze, 1000 against PhotoGuard)."),
                io.Float.Input("lr", default=0.01, min=0.0001, max=0.5, step=0.0005,
                               tooltip="Adam learning rate on pixels in [−1, 1], cosine-annealed to 1e-5 "
                                       "(paper: 0.01)."),
                io.Float.Input("alpha", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="α, weight of the closeness hinge (paper: 0.1)."),
                io.Float.Input("bound", default=0.1, min=0.0, max=1.0, step=0.005,
                               tooltip="Δ, the closeness allowed for free: 1 − SSIM for 'ssim', RMS pixel "
                                       "difference (fraction of the range) for 'l2' (paper: LPIPS 0.1)."),
                io.Float.Input("noise", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="σ of the Gaussian noise the optimisation starts from, on pixels in "
                                       "[−1, 1] (paper: 0.1)."),
                io.Combo.Input("closeness", options=list(K.CLOSENESS), default="ssim",
                               tooltip="Distance d to the input: ssim (1 − SSIM, structure) or l2 (RMS)."),
                _seed_input("Seed of the starting noise."),
            ],
            outputs=_image_output(),
        )

    @classmethod
    def execute(cls, image, vae, steps, lr, alpha, bound, noise, closeness, seed) -> io.NodeOutput:
        from .diffusion_access import VAEAccess

        x = image_to_bchw(image)
        with torch.inference_mode(False):
            access = VAEAccess(vae)
            clean = x.to(access.device).clone()
            out = K.impress(
                clean, access.encode, access.decode, steps=int(steps), lr=float(lr), alpha=float(alpha),
                bound=float(bound), noise=float(noise), closeness=closeness, seed=int(seed),
                multiple=access.multiple, callback=Progress(int(steps), preview_every=max(1, int(steps) // 20)),
            )
        return io.NodeOutput(bchw_to_image(out))


NODES = [
    ImmunizePurifyJPEG,
    ImmunizePurifyGaussianBlur,
    ImmunizePurifyResizeDownUp,
    ImmunizePurifyGaussianNoise,
    ImmunizePurifyAdverseCleaner,
    ImmunizePurifyVAERoundTrip,
    ImmunizePurifySDEdit,
    ImmunizePurifyGrIDPure,
    ImmunizePurifyNoisyUpscale,
    ImmunizePurifyIMPRESS,
]
