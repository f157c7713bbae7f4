"""PGD Protect: optimise a protective perturbation against the chained objectives."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kernels.pgd import PGDConfig, check_protected, protect
from ..kernels.report import ProtectionReport
from ..kernels.verdict import attacked_models
from .common import (Node, CATEGORY, ObjectiveType, Progress, bchw_to_image, device, image_to_bchw, mask_input,
                     mask_to_b1hw, protect_outputs, record_protection)


class PGDProtect(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizePGDProtect",
            display_name="PGD Protect",
            category=f"{CATEGORY}/protect",
            description=(
                "Adds an imperceptible perturbation that minimises the chained objectives with "
                "projected gradient descent. Each objective's gradient is L2-normalised before the "
                "weighted sum. The result stays within ε of the original even after saving as 8-bit PNG. "
                "It fails with an error, never returning the input, when the result is not protected "
                "(unchanged, non-finite, or an objective's loss became NaN)."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Image(s) to protect; any size, any batch."),
                ObjectiveType.Input("objective", tooltip="What to optimise: chain objective nodes (Identity Loss, ...)."),
                io.Float.Input("epsilon", default=8.0, min=1.0, max=32.0, step=0.5,
                               tooltip="Budget in 8-bit steps (/255), 1–32: the largest change of any pixel value "
                                       "(L∞), or the RMS change (L2). 8 is the usual invisible-ish budget; above 16 "
                                       "the change shows."),
                io.Float.Input("step", default=1.275, min=0.01, max=16.0, step=0.005,
                               tooltip="Step size in /255 per iteration (IDGuardian: 0.005 = 1.275/255)."),
                io.Int.Input("iterations", default=200, min=1, max=5000,
                             tooltip="Maximum PGD iterations (IDGuardian: ≤200). At least 1: zero steps "
                                     "would return the unprotected image."),
                io.Combo.Input("norm", options=["Linf", "L2"], default="Linf",
                               tooltip="Budget norm. L2 treats epsilon as the RMS change per pixel value."),
                io.Boolean.Input("early_stop", default=True,
                                 tooltip="Stop once every objective reports its target reached (fewer visible changes)."),
                io.Boolean.Input("random_start", default=False,
                                 tooltip="Start from uniform noise inside the budget (stronger, more visible)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the random start and of any sampling inside objectives."),
                mask_input(),
            ],
            outputs=protect_outputs(),
            hidden=[io.Hidden.extra_pnginfo, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, objective, epsilon, step, iterations, norm, early_stop, random_start, seed,
                mask=None) -> io.NodeOutput:
        clean = image_to_bchw(image)
        m = mask_to_b1hw(mask, clean)
        cfg = PGDConfig(eps=epsilon / 255.0, step=step / 255.0, iterations=int(iterations),
                        norm=norm.lower(), random_start=bool(random_start), seed=int(seed),
                        early_stop=bool(early_stop))
        cfg.validate()
        objectives = list(objective or ())
        dev = device()
        with torch.inference_mode(False):
            result = protect(clean.to(dev), objectives, cfg, None if m is None else m.to(dev),
                             callback=Progress(cfg.iterations))
        protected = result.protected.cpu()
        clean = clean.cpu()
        # never a false "protected": finite, within ε on the 8-bit grid, changed in every image
        measured = check_protected(clean, protected, cfg.eps, cfg.norm, None if m is None else m.cpu())
        view = (0.5 + (protected - clean) / (2 * cfg.eps)).clamp(0, 1)
        report = ProtectionReport(clean=clean, protected=protected, result=result,
                                  attacked=attacked_models(objectives))
        record_protection(getattr(cls, "hidden", None), report, measured)
        return io.NodeOutput(bchw_to_image(protected), bchw_to_image(view), report)


NODES = [PGDProtect]
