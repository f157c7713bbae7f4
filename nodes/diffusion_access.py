"""Differentiable access to ComfyUI's VAE and diffusion MODEL for the kernels' protocols.

ComfyUI's public paths are not usable for attacks: ``VAE.encode`` crops the image, batches
under ``inference_mode`` and falls back to an inference-only tiled path, and sampling goes
through the user's ModelPatcher (weights patched in place, wrappers, callbacks). So this file
works on *private deep copies* of the torch modules, made outside inference mode with
gradients usable and ``requires_grad`` off, and never touches the user's objects:

- :class:`VAEAccess`: ``encode(images [B,3,H,W] in [0,1]) → latent`` (raw VAE latent, as
  ``VAE.encode`` returns it) and ``decode``, through ``vae.first_stage_model`` with ComfyUI's
  own ``process_input`` / ``process_output`` scaling.
- :class:`DenoiserAccess`: the kernels' :class:`~kernels.denoising.Denoiser` for a MODEL:
  ``eps(x_t, t, cond)`` at an integer DDPM timestep in DDPM parameterisation, computed in
  ComfyUI's sigma parameterisation:

      σ_t = √((1 − ᾱ_t)/ᾱ_t),  x = x_t/√ᾱ_t = z + σ_t·ε,  ε̂ = (x − denoised(x, σ_t)) / σ_t

  with ``denoised`` from ``BaseModel.apply_model(x, σ, c_crossattn=…, y=…)`` and the
  conditioning prepared exactly as the samplers do (``convert_cond`` + ``extra_conds``, which
  builds SDXL's ``y`` from the pooled output and the size conditioning). ᾱ_t comes from the
  model's own ``model_sampling`` sigmas (object patches such as ModelSamplingDiscrete included).

Weight patches on the MODEL (LoRAs) are applied to the copy with ``comfy.lora.calculate_weight``
from the original weights; attention patches, wrappers and ControlNets in the model options or
conditioning are not applied. SD1.x/SD2.x and SDXL (discrete ε- or v-prediction UNets) are
supported; other families raise a ValueError that names them.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.utils


# --------------------------------------------------------------------------- helpers


def clone_tensors(obj: Any) -> Any:
    """Clone every tensor in nested dicts/lists/tuples (outside inference mode: grad-usable)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tensors(v) for v in obj)
    return obj


def _strip_lowvram(module: torch.nn.Module) -> None:
    """Drop ComfyUI's low-VRAM weight functions from a *copied* module (they reference the
    user's patcher); weight patches are re-applied explicitly instead."""
    for m in module.modules():
        comfy.model_patcher.wipe_lowvram_weight(m)


def _finish_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module.requires_grad_(False).eval()
    _make_room(module, device)
    module.to(device)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_inference():
            raise RuntimeError(f"copied weight {name!r} is still an inference tensor")
    return module


def _make_room(module: torch.nn.Module, device: torch.device) -> None:
    """Ask ComfyUI to free accelerator memory for the copy (it unloads models its own way)."""
    if torch.device(device).type == "cpu":
        return
    size = comfy.model_management.module_size(module)
    comfy.model_management.free_memory(size * 1.3, torch.device(device))


