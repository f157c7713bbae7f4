"""The attacker's customisation step as nodes: DreamBooth-LoRA fine-tuning and img2img editing.

Protection is judged by what a mimic gets out of the protected photos, so these nodes run the
two attacks the way attackers do, on the user's own ComfyUI MODEL and VAE:

- :class:`ImmunizeLoRAFineTune`: DreamBooth-LoRA (math in ``kernels/lora.py``) on the photos,
  returning the fine-tuned MODEL and saving the LoRA where ComfyUI's LoRA loaders find it.
- :class:`ImmunizeEditImage`: a malicious edit — img2img (optionally inpainting) with an edit
  prompt through ComfyUI's own sampler.

The user's MODEL is never modified: training runs on a private deep copy
(:class:`~.diffusion_access.DenoiserAccess`) and the returned MODEL is a clone with the LoRA added
as weight patches, exactly as ``LoraLoader`` would add it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

import comfy.model_base
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..kernels.encoder import pad_to_multiple
from ..kernels.lora import (FineTuneConfig, check_rank_alpha, fine_tune, inject_lora, lora_factors,
                            lora_parameters, lora_targets)
from .common import Node, CATEGORY, image_to_bchw, mask_to_b1hw
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, model_family

NODE_CATEGORY = f"{CATEGORY}/attacker"
LORA_FOLDER = "loras"
HALF_LOSS_SCALE = 2.0**12  # initial dynamic loss scale when the UNet runs in float16


# --------------------------------------------------------------------------- LoRA fine-tuning


@dataclass
class LoRATraining:
    """What :func:`train_lora` produced.

    state_dict: the LoRA in kohya format (see :func:`lora_state_dict`), float32 CPU tensors;
    history: per-step loss components (``instance``, ``prior`` when used, ``total``);
    denoiser: the private trained copy (LoRA layers in place), for checks; drop it when done.
    """

    state_dict: dict[str, Tensor]
    history: list[dict[str, float]]
    denoiser: DenoiserAccess
    rank: int
    alpha: float


def encode_latents(vae: Any, denoiser: DenoiserAccess, images: Tensor, chunk: int = 4) -> Tensor:
    """IMAGE ``[B,H,W,3]`` → latents in the model's space ``[B,c,h,w]`` (once, no gradients).

    Images are reflect-padded to the VAE's multiple, never resized or cropped.
    """
    access = VAEAccess(vae)
    x = image_to_bchw(images)
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            batch = pad_to_multiple(x[i:i + chunk], access.multiple)
            out.append(denoiser.latent_in(access.encode(batch)))
    return torch.cat(out)


def lora_key_prefixes(patcher: Any, names: list[str]) -> dict[str, str]:
    """Kohya key prefix of each trained layer (name relative to the UNet).

    SD1.x/2.x: diffusers names, ``lora_unet_down_blocks_1_attentions_0_…_attn1_to_q``; SDXL:
    the original (sgm) names, ``lora_unet_input_blocks_4_1_…_attn1_to_q`` — what kohya's
    sd-scripts write for each, so the file also works outside ComfyUI.
    """
    base = patcher.model
    to_diffusers: dict[str, str] = {}
    if not isinstance(base, comfy.model_base.SDXL):
        mapping = comfy.utils.unet_to_diffusers(base.model_config.unet_config)
        to_diffusers = {ldm: diff for diff, ldm in mapping.items()}
    out = {}
    for name in names:
        diff = to_diffusers.get(name + ".weight")
        key = diff[: -len(".weight")] if diff else name
        out[name] = "lora_unet_" + key.replace(".", "_")
    return out


def lora_state_dict(patcher: Any, factors: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """``{prefix.lora_down.weight: A, prefix.lora_up.weight: B, prefix.alpha: α}`` per layer."""
    prefixes = lora_key_prefixes(patcher, list(factors))
    sd: dict[str, Tensor] = {}
    for name, (down, up, alpha) in factors.items():
        p = prefixes[name]
        sd[f"{p}.lora_down.weight"] = down.contiguous()
        sd[f"{p}.lora_up.weight"] = up.contiguous()
        sd[f"{p}.alpha"] = torch.tensor(float(alpha))
    return sd


def train_lora(model: Any, vae: Any, images: Tensor, instance_cond: Any, config: FineTuneConfig,
               rank: int, alpha: float, class_images: Optional[Tensor] = None,
               class_cond: Any = None, progress=None) -> LoRATraining:
    """DreamBooth-LoRA on a private copy of ``model``'s UNet attention layers (see the node)."""
    check_supported_model(model)
    check_rank_alpha(rank, alpha)
    if not instance_cond:
        raise ValueError("'instance_conditioning' is empty: connect a CLIP Text Encode with the "
                         "instance prompt, e.g. 'a photo of sks person'")
    if (class_images is None) != (class_cond is None or len(class_cond) == 0):
        raise ValueError("prior preservation needs both 'class_images' and 'class_conditioning' "
                         "(e.g. 'a photo of a person'): connect both, or neither")
    use_prior = class_images is not None and config.prior_weight > 0
    config.check()
    with torch.inference_mode(False):
        denoiser = DenoiserAccess(model)
        latents = encode_latents(vae, denoiser, images)
        class_latents = encode_latents(vae, denoiser, class_images) if use_prior else None
        compute_dtype = denoiser.model.manual_cast_dtype or denoiser.model.get_dtype()
        if compute_dtype == torch.float16 and config.loss_scale == 1.0:
            config = dataclasses.replace(config, loss_scale=HALF_LOSS_SCALE)
        names = lora_targets(denoiser.model.diffusion_model)
        layers = inject_lora(denoiser.model.diffusion_model, names, rank, alpha, seed=config.seed)
        history = fine_tune(denoiser.eps, denoiser.alphas_cumprod, lora_parameters(layers),
                            latents, instance_cond, config, class_latents,
                            class_cond if use_prior else None, callback=progress)
        sd = lora_state_dict(model, lora_factors(layers))
    return LoRATraining(state_dict=sd, history=history, denoiser=denoiser, rank=rank, alpha=alpha)


