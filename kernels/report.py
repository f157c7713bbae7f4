"""The protection report: numbers per image, a rendered chart and CSV/JSON files.

A :class:`ProtectionReport` is what PGD Protect hands to the report node: the clean and
protected batches (``[B,3,H,W]`` in [0, 1], CPU) and the PGD history. Everything else —
PSNR/SSIM, L∞ and RMS in /255, per-encoder identity similarity clean ↔ protected — is derived
here. Rendering uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
from torch import Tensor

from . import metrics
from .pgd import PGDResult
from .verdict import WHITE_BOX, verdict_lines

# Legend: for every column of the report, (direction, measured against, what it is). Directions:
# "↑ better" / "↓ better" (better = stronger protection, or for quality columns a less visible
# perturbation), "count", "setting" (an input, not a score) or "text".
CLEAN = "the clean photo (the same photo before protection)"
CLEAN_FACE = "the clean photo's face (the same photo before protection)"
SIMILARITY_NOTE = (
    "similarity vs ism_cosine: a Protection Report 'similarity' compares the protected photo with the clean copy of "
    "the same photo, each network by its own rule: for recognisers with uncentred descriptors (dlib) it is "
    "1 − d/τ (d its distance, τ its same-person threshold; 1 = unchanged, < 0 = a different person by the "
    "recogniser's own rule), for centred ones (FaceNet, ArcFace, FaceRes, MobileFace) and CLIP encoders the cosine. "
    "Score Identity's ism_cosine is the plain cosine to the mean of the reference photos: for dlib it stays about "
    "0.8–0.9 even between different people (its descriptors are not centred), so a 'similarity' of −0.5 and an "
    "ism_cosine of 0.8 can describe the same pair; compare with ism_rule (1 − d/τ to that mean) instead."
)

_COLUMNS: dict[str, tuple[str, str, str]] = {
    "image": ("index", "", "position of the image in the batch"),
    "method": ("text", "", "the objectives PGD minimised, joined by '+'"),
    "height": ("pixels", "", "image height"),
    "width": ("pixels", "", "image width"),
    "norm": ("setting", "", "budget norm: linf = largest change per pixel, l2 = RMS change"),
    "epsilon_255": ("setting", "", "perturbation budget ε in 8-bit levels (/255)"),
    "step_255": ("setting", "", "PGD step size in 8-bit levels (/255)"),
    "iterations": ("setting", "", "most PGD steps allowed"),
    "random_start": ("setting", "", "whether PGD started from random noise inside the budget"),
    "early_stop": ("setting", "", "whether PGD may stop once every objective's target is reached"),
    "seed": ("setting", "", "random seed"),
    "steps_run": ("count", "", "PGD steps run"),
    "stopped_early": ("flag", "", "true when every objective with a target was reached before the last step"),
    "psnr_db": ("↑ better (less visible)", CLEAN, "PSNR in dB"),
    "ssim": ("↑ better (less visible)", CLEAN, "structural similarity, 1 = identical"),
    "linf_255": ("↓ better (less visible); ≤ ε", CLEAN, "largest change of any pixel channel, in /255"),
    "rms_255": ("↓ better (less visible)", CLEAN, "RMS change over all pixels, in /255"),
}

# logged by the objectives as "<objective>/<network>/<name>" or "<objective>/<name>"
_LOGGED: dict[str, tuple[str, str, str]] = {
    "similarity": ("↓ better", CLEAN_FACE,
                   "identity similarity by this network's own rule: uncentred recognisers (dlib) 1 − d/τ "
                   "(< 0 = a different person by the recogniser's rule), centred recognisers and CLIP the cosine; "
                   "1 = unchanged"),
    "distance": ("↑ better", CLEAN_FACE,
                 "the recogniser's own distance d (dlib: Euclidean; others: 1 − cosine), smallest over the image's "
                 "faces; d ≥ τ (its threshold, dlib 0.6) = judged a different person"),
    "target_distance": ("↓ better", "the target person's photo", "distance to the target identity (targeted mode)"),
    "eps_mse": ("↑ better", "the noise actually added", "the diffusion denoiser's noise-prediction error (MSE)"),
    "t": ("setting", "", "mean diffusion timestep drawn"),
    "hf_loss": ("↓ better (minimised)", "the protected photo", "frequency loss L_freq (pixel²)"),
    "hf_retained": ("↑ better", "the perturbation", "share of the perturbation's high-band energy left after purification"),
    "latent_rms": ("↑ better away from the clean latent / ↓ towards a target", "the clean (or target) latent",
                   "RMS distance of the VAE latent"),
    "eps_shift": ("↑ better", "the denoiser's prediction on the clean photo", "RMS shift of the predicted noise"),
    "score_shift": ("↑ better", "the denoiser's score on the clean photo", "RMS shift of the diffusion score"),
    "distortion": ("↑ better", "the edit of the clean photo", "L2 distortion of the forgery inside the face boxes"),
    "onet_prob": ("↓ better", "the face on the clean photo", "MTCNN O-Net face probability"),
    "rnet_prob": ("↓ better", "the face on the clean photo", "MTCNN R-Net face probability"),
    "pnet_prob": ("↓ better", "the face on the clean photo", "MTCNN P-Net face probability"),
    "onet_iou": ("↓ better", "the face box on the clean photo", "IoU of O-Net's best box"),
    "predicted_fail": ("↑ better", "the face on the clean photo", "1 = the detector is predicted to miss the face"),
    "success": ("↑ better", "the face on the clean photo", "1 = the detector missed the face"),
    "pnet_loss": ("↓ better (minimised)", "", "P-Net term of the detector loss"),
    "rnet_loss": ("↓ better (minimised)", "", "R-Net term of the detector loss"),
    "onet_loss": ("↓ better (minimised)", "", "O-Net term of the detector loss"),
    "attn_in": ("↓ better", "the clean photo's mask", "mean cross-attention of the subject tokens inside the mask"),
    "attn_out": ("↑ better", "the clean photo's mask", "mean cross-attention of the subject tokens outside the mask"),
    "attn_contrast": ("↓ better (minimised)", "", "attention term of the loss"),
    "ts_gap": ("↓ better (minimised)", "", "timestep gap term of the loss"),
    "skipped": ("count", "", "1 = the objective skipped this image"),
}


def describe(key: str) -> dict[str, str]:
    """``{"direction", "measured_against", "meaning"}`` of a report column (or logged number)."""
    if key in _COLUMNS:
        d, a, m = _COLUMNS[key]
    else:
        parts = key.split("/")
        base = parts[-1].split(" #")[0]
        if base in _LOGGED:
            d, a, m = _LOGGED[base]
            if len(parts) > 1:
                m = f"{m} [{'/'.join(parts[:-1])}]"
        else:
            d, a, m = "see the objective's node", "", f"logged by objective '{parts[0]}'"
    return {"direction": d, "measured_against": a or "—", "meaning": m}


def legend(keys, config_keys=()) -> dict:
    """The JSON ``legend`` object: every column's (and config entry's) description, plus the
    similarity note."""
    return {"columns": {k: describe(k) for k in keys},
            "config": {k: describe(k) for k in config_keys},
            "loss_curves": {"direction": "↓ (minimised)", "measured_against": "—",
                            "meaning": "batch-mean loss per PGD step: the total and each objective's"},
            "note": SIMILARITY_NOTE}


def write_legend_csv(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    """``metric, direction, measured_against, meaning``: one line per column (every cell filled)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["metric", "direction", "measured_against", "meaning"])
        for k, e in entries.items():
            w.writerow([k, e["direction"], e["measured_against"], e["meaning"]])
    return path


