"""Verification scores: did the protection work, and what did it cost?

Scores are collected in :class:`Scores`, an ordered list of named :class:`ScoreRow` s:

    {name: {metric: value | None, ..., "unavailable": {metric: reason}}}

A metric that cannot be computed (no model file, no face, an infinite PSNR) is stored as
``None`` with a reason, never as a made-up number. Rows are merged by name, so several score
nodes can fill one row per condition ("clean", "protected", "protected + JPEG", ...).

Identity (Anti-DreamBooth's protocol, Van Le et al. 2023) on images *generated* by a model
personalised on the (protected) photos, against clean photos of the person:

- **ISM** (identity score matching) ``= cos(e_i, ē)``: e_i the recogniser's embedding of the
  largest face in generated image i, ē the mean embedding of the clean reference faces; the
  batch mean over images where a face was found (undetected faces are *excluded* and counted
  in ``faces_missing``). Lower = the model learned the identity less = better protection.
- **ISM, recogniser rule** ``= 1 − d(e_i, ē)/τ``, d and τ the recogniser's own distance and
  same-person threshold (dlib: Euclidean, τ = 0.6). Reported for every recogniser; it is the
  meaningful one for *uncentred* descriptors such as dlib's, whose cosine is ≈ 0.9 between any
  two faces (all descriptors lie in one narrow cone), so cosine barely separates people there.
  It reads like a cosine: 1 at ē itself, > 0 same person by the recogniser's rule, < 0 not.
  Also reported: the mean distance and ``same_person_rate``, the share of detected faces with
  d < τ.
- **FDFR** (face detection failure rate): share of images in which MTCNN finds no face with
  probability ≥ ``min_prob``. Higher = the generator no longer even produces a face.

Quality of the protected image: PSNR and SSIM against the clean image (kernels.metrics),
BRISQUE (no reference, kernels.brisque) and LPIPS (kernels.lpips) where their trained weights
are on disk.

Edit distortion (PhotoGuard, Salman et al. 2023): how different the result of one edit is when
it runs on the protected instead of the clean photo — RMS difference (in /255) and PSNR between
the two edits, on the whole image and, with a mask, inside and outside it. Larger difference
(lower PSNR) = the edit was disrupted more.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import metrics
from .faces import FaceSet, align_faces, detect_faces
from .modules import first_tensor
from .verdict import gallery_ranks, held_out_outcomes, judge_role, labelled, roles_from_notes, verdict_lines

UNAVAILABLE = "unavailable"  # the CSV cell of a metric that could not be computed
NOT_MEASURED = "not measured"  # the CSV cell of a metric a row has no score node for


# ---------------------------------------------------------------------------------------------
# the structure
# ---------------------------------------------------------------------------------------------


def _finite(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class ScoreRow:
    """The scores of one condition.

    values: metric → number, or None when unavailable (then ``unavailable[metric]`` says why);
    per_image: metric → one value (or None) per image, where the metric is a batch mean;
    notes: free text about how the numbers were made (recogniser, model files, thresholds).
    """

    name: str
    values: dict[str, Optional[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    per_image: dict[str, list[Optional[float]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def set(self, metric: str, value, reason: str = "", per_image: Optional[Iterable] = None) -> None:
        """Record ``metric``; a None or non-finite ``value`` is recorded as unavailable with ``reason``."""
        v = _finite(value)
        self.values[metric] = v
        if v is None:
            if not reason:
                raise ValueError(f"metric {metric!r} has no value ({value!r}) and no reason was given")
            self.unavailable[metric] = reason
        else:
            self.unavailable.pop(metric, None)
        if per_image is not None:
            self.per_image[metric] = [_finite(x) for x in per_image]

    def as_dict(self) -> dict:
        """``{metric: value | None, ..., "unavailable": {metric: reason}}`` (plus per-image lists and notes)."""
        d: dict = dict(self.values)
        d["unavailable"] = dict(self.unavailable)
        if self.per_image:
            d["per_image"] = {k: list(v) for k, v in self.per_image.items()}
        if self.notes:
            d["notes"] = dict(self.notes)
        return d

    def copy(self) -> "ScoreRow":
        return ScoreRow(self.name, dict(self.values), dict(self.unavailable),
                        {k: list(v) for k, v in self.per_image.items()}, dict(self.notes))


def _free_key(keys, key: str) -> str:
    n = 2
    while f"{key} #{n}" in keys:
        n += 1
    return f"{key} #{n}"


@dataclass
class Scores:
    """An ordered collection of :class:`ScoreRow`, one per name. Merging never mutates its inputs."""

    rows: list[ScoreRow] = field(default_factory=list)

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def __getitem__(self, name: str) -> ScoreRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def merge(self, *others: "Scores | ScoreRow") -> "Scores":
        """A new Scores with ``others`` added in order. Rows of the same name are joined; a metric
        a row already has with a *different* value is kept under ``"metric #2"`` (nothing is lost)."""
        out = Scores([r.copy() for r in self.rows])
        for other in others:
            for row in ([other] if isinstance(other, ScoreRow) else other.rows):
                try:
                    target = out[row.name]
                except KeyError:
                    out.rows.append(row.copy())
                    continue
                for k, v in row.values.items():
                    key = k
                    if k in target.values and (target.values[k] != v or target.unavailable.get(k) != row.unavailable.get(k)):
                        key = _free_key(target.values, k)
                    target.values[key] = v
                    if k in row.unavailable:
                        target.unavailable[key] = row.unavailable[k]
                    if k in row.per_image:
                        target.per_image[key] = list(row.per_image[k])
                for k, v in row.notes.items():
                    target.notes[k if k not in target.notes or target.notes[k] == v else _free_key(target.notes, k)] = v
        return out

    def metrics(self) -> list[str]:
        """All metric names, in order of first appearance."""
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r.values if k not in keys]
        return keys

    def as_dict(self) -> dict:
        return {r.name: r.as_dict() for r in self.rows}

    def verdict(self) -> list[str]:
        """What the identity numbers can claim, by their judges' roles (kernels.verdict)."""
        return verdict_lines(roles_from_notes(self.rows)) + held_out_outcomes(self.rows)

    def table(self, digits: int = 7) -> tuple[list[str], list[list[str]]]:
        """Header and text cells: every cell holds a number, ``unavailable`` or ``not measured``."""
        keys = self.metrics()
        header = ["name"] + keys + ["unavailable_reasons"]
        cells = []
        for r in self.rows:
            line = [r.name]
            for k in keys:
                if k not in r.values:
                    line.append(NOT_MEASURED)
                elif r.values[k] is None:
                    line.append(UNAVAILABLE)
                else:
                    line.append(_fmt(r.values[k], digits))
            line.append("; ".join(f"{k}: {v}" for k, v in r.unavailable.items()) or "none")
            cells.append(line)
        return header, cells

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.json`` (the full structure and a ``legend``), ``stem.csv`` (the table, metric
        names as column keys) and ``stem + "legend.csv"`` (each metric's direction, what it is
        measured against and what it is). Returns the JSON and CSV paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        jpath, cpath = directory / f"{stem}.json", directory / f"{stem}.csv"
        lg = score_legend(self.metrics())
        jpath.write_text(json.dumps({"verdict": self.verdict(), "scores": self.as_dict(), "legend": lg}, indent=2,
                                    ensure_ascii=False, allow_nan=False), encoding="utf-8")
        header, cells = self.table(digits=7)
        with cpath.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(cells)
        lpath = directory / (f"{stem}legend.csv" if stem.endswith("_") else f"{stem}_legend.csv")
        with lpath.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["metric", "direction", "measured_against", "meaning"])
            for k, e in lg["metrics"].items():
                w.writerow([k, e["direction"], e["measured_against"], e["meaning"]])
        return jpath, cpath


