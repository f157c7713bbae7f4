"""The two classic baselines as PROTECT_OBJECTIVE nodes: AdvDM's denoising loss and the
PhotoGuard/Mist encoder attack. The math is in ``kernels/denoising.py`` and
``kernels/encoder.py``; ComfyUI access is in ``nodes/diffusion_access.py``."""

from __future__ import annotations

from comfy_api.latest import io

from .diffusion_access import ComfyDenoisingObjective, ComfyEncoderObjective
from .common import Node

Objective = io.Custom("PROTECT_OBJECTIVE")

CATEGORY = "Immunize/objectives"

ENCODER_MODES = {
    "toward_gray": "toward_target",
    "toward_target": "toward_target",
    "away_from_clean": "away",
}


def _chain(previous, new) -> tuple:
    """An objective output: the incoming tuple plus the new objective."""
    return tuple(previous or ()) + (new,)


def _objective_input():
    return Objective.Input(
        "objective", optional=True,
        tooltip="Objectives to combine with this one (chain several objective nodes, then "
                "connect the last one to Immunize PGD).",
    )


def _weight_input():
    return io.Float.Input(
        "weight", default=1.0, min=0.0, max=10.0, step=0.05,
        tooltip="Relative weight of this objective when several are combined (each gradient is "
                "normalised first, so 1.0 means an equal share).",
    )


class ImmunizeDenoisingLoss(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeDenoisingLoss",
            display_name="Denoising Loss (AdvDM)",
            category=CATEGORY,
            description=(
                "AdvDM / Anti-DreamBooth: makes the diffusion model's noise prediction on the "
                "protected image as wrong as possible, so fine-tuning (DreamBooth, LoRA) on it "
                "learns poorly. SD1.x/2.x and SDXL models."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to attack (SD1.x/2.x or "
                               "SDXL); it is copied, never modified."),
                io.Vae.Input("vae", tooltip="The VAE that maps the image to this model's latents."),
                io.Conditioning.Input("positive", tooltip="Text conditioning used for the noise "
                                      "prediction, e.g. the prompt a mimic would train with."),
                io.Int.Input("t_min", default=0, min=0, max=999, step=1,
                             tooltip="Lowest DDPM timestep (of 1000) to draw noise levels from."),
                io.Int.Input("t_max", default=999, min=0, max=999, step=1,
                             tooltip="Highest DDPM timestep (of 1000) to draw noise levels from."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[Objective.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, positive, t_min, t_max, weight, objective=None) -> io.NodeOutput:
        new = ComfyDenoisingObjective(model, vae, positive, t_min, t_max, weight=weight)
        return io.NodeOutput(_chain(objective, new))


class ImmunizeEncoderAttack(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeEncoderAttack",
            display_name="Encoder Attack (PhotoGuard)",
            category=CATEGORY,
            description=(
                "PhotoGuard / Mist encoder attack: moves the VAE latent of the protected image "
                "toward a flat gray image (or a target image) or away from the clean latent, so "
                "img2img and inpainting edits start from a broken latent."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE to fool; it is copied, never modified."),
                io.Combo.Input(
                    "mode", options=list(ENCODER_MODES), default="toward_gray",
                    tooltip="toward_gray: latent of a flat 50% gray image (PhotoGuard). "
                            "toward_target: latent of the target image (Mist). "
                            "away_from_clean: as far as possible from the clean latent.",
                ),
                io.Image.Input("target", optional=True, tooltip="Target image for "
                               "toward_target (resized to the input image); ignored otherwise."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[Objective.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, vae, mode, weight, target=None, objective=None) -> io.NodeOutput:
        if mode == "toward_target" and target is None:
            raise ValueError("mode 'toward_target' needs a target image: connect one, or use toward_gray")
        new = ComfyEncoderObjective(
            vae, ENCODER_MODES[mode], target=target if mode == "toward_target" else None, weight=weight
        )
        return io.NodeOutput(_chain(objective, new))


NODES = [ImmunizeDenoisingLoss, ImmunizeEncoderAttack]
