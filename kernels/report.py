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
        """Write ``stem.json`` (rows, curves, config) and ``stem.csv`` (rows). Returns both paths."""
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
        jpath, cpath = directory / f"{stem}.json", directory / f"{stem}.csv"
        jpath.write_text(json.dumps(_json_safe(data), indent=2))
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with cpath.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        return jpath, cpath

    def render(self, width_px: int = 1200, height_px: int = 820) -> Tensor:
        """A chart as an image ``[1,H,W,3]`` in [0, 1]: the first image (clean, protected, the
        perturbation amplified to the budget), loss curves, identity similarities, quality."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        cfg = self.result.config
        dpi = 100
        fig, axes = plt.subplots(2, 3, figsize=(width_px / dpi, height_px / dpi), dpi=dpi,
                                 gridspec_kw={"height_ratios": [1, 1.1]})
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
        ax.set_title("loss (minimised)")
        ax.set_xlabel("PGD step")
        if ax.lines:
            ax.legend(fontsize=7)

        ax = axes[1][1]
        sim_keys = [k for k in rows[0] if k.endswith("/similarity") or k.endswith("/distance")] if rows else []
        if sim_keys:
            means = [float(np.nanmean([r[k] for r in rows])) for k in sim_keys]
            ax.barh(range(len(sim_keys)), means, color="#c44")
            ax.set_yticks(range(len(sim_keys)), [k.replace("/", "\n") for k in sim_keys], fontsize=7)
            for y, v in enumerate(means):
                ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
            ax.axvline(0, color="k", lw=0.5)
        else:
            ax.axis("off")
        ax.set_title("clean ↔ protected (batch mean)")

        ax = axes[1][2]
        ax.axis("off")
        lines = [f"images: {self.batch}   steps: {self.result.steps_run}"
                 + ("  (early stop)" if self.result.stopped_early else ""),
                 f"budget: {cfg.norm} ε = {cfg.eps * 255:.3g}/255", ""]
        for r in rows[:8]:
            lines.append(f"#{r['image']}: PSNR {r['psnr_db']:.2f} dB  SSIM {r['ssim']:.4f}  "
                         f"L∞ {r['linf_255']:.0f}/255")
        if len(rows) > 8:
            lines.append(f"... {len(rows) - 8} more in the CSV")
        for v in self.verdict():
            lines += [""] + textwrap.wrap(v, 58)
        ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
        ax.set_title("image quality")
        fig.tight_layout()
        fig.canvas.draw()
        buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return torch.from_numpy(buf).float().div(255.0).unsqueeze(0)


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