def _fmt(v: float, digits: int) -> str:
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.{digits}g}"


# ---------------------------------------------------------------------------------------------
# identity: ISM and FDFR
# ---------------------------------------------------------------------------------------------


def largest_faces(faces: list[FaceSet]) -> list[FaceSet]:
    """Keep only the largest face of each image (``detect_faces`` sorts largest first)."""
    return [FaceSet(f.landmarks[:1], f.boxes[:1], f.probs[:1]) for f in faces]


def face_detection_failures(images: Tensor, min_prob: float = 0.9) -> tuple[Tensor, list[FaceSet]]:
    """MTCNN on ``images`` ``[B,3,H,W]`` in [0, 1] → (failed ``[B]`` bool: no face with
    probability ≥ ``min_prob``, the faces found). FDFR = ``failed.float().mean()``."""
    faces = detect_faces(images, min_prob=min_prob)
    return torch.tensor([len(f) == 0 for f in faces], dtype=torch.bool), faces


@torch.no_grad()
def embed_faces(images: Tensor, faces: list[FaceSet], recognizer) -> tuple[Tensor, Tensor]:
    """Embeddings ``[N,D]`` (float32, CPU) of the largest face of each image that has one, and
    ``owner`` ``[N]``, the image index of each. images ``[B,3,H,W]`` in [0, 1]."""
    p = first_tensor(recognizer)
    x = images.detach().to(p.device, p.dtype)
    chips, owner = align_faces(x, largest_faces(faces), recognizer.template.to(p.device, p.dtype),
                               recognizer.chip_size)
    if chips.shape[0] == 0:
        return torch.zeros(0, 0), owner.cpu()
    return recognizer(chips).float().cpu(), owner.cpu()


