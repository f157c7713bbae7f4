"""TSDF nodes: interruption and detector-poisoning objectives, the two-stage protection, and
its scores. The math is in ``kernels/tsdf.py`` and ``kernels/detector.py``; ComfyUI access to
MODEL/VAE is in ``nodes/diffusion_access.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

import folder_paths

from ..kernels.detector import MODES, DetectorPoisonObjective, MTCNNDetector, detect_boxes, face_mask
from ..kernels.report import ProtectionReport
from ..kernels.tsdf import (
    DiffusionEdit, InterruptionObjective, TwoStageConfig, ddim_timesteps, format_scores, tsdf_scores,
    two_stage_protect,
)
from .common import (CATEGORY, ObjectiveType, Progress, bchw_to_image, device, image_to_bchw, mask_input,
                     mask_to_b1hw, protect_outputs)
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, latent_encoder

TSDF_CATEGORY = f"{CATEGORY}/tsdf"
REGIONS = ("face", "image")


def _mtcnn():
    from ..kernels.faces import _mtcnn as shared

    return shared()


def _chain(previous, new) -> tuple:
    return tuple(previous or ()) + (new,)


def _objective_input():
    return ObjectiveType.Input(
        "objective", optional=True,
        tooltip="Objectives to combine with this one (chain objective nodes, then connect the last "
                "one to a protect node).",
    )


def _weight_input():
    return io.Float.Input(
        "weight", default=1.0, min=0.0, max=10.0, step=0.05,
        tooltip="Relative weight of this objective when several are combined (each gradient is "
                "normalised first, so 1.0 means an equal share).",
    )


class ComfyInterruptionObjective:
    """PGD objective: :class:`~kernels.tsdf.InterruptionObjective` with a diffusion edit on a
    ComfyUI MODEL + VAE. Heavy private copies are made in ``bind`` (outside inference mode)."""

    def __init__(self, model: Any, vae: Any, conditioning: Any, strength: float, steps: int,
                 weight: float = 1.0, region: str = "face", seeds: int = 2, seed: int = 0,
                 name: str = "interruption"):
        check_supported_model(model)
        if not conditioning:
            raise ValueError("the Interruption objective needs a CONDITIONING: connect the edit prompt's "
                             "text encode node to 'edit_prompt'")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        ddim_timesteps(strength, steps)  # validates both
        self.model, self.vae, self.conditioning = model, vae, conditioning
        self.strength, self.steps, self.region = float(strength), int(steps), region
        self.seeds, self.seed, self.weight, self.name = int(seeds), int(seed), float(weight), name

    def build(self) -> InterruptionObjective:
        with torch.inference_mode(False):
            vae = VAEAccess(self.vae)
            den = DenoiserAccess(self.model)
            edit = DiffusionEdit(
                encode=latent_encoder(vae, den),
                decode=lambda z: vae.decode(den.model.process_latent_out(z)),
                denoiser=den, cond=self.conditioning, strength=self.strength, steps=self.steps,
                multiple=vae.multiple,
            )
            mask = None
            if self.region == "face":
                mask = lambda clean: face_mask(detect_boxes(_mtcnn(), clean), *clean.shape[-2:]).to(clean.device)
            return InterruptionObjective([edit], mask=mask, seeds=self.seeds, seed=self.seed,
                                         weight=self.weight, name=self.name)

    def bind(self, clean: torch.Tensor):
        return self.build().bind(clean.clone())


class ImmunizeInterruptionObjective(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeInterruptionObjective",
            display_name="Interruption Objective (TSDF)",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's interruption: maximises how much a diffusion edit (img2img with this MODEL and "
                "the edit prompt, a few differentiable DDIM steps) of the protected photo differs from "
                "the same edit of the original, inside the face (L2_mask). SD1.x/2.x and SDXL models."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model a forger would edit with (SD1.x/2.x "
                               "or SDXL); it is copied, never modified."),
                io.Vae.Input("vae", tooltip="The VAE of that model."),
                io.Conditioning.Input("edit_prompt", tooltip="Text conditioning of the edit to disrupt, "
                                      "e.g. 'a photo of the person smiling'."),
                io.Float.Input("strength", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="img2img denoise strength of the simulated edit: the share of the "
                                       "noise schedule re-noised (0.3–0.6 is a typical edit)."),
                io.Int.Input("steps", default=2, min=1, max=8,
                             tooltip="DDIM steps of the simulated edit. The gradient goes through all of "
                                     "them: 1–2 keep the protection affordable."),
                io.Combo.Input("region", options=list(REGIONS), default="face",
                               tooltip="face: measure the distortion inside the face boxes MTCNN finds "
                                       "(the whole image where none is found); image: everywhere."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[ObjectiveType.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, edit_prompt, strength, steps, region, weight, objective=None) -> io.NodeOutput:
        new = ComfyInterruptionObjective(model, vae, edit_prompt, strength, steps, weight=weight, region=region)
        return io.NodeOutput(_chain(objective, new))


class ImmunizeDetectorPoisonObjective(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeDetectorPoisonObjective",
            display_name="Detector Poison Objective (TSDF)",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's poisoning of the attacker's data preparation: the face detector (MTCNN, as in "
                "most face-swap and fine-tuning pipelines) misses the face, or boxes it wrongly "
                "(IoU < 0.7), so the protected photo drops out of the attacker's training set. Stops "
                "early per image once the real MTCNN fails on the 8-bit image."
            ),
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="miss",
                               tooltip="miss: drive MTCNN's face probabilities below its thresholds. "
                                       "misplace: drive its box regressions off the face. any: whichever "
                                       "is nearer for each candidate box."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[ObjectiveType.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, mode, weight, objective=None) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        new = DetectorPoisonObjective(detectors=[MTCNNDetector()], mode=mode, weight=float(weight))
        return io.NodeOutput(_chain(objective, new))


class ImmunizeTwoStageProtect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeTwoStageProtect",
            display_name="Two-Stage Protect (TSDF)",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's intensity separation: stage 1 optimises the interruption within "
                "interruption_strength × ε, stage 2 the poisoning within the inner budget on top, the "
                "sum is clipped to ε and a short joint refinement restores both effects. The result "
                "stays within ε of the original after saving as 8-bit PNG."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Photo(s) to protect."),
                ObjectiveType.Input("interruption", tooltip="The interruption objective(s) (Interruption "
                                    "Objective): what the forgery should be disrupted by."),
                ObjectiveType.Input("poison", tooltip="The poisoning objective(s) (Detector Poison "
                                    "Objective): what should break the attacker's data preparation."),
                io.Float.Input("epsilon", default=8.0, min=1.0, max=64.0, step=0.5,
                               tooltip="Final budget in 8-bit steps (/255): the largest change of any pixel."),
                io.Float.Input("inner_epsilon", default=8.0, min=1.0, max=64.0, step=0.5,
                               tooltip="Stage 2's search budget (/255) around the stage-1 image; may exceed "
                                       "what is left of epsilon: the sum is clipped and refined."),
                io.Float.Input("interruption_strength", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Share of epsilon stage 1 (interruption) may use."),
                io.Float.Input("poison_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly stage 2's perturbation is laid over stage 1's before "
                                       "clipping to epsilon."),
                io.Int.Input("stage1_iterations", default=40, min=0, max=2000,
                             tooltip="PGD iterations of stage 1 (interruption)."),
                io.Int.Input("stage2_iterations", default=120, min=0, max=2000,
                             tooltip="PGD iterations of stage 2 (poisoning); stops early once the "
                                     "detector fails on every image."),
                io.Int.Input("refine_iterations", default=20, min=0, max=2000,
                             tooltip="Joint iterations on both objectives after clipping to epsilon."),
                io.Float.Input("step", default=1.0, min=0.05, max=8.0, step=0.05,
                               tooltip="PGD step in /255 per iteration."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the PGD starts."),
                mask_input(),
            ],
            outputs=protect_outputs(),
        )

    @classmethod
    def execute(cls, image, interruption, poison, epsilon, inner_epsilon, interruption_strength,
                poison_strength, stage1_iterations, stage2_iterations, refine_iterations, step, seed,
                mask=None) -> io.NodeOutput:
        clean = image_to_bchw(image)
        m = mask_to_b1hw(mask, clean)
        cfg = TwoStageConfig(
            eps=epsilon / 255.0, interruption_strength=float(interruption_strength),
            inner_eps=inner_epsilon / 255.0, poison_strength=float(poison_strength),
            stage1_iterations=int(stage1_iterations), stage2_iterations=int(stage2_iterations),
            refine_iterations=int(refine_iterations), step=step / 255.0, seed=int(seed),
        )
        cfg.validate()
        if not interruption:
            raise ValueError("'interruption' is empty: connect an Interruption Objective (TSDF)")
        if not poison:
            raise ValueError("'poison' is empty: connect a Detector Poison Objective (TSDF)")
        dev = device()
        total = cfg.stage1_iterations + cfg.stage2_iterations + cfg.refine_iterations
        with torch.inference_mode(False):
            res = two_stage_protect(clean.to(dev), list(interruption), list(poison), cfg,
                                    None if m is None else m.to(dev), callback=Progress(total))
        protected = res.protected.cpu()
        clean = clean.cpu()
        view = (0.5 + (protected - clean) / (2 * cfg.eps)).clamp(0, 1)
        report = ProtectionReport(clean=clean, protected=protected, result=res.result)
        return io.NodeOutput(bchw_to_image(protected), bchw_to_image(view), report)


class ImmunizeScoreTSDF(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeScoreTSDF",
            display_name="Score TSDF",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's numbers: the masked L2 distortion of the forgery of the protected photo against "
                "the forgery of the original (success when ≥ 0.05), and what MTCNN does on the protected "
                "photo (precision/recall at IoU 0.7 against its detections on the original, FDFR). "
                "Writes them as JSON into the output folder."
            ),
            inputs=[
                io.Image.Input("clean", tooltip="The original photo(s)."),
                io.Image.Input("protected", tooltip="The protected photo(s), same size and order."),
                io.Image.Input("forged_clean", tooltip="The forgery (e.g. img2img) of the original photo(s)."),
                io.Image.Input("forged_protected", tooltip="The same forgery (same seed and settings) of "
                               "the protected photo(s)."),
                io.String.Input("filename_prefix", default="immunize/tsdf_scores",
                                tooltip="Where the JSON goes, relative to the output folder."),
            ],
            outputs=[io.String.Output("summary", display_name="summary", tooltip="The scores as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clean, protected, forged_clean, forged_protected, filename_prefix) -> io.NodeOutput:
        imgs = [image_to_bchw(t, name) for t, name in ((clean, "clean"), (protected, "protected"),
                                                      (forged_clean, "forged_clean"),
                                                      (forged_protected, "forged_protected"))]
        with torch.inference_mode(False):
            scores = tsdf_scores(*[t.cpu() for t in imgs], detect=lambda x: detect_boxes(_mtcnn(), x))
        out_dir = folder_paths.get_output_directory()
        full_dir, stem, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        path = Path(full_dir) / f"{stem}_{counter:05}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores, indent=2))
        summary = format_scores(scores) + f"\nsaved: {path}"
        return io.NodeOutput(summary, ui={"text": [summary]})


NODES = [ImmunizeInterruptionObjective, ImmunizeDetectorPoisonObjective, ImmunizeTwoStageProtect, ImmunizeScoreTSDF]
