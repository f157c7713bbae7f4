"""Score nodes: identity (ISM, FDFR), image quality (PSNR, SSIM, BRISQUE, LPIPS), edit distortion,
and the Score Report that tables, charts and saves them. The math is in kernels/scores.py."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

import folder_paths

from ..kernels.brisque import BRISQUE_ENV, find_brisque_model
from ..kernels.lpips import LPIPS_ENV, find_lpips
from ..kernels.scores import Scores, render_scores, score_edit, score_identity, score_quality
from .common import (Node, CATEGORY, FaceRecognizerType, ReportType, image_to_bchw, mask_to_b1hw, model_file,
                     next_output_stem)
from .report import save_chart

ScoresType = io.Custom("PROTECT_SCORES")

_SCORES_TOOLTIP = "Scores from another score node: the new row is added to them (same label = same row)."
_LABEL_TOOLTIP = ("Name of the row these scores go to, e.g. 'clean', 'protected', 'protected + JPEG'. "
                  "Score nodes with the same label fill the same row.")


def _append(scores, row) -> Scores:
    if scores is not None and not isinstance(scores, Scores):
        raise ValueError(f"'scores' must come from an Immunize score node; got {type(scores).__name__}.")
    return (scores or Scores()).merge(row)


def _label(label: str) -> str:
    label = (label or "").strip()
    if not label:
        raise ValueError("'label' is empty: name the row, e.g. 'protected'.")
    return label


class ScoreIdentity(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeScoreIdentity",
            display_name="Score Identity (ISM, FDFR)",
            category=f"{CATEGORY}/verify",
            description=(
                "Does the judge recogniser still see the person? ISM: cosine between each face's embedding and the "
                "mean embedding of the reference photos, plus the recogniser's own rule 1 − distance/threshold "
                "(the meaningful one for dlib, whose descriptors are not centred); same-person rate; with a "
                "gallery, the identification rank. FDFR: share of images with no detectable face. Lower ISM, "
                "same-person and rank-1 rates / higher FDFR = better protection. Every number is labelled with "
                "the judge's role: 'white-box' when the protection attacked this recogniser (it proves nothing "
                "about others), 'held out' when it did not (a real test) — connect the protection report to know."
            ),
            inputs=[
                io.Image.Input("generated", tooltip="The images to judge: the protected photo(s), or images generated "
                               "by a model fine-tuned on them."),
                io.Image.Input("reference", tooltip="Clean photos of the same person (one or more; any size). For a "
                               "verdict on identity reuse use the person's OTHER photos, not the clean copy of the "
                               "protected one (that only measures how much it changed)."),
                FaceRecognizerType.Input("recognizer", tooltip="The judge: the face recogniser that embeds the faces "
                                         "(Load Face Recognizer). Use one the protection did NOT attack."),
                io.String.Input("label", default="protected", tooltip=_LABEL_TOOLTIP),
                io.Float.Input("min_face_confidence", default=0.9, min=0.5, max=0.999, step=0.01,
                               tooltip="MTCNN probability a face needs to count as detected (FDFR and ISM)."),
                ScoresType.Input("scores", optional=True, tooltip=_SCORES_TOOLTIP),
                ReportType.Input("protect_report", optional=True,
                                 tooltip="The report of the protect node: tells which recognisers were attacked, so "
                                         "each number says 'white-box' or 'held out'. Without it: 'attack unknown'."),
                io.Image.Input("gallery", optional=True,
                               tooltip="Photos of OTHER people (one face each): reports the rank of the true identity "
                                       "among them (rank 1 = still identified) and the rank-1 rate."),
            ],
            outputs=[ScoresType.Output("scores_out", display_name="PROTECT_SCORES",
                                       tooltip="The scores so far, for more score nodes or the Score Report.")],
        )

    @classmethod
    def execute(cls, generated, reference, recognizer, label, min_face_confidence, scores=None,
                protect_report=None, gallery=None) -> io.NodeOutput:
        attacked = None if protect_report is None else protect_report.attacked
        row = score_identity(_label(label), image_to_bchw(generated, "generated"),
                             image_to_bchw(reference, "reference"), recognizer, float(min_face_confidence),
                             attacked=attacked, gallery=None if gallery is None else image_to_bchw(gallery, "gallery"))
        return io.NodeOutput(_append(scores, row))


class ScoreQuality(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeScoreQuality",
            display_name="Score Image Quality",
            category=f"{CATEGORY}/verify",
            description=(
                "How visible is the perturbation? PSNR (dB) and SSIM against the clean image, BRISQUE (no reference, "
                "lower is better) and LPIPS (lower is closer). BRISQUE and LPIPS need trained weights on disk; "
                "without them they are reported as unavailable, with the reason."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to score, e.g. the protected photo."),
                io.Image.Input("reference", optional=True,
                               tooltip="The clean image (1 or one per image, same size) for PSNR, SSIM and LPIPS."),
                io.String.Input("label", default="protected", tooltip=_LABEL_TOOLTIP),
                io.String.Input("brisque_model", default="",
                                tooltip=("libsvm BRISQUE model (svm.txt with normalize.pickle beside it, or a folder). Empty: "
                                         f"${BRISQUE_ENV}, then the model inside the pip package 'brisque'.")),
                io.String.Input("lpips_weights", default="",
                                tooltip=("LPIPS weights: models/lpips/alex.safetensors or vgg.safetensors (made by "
                                         "scripts/convert_lpips.py; a folder picks alex), or torchvision AlexNet/VGG-16 "
                                         "weights (LPIPS v0.1 alex.pth/vgg.pth beside it or the pip package 'lpips'). "
                                         f"Empty: ${LPIPS_ENV}, then models/lpips/, then torch hub's cache.")),
                ScoresType.Input("scores", optional=True, tooltip=_SCORES_TOOLTIP),
            ],
            outputs=[ScoresType.Output("scores_out", display_name="PROTECT_SCORES",
                                       tooltip="The scores so far, for more score nodes or the Score Report.")],
        )

    @classmethod
    def execute(cls, image, label, brisque_model, lpips_weights, reference=None, scores=None) -> io.NodeOutput:
        x = image_to_bchw(image, "image")
        ref = image_to_bchw(reference, "reference") if reference is not None else None
        brisque = find_brisque_model(model_file(brisque_model, "brisque_model"))
        lpips_dirs = folder_paths.get_folder_paths("lpips") if "lpips" in folder_paths.folder_names_and_paths \
            else [os.path.join(folder_paths.models_dir, "lpips")]
        if ref is None:
            lpips = (None, "no reference")
        elif min(x.shape[-2:]) < 32:
            lpips = (None, f"LPIPS needs images of at least 32x32 pixels; got {x.shape[-1]}x{x.shape[-2]}")
        else:
            lpips = find_lpips(model_file(lpips_weights, "lpips_weights"), search_dirs=lpips_dirs)
        row = score_quality(_label(label), x, ref, brisque=brisque, lpips=lpips)
        return io.NodeOutput(_append(scores, row))


class ScoreEdit(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeScoreEdit",
            display_name="Score Edit Distortion",
            category=f"{CATEGORY}/verify",
            description=(
                "Did the protection disrupt an edit? Compares the same edit (same prompt, seed, mask) run on the clean "
                "and on the protected photo: RMS difference (/255) and PSNR (dB), on the whole image and inside / outside "
                "the mask. Larger difference (lower PSNR) = better protection."
            ),
            inputs=[
                io.Image.Input("edit_of_clean", tooltip="The edit's result on the clean photo."),
                io.Image.Input("edit_of_protected", tooltip="The same edit's result on the protected photo (same size)."),
                io.Mask.Input("mask", optional=True, tooltip="The edited region (e.g. the inpainting mask), to score inside and outside it."),
                io.String.Input("label", default="protected", tooltip=_LABEL_TOOLTIP),
                ScoresType.Input("scores", optional=True, tooltip=_SCORES_TOOLTIP),
            ],
            outputs=[ScoresType.Output("scores_out", display_name="PROTECT_SCORES",
                                       tooltip="The scores so far, for more score nodes or the Score Report.")],
        )

    @classmethod
    def execute(cls, edit_of_clean, edit_of_protected, label, mask=None, scores=None) -> io.NodeOutput:
        b = image_to_bchw(edit_of_protected, "edit_of_protected")
        a = image_to_bchw(edit_of_clean, "edit_of_clean")
        m = mask_to_b1hw(mask, b, "mask")
        return io.NodeOutput(_append(scores, score_edit(_label(label), a, b, m)))


class ScoreReport(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeScoreReport",
            display_name="Score Report",
            category=f"{CATEGORY}/verify",
            description=(
                "Tables and charts all scores (one row per label) and saves the chart (PNG), the scores (CSV, JSON) "
                "and a legend CSV (each metric's direction and what it is measured against) into the output folder "
                "under one new number per run. Unavailable metrics are marked as such with the reason, never filled in."
            ),
            inputs=[
                ScoresType.Input("scores", tooltip="Scores from a score node."),
                ScoresType.Input("scores_2", optional=True, tooltip="More scores to merge (rows with the same label are joined)."),
                ScoresType.Input("scores_3", optional=True, tooltip="More scores to merge."),
                ScoresType.Input("scores_4", optional=True, tooltip="More scores to merge."),
                io.String.Input("filename_prefix", default="immunize/scores",
                                tooltip="Where the CSV/JSON/PNG go, relative to the output folder (a new number "
                                        "each run, e.g. scores_00001_.csv)."),
            ],
            outputs=[
                io.Image.Output("chart", display_name="chart", tooltip="The table and one bar chart per metric."),
                io.String.Output("table", display_name="table", tooltip="The table as CSV text."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, scores, filename_prefix, scores_2=None, scores_3=None, scores_4=None) -> io.NodeOutput:
        parts = [s for s in (scores_2, scores_3, scores_4) if s is not None]
        for i, s in enumerate([scores] + parts):
            if not isinstance(s, Scores):
                raise ValueError(f"score input {i + 1} is a {type(s).__name__}, not PROTECT_SCORES from a score node.")
        merged = scores.merge(*parts)
        if not merged.rows:
            raise ValueError("'scores' holds no rows: connect a Score Identity / Quality / Edit node.")
        directory, stem, subfolder = next_output_stem(filename_prefix)
        _, cpath = merged.write(Path(directory), stem)
        chart = render_scores(merged)
        return io.NodeOutput(chart, cpath.read_text(encoding="utf-8"),
                             ui=save_chart(chart, directory, stem, subfolder, cls))


NODES = [ScoreIdentity, ScoreQuality, ScoreEdit, ScoreReport]