def clean_identity(reference: Tensor, recognizer, min_prob: float = 0.9) -> Tensor:
    """Mean embedding ``[D]`` of the largest face of each clean reference photo ``[R,3,H,W]``.
    Photos without a face are skipped; none at all raises ValueError."""
    _, faces = face_detection_failures(reference, min_prob)
    emb, _ = embed_faces(reference, faces, recognizer)
    if emb.shape[0] == 0:
        raise ValueError(
            f"No face found in any of the {reference.shape[0]} clean reference image(s) (MTCNN confidence ≥ "
            f"{min_prob}). Connect clean photos of the person with a visible face, or lower 'min_face_confidence'."
        )
    return emb.mean(0)


def ism_scores(emb: Tensor, mean_clean: Tensor, recognizer) -> dict[str, Tensor]:
    """Per-face identity numbers against the clean identity. emb ``[N,D]``, mean_clean ``[D]``
    → ``{"ism_cosine", "ism_rule", "distance": [N] float, "same_person": [N] bool}``
    (definitions in the module docstring)."""
    ref = mean_clean.to(emb)[None]
    dist = recognizer.distance(emb, ref).float()
    return {
        "ism_cosine": F.cosine_similarity(emb, ref, dim=-1),
        "ism_rule": 1.0 - dist / recognizer.threshold,
        "distance": dist,
        "same_person": dist < recognizer.threshold,
    }


def score_identity(name: str, generated: Tensor, reference: Tensor, recognizer, min_prob: float = 0.9,
                   attacked: Optional[Iterable[str]] = None, gallery: Optional[Tensor] = None) -> ScoreRow:
    """ISM (cosine and the recogniser's rule), distance, same-person rate, FDFR and, with a
    gallery, the identification rank — each labelled with the judge's role (kernels.verdict).

    generated ``[B,3,H,W]`` and reference ``[R,3,H',W']`` RGB in [0, 1] (reference: the person's
    clean photos — their *other* photos for a verdict on identity reuse); recognizer a
    :class:`kernels.recognizers.FaceRecognizer`, the judge; attacked: names of the models the
    protection was optimised against (None: unknown); gallery ``[G,3,H'',W'']``: photos of
    other people, one identity each. Keys: ``fdfr``, ``faces_detected``, ``faces_missing`` and,
    prefixed with ``"<judge> [<role>]/"``, ``ism_cosine``, ``ism_rule``, ``distance``,
    ``same_person_rate`` and, with a gallery, ``rank1_rate`` and ``mean_rank``.
    """
    mean_clean = clean_identity(reference, recognizer, min_prob)
    failed, faces = face_detection_failures(generated, min_prob)
    emb, owner = embed_faces(generated, faces, recognizer)
    b = generated.shape[0]
    role = judge_role(recognizer.name, attacked)
    row = ScoreRow(name)
    row.set("fdfr", failed.float().mean(), per_image=failed.float().tolist())
    row.set("faces_detected", int((~failed).sum()))
    row.set("faces_missing", int(failed.sum()))
    row.notes["face_detector"] = f"MTCNN (facenet-pytorch), confidence ≥ {min_prob}, largest face per image"
    row.notes[f"judge: {recognizer.name}"] = role
    row.notes[f"{recognizer.name}"] = (
        f"metric {recognizer.metric}, same person iff distance < {recognizer.threshold}; "
        f"{'centred' if recognizer.centred else 'uncentred (use ism_rule)'}; reference: mean of "
        f"{reference.shape[0]} clean photo(s); role: {role}")
    prefix = labelled(recognizer.name, role) + "/"
    keys = ["ism_cosine", "ism_rule", "distance", "same_person_rate"] + (["rank1_rate", "mean_rank"]
                                                                          if gallery is not None else [])
    if emb.shape[0] == 0:
        reason = f"no face detected in any of the {b} generated image(s)"
        for k in keys:
            row.set(prefix + k, None, reason)
        return row
    m = ism_scores(emb, mean_clean, recognizer)
    cos, rule, dist, same = m["ism_cosine"], m["ism_rule"], m["distance"], m["same_person"].float()

    def per_image(v: Tensor) -> list[Optional[float]]:
        out: list[Optional[float]] = [None] * b
        for o, x in zip(owner.tolist(), v.tolist()):
            out[o] = x
        return out

    row.set(prefix + "ism_cosine", cos.mean(), per_image=per_image(cos))
    row.set(prefix + "ism_rule", rule.mean(), per_image=per_image(rule))
    row.set(prefix + "distance", dist.mean(), per_image=per_image(dist))
    row.set(prefix + "same_person_rate", same.mean(), per_image=per_image(same))
    if gallery is not None:
        g_failed, g_faces = face_detection_failures(gallery, min_prob)
        g_emb, _ = embed_faces(gallery, g_faces, recognizer)
        if g_emb.shape[0] == 0:
            for k in ("rank1_rate", "mean_rank"):
                row.set(prefix + k, None, f"no face detected in any of the {gallery.shape[0]} gallery image(s)")
        else:
            ranks = gallery_ranks(emb, mean_clean, g_emb, recognizer.distance).float()
            row.set(prefix + "rank1_rate", (ranks == 1).float().mean(), per_image=per_image(ranks == 1))
            row.set(prefix + "mean_rank", ranks.mean(), per_image=per_image(ranks))
            row.notes["gallery"] = (f"{int(g_emb.shape[0])} other people (one face per gallery image; "
                                    f"{int(g_failed.sum())} without a face skipped); rank 1 = still identified")
    return row