def short_label(key: str) -> str:
    """``"↓ better"`` / ``"↑ better"`` / ``"count"``... for a chart label."""
    return describe(key)["direction"].split(";")[0].split(" (")[0]


@dataclass
class ProtectionReport:
    clean: Tensor  # [B,3,H,W] in [0,1], CPU
    protected: Tensor  # [B,3,H,W] in [0,1], CPU
    result: PGDResult
    extra_logs: dict[str, Tensor] = field(default_factory=dict)  # more [B] numbers (other encoders)
    attacked: tuple[str, ...] = ()  # names of the networks the protection was optimised against
    judges: dict[str, str] = field(default_factory=dict)  # more recognisers that scored it → their role

    def verdict(self) -> list[str]:
        """What the identity numbers can claim: the attacked networks' are white-box (kernels.verdict)."""
        return verdict_lines({**{a: WHITE_BOX for a in self.attacked}, **self.judges})

    @property
    def batch(self) -> int:
        return self.clean.shape[0]

    def rows(self) -> list[dict]:
        """One dict per image: budget, image quality and the objectives' final numbers."""
        cfg = self.result.config
        p = metrics.psnr(self.protected, self.clean)
        s = metrics.ssim(self.protected, self.clean)
        li = metrics.linf_255(self.protected, self.clean)
        rms = metrics.l2_rms_255(self.protected, self.clean)
        logs = {**self.result.final_logs, **self.extra_logs}
        out = []
        for i in range(self.batch):
            row = {
                "image": i,
                "method": "+".join(self.result.final_losses),
                "height": int(self.clean.shape[2]),
                "width": int(self.clean.shape[3]),
                "norm": cfg.norm,
                "epsilon_255": round(cfg.eps * 255, 4),
                "steps_run": self.result.steps_run,
                "stopped_early": self.result.stopped_early,
                "psnr_db": _num(p[i]),
                "ssim": _num(s[i]),
                "linf_255": _num(li[i]),
                "rms_255": _num(rms[i]),
            }
            for k, v in logs.items():
                row[k] = _num(v[i])
            out.append(row)
        return out

    def curves(self) -> dict[str, list[float]]:
        """Batch-mean loss per step: the total and each objective's."""
        curves: dict[str, list[float]] = {"total": []}
        for rec in self.result.history:
            curves["total"].append(float(rec.total.mean()))
            for k, v in rec.losses.items():
                curves.setdefault(k, []).append(float(v.mean()))
        if len(curves) == 2:  # a single objective: its curve is the total
            curves.pop(next(k for k in curves if k != "total"))
        return curves

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.json`` (rows, curves, config, legend), ``stem.csv`` (rows) and
        ``stem + "legend.csv"`` (what each column is, its direction and what it is measured
        against). Returns the JSON and CSV paths."""
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        cfg = self.result.config
        data = {
            "attacked": list(self.attacked),
            "verdict": self.verdict(),
            "config": {"epsilon_255": cfg.eps * 255, "step_255": cfg.step * 255,
                       "iterations": cfg.iterations, "norm": cfg.norm,
                       "random_start": cfg.random_start, "early_stop": cfg.early_stop, "seed": cfg.seed},
            "images": rows,
            "loss_curves": self.curves(),
        }
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        data["legend"] = legend(keys, data["config"])
        jpath, cpath = directory / f"{stem}.json", directory / f"{stem}.csv"
        jpath.write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False), encoding="utf-8")
        write_legend_csv(directory / (f"{stem}legend.csv" if stem.endswith("_") else f"{stem}_legend.csv"),
                         data["legend"]["columns"])
        with cpath.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        return jpath, cpath

    def render(self, width_px: int = 1200, height_px: int = 1060) -> Tensor:
        """A chart as an image ``[1,H,W,3]`` in [0, 1]: the first image (clean, protected, the
        perturbation amplified to the budget), loss curves, identity similarities, quality, and
        a legend (each number's direction and what it is measured against)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        cfg = self.result.config
        dpi = 100
        fig, axes = plt.subplots(3, 3, figsize=(width_px / dpi, height_px / dpi), dpi=dpi,
                                 gridspec_kw={"height_ratios": [1, 1.1, 0.62]})
        clean, prot = self.clean[0].float(), self.protected[0].float()
        view = (0.5 + (prot - clean) / (2 * cfg.eps)).clamp(0, 1)
        for ax, img, title in zip(axes[0], (clean, prot, view),
                                  ("clean", "protected", f"perturbation (×{0.5 / cfg.eps:.0f})")):
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(title)
            ax.axis("off")

        ax = axes[1][0]
        for name, ys in self.curves().items():
            ax.plot(range(1, len(ys) + 1), ys, label=name)
        ax.set_title("loss (minimised, ↓)")
        ax.set_xlabel("PGD step")
        if ax.lines:
            ax.legend(fontsize=7)

        ax = axes[1][1]
        sim_keys = [k for k in rows[0] if k.endswith("/similarity") or k.endswith("/distance")] if rows else []
        if sim_keys:
            means = [float(np.nanmean([r[k] for r in rows])) for k in sim_keys]
            ax.barh(range(len(sim_keys)), means, color=["#c44" if k.endswith("/similarity") else "#47a"
                                                        for k in sim_keys])
            ax.set_yticks(range(len(sim_keys)), [f"{k.replace('/', chr(10))}  ({short_label(k)})" for k in sim_keys],
                          fontsize=7)
            for y, v in enumerate(means):
                ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
            ax.axvline(0, color="k", lw=0.5)
            ax.invert_yaxis()
        else:
            ax.axis("off")
        ax.set_title("protected vs the clean photo (batch mean)", fontsize=10)

        ax = axes[1][2]
        ax.axis("off")
        lines = [f"images: {self.batch}   steps: {self.result.steps_run}"
                 + ("  (early stop)" if self.result.stopped_early else ""),
                 f"budget: {cfg.norm} ε = {cfg.eps * 255:.3g}/255",
                 "vs the clean photo: PSNR ↑, SSIM ↑, L∞ ↓ better", ""]
        for r in rows[:8]:
            lines.append(f"#{r['image']}: PSNR {r['psnr_db']:.2f} dB  SSIM {r['ssim']:.4f}  "
                         f"L∞ {r['linf_255']:.0f}/255")
        if len(rows) > 8:
            lines.append(f"... {len(rows) - 8} more in the CSV")
        for v in self.verdict():
            lines += [""] + textwrap.wrap(v, 52)
        ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
        ax.set_title("image quality (less visible = better)")

        for ax in axes[2][1:]:
            ax.remove()
        ax = fig.add_subplot(axes[2][0].get_gridspec()[2, :])
        axes[2][0].remove()
        ax.axis("off")
        ax.text(0, 1, "\n".join(self._legend_lines(sim_keys)), va="top", fontsize=7.5, transform=ax.transAxes)
        ax.set_title("legend", loc="left", fontsize=9)
        fig.tight_layout()
        fig.canvas.draw()
        buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return torch.from_numpy(buf).float().div(255.0).unsqueeze(0)

    @staticmethod
    def _legend_lines(sim_keys: list[str], width: int = 215) -> list[str]:
        lines = []
        if any(k.endswith("/similarity") for k in sim_keys):
            d = _LOGGED["similarity"]
            lines += textwrap.wrap(f"similarity ({d[0]}), vs {d[1]}: {d[2]}.", width)
        if any(k.endswith("/distance") for k in sim_keys):
            d = _LOGGED["distance"]
            lines += textwrap.wrap(f"distance ({d[0]}), vs {d[1]}: {d[2]}.", width)
        lines += textwrap.wrap("PSNR (dB, ↑ better), SSIM (1 = identical, ↑ better), L∞ (largest pixel change /255, "
                               "↓ better): the protected vs " + CLEAN + "; they measure visibility, not protection.",
                               width)
        lines += textwrap.wrap(SIMILARITY_NOTE, width)
        return lines


def _num(v) -> float:
    return float(v)


def _json_safe(obj):
    """JSON has no NaN/inf: write them as null (e.g. PSNR of an unchanged image)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
