"""AntiPure (arXiv 2509.13922) as PROTECT_OBJECTIVE nodes: perturbations that survive diffusion
purification. The math is in ``kernels/frequency.py`` (patch-wise frequency guidance) and
``kernels/timestep.py`` (erroneous timestep guidance); ComfyUI access is in
``nodes/diffusion_access.py``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from comfy_api.latest import io

from .baselines import CATEGORY, Objective, _chain, _objective_input, _weight_input
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, latent_encoder
from .common import Node


def _check_inputs(model: Any, vae: Any, conditioning: Any, node: str) -> None:
    check_supported_model(model)
    if not conditioning:
        raise ValueError(f"{node} needs a CONDITIONING on 'positive' (connect a text encode node)")
    if getattr(vae, "first_stage_model", None) is None:
        raise ValueError(f"{node}: this VAE has no weights (first_stage_model is None); load a real VAE")


def latent_decoder(vae: VAEAccess, denoiser: DenoiserAccess):
    """z₀ in the denoiser's latent space → images ``[B,3,H,W]`` in [0,1] (``process_latent_out``)."""
    return lambda z: vae.decode(denoiser.model.process_latent_out(z.to(denoiser.device).float()))


class ComfyFrequencyObjective:
    """PGD objective: :class:`~kernels.frequency.FrequencyGuidance` on a ComfyUI MODEL + VAE.

    Light until :meth:`bind`: the private copies of the UNet and VAE are made there (outside
    inference mode) and released with the bound closure.
    """

    def __init__(self, model: Any, vae: Any, conditioning: Any, t_min: int, t_max: int,
                 patch: int, cutoff: int, weight: float = 1.0, seed: int = 0, draws: int = 1,
                 name: str = "frequency"):
        from ..kernels.denoising import check_timestep_range
        from ..kernels.frequency import check_patch_cutoff

        _check_inputs(model, vae, conditioning, "Immunize Frequency Guidance")
        check_timestep_range(t_min, t_max)
        check_patch_cutoff(patch, cutoff)
        self.model, self.vae, self.conditioning = model, vae, conditioning
        self.t_min, self.t_max, self.patch, self.cutoff = int(t_min), int(t_max), int(patch), int(cutoff)
        self.seed, self.draws, self.weight, self.name = int(seed), int(draws), float(weight), name

    def build(self):
        """The kernel objective with fresh private copies (call outside inference mode)."""
        from ..kernels.frequency import FrequencyGuidance

        with torch.inference_mode(False):
            vae = VAEAccess(self.vae)
            denoiser = DenoiserAccess(self.model)
            return FrequencyGuidance(
                encoder=latent_encoder(vae, denoiser), decoder=latent_decoder(vae, denoiser),
                denoiser=denoiser, cond=self.conditioning, t_min=self.t_min, t_max=self.t_max,
                patch=self.patch, cutoff=self.cutoff, draws=self.draws, seed=self.seed,
                multiple=vae.multiple, weight=self.weight, name=self.name,
            )

    def bind(self, clean: Tensor):
        return self.build().bind(clean.clone())


class ComfyTimestepObjective:
    """PGD objective: :class:`~kernels.timestep.TimestepGuidance` on a ComfyUI MODEL + VAE."""

    def __init__(self, model: Any, vae: Any, conditioning: Any, t_min: int, t_max: int,
                 count: int, mode: str, offset: int, weight: float = 1.0, seed: int = 0,
                 name: str = "timestep"):
        from ..kernels.denoising import check_timestep_range
        from ..kernels.timestep import check_offset

        _check_inputs(model, vae, conditioning, "Immunize Timestep Guidance")
        check_timestep_range(t_min, t_max)
        check_offset(mode, offset)
        if int(count) < 1:
            raise ValueError(f"'timesteps' must be >= 1, got {count}")
        self.model, self.vae, self.conditioning = model, vae, conditioning
        self.t_min, self.t_max, self.count = int(t_min), int(t_max), int(count)
        self.mode, self.offset = mode, int(offset)
        self.seed, self.weight, self.name = int(seed), float(weight), name

    def build(self):
        from ..kernels.timestep import TimestepGuidance

        with torch.inference_mode(False):
            vae = VAEAccess(self.vae)
            denoiser = DenoiserAccess(self.model)
            return TimestepGuidance(
                encoder=latent_encoder(vae, denoiser), denoiser=denoiser, cond=self.conditioning,
                t_min=self.t_min, t_max=self.t_max, count=self.count, mode=self.mode,
                offset=self.offset, seed=self.seed, multiple=vae.multiple,
                weight=self.weight, name=self.name,
            )

    def bind(self, clean: Tensor):
        return self.build().bind(clean.clone())