def images_bchw(images: Tensor) -> Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` → ``[B,3,H,W]`` float copy (alpha dropped)."""
    if images.dim() != 4:
        raise ValueError(f"expected an IMAGE batch [B,H,W,C], got shape {tuple(images.shape)}")
    return images[..., :3].movedim(-1, 1).float().clone()


# --------------------------------------------------------------------------- VAE


class VAEAccess:
    """A grad-usable copy of a ComfyUI VAE's ``first_stage_model``.

    ``encode``: images ``[B,3,H,W]`` in [0,1] (H, W multiples of :attr:`multiple`) → the raw
    latent ``[B,c,H/8,W/8]`` that ``VAE.encode`` would return (mean of the posterior).
    ``decode``: latent → images ``[B,3,H,W]`` in [0,1]. Both float32 out, differentiable.
    Build it outside ``torch.inference_mode``.
    """

    def __init__(self, vae: Any):
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        if getattr(vae, "latent_dim", 2) != 2:
            raise ValueError(
                f"only image VAEs (2-D latents) are supported; this VAE has latent_dim={vae.latent_dim}"
            )
        ratio = vae.spacial_compression_encode()
        if not isinstance(ratio, int):
            raise ValueError("only image VAEs with an integer downscale ratio are supported")
        self.multiple = ratio
        self.process_input = vae.process_input
        self.process_output = vae.process_output
        self.dtype = vae.vae_dtype
        self.device = torch.device(vae.device)
        with torch.inference_mode(False):
            module = copy.deepcopy(vae.first_stage_model)
            _strip_lowvram(module)
            self.module = _finish_copy(module, self.device)

    def encode(self, images: Tensor) -> Tensor:
        x = self.process_input(images.to(self.device)).to(self.dtype)
        return self.module.encode(x).float()

    def decode(self, latent: Tensor) -> Tensor:
        x = self.module.decode(latent.to(self.device, self.dtype))
        return self.process_output(x.float())

    __call__ = encode


# --------------------------------------------------------------------------- MODEL

SUPPORTED_MODEL_CLASSES = (comfy.model_base.BaseModel, comfy.model_base.SDXL)
SUPPORTED_MODEL_TYPES = (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION)


def model_family(patcher: Any) -> str:
    """A readable name of a MODEL's family, e.g. ``SD15``, ``SDXL``, ``Flux``."""
    base = getattr(patcher, "model", None)
    cfg = getattr(base, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(base).__name__


def check_supported_model(patcher: Any) -> None:
    """Raise a ValueError naming the family unless MODEL is an SD1.x/SD2.x or SDXL UNet."""
    base = getattr(patcher, "model", None)
    family = model_family(patcher)
    sampling = patcher.get_model_object("model_sampling") if base is not None else None
    ok = (
        type(base) in SUPPORTED_MODEL_CLASSES
        and getattr(base, "model_type", None) in SUPPORTED_MODEL_TYPES
        and isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
    )
    if not ok:
        mtype = getattr(getattr(base, "model_type", None), "name", "?")
        if type(base) in SUPPORTED_MODEL_CLASSES:  # the right family, patched to another sampling
            raise ValueError(
                f"'model': this {family} MODEL has been patched to another sampling ({type(sampling).__name__}, "
                f"{mtype} prediction; e.g. by a ModelSampling* node), which Immunize's diffusion nodes do not "
                "support: they need the checkpoint's own discrete ε/v schedule. Connect the MODEL straight from "
                "the checkpoint loader (before any ModelSampling node)."
            )
        raise ValueError(
            f"'model': Immunize's diffusion nodes support Stable Diffusion 1.x/2.x and SDXL models; "
            f"this MODEL is {family} ({type(base).__name__}, {mtype} prediction), which is not "
            "supported yet. Load an SD1.5 or SDXL checkpoint for this node."
        )


def snapshot_base_model(patcher: Any) -> comfy.model_base.BaseModel:
    """A grad-usable deep copy of ``patcher.model`` with the patcher's weight patches applied.

    The user's patcher and its model are only read: originals come from the patcher's backup
    when its (or a sibling clone's) patches are currently applied in place.
    """
    base = patcher.model
    key_patches = patcher.get_key_patches("diffusion_model.")
    sampling = patcher.get_model_object("model_sampling")
    # references that must not be deep-copied: the patcher (and its patch lists)
    memo: dict[int, Any] = {id(patcher): None, id(patcher.patches): {}}
    if getattr(base, "current_patcher", None) is not None:
        memo[id(base.current_patcher)] = None
    with torch.inference_mode(False):
        twin = copy.deepcopy(base, memo)
        twin.current_patcher = None
        _strip_lowvram(twin)
        twin.model_sampling = copy.deepcopy(sampling)
        for key, entries in key_patches.items():
            original, convert = entries[0]
            current = comfy.utils.get_attr(base, key)
            if len(entries) == 1 and original is current:
                continue  # unpatched: the deep copy already holds the original
            target = comfy.utils.get_attr(twin, key)
            w = original.to(device=target.device, dtype=torch.float32, copy=True)
            w = convert(w, inplace=True)
            if len(entries) > 1:
                w = comfy.lora.calculate_weight(entries[1:], w, key)
            comfy.utils.set_attr_param(twin, key, w.to(target.dtype))
        return _finish_copy(twin, torch.device(patcher.load_device))


class DenoiserAccess:
    """The kernels' Denoiser for a ComfyUI MODEL (SD1.x/2.x, SDXL); see the module docstring.

    ``cond`` given to :meth:`eps` is a ComfyUI CONDITIONING (list of ``[tensor, dict]``); with
    several entries their ε̂ are averaged (areas, masks and strengths are not applied).
    ``latent_in`` maps a raw VAE latent to the model's latent space (``process_latent_in``).
    Build it outside ``torch.inference_mode``.
    """

    def __init__(self, patcher: Any):
        check_supported_model(patcher)
        self.family = model_family(patcher)
        self.model = snapshot_base_model(patcher)
        self.device = torch.device(patcher.load_device)
        sigmas = self.model.model_sampling.sigmas.detach().float().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        self._conds: dict[tuple, list[dict[str, Any]]] = {}

    def latent_in(self, latent: Tensor) -> Tensor:
        return self.model.process_latent_in(latent.to(self.device).float())

    def _model_conds(self, cond: Any, x: Tensor) -> list[dict[str, Any]]:
        """Per-entry kwargs for ``apply_model``, built as ``samplers.encode_model_conds`` does."""
        key = (id(cond), tuple(x.shape), x.device)
        if key in self._conds:
            return self._conds[key]
        if not cond:
            raise ValueError("the Denoising Loss needs a CONDITIONING (connect a text encode node)")
        out = []
        for c in cond:
            params = clone_tensors(dict(c[1]))
            params.pop("control", None)
            params.pop("gligen", None)
            params["cross_attn"] = clone_tensors(c[0])
            params.update(device=x.device, noise=x, width=x.shape[3] * 8, height=x.shape[2] * 8,
                          prompt_type="positive")
            model_conds = self.model.extra_conds(**params)
            kwargs = {}
            for name, mc in model_conds.items():
                kwargs[name] = mc.process_cond(batch_size=x.shape[0], area=None).cond
            out.append(kwargs)
        self._conds[key] = out
        return out

    def eps(self, x_t: Tensor, t: Tensor, cond: Any, transformer_options: Optional[dict] = None) -> Tensor:
        """ε̂ ``[B,c,h,w]`` at integer DDPM timesteps ``t`` ``[B]`` for x_t in DDPM scaling.

        ``transformer_options`` reaches the UNet's transformer blocks as in sampling: attention
        patches (``patches_replace["attn2"]``: capture, IP-Adapter injection) go there. It is
        built per call by the objective that needs it and never stored on the user's model.
        """
        out_device = x_t.device
        x_t = x_t.to(self.device).float()
        a = self.alphas_cumprod.to(self.device)[t.to(self.device)].view(-1, 1, 1, 1)
        sigma = ((1 - a) / a).sqrt()
        x = x_t / a.sqrt()
        preds = []
        for kwargs in self._model_conds(cond, x):
            opts = dict(transformer_options) if transformer_options else {}
            denoised = self.model.apply_model(x, sigma.flatten(), transformer_options=opts, **kwargs)
            preds.append((x - denoised.float()) / sigma)
        return (sum(preds) / len(preds)).to(out_device)


def latent_encoder(vae: VAEAccess, denoiser: Optional[DenoiserAccess] = None):
    """images ``[B,3,H,W]`` → z₀ in the denoiser's latent space (raw VAE latent without one)."""
    if denoiser is None:
        return vae.encode
    return lambda images: denoiser.latent_in(vae.encode(images))


# --------------------------------------------------------------------------- objectives
# The nodes hand PGD these light objects; the heavy private copies are made in ``bind`` (which
# PGD calls outside inference mode) and released with the bound closure when PGD is done, so
# ComfyUI's output cache never holds a second UNet.


class ComfyEncoderObjective:
    """PGD objective: :class:`~kernels.encoder.EncoderAttack` on a ComfyUI VAE."""

    def __init__(self, vae: Any, mode: str, target: Optional[Tensor] = None, weight: float = 1.0,
                 name: str = "encoder"):
        from ..kernels.encoder import MODES

        if mode not in MODES:
            raise ValueError(f"encoder attack mode must be one of {MODES}, got {mode!r}")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        self.vae, self.mode, self.weight, self.name = vae, mode, float(weight), name
        self.target = None if target is None else images_bchw(target)  # [B,3,H,W] copy

    def bind(self, clean: Tensor):
        from ..kernels.encoder import EncoderAttack

        with torch.inference_mode(False):
            access = VAEAccess(self.vae)
            target = None if self.target is None else self.target.clone()
            kernel = EncoderAttack(encoder=access.encode, mode=self.mode, target=target,
                                   multiple=access.multiple, weight=self.weight, name=self.name)
            return kernel.bind(clean.clone())


class ComfyDenoisingObjective:
    """PGD objective: :class:`~kernels.denoising.DenoisingLoss` on a ComfyUI MODEL + VAE."""

    def __init__(self, model: Any, vae: Any, conditioning: Any, t_min: int, t_max: int,
                 weight: float = 1.0, seed: int = 0, draws: int = 1, name: str = "denoising"):
        from ..kernels.denoising import check_timestep_range

        check_supported_model(model)
        check_timestep_range(t_min, t_max)
        if not conditioning:
            raise ValueError("the Denoising Loss needs a CONDITIONING (connect a text encode node)")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        self.model, self.vae, self.conditioning = model, vae, conditioning
        self.t_min, self.t_max, self.seed, self.draws = int(t_min), int(t_max), int(seed), int(draws)
        self.weight, self.name = float(weight), name

    def build(self):
        """The kernel objective with fresh private copies (call outside inference mode)."""
        from ..kernels.denoising import DenoisingLoss

        with torch.inference_mode(False):
            vae = VAEAccess(self.vae)
            denoiser = DenoiserAccess(self.model)
            return DenoisingLoss(
                encoder=latent_encoder(vae, denoiser), denoiser=denoiser, cond=self.conditioning,
                t_min=self.t_min, t_max=self.t_max, seed=self.seed, draws=self.draws,
                multiple=vae.multiple,
                weight=self.weight, name=self.name,
            )

    def bind(self, clean: Tensor):
        return self.build().bind(clean.clone())
