"""TSDF nodes: interruption and detector-poisoning objectives, the two-stage protection, the
attacker's detector crop, and the scores (TSDF's own, and persistence after the attacker's
fine-tuning). The math is in ``kernels/tsdf.py`` and ``kernels/detector.py``; ComfyUI access to
MODEL/VAE is in ``nodes/diffusion_access.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..kernels.detector import MODES, DetectorPoisonObjective, MTCNNDetector, detect_boxes, face_mask
from ..kernels.pgd import check_protected
from ..kernels.report import ProtectionReport
from ..kernels.verdict import attacked_models
from ..kernels.tsdf import (
    Deferred, DiffusionEdit, ImagePromptGeneration, InterruptionObjective, TwoStageConfig, crop_faces, ddim_timesteps,
    format_persistence, format_scores, persistence_score_rows, persistence_scores, random_sign_noise,
    tsdf_score_row, tsdf_scores, two_stage_protect,
)
from .common import (Node, CATEGORY, ObjectiveType, Progress, bchw_to_image, device, image_to_bchw, mask_input,
                     mask_to_b1hw, next_output_stem, protect_outputs, record_protection)
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, latent_encoder
from .ipadapter import IPAdapterType, check_clip_vision_fits, check_ipadapter_fits, private_ip_parts
from .scores import ScoresType, _append, _label

TSDF_CATEGORY = f"{CATEGORY}/tsdf"
ATTACKER_CATEGORY = f"{CATEGORY}/attacker"
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


def diffusion_edit(model: Any, vae: Any, conditioning: Any, strength: float, steps: int,
                   inpaint_mask: Optional[torch.Tensor] = None) -> DiffusionEdit:
    """TSDF's forgery G (img2img by η = 0 DDIM, :class:`~kernels.tsdf.DiffusionEdit`) on private
    copies of a ComfyUI MODEL (its LoRA patches applied) and VAE; with ``inpaint_mask``
    (``[B or 1,1,H,W]``) an inpainting edit of that region. Call outside inference mode."""
    vae_access = VAEAccess(vae)
    den = DenoiserAccess(model)
    return DiffusionEdit(
        encode=latent_encoder(vae_access, den),
        decode=lambda z: vae_access.decode(den.model.process_latent_out(z)),
        denoiser=den, cond=conditioning, strength=float(strength), steps=int(steps), multiple=vae_access.multiple,
        inpaint_mask=inpaint_mask,
    )


def _save_json(data: dict, filename_prefix: str) -> Path:
    """``<prefix>_<NNNNN>_.json`` with a fresh number each run (never overwrites)."""
    directory, stem, _ = next_output_stem(filename_prefix)
    path = Path(directory) / f"{stem}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


class ComfyInterruptionObjective:
    """PGD objective: :class:`~kernels.tsdf.InterruptionObjective` with a diffusion edit on a
    ComfyUI MODEL + VAE. Heavy private copies are made in ``bind`` (outside inference mode)."""

    def __init__(self, model: Any, vae: Any, conditioning: Any, strength: float, steps: int,
                 weight: float = 1.0, region: str = "face", seeds: int = 2, seed: int = 0,
                 name: str = "interruption", inpaint_mask: Optional[torch.Tensor] = None):
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
        self.inpaint_mask = None if inpaint_mask is None else inpaint_mask.detach().clone()  # ComfyUI MASK

    def build(self, clean: Optional[torch.Tensor] = None) -> InterruptionObjective:
        """The kernel objective; ``clean`` ``[B,3,H,W]`` fits the inpaint mask to the batch (without
        it, or without a mask, the edit is img2img)."""
        with torch.inference_mode(False):
            inpaint = None
            if self.inpaint_mask is not None and clean is not None:
                inpaint = mask_to_b1hw(self.inpaint_mask, clean, "inpaint_mask").to(clean.device)
            edit = diffusion_edit(self.model, self.vae, self.conditioning, self.strength, self.steps, inpaint)
            mask = None
            if self.region == "face":
                mask = lambda clean: face_mask(detect_boxes(_mtcnn(), clean), *clean.shape[-2:]).to(clean.device)
            return InterruptionObjective([edit], mask=mask, seeds=self.seeds, seed=self.seed,
                                         weight=self.weight, name=self.name)

    def bind(self, clean: torch.Tensor):
        return self.build(clean).bind(clean.clone())


class ComfyIPInterruptionObjective:
    """PGD objective: :class:`~kernels.tsdf.InterruptionObjective` over an IP-Adapter generation
    (:class:`~kernels.tsdf.ImagePromptGeneration`) on a ComfyUI MODEL, VAE, CLIP_VISION and an
    IMMUNIZE_IPADAPTER. Validates in ``__init__``; private copies are made in ``bind``."""

    def __init__(self, model: Any, vae: Any, clip_vision: Any, ipadapter: Any, conditioning: Any, ip_scale: float,
                 steps: int, weight: float = 1.0, seeds: int = 2, seed: int = 0, name: str = "interruption_ip"):
        check_supported_model(model)
        check_ipadapter_fits(ipadapter, model)
        check_clip_vision_fits(clip_vision, ipadapter)
        if not conditioning:
            raise ValueError("the IP-Adapter interruption needs a CONDITIONING: connect the forger's text prompt "
                             "(e.g. 'a photo of a person') to 'prompt'")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        ddim_timesteps(1.0, steps)
        self.model, self.vae, self.clip_vision, self.ipadapter = model, vae, clip_vision, ipadapter
        self.conditioning, self.ip_scale, self.steps = conditioning, float(ip_scale), int(steps)
        self.seeds, self.seed, self.weight, self.name = int(seeds), int(seed), float(weight), name

    def build(self) -> InterruptionObjective:
        with torch.inference_mode(False):
            vae, access, ip, clip, denoiser = private_ip_parts(self.model, self.vae, self.clip_vision, self.ipadapter,
                                                               self.conditioning, self.ip_scale)
            channels = int(getattr(self.model.model.latent_format, "latent_channels", 4))
            generate = ImagePromptGeneration(
                image_tokens=lambda x: ip.tokens(clip(x.to(access.device))),
                denoiser=denoiser,
                decode=lambda z: vae.decode(access.model.process_latent_out(z)),
                latent_shape=(channels, vae.multiple), steps=self.steps,
            )
            return InterruptionObjective([generate], mask=None, seeds=self.seeds, seed=self.seed,
                                         weight=self.weight, name=self.name)

    def bind(self, clean: torch.Tensor):
        return self.build().bind(clean.clone())


class ImmunizeInterruptionObjective(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeInterruptionObjective",
            display_name="Interruption Objective (TSDF)",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's interruption: maximises how much a diffusion edit (img2img with this MODEL and "
                "the edit prompt, a few differentiable DDIM steps; inpainting when an inpaint mask is "
                "connected) of the protected photo differs from the same edit of the original, inside the "
                "face (L2_mask). SD1.x/2.x and SDXL models. Chain several to cover several edits."
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
                io.Mask.Input("inpaint_mask", optional=True,
                              tooltip="Optional: simulate an inpainting edit instead of img2img — only where "
                                      "this mask is > 0 is repainted (e.g. the face, for a face swap); "
                                      "elsewhere the photo's own latent is kept. Same size as the image."),
            ],
            outputs=[ObjectiveType.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, edit_prompt, strength, steps, region, weight, objective=None,
                inpaint_mask=None) -> io.NodeOutput:
        new = ComfyInterruptionObjective(model, vae, edit_prompt, strength, steps, weight=weight, region=region,
                                         inpaint_mask=inpaint_mask)
        return io.NodeOutput(_chain(objective, new))


class ImmunizeIPInterruptionObjective(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeIPInterruptionObjective",
            display_name="Interruption Objective (TSDF, IP-Adapter)",
            category=TSDF_CATEGORY,
            description=(
                "TSDF's interruption against IP-Adapter face generation: the forger uses the photo as an image "
                "prompt and generates from noise (a few differentiable DDIM steps). Maximises how much the "
                "generation from the protected photo differs from the one from the original (L2 over the whole "
                "generated image, same noise). Chain it with other Interruption Objectives for an ensemble."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the IP-Adapter belongs to (SD1.x or SDXL); "
                               "it is copied, never modified."),
                io.Vae.Input("vae", tooltip="The VAE of that model (decodes the generation)."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the IP-Adapter was trained with."),
                IPAdapterType.Input("ipadapter", tooltip="From Immunize Load IP-Adapter; must match the model family."),
                io.Conditioning.Input("prompt", tooltip="The forger's text conditioning, e.g. 'a photo of a person "
                                      "at the beach'."),
                io.Float.Input("ip_scale", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="IP-Adapter strength λ the forger would use (1.0 is usual)."),
                io.Int.Input("steps", default=2, min=1, max=8,
                             tooltip="DDIM steps of the simulated generation from noise; the gradient goes "
                                     "through all of them (1–2 keep the protection affordable)."),
                _weight_input(),
                _objective_input(),
            ],
            outputs=[ObjectiveType.Output(display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, clip_vision, ipadapter, prompt, ip_scale, steps, weight,
                objective=None) -> io.NodeOutput:
        new = ComfyIPInterruptionObjective(model, vae, clip_vision, ipadapter, prompt, ip_scale, steps,
                                           weight=weight)
        return io.NodeOutput(_chain(objective, new))


class ImmunizeDetectorPoisonObjective(Node):
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
                io.Combo.Input("mode", options=list(MODES), default="any",
                               tooltip="miss: drive MTCNN's face probabilities below its thresholds. "
                                       "misplace: pull its boxes off the face (IoU < 0.7). any: shrink the "
                                       "boxes first, then (after 120 steps) hide the faces still found, then "
                                       "(after 220 and 360) start those afresh growing the boxes — each phase "
                                       "wins on other photos, so 'any' protects the most (give it ≥ 500 "
                                       "iterations; it stops early per photo). A fresh start resets the whole "
                                       "perturbation of that photo: use 'any' in Two-Stage Protect's poisoning "
                                       "stage rather than chained with other objectives in one PGD Protect."),
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


class ImmunizeTwoStageProtect(Node):
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
                io.Float.Input("epsilon", default=8.0, min=1.0, max=32.0, step=0.5,
                               tooltip="Final budget in 8-bit steps (/255), 1–32: the largest change of any pixel."),
                io.Float.Input("inner_epsilon", default=8.0, min=1.0, max=32.0, step=0.5,
                               tooltip="Stage 2's search budget (/255) around the stage-1 image; may exceed "
                                       "what is left of epsilon: the sum is clipped and refined."),
                io.Float.Input("interruption_strength", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Share of epsilon stage 1 (interruption) may use."),
                io.Float.Input("poison_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly stage 2's perturbation is laid over stage 1's before "
                                       "clipping to epsilon."),
                io.Int.Input("stage1_iterations", default=40, min=0, max=2000,
                             tooltip="PGD iterations of stage 1 (interruption)."),
                io.Int.Input("stage2_iterations", default=500, min=0, max=2000,
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
            hidden=[io.Hidden.extra_pnginfo, io.Hidden.unique_id],
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
        # never a false "protected": finite, within ε on the 8-bit grid, changed in every image
        measured = check_protected(clean, protected, cfg.eps, "linf", None if m is None else m.cpu())
        view = (0.5 + (protected - clean) / (2 * cfg.eps)).clamp(0, 1)
        report = ProtectionReport(clean=clean, protected=protected, result=res.result,
                                  attacked=attacked_models(list(interruption) + list(poison)))
        record_protection(getattr(cls, "hidden", None), report, measured)
        return io.NodeOutput(bchw_to_image(protected), bchw_to_image(view), report)


class ImmunizeScoreTSDF(Node):
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
                "Writes them as JSON into the output folder and adds a row to PROTECT_SCORES for Score Report."
            ),
            inputs=[
                io.Image.Input("clean", tooltip="The original photo(s)."),
                io.Image.Input("protected", tooltip="The protected photo(s), same size and order."),
                io.Image.Input("forged_clean", tooltip="The forgery (e.g. img2img) of the original photo(s)."),
                io.Image.Input("forged_protected", tooltip="The same forgery (same seed and settings) of "
                               "the protected photo(s)."),
                io.String.Input("label", default="TSDF", tooltip="Name of the Score Report row these numbers go to, "
                                "e.g. 'TSDF' or 'TSDF, fine-tuned forger'."),
                io.String.Input("filename_prefix", default="immunize/tsdf_scores",
                                tooltip="Where the JSON goes, relative to the output folder."),
                ScoresType.Input("scores", optional=True, tooltip="Scores from another score node: the new row is "
                                 "added to them (same label = same row)."),
            ],
            outputs=[
                io.String.Output("summary", display_name="summary", tooltip="The scores as text."),
                ScoresType.Output("scores_out", display_name="PROTECT_SCORES",
                                  tooltip="The scores so far, for more score nodes or the Score Report."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clean, protected, forged_clean, forged_protected, label, filename_prefix,
                scores=None) -> io.NodeOutput:
        name = _label(label)
        imgs = [image_to_bchw(t, n) for t, n in ((clean, "clean"), (protected, "protected"),
                                                 (forged_clean, "forged_clean"),
                                                 (forged_protected, "forged_protected"))]
        with torch.inference_mode(False):
            result = tsdf_scores(*[t.cpu() for t in imgs], detect=lambda x: detect_boxes(_mtcnn(), x))
        path = _save_json(result, filename_prefix)
        summary = format_scores(result) + f"\nsaved: {path}"
        return io.NodeOutput(summary, _append(scores, tsdf_score_row(name, result)), ui={"text": [summary]})


class ImmunizeDetectorCrop(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeDetectorCrop",
            display_name="Detector Crop (attacker)",
            category=ATTACKER_CATEGORY,
            description=(
                "The attacker's data preparation, as face-swap and fine-tuning pipelines do it: MTCNN finds "
                "the faces, the largest one of each photo is cropped (a square with some margin) and resized "
                "to the training size. A photo where MTCNN finds no face yields nothing: it drops out of the "
                "training set (TSDF's poisoning aims at exactly that). If nothing is kept the crops are an "
                "empty batch, and LoRA Fine-Tune and TSDF Persistence report 'attacker has no training data'."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The photos the attacker collected (e.g. the protected ones)."),
                io.Int.Input("size", default=512, min=64, max=2048, step=8,
                             tooltip="Training size in pixels: every crop is resized to size x size."),
                io.Float.Input("margin", default=0.3, min=0.0, max=2.0, step=0.05,
                               tooltip="Context around the face: the crop's side is the face box's longer "
                                       "side times (1 + margin), at most the photo's shorter side."),
                io.Float.Input("min_confidence", default=0.9, min=0.0, max=0.999, step=0.01,
                               tooltip="MTCNN face probability a detection needs to be used (on top of MTCNN's "
                                       "own cascade thresholds); photos without one are dropped."),
            ],
            outputs=[
                io.Image.Output("crops", display_name="crops", tooltip="One crop per kept photo (an empty batch "
                                "when the detector kept none)."),
                io.Int.Output("kept", display_name="kept", tooltip="How many photos gave a training crop."),
                io.Int.Output("dropped", display_name="dropped", tooltip="How many photos the detector dropped."),
                io.String.Output("summary", display_name="summary", tooltip="What was kept and dropped, as text."),
            ],
        )

    @classmethod
    def execute(cls, images, size, margin, min_confidence) -> io.NodeOutput:
        x = image_to_bchw(images, "images")
        boxes = detect_boxes(_mtcnn(), x, min_prob=float(min_confidence))
        crops, kept = crop_faces(x, boxes, int(size), float(margin))
        n, k = int(kept.numel()), int(kept.sum())
        summary = (f"attacker's detector (MTCNN, confidence ≥ {min_confidence:g}) kept {k} of {n} photo(s), "
                   f"dropped {n - k}" + (f" (photos {[i for i, v in enumerate(kept.tolist()) if not v]})" if k < n else ""))
        if k == 0:
            summary += ": the attacker has no training data"
        return io.NodeOutput(bchw_to_image(crops), k, n - k, summary, ui={"text": [summary]})


class ImmunizeTSDFPersistence(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeTSDFPersistence",
            display_name="TSDF Persistence",
            category=TSDF_CATEGORY,
            description=(
                "Does the interruption survive the attacker's retraining? Forges the clean photo, the protected "
                "photo and an unprotected control (±epsilon random-sign noise, same budget) with the base model "
                "and with the model the attacker fine-tuned on the crops their detector kept, and reports the "
                "masked L2 distortion of each against the clean photo's forgery (TSDF's metric), "
                "after/before (persistence) and protected/control. The forgery is TSDF's img2img by DDIM, "
                "the same one the Interruption Objective attacks, on fresh seeds. Adds rows to "
                "PROTECT_SCORES and writes a JSON."
            ),
            inputs=[
                io.Image.Input("clean", tooltip="The original photo(s)."),
                io.Image.Input("protected", tooltip="The protected photo(s), same size and order."),
                io.Model.Input("model", tooltip="The attacker's base model (before fine-tuning)."),
                io.Model.Input("finetuned_model", tooltip="The model after LoRA Fine-Tune on the Detector Crop "
                               "crops of the protected photos."),
                io.Vae.Input("vae", tooltip="The VAE of these models."),
                io.Conditioning.Input("edit_prompt", tooltip="Text conditioning of the forgery (edit) prompt."),
                io.Image.Input("training_crops", tooltip="The crops the attacker trained on (Detector Crop's "
                               "'crops'); an empty batch means the attacker had no training data."),
                io.Float.Input("epsilon", default=8.0, min=1.0, max=64.0, step=0.5,
                               tooltip="Budget (/255) of the unprotected control: ±epsilon random-sign noise. "
                                       "Use the protection's epsilon."),
                io.Float.Input("strength", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="img2img strength of the forgery (share of the noise schedule re-noised)."),
                io.Int.Input("steps", default=2, min=1, max=50, tooltip="DDIM steps of the forgery."),
                io.Combo.Input("region", options=list(REGIONS), default="face",
                               tooltip="face: distortion inside the faces MTCNN finds on the clean photo "
                                       "(the whole image where none is found); image: everywhere."),
                io.Int.Input("seeds", default=2, min=1, max=16,
                             tooltip="Forgery noise seeds averaged over (1000, 1001, …: not those PGD used)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the control's random signs."),
                io.String.Input("label", default="TSDF", tooltip="Prefix of the Score Report rows, e.g. 'TSDF'."),
                io.String.Input("filename_prefix", default="immunize/tsdf_persistence",
                                tooltip="Where the JSON goes, relative to the output folder."),
                io.Model.Input("baseline_finetuned_model", optional=True,
                               tooltip="Optional: a model fine-tuned on the control photos' own crops, for the "
                                       "control's 'after' numbers (default: finetuned_model)."),
                ScoresType.Input("scores", optional=True, tooltip="Scores from another score node: the new rows "
                                 "are added to them."),
            ],
            outputs=[
                ScoresType.Output("scores_out", display_name="PROTECT_SCORES",
                                  tooltip="The scores so far, for more score nodes or the Score Report."),
                io.String.Output("summary", display_name="summary", tooltip="The numbers as text."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clean, protected, model, finetuned_model, vae, edit_prompt, training_crops, epsilon, strength,
                steps, region, seeds, seed, label, filename_prefix, baseline_finetuned_model=None,
                scores=None) -> io.NodeOutput:
        name = _label(label)
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        if not edit_prompt:
            raise ValueError("'edit_prompt' is empty: connect the forgery prompt's text encode node")
        for m in (model, finetuned_model) + (() if baseline_finetuned_model is None else (baseline_finetuned_model,)):
            check_supported_model(m)
        ddim_timesteps(strength, steps)
        x, p = image_to_bchw(clean, "clean"), image_to_bchw(protected, "protected")
        if x.shape != p.shape:
            raise ValueError(f"'clean' {tuple(x.shape)} and 'protected' {tuple(p.shape)} differ: connect the same photos")
        kept = int(training_crops.shape[0]) if training_crops is not None else 0
        if kept > x.shape[0]:
            raise ValueError(f"'training_crops' has {kept} crops for {x.shape[0]} photos: connect the Detector Crop "
                             "of these protected photos")
        with torch.inference_mode(False):
            x, p = x.clone(), p.clone()
            baseline = random_sign_noise(x, epsilon / 255.0, int(seed))
            mask = face_mask(detect_boxes(_mtcnn(), x), *x.shape[-2:]) if region == "face" else None
            def edit(m):  # built when persistence_scores needs it: one private UNet copy at a time
                return Deferred(lambda: diffusion_edit(m, vae, edit_prompt, strength, steps))

            before = edit(model)
            after = edit(finetuned_model) if kept else None
            after_b = edit(baseline_finetuned_model) if kept and baseline_finetuned_model is not None else None
            result = persistence_scores(x, p, baseline, before, after, kept, after_b, mask,
                                        seeds=[1000 + k for k in range(int(seeds))],
                                        baseline_name=f"±{epsilon:g}/255 random-sign noise")
        path = _save_json(result, filename_prefix)
        summary = format_persistence(result) + f"\nsaved: {path}"
        rows = persistence_score_rows(name, result)
        return io.NodeOutput(_append(scores, rows[0]).merge(*rows[1:]), summary, ui={"text": [summary]})


NODES = [
    ImmunizeInterruptionObjective,
    ImmunizeIPInterruptionObjective,
    ImmunizeDetectorPoisonObjective,
    ImmunizeTwoStageProtect,
    ImmunizeScoreTSDF,
    ImmunizeDetectorCrop,
    ImmunizeTSDFPersistence,
]
