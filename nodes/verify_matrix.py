"""Verify Matrix: {clean, protected} × purifiers × attackers in one node.

For each photo (the clean one and the protected one) and each purifier of the set (always
starting with "none"), the purified photo goes to every attacker of the set; a "model" attacker
(LoRA fine-tune, IP-Adapter) returns a MODEL that is sampled exactly as ComfyUI's KSampler and
VAE Decode do (``nodes.common_ksampler``, the same seed for every cell), an "image" attacker
(img2img edit) returns its images. Each cell's images are scored as Score Identity and Score
Image Quality do (``kernels.scores``: ISM and FDFR by the judge, BRISQUE), one row per cell,
labelled ``"<photo> | <purifier> | <attacker>"``. Purification runs once per photo and purifier.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from torch import Tensor

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..kernels.brisque import find_brisque_model
from ..kernels.scores import Scores, score_identity, score_quality
from .common import CATEGORY, FaceRecognizerType, Node, ReportType, image_to_bchw, model_file
from .verify_sets import Attacker, AttackerSetType, Purifier, PurifierSetType, no_purifier

ScoresType = io.Custom("PROTECT_SCORES")

PHOTOS = ("clean", "protected")
CELL_TICKS = 1000  # progress units per cell: the steps inside a cell fill its share of the bar
GRID_TILE = 256  # at most this many pixels per sample in the output grid (longer side)


def cell_label(photo: str, purifier: str, attacker: str) -> str:
    return f"{photo} | {purifier} | {attacker}"


def _check_sets(purifiers, attackers) -> tuple[tuple[Purifier, ...], tuple[Attacker, ...]]:
    purifiers = () if purifiers is None else purifiers
    if not isinstance(purifiers, tuple) or not all(isinstance(p, Purifier) for p in purifiers):
        raise ValueError(f"'purifiers' must come from a Purifier Set node; got {type(purifiers).__name__}.")
    if not isinstance(attackers, tuple) or not all(isinstance(a, Attacker) for a in attackers) or not attackers:
        raise ValueError("'attackers' must come from an Attacker Set node (e.g. Attacker Set: LoRA Fine-Tune) "
                         f"and hold at least one attacker; got {type(attackers).__name__}.")
    purifiers = (no_purifier(),) + purifiers
    for what, items in (("purifier", purifiers), ("attacker", attackers)):
        labels = [i.label for i in items]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            extra = " ('none' is always the first purifier: the photo as it is)" if "none" in dup else ""
            raise ValueError(f"two {what}s are labelled {', '.join(map(repr, dup))}{extra}: give each its own "
                             "'label', or their rows would merge.")
    return purifiers, attackers


@contextlib.contextmanager
def _cell_progress(bar: comfy.utils.ProgressBar, cell: int, cells: int):
    """While a cell runs, the progress bars its steps create (sampler, LoRA training, GrIDPure)
    move the matrix's bar within the cell's share instead of replacing it."""
    outer = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview=None, **_):
        # a cell runs several bars in turn (training, then sampling): never move backwards
        frac = min(max(float(value) / max(float(total or 1), 1.0), 0.0), 1.0)
        bar.update_absolute(max(bar.current, cell * CELL_TICKS + int(frac * (CELL_TICKS - 1))), cells * CELL_TICKS,
                            preview)

    comfy.utils.set_progress_bar_global_hook(hook if outer is not None else None)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(outer)


def generate(attacker: Attacker, image: Tensor, vae, positive, negative, latent: dict, seed: int, steps: int,
             cfg: float, sampler_name: str, scheduler: str) -> Tensor:
    """The attacker's images from the photo(s) ``image`` (IMAGE): a "model" attacker's MODEL is
    sampled as KSampler (denoise 1) + VAE Decode do; an "image" attacker returns its images."""
    import nodes as comfy_nodes  # ComfyUI's own nodes.py: KSampler's and VAE Decode's functions

    out = attacker.run(image)
    if attacker.kind == "image":
        return out
    (samples,) = comfy_nodes.common_ksampler(out, int(seed), int(steps), float(cfg), sampler_name, scheduler,
                                             positive, negative, latent, denoise=1.0)
    (images,) = comfy_nodes.VAEDecode().decode(vae, samples)
    return images


def sample_grid(cells: list[list[Tensor]], tile: int = GRID_TILE) -> Tensor:
    """One IMAGE ``[1,H,W,3]``: a row per (photo, purifier), the attackers' samples side by side
    (each attacker's batch in order); a thin gap between cells. Every sample is resized to the
    same longer side: the largest sample's, at most ``tile``."""
    tile = min(tile, max(max(img.shape[1:3]) for row in cells for img in row))
    def fit(img: Tensor) -> Tensor:  # [B,H,W,3] → [B,3,h,w] with the longer side = tile
        x = img.movedim(-1, 1).float().cpu()
        h, w = x.shape[-2:]
        s = tile / max(h, w)
        return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                             align_corners=False, antialias=True).clamp(0, 1)

    rows = [[fit(img) for img in row] for row in cells]
    gap = max(2, tile // 32)
    th = max(t.shape[-2] for row in rows for t in row)
    tw = max(t.shape[-1] for row in rows for t in row)
    ncols = max(sum(t.shape[0] for t in row) for row in rows)
    ncell = max(len(row) for row in rows)
    width = ncols * tw + (ncell - 1) * gap * 3
    canvas = torch.ones(3, len(rows) * th + (len(rows) - 1) * gap, width)
    for r, row in enumerate(rows):
        x = 0
        for t in row:
            for img in t:
                canvas[:, r * (th + gap):r * (th + gap) + img.shape[-2], x:x + img.shape[-1]] = img
                x += tw
            x += gap * 3
    return canvas.movedim(0, -1).unsqueeze(0).contiguous().to(comfy.model_management.intermediate_device())


def run_matrix(clean: Tensor, protected: Tensor, purifiers, attackers, judge, vae, positive, negative, latent: dict,
               seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, min_face_confidence: float = 0.9,
               reference: Tensor | None = None, attacked=None, gallery: Tensor | None = None,
               brisque=(None, "not requested")) -> tuple[Scores, Tensor]:
    """Scores (one row per photo × purifier × attacker) and the grid of the generated samples."""
    purifiers, attackers = _check_sets(purifiers, attackers)
    photos = {"clean": clean, "protected": protected}
    for name, img in photos.items():
        image_to_bchw(img, name)  # clear errors for grayscale / alpha / broken images
    ref = image_to_bchw(clean if reference is None else reference, "reference")
    gal = None if gallery is None else image_to_bchw(gallery, "gallery")
    cells = len(photos) * len(purifiers) * len(attackers)
    bar = comfy.utils.ProgressBar(cells * CELL_TICKS)
    scores, grid, cell = Scores(), [], 0
    for photo, image in photos.items():
        for purifier in purifiers:
            comfy.model_management.throw_exception_if_processing_interrupted()
            with _cell_progress(bar, cell, cells):
                purified = purifier.run(image)
            grid_row = []
            for attacker in attackers:
                comfy.model_management.throw_exception_if_processing_interrupted()
                label = cell_label(photo, purifier.label, attacker.label)
                with _cell_progress(bar, cell, cells):
                    images = generate(attacker, purified, vae, positive, negative, latent, seed, steps, cfg,
                                      sampler_name, scheduler)
                    x = image_to_bchw(images, f"images of {label}")
                    scores = scores.merge(
                        score_identity(label, x, ref, judge, float(min_face_confidence), attacked=attacked,
                                       gallery=gal),
                        score_quality(label, x, None, brisque=brisque, lpips=(None, "no reference")))
                grid_row.append(images)
                cell += 1
                bar.update_absolute(cell * CELL_TICKS, cells * CELL_TICKS)
            grid.append(grid_row)
    return scores, sample_grid(grid)


class ImmunizeVerifyMatrix(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeVerifyMatrix",
            display_name="Verify Matrix",
            category=f"{CATEGORY}/verify",
            description=(
                "Runs {clean, protected} × purifiers × attackers in one node: each photo, as it is ('none') and "
                "after each purifier of the set, goes to each attacker (a LoRA fine-tune or IP-Adapter is then "
                "sampled as KSampler + VAE Decode do, with the settings below; an img2img edit returns its "
                "images), and each cell's images are scored: ISM and FDFR by the judge, BRISQUE. One score row "
                "per cell, labelled 'protected | JPEG 75 | LoRA'. Add a purifier or attacker with one set node."
            ),
            inputs=[
                io.Image.Input("clean", tooltip="The clean photo(s) of the person: the baseline the protection is "
                                                "compared with."),
                io.Image.Input("protected", tooltip="The protected photo(s), e.g. PGD Protect's output."),
                AttackerSetType.Input("attackers", tooltip="The mimics, from Attacker Set nodes (LoRA Fine-Tune, "
                                                           "IP-Adapter, Edit Image); chain them for several."),
                FaceRecognizerType.Input("judge", tooltip="The face recogniser that scores identity (Load Face "
                                                          "Recognizer). Use one the protection did NOT attack."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the samples of the model attackers."),
                io.Conditioning.Input("positive", tooltip="The prompt the mimic generates with, e.g. 'a photo of "
                                                          "sks person' (the LoRA's instance prompt)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of the generation."),
                io.Latent.Input("latent_image", tooltip="Size and number of samples per cell (Empty Latent "
                                                        "Image); every cell uses the same noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the generation noise, the same in every cell (as one KSampler)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps per generation."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the generation."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler of the generation."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="ComfyUI noise schedule of the generation."),
                io.Float.Input("min_face_confidence", default=0.9, min=0.5, max=0.999, step=0.01,
                               tooltip="MTCNN probability a face needs to count as detected (FDFR and ISM)."),
                io.String.Input("brisque_model", default="",
                                tooltip="libsvm BRISQUE model (svm.txt with normalize.pickle beside it, or a folder). "
                                        "Empty: $IMMUNIZE_BRISQUE_MODEL, then the model inside the pip package "
                                        "'brisque'; without one BRISQUE is reported unavailable."),
                PurifierSetType.Input("purifiers", optional=True,
                                      tooltip="What the attacker runs on the photos first, from Purifier Set nodes. "
                                              "'none' (the photo as it is) is always included; unconnected: only "
                                              "'none'."),
                io.Image.Input("reference", optional=True,
                               tooltip="Clean photos of the person the judge compares with: best their OTHER photos. "
                                       "Unconnected: the clean photo."),
                ReportType.Input("protect_report", optional=True,
                                 tooltip="The protect node's report: each identity number says 'white-box' (the "
                                         "judge was attacked) or 'held out'. Unconnected: 'attack unknown'."),
                io.Image.Input("gallery", optional=True,
                               tooltip="Photos of OTHER people (one face each): adds the rank of the true identity "
                                       "among them and the rank-1 rate."),
            ],
            outputs=[
                ScoresType.Output("scores", display_name="PROTECT_SCORES",
                                  tooltip="One row per photo × purifier × attacker, for Score Report."),
                io.Image.Output("samples", display_name="samples",
                                tooltip="The generated images: a row per photo × purifier (clean rows first, "
                                        "'none' first), the attackers side by side in set order."),
            ],
        )

    @classmethod
    def execute(cls, clean, protected, attackers, judge, vae, positive, negative, latent_image, seed, steps, cfg,
                sampler_name, scheduler, min_face_confidence, brisque_model, purifiers=None, reference=None,
                protect_report=None, gallery=None) -> io.NodeOutput:
        attacked = None if protect_report is None else protect_report.attacked
        brisque = find_brisque_model(model_file(brisque_model, "brisque_model"))
        scores, grid = run_matrix(clean, protected, purifiers, attackers, judge, vae, positive, negative,
                                  latent_image, int(seed), int(steps), float(cfg), sampler_name, scheduler,
                                  float(min_face_confidence), reference, attacked, gallery, brisque)
        return io.NodeOutput(scores, grid)


NODES = [ImmunizeVerifyMatrix]