# ---------------------------------------------------------------------------------------------
# image quality
# ---------------------------------------------------------------------------------------------


def _broadcast_reference(images: Tensor, reference: Tensor, what: str = "reference") -> Tensor:
    if reference.shape[1:] != images.shape[1:]:
        raise ValueError(
            f"'{what}' is {reference.shape[-1]}x{reference.shape[-2]} but the image is "
            f"{images.shape[-1]}x{images.shape[-2]}: compare images of one size (resize or crop first)."
        )
    if reference.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"'{what}' has {reference.shape[0]} images for a batch of {images.shape[0]}; use 1 or {images.shape[0]}.")
    return reference.expand_as(images)


def score_quality(name: str, images: Tensor, reference: Optional[Tensor] = None,
                  brisque: tuple = (None, "not requested"), lpips: tuple = (None, "not requested")) -> ScoreRow:
    """PSNR (dB), SSIM, BRISQUE and LPIPS of ``images`` ``[B,3,H,W]`` in [0, 1].

    reference: the clean image(s) ``[1|B,3,H,W]`` for PSNR/SSIM/LPIPS (None: those are
    unavailable); brisque, lpips: ``(model, reason)`` as returned by
    :func:`kernels.brisque.find_brisque_model` / :func:`kernels.lpips.find_lpips`.
    """
    from .brisque import brisque_score

    row = ScoreRow(name)
    x = images.detach().float().cpu()
    if reference is None:
        for k in ("psnr_db", "ssim", "lpips"):
            row.set(k, None, "no reference (clean) image connected")
    else:
        ref = _broadcast_reference(x, reference.detach().float().cpu())
        p = metrics.psnr(x, ref)
        row.set("psnr_db", p.mean() if torch.isfinite(p).all() else None,
                "some image is identical to its reference (PSNR = +inf)", per_image=p.tolist())
        s = metrics.ssim(x, ref)
        row.set("ssim", s.mean(), per_image=s.tolist())
        model, reason = lpips
        if model is None:
            row.set("lpips", None, reason)
        else:
            with torch.no_grad():
                dev = next(model.parameters()).device
                d = model(x.to(dev), ref.to(dev)).float().cpu()
            row.set("lpips", d.mean(), per_image=d.tolist())
            row.notes["lpips"] = f"{model.net} backbone, {model.source}"
    model, reason = brisque
    if model is None:
        row.set("brisque", None, reason)
    else:
        q = brisque_score(x, model)
        row.set("brisque", q.mean() if torch.isfinite(q).all() else None,
                "BRISQUE is undefined on an image without local contrast (flat)", per_image=q.tolist())
        row.notes["brisque"] = f"lower is better; SVR {model.source}"
    return row