def apply_lora(model: Any, state_dict: dict[str, Tensor], strength: float = 1.0) -> Any:
    """A clone of ``model`` with the LoRA as weight patches, through ComfyUI's own loader path
    (``comfy.sd.load_lora_for_models``, as ``LoraLoader`` does); checks every layer landed."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, state_dict, strength, 0.0)
    expected = {k[: -len(".lora_down.weight")] for k in state_dict if k.endswith(".lora_down.weight")}
    added = sum(1 for k, v in patched.patches.items() if len(v) > len(model.patches.get(k, ())))
    if added != len(expected):
        raise RuntimeError(f"ComfyUI applied {added} of the {len(expected)} LoRA layers")
    return patched


def write_lora(state_dict: dict[str, Tensor], prefix: str, metadata: dict[str, str]) -> str:
    """Write the LoRA as safetensors into the first ``models/loras`` folder → the name that
    ``LoraLoader`` lists (relative to that folder), e.g. ``immunize/dreambooth_00001_.safetensors``."""
    import safetensors.torch

    if not prefix.strip():
        raise ValueError("'lora_prefix' is empty: give a file name prefix such as 'immunize/dreambooth'")
    root = os.path.abspath(folder_paths.get_folder_paths(LORA_FOLDER)[0])
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
    except Exception as exc:  # ComfyUI raises a bare Exception for paths outside the folder
        raise ValueError(f"'lora_prefix' {prefix!r} must stay inside the loras folder {root}") from exc
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    safetensors.torch.save_file(state_dict, path, metadata=metadata)
    return os.path.relpath(path, root)


def _metadata(model: Any, training: LoRATraining, config: FineTuneConfig, prior: bool) -> dict[str, str]:
    base_version = {"SD15": "sd_v1", "SD20": "sd_v2", "SDXL": "sdxl_base_v1-0"}
    family = model_family(model)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(training.rank),
        "ss_network_alpha": str(training.alpha),
        "ss_base_model_version": base_version.get(family, family),
        "ss_steps": str(config.steps),
        "ss_learning_rate": str(config.lr),
        "immunize_training": "DreamBooth-LoRA, epsilon-prediction MSE"
                             + (f", prior preservation weight {config.prior_weight}" if prior else ""),
        "immunize_timesteps": f"{config.t_min}-{config.t_max}",
        "immunize_seed": str(config.seed),
    }


class _TrainingProgress:
    """ComfyUI progress bar + cancellation between optimiser steps."""

    def __init__(self, steps: int):
        self.bar = comfy.utils.ProgressBar(steps)

    def __call__(self, step: int, total: int, logs: dict[str, float]) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(step, total)
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            logging.info("Immunize LoRA fine-tune %d/%d: %s", step, total,
                         ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))


class ImmunizeLoRAFineTune(Node):
    """DreamBooth-LoRA fine-tuning: the mimic's customisation step.

    How it differs from core's ``TrainLoraNode``: that node regresses the denoised latent x̂₀
    on the instance latents only (an x₀ loss on any model family, no class prior). This node
    trains what DreamBooth papers and Anti-DreamBooth evaluations use: the DDPM ε-prediction
    MSE ‖ε_θ(x_t, t, c_inst) − ε‖² at integer timesteps in [t_min, t_max], plus prior
    preservation λ·‖ε_θ(x'_t, t, c_cls) − ε'‖² on class images; LoRA only on the UNet's
    attention projections (attn1/attn2 to_q, to_k, to_v, to_out); latents encoded once; fp32
    LoRA factors. It saves a kohya-format file into ``models/loras`` (not the output folder),
    so ``LoraLoader`` lists it at once.
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeLoRAFineTune",
            display_name="LoRA Fine-Tune (DreamBooth)",
            category=NODE_CATEGORY,
            description=(
                "Fine-tunes the model on the photos the way a mimic would (DreamBooth-LoRA: "
                "ε-prediction loss, optional prior preservation with class images). Returns the "
                "fine-tuned MODEL (the input model is not changed) and saves the LoRA into "
                "models/loras, where Load LoRA finds it. SD1.x/2.x and SDXL."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model to fine-tune (SD1.x/2.x or SDXL); "
                               "it is copied for training, never modified."),
                io.Vae.Input("vae", tooltip="The VAE that maps the photos to this model's latents."),
                io.Image.Input("images", tooltip="The instance photos (e.g. the protected or purified "
                               "images, or Detector Crop's crops). Not resized: use the size the model was "
                               "made for. An empty batch (the detector kept nothing) returns the model unchanged."),
                io.Conditioning.Input("instance_conditioning", tooltip="The instance prompt, e.g. a "
                                      "CLIP Text Encode of 'a photo of sks person'."),
                io.Int.Input("rank", default=4, min=1, max=128,
                             tooltip="LoRA rank r: the size of the low-rank update per layer."),
                io.Float.Input("alpha", default=4.0, min=0.01, max=256.0, step=0.01,
                               tooltip="LoRA alpha: the update is scaled by alpha/rank (alpha = rank: 1)."),
                io.Int.Input("steps", default=400, min=1, max=20000,
                             tooltip="Optimiser steps (DreamBooth-LoRA: a few hundred)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate of the LoRA factors (usual: 1e-4)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Instance images per step (and as many class images)."),
                io.Int.Input("t_min", default=0, min=0, max=999,
                             tooltip="Lowest DDPM timestep (of 1000) trained on."),
                io.Int.Input("t_max", default=999, min=0, max=999,
                             tooltip="Highest DDPM timestep (of 1000) trained on."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the LoRA initialisation and of the image, timestep "
                                     "and noise draws."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight λ of the prior-preservation loss on the class images "
                                       "(used only when class images are connected)."),
                io.Boolean.Input("save_lora", default=True,
                                 tooltip="Save the LoRA as .safetensors into models/loras."),
                io.String.Input("lora_prefix", default="immunize/dreambooth_lora",
                                tooltip="File name prefix inside models/loras (a counter is added)."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Prior-preservation images of the class (e.g. generated "
                                       "'a photo of a person'). Needs class_conditioning."),
                io.Conditioning.Input("class_conditioning", optional=True,
                                      tooltip="The class prompt, e.g. 'a photo of a person'."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the model with the LoRA applied."),
                io.String.Output(display_name="lora_name",
                                 tooltip="The saved file's name as Load LoRA lists it (empty if not saved)."),
                io.String.Output(display_name="loss_log",
                                 tooltip="JSON: per-step loss components (instance, prior, total), or "
                                         "{\"skipped\": reason} when there were no images."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, images, instance_conditioning, rank, alpha, steps, learning_rate,
                batch_size, t_min, t_max, seed, prior_weight, save_lora, lora_prefix,
                class_images=None, class_conditioning=None) -> io.NodeOutput:
        config = FineTuneConfig(steps=int(steps), lr=float(learning_rate), batch_size=int(batch_size),
                                t_min=int(t_min), t_max=int(t_max), prior_weight=float(prior_weight),
                                seed=int(seed))
        if save_lora and not lora_prefix.strip():
            raise ValueError("'lora_prefix' is empty: give a file name prefix such as 'immunize/dreambooth'")
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
            # e.g. Detector Crop kept no photo: there is nothing to learn from, so the attacker's
            # model stays what it was; said in the log rather than failing the whole graph
            logging.warning("Immunize LoRA fine-tune: no instance images, the model is returned unchanged")
            return io.NodeOutput(model, "", json.dumps({"skipped": "no instance images: the attacker has no "
                                                                   "training data, the model is unchanged"}))
        training = train_lora(model, vae, images, instance_conditioning, config, int(rank), float(alpha),
                              class_images, class_conditioning, progress=_TrainingProgress(config.steps))
        training.denoiser = None  # free the private UNet copy before ComfyUI caches the outputs
        patched = apply_lora(model, training.state_dict)
        prior = any("prior" in h for h in training.history)
        name = ""
        if save_lora:
            name = write_lora(training.state_dict, lora_prefix, _metadata(model, training, config, prior))
        log = {k: [h.get(k) for h in training.history] for k in ("instance", "prior", "total")}
        if not prior:
            log.pop("prior")
        return io.NodeOutput(patched, name, json.dumps(log))


# --------------------------------------------------------------------------- malicious edit


def edit_image(model: Any, vae: Any, image: Tensor, positive: Any, negative: Any, strength: float,
               steps: int, cfg: float, seed: int, sampler_name: str, scheduler: str,
               mask: Optional[Tensor] = None) -> Tensor:
    """img2img through ComfyUI's sampler: encode → noise to ``strength`` → denoise → decode.

    IMAGE ``[B,H,W,3]`` → IMAGE ``[B,H,W,3]`` of the same size: the image is reflect-padded to
    the VAE's multiple (ComfyUI's VAE would crop it) and the result cropped back. ``mask``
    (``[B,H,W]``, 1 = edit) turns it into inpainting, as Set Latent Noise Mask does.
    """
    import latent_preview

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"'strength' must be in [0, 1], got {strength}")
    x = image_to_bchw(image)
    h, w = x.shape[-2:]
    multiple = vae.spacial_compression_encode()
    latent = vae.encode(pad_to_multiple(x, multiple).movedim(1, -1))
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise_mask = None
    if mask is not None:
        noise_mask = pad_to_multiple(mask_to_b1hw(mask, x), multiple)
    noise = comfy.sample.prepare_noise(latent, seed)
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
        denoise=strength, noise_mask=noise_mask, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    out = vae.decode(samples)
    return out[:, :h, :w, :3].contiguous()


class ImmunizeEditImage(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeEditImage",
            display_name="Edit Image (img2img attack)",
            category=NODE_CATEGORY,
            description=(
                "A malicious edit: img2img with an edit prompt through ComfyUI's own sampler "
                "(VAE encode, noise to 'strength', denoise, decode), optionally inpainting a "
                "masked region. Use it to check that a protected photo resists editing. The "
                "output has the input's size."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model that does the edit."),
                io.Vae.Input("vae", tooltip="The VAE of that model."),
                io.Image.Input("image", tooltip="The photo(s) to edit, e.g. the protected image."),
                io.Conditioning.Input("positive", tooltip="The edit prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Float.Input("strength", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="How much is re-generated (img2img denoise): 0 returns the VAE "
                                       "round trip, 1 ignores the photo."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Sampler steps actually run (over the noised part of the schedule)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the added noise."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="ComfyUI noise schedule."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpainting: only where the mask is 1 is edited. Same size as the image."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The edited image(s), input size.")],
        )

    @classmethod
    def execute(cls, model, vae, image, positive, negative, strength, steps, cfg, seed, sampler_name,
                scheduler, mask=None) -> io.NodeOutput:
        out = edit_image(model, vae, image, positive, negative, float(strength), int(steps), float(cfg),
                         int(seed), sampler_name, scheduler, mask)
        return io.NodeOutput(out)


NODES = [ImmunizeLoRAFineTune, ImmunizeEditImage]