def _model_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model a mimic would purify with (SD1.x/2.x "
                       "or SDXL); it is copied, never modified."),
        io.Vae.Input("vae", tooltip="The VAE that maps the image to this model's latents."),
        io.Conditioning.Input("positive", tooltip="Text conditioning for the noise prediction, "
                              "e.g. an empty prompt or the prompt a mimic would use."),
    ]


class ImmunizeFrequencyGuidance(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeFrequencyGuidance",
            display_name="Frequency Guidance (AntiPure)",
            category=CATEGORY,
            description=(
                "AntiPure patch-wise frequency guidance: shapes the perturbation so that a "
                "diffusion purification pass (noise to t*, denoise) keeps the protected image's "
                "high frequencies instead of regenerating them, so the protection survives "
                "purification before fine-tuning. Combine with an attack objective (e.g. "
                "Denoising Loss). SD1.x/2.x and SDXL models."
            ),
            inputs=[
                *_model_inputs(),
                io.Int.Input("t_min", default=50, min=0, max=999, step=1,
                             tooltip="Lowest purification noise level t* (DDPM step of 1000) to "
                                     "guard against."),
                io.Int.Input("t_max", default=250, min=0, max=999, step=1,
                             tooltip="Highest purification noise level t* (DDPM step of 1000); "
                                     "purifiers typically use 100–300."),
                io.Int.Input("patch_size", default=16, min=8, max=64, step=1,
                             tooltip="Side in pixels of the square patches compared in the DCT "
                                     "domain (images are padded, never resized)."),
                io.Int.Input("cutoff_band", default=16, min=1, max=126, step=1,
                             tooltip="High band = DCT coefficients (u, v) of a patch with u + v >= "
                                     "this (u + v runs 0 … 2·patch_size − 2). patch_size keeps the "
                                     "upper half; larger = only the finest detail."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[Objective.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, positive, t_min, t_max, patch_size, cutoff_band, weight,
                objective=None) -> io.NodeOutput:
        new = ComfyFrequencyObjective(model, vae, positive, t_min, t_max, patch_size, cutoff_band,
                                      weight=weight)
        return io.NodeOutput(_chain(objective, new))


class ImmunizeTimestepGuidance(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeTimestepGuidance",
            display_name="Timestep Guidance (AntiPure)",
            category=CATEGORY,
            description=(
                "AntiPure erroneous timestep guidance: makes the model's noise prediction on "
                "the protected image at the true noise level look like its prediction at a "
                "wrong one, so a diffusion purification pass removes the wrong amount of noise. "
                "SD1.x/2.x and SDXL models."
            ),
            inputs=[
                *_model_inputs(),
                io.Int.Input("t_min", default=50, min=0, max=999, step=1,
                             tooltip="Lowest true timestep (DDPM step of 1000) to guide."),
                io.Int.Input("t_max", default=300, min=0, max=999, step=1,
                             tooltip="Highest true timestep (DDPM step of 1000) to guide."),
                io.Int.Input("timesteps", default=2, min=1, max=16, step=1,
                             tooltip="Timesteps per step, spread evenly over [t_min, t_max]; each "
                                     "costs two UNet passes."),
                io.Combo.Input("t_prime_mode", options=["mirror", "offset"], default="mirror",
                               tooltip="Wrong timestep t′: mirror = 999 − t; offset = t + offset "
                                       "(t − offset where that leaves 0…999)."),
                io.Int.Input("t_prime_offset", default=500, min=-500, max=500, step=1,
                             tooltip="Used by offset mode: how far t′ is from t (positive = read "
                                     "as noisier, negative = as cleaner). Not 0."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[Objective.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, positive, t_min, t_max, timesteps, t_prime_mode, t_prime_offset,
                weight, objective=None) -> io.NodeOutput:
        new = ComfyTimestepObjective(model, vae, positive, t_min, t_max, timesteps, t_prime_mode,
                                     t_prime_offset, weight=weight)
        return io.NodeOutput(_chain(objective, new))


NODES = [ImmunizeFrequencyGuidance, ImmunizeTimestepGuidance]