# ---------------------------------------------------------------------------------------------
# edit distortion
# ---------------------------------------------------------------------------------------------


def _masked_mse(a: Tensor, b: Tensor, w: Optional[Tensor]) -> Tensor:
    """Per-image mean squared difference weighted by ``w`` ``[B,1,H,W]`` (None = everywhere);
    NaN where the weights sum to 0."""
    d = (a - b).pow(2)
    if w is None:
        return d.flatten(1).mean(1)
    w = w.expand_as(d)
    num, den = (d * w).flatten(1).sum(1), w.flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, float("nan")))


def score_edit(name: str, edit_clean: Tensor, edit_protected: Tensor, mask: Optional[Tensor] = None) -> ScoreRow:
    """Distortion between the edit of the clean and the edit of the protected image.

    edit_clean, edit_protected ``[B,3,H,W]`` in [0, 1] (edit_clean may be ``[1,...]``);
    mask ``[B,1,H,W]`` in [0, 1] (soft masks weight pixels). Keys ``edit_rms_255``,
    ``edit_psnr_db`` and, with a mask, the same with ``_in_mask`` / ``_outside_mask``.
    """
    b = edit_protected.detach().float().cpu()
    a = _broadcast_reference(b, edit_clean.detach().float().cpu(), "edit_of_clean")
    row = ScoreRow(name)
    regions = [("", None)]
    if mask is not None:
        m = mask.detach().float().cpu().clamp(0, 1)
        regions += [("_in_mask", m), ("_outside_mask", 1.0 - m)]
    for suffix, w in regions:
        mse = _masked_mse(a, b, w)
        where = {"": "the image", "_in_mask": "the mask", "_outside_mask": "outside the mask"}[suffix]
        empty = bool(torch.isnan(mse).any())
        rms = mse.sqrt() * 255.0
        psnr = 10.0 * torch.log10(1.0 / mse)
        row.set(f"edit_rms_255{suffix}", None if empty else rms.mean(),
                f"{where} is empty in some image" if empty else "", per_image=rms.tolist())
        if empty:
            reason = f"{where} is empty in some image"
        else:
            reason = "the two edits are identical there (PSNR = +inf): the protection did not change the edit"
        row.set(f"edit_psnr_db{suffix}", psnr.mean() if torch.isfinite(psnr).all() else None, reason,
                per_image=psnr.tolist())
    return row


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

# what a protection wants of each metric: "low" / "high" (None: neutral, e.g. counts)
_WANTS = {
    "ism_cosine": "low", "ism_rule": "low", "distance": "high", "same_person_rate": "low",
    "rank1_rate": "low", "mean_rank": "high",
    "fdfr": "high", "psnr_db": "high", "ssim": "high", "brisque": "low", "lpips": "low",
    "edit_rms_255": "high", "edit_psnr_db": "low",
    # TSDF (kernels/tsdf.py): interruption distortion, the attacker's detector, persistence
    "l2_mask": "high", "success_rate": "high", "vs_baseline": "high", "persistence": "high",
    "precision": "low", "recall": "low", "miss_or_misplace_rate": "high", "training_photos": "low",
}


def metric_wants(metric: str) -> Optional[str]:
    """"low"/"high": which direction means better protection (for identity and edit metrics) or a
    less visible perturbation (for quality metrics); None for counts."""
    base = metric.split("/")[-1].split(" #")[0]
    for suffix in ("_in_mask", "_outside_mask"):
        base = base.removesuffix(suffix)
    return _WANTS.get(base)


REFERENCE_MEAN = "the mean embedding of the reference photos"
ISM_NOTE = (
    "ism_cosine vs ism_rule: ism_cosine is the plain cosine to the mean of the reference photos; for dlib it is "
    "about 0.8–0.9 even between different people (its descriptors are not centred), so it barely separates people. "
    "ism_rule = 1 − d/τ to the same mean, the recogniser's own rule (d its distance, τ its same-person threshold): "
    "1 = the reference itself, < 0 = a different person. A Protection Report 'similarity' is yet another "
    "comparison: the protected photo vs the clean copy of the same photo (dlib: 1 − d/τ, centred networks: cosine)."
)

# base metric → (measured against, what it is); the direction comes from _WANTS
_MEANING: dict[str, tuple[str, str]] = {
    "ism_cosine": (REFERENCE_MEAN, "ISM: plain cosine of each face's embedding (≈ 0.9 for any two faces with dlib: "
                                   "uncentred; read ism_rule there)"),
    "ism_rule": (REFERENCE_MEAN, "ISM by the recogniser's rule 1 − d/τ: 1 = the reference itself, < 0 = a different "
                                 "person"),
    "distance": (REFERENCE_MEAN, "the recogniser's own distance d; d ≥ τ (its threshold) = a different person"),
    "same_person_rate": (REFERENCE_MEAN, "share of detected faces with d < τ (judged the same person)"),
    "rank1_rate": ("the gallery of other people", "share of faces whose closest identity is still the person"),
    "mean_rank": ("the gallery of other people", "mean rank of the true identity (1 = identified)"),
    "fdfr": ("MTCNN face detection", "share of images in which no face is detected"),
    "fdfr_clean": ("MTCNN face detection", "share of clean photos without a detected face (reference)"),
    "faces_detected": ("MTCNN face detection", "images with a detected face"),
    "faces_missing": ("MTCNN face detection", "images without a detected face"),
    "psnr_db": ("the clean image", "PSNR in dB (less visible perturbation = higher)"),
    "ssim": ("the clean image", "structural similarity, 1 = identical"),
    "lpips": ("the clean image", "learned perceptual distance, 0 = identical"),
    "brisque": ("no reference (natural-image statistics)", "BRISQUE naturalness score, lower = more natural"),
    "edit_rms_255": ("the same edit run on the clean photo", "RMS difference between the two edits, in /255"),
    "edit_psnr_db": ("the same edit run on the clean photo", "PSNR between the two edits, in dB"),
    "l2_mask": ("the forgery of the clean photo", "TSDF distortion L2 inside the face boxes (images in [-1, 1])"),
    "success_rate": ("the success threshold", "share of images whose distortion passes the threshold"),
    "vs_baseline": ("the baseline's l2_mask", "how many times the baseline's distortion"),
    "persistence": ("the distortion before fine-tuning", "distortion after fine-tuning ÷ before"),
    "precision": ("the detector's boxes on the clean photo", "precision of the attacker's face detector"),
    "recall": ("the detector's boxes on the clean photo", "recall of the attacker's face detector"),
    "miss_or_misplace_rate": ("the detector's boxes on the clean photo",
                              "share of true faces the detector misses or misplaces"),
    "training_photos": ("the protected photos", "photos the attacker's detector kept for fine-tuning"),
}
_COUNTS = {"faces_detected", "faces_missing", "training_photos"}
_REGION = {"_in_mask": " inside the mask", "_outside_mask": " outside the mask"}


def _base(metric: str) -> tuple[str, str]:
    base = metric.split("/")[-1].split(" #")[0]
    for suffix in _REGION:
        if base.endswith(suffix):
            return base.removesuffix(suffix), suffix
    return base, ""


def metric_direction(metric: str) -> str:
    """``"↓ better"`` / ``"↑ better"`` (protection, or for quality metrics a less visible
    perturbation), ``"count"`` or ``"reference"``."""
    wants = metric_wants(metric)
    if wants is not None:
        return "↓ better" if wants == "low" else "↑ better"
    return "count" if _base(metric)[0] in _COUNTS else "reference"


def describe_metric(metric: str) -> dict[str, str]:
    """``{"direction", "measured_against", "meaning"}`` of a score metric (the judge's name and
    role, when the key has them, are part of the meaning)."""
    base, region = _base(metric)
    against, meaning = _MEANING.get(base, ("—", "see the score node that made it"))
    if "/" in metric:
        meaning = f"{meaning} [{metric.rsplit('/', 1)[0]}]"
    if base in _COUNTS and metric_wants(metric) is not None:
        meaning += " (count)"
    return {"direction": metric_direction(metric), "measured_against": against + _REGION.get(region, ""),
            "meaning": meaning}


def score_legend(metrics: Iterable[str]) -> dict:
    """The JSON ``legend``: ``{"metrics": {metric: describe_metric(metric)}, "note": ...}``."""
    return {"metrics": {k: describe_metric(k) for k in metrics}, "note": ISM_NOTE}


def figure_to_image(fig) -> Tensor:
    """Draw a matplotlib figure (Agg) and close it → ``[1,H,W,3]`` float in [0, 1]."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(buf).float().div(255.0).unsqueeze(0)


def _arrow(metric: str) -> str:
    d = metric_direction(metric)
    return d.split(" ")[0] if d.endswith("better") else d


def _legend_lines(metrics: list[str], width: int) -> list[str]:
    """One line per base metric shown (its direction and what it is measured against) + the ISM note."""
    lines, seen = [], set()
    for k in metrics:
        base, region = _base(k)
        key = base + region
        if key in seen:
            continue
        seen.add(key)
        e = describe_metric(base + region)
        lines += textwrap.wrap(f"{key} ({e['direction']}): {e['meaning']}; vs {e['measured_against']}", width,
                               subsequent_indent="    ")
    if any(_base(k)[0] in ("ism_cosine", "ism_rule") for k in metrics):
        lines += textwrap.wrap(ISM_NOTE, width)
    return lines


def render_scores(scores: Scores, width_px: int = 1400, max_metrics: int = 16) -> Tensor:
    """The table, one bar chart per metric (bars = rows) and a legend (each metric's direction
    and what it is measured against) as an image ``[1,H,W,3]`` in [0, 1]. Unavailable values are
    drawn as a labelled gap, never as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, cells = scores.table(digits=4)  # 4 significant digits on the chart
    keys = [k for k in scores.metrics() if metric_wants(k) is not None][:max_metrics]
    ncols = 4
    nrows_chart = max(1, math.ceil(len(keys) / ncols))
    table_h = 0.6 + 0.32 * (len(cells) + 1) + 0.3 * len(scores.verdict()) + 0.25
    legend = _legend_lines(scores.metrics(), int(width_px / 7.2))
    legend_h = 0.45 + 0.16 * len(legend)
    dpi = 100
    fig = plt.figure(figsize=(width_px / dpi, table_h + 2.8 * nrows_chart + legend_h), dpi=dpi)
    grid = fig.add_gridspec(2 + nrows_chart, ncols, height_ratios=[table_h] + [2.8] * nrows_chart + [legend_h])

    ax = fig.add_subplot(grid[0, :])
    ax.axis("off")
    # the table shows a compact view: long metric names wrap, reasons go to the CSV/JSON
    short = ["name"] + [f"{h.replace(' [', chr(10) + '[').replace('/', '/' + chr(10))}{chr(10)}({_arrow(h)})"
                        for h in header[1:-1]]
    body = [[c if c != UNAVAILABLE else "n/a" for c in line[:-1]] for line in cells]
    if body:
        t = ax.table(cellText=body, colLabels=short, loc="upper center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(7)
        t.scale(1, 1.6)
        for (r, _), cell in t.get_celld().items():
            if r == 0:
                cell.set_height(cell.get_height() * (1 + 0.5 * max(c.count(chr(10)) for c in short)))
    verdict = [textwrap.fill(v, 170) for v in scores.verdict()]
    ax.set_title("\n".join(verdict + ["scores  (↑/↓ = which way is better; n/a = unavailable, reason in the CSV/JSON)"]),
                 fontsize=9, color="#000", loc="left" if verdict else "center")

    names = scores.names()
    colours = plt.get_cmap("tab10")
    for i, k in enumerate(keys):
        ax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        vals = [scores[n].values.get(k) for n in names]
        for j, (n, v) in enumerate(zip(names, vals)):
            if v is None:
                label = "n/a" if k in scores[n].values else "not\nmeasured"
                ax.text(j, 0.04, label, ha="center", va="bottom", fontsize=7, color="#888",
                        transform=ax.get_xaxis_transform())
            else:
                ax.bar(j, v, color=colours(j % 10))
                ax.text(j, v, f"{v:.3g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="#444", lw=0.5)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks(range(len(names)), [n if len(n) <= 16 else n[:15] + "…" for n in names],
                      fontsize=7, rotation=20)
        against = describe_metric(k)["measured_against"]
        against = against if len(against) <= 44 else against[:43] + "…"
        ax.set_title(f"{k}  ({metric_direction(k)})\nvs {against}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)

    ax = fig.add_subplot(grid[1 + nrows_chart, :])
    ax.axis("off")
    ax.text(0, 1, "\n".join(legend), va="top", fontsize=7, transform=ax.transAxes)
    ax.set_title("legend", loc="left", fontsize=9)
    fig.tight_layout()
    return figure_to_image(fig)
