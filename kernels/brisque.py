"""BRISQUE: no-reference image quality from natural scene statistics (Mittal et al., TIP 2012).

A natural photo's *mean-subtracted contrast-normalised* (MSCN) coefficients

    Î(i,j) = (I(i,j) − μ(i,j)) / (σ(i,j) + C),   μ = w ∗ I,  σ = sqrt(|w ∗ I² − μ²|),  C = 1

(I the 8-bit luminance in [0, 255], w a 7x7 Gaussian with σ_w = 7/6) follow a generalised
Gaussian; distortions (blur, noise, compression) change its shape. The 36 features are, at the
full and the half scale (18 each):

- the GGD fit of Î: shape α and variance σ²  (moment matching: the ratio E[x²]/E[|x|]²
  against Γ(1/α)Γ(3/α)/Γ(2/α)², α searched on the grid 0.2:0.001:10);
- for the four neighbour products Î·Î(shifted) — horizontal (0,1), vertical (1,0), main
  diagonal (1,1), secondary diagonal (−1,1), circular shifts — the asymmetric GGD fit:
  shape ν, mean η = (σ_r − σ_l)·Γ(2/ν)/Γ(1/ν)·sqrt(Γ(1/ν)/Γ(3/ν)), σ_l², σ_r².

The score is an ε-SVR with an RBF kernel on the features scaled to [−1, 1] by the training
set's per-feature min/max (libsvm's svm-scale): ``f(x) = Σ_i c_i exp(−γ‖x − s_i‖²) − ρ``.
It is about 0–100, **lower is better** (an undistorted photo ≈ 10–40; blur and noise raise it).

The regressor is a trained model: this file only reads one from local files, never downloads
and never makes one up. It accepts libsvm's text model format (``svm_type epsilon_svr``,
``kernel_type rbf``) plus the scaling ranges as libsvm's svm-scale range file or as a pickle of
``{"min_": [36 floats], "max_": [36 floats]}`` (read with an unpickler that admits no classes,
so only plain numbers/lists/dicts load). Where it looks, in order (:func:`find_brisque_model`):

1. an explicit path (a model file, or a folder holding ``svm.txt``/``brisque_svm.txt`` or
   ``allmodel`` plus ``normalize.pickle``/``allrange``);
2. the environment variable ``IMMUNIZE_BRISQUE_MODEL`` (same forms);
3. the LIVE-trained model shipped inside the pip packages ``brisque`` or ``image-quality``
   (``imquality``) — found on disk without importing them (``brisque`` imports OpenCV).

The features follow the authors' reference implementation (8-bit luminance with MATLAB's
``rgb2gray`` weights, rounded; zero-padded filtering; circular shifts; grid-searched shapes;
half scale by antialiased bicubic resizing); the model shipped by the packages above was
trained on features computed that way (its shape minima lie on the 0.001 grid).
"""

from __future__ import annotations

import importlib.util
import io as _io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

PathLike = Union[str, Path]
BRISQUE_ENV = "IMMUNIZE_BRISQUE_MODEL"
N_FEATURES = 36

# MATLAB rgb2gray: first row of the inverse of the NTSC YIQ matrix.
_GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))  # (rows, cols) as MATLAB's circshift


@dataclass
class BrisqueModel:
    """An RBF ε-SVR over the 36 scaled BRISQUE features.

    support_vectors ``[N,36]``, coef ``[N]`` (float64), rho, gamma; feat_min/feat_max ``[36]``
    the training ranges mapped to [−1, 1]; source: where it was read from (for reports).
    """

    support_vectors: Tensor
    coef: Tensor
    rho: float
    gamma: float
    feat_min: Tensor
    feat_max: Tensor
    source: str

    def scale(self, features: Tensor) -> Tensor:
        """``[B,36]`` raw features → ``[B,36]`` in the SVR's input range (≈ [−1, 1])."""
        lo, hi = self.feat_min, self.feat_max
        span = (hi - lo).clamp_min(1e-12)
        return -1.0 + 2.0 * (features.double() - lo) / span

    def predict(self, features: Tensor) -> Tensor:
        """Raw features ``[B,36]`` → scores ``[B]`` (lower is better). NaN features give NaN."""
        x = self.scale(features)
        d2 = torch.cdist(x, self.support_vectors).pow(2)  # [B,N]
        return torch.exp(-self.gamma * d2) @ self.coef - self.rho


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------

_GRID = torch.arange(2000, 100001, 10, dtype=torch.float64) / 10000.0  # 0.2, 0.201, ..., 10.0


def _lg(x: Tensor) -> Tensor:
    return torch.lgamma(x)


# Γ(1/a)Γ(3/a)/Γ(2/a)² for the GGD, its inverse for the AGGD (computed in log space).
_R_GGD = torch.exp(_lg(1 / _GRID) + _lg(3 / _GRID) - 2 * _lg(2 / _GRID))
_R_AGGD = 1.0 / _R_GGD


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).view(1, 1, size, size)


def mscn(gray: Tensor) -> Tensor:
    """MSCN coefficients. gray ``[B,1,H,W]`` float64 luminance in [0, 255] → ``[B,1,H,W]``."""
    w = _gaussian_window().to(gray)
    mu = F.conv2d(gray, w, padding=3)
    sigma = (F.conv2d(gray * gray, w, padding=3) - mu * mu).abs().sqrt()
    return (gray - mu) / (sigma + 1.0)


def _ggd_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric GGD fit of each row of ``x`` ``[B,M]`` → shape α ``[B]``, variance ``[B]``."""
    var = x.pow(2).mean(1)
    rho = var / x.abs().mean(1).pow(2)
    idx = (rho[:, None] - _R_GGD.to(x)[None]).abs().argmin(1)
    alpha = _GRID.to(x)[idx]
    return torch.where(torch.isfinite(rho), alpha, torch.nan), var


def _aggd_fit(x: Tensor) -> Tensor:
    """Asymmetric GGD fit of each row of ``x`` ``[B,M]`` → ``[B,4]``: shape, mean, σ_l², σ_r²."""
    x2 = x * x
    neg, pos = x < 0, x > 0
    zero = x2.new_zeros(())
    left_var = torch.where(neg, x2, zero).sum(1) / neg.sum(1)  # NaN when a side is empty (flat image)
    right_var = torch.where(pos, x2, zero).sum(1) / pos.sum(1)
    g = (left_var / right_var).sqrt()
    r_hat = x.abs().mean(1).pow(2) / x2.mean(1)
    r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    idx = (_R_AGGD.to(x)[None] - r_norm[:, None]).pow(2).argmin(1)
    nu = torch.where(torch.isfinite(r_norm), _GRID.to(x)[idx], torch.nan)
    const = torch.exp(0.5 * (_lg(1 / nu) - _lg(3 / nu)))
    eta = (right_var.sqrt() - left_var.sqrt()) * torch.exp(_lg(2 / nu) - _lg(1 / nu)) * const
    return torch.stack([nu, eta, left_var, right_var], 1)


def _scale_features(gray: Tensor) -> Tensor:
    """18 features of one scale. gray ``[B,1,H,W]`` in [0, 255] → ``[B,18]``."""
    m = mscn(gray)
    flat = m.flatten(1)
    alpha, var = _ggd_fit(flat)
    feats = [alpha[:, None], var[:, None]]
    for dy, dx in _SHIFTS:
        pair = flat * torch.roll(m, shifts=(dy, dx), dims=(2, 3)).flatten(1)
        feats.append(_aggd_fit(pair))
    return torch.cat(feats, 1)


def luminance_255(images: Tensor) -> Tensor:
    """``[B,3,H,W]`` RGB in [0, 1] → 8-bit luminance ``[B,1,H,W]`` float64 in [0, 255] (MATLAB's
    ``rgb2gray`` on the uint8 image: BT.601 weights, rounded)."""
    rgb = (images.detach().double().clamp(0, 1) * 255.0).round()
    w = torch.tensor(_GRAY, dtype=torch.float64, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True).round()


def brisque_features(images: Tensor) -> Tensor:
    """The 36 BRISQUE features. images ``[B,3,H,W]`` RGB in [0, 1] → ``[B,36]`` float64 (CPU).

    A flat image (no local contrast) has undefined shape parameters: its row is NaN.

    Example:
        >>> f = brisque_features(img)      # img [1,3,256,256] → [1,36]
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"BRISQUE needs images of at least 16x16 px, got {tuple(images.shape[-2:])}")
    gray = luminance_255(images.cpu())
    # MATLAB's imresize(I, 0.5): bicubic (a = −0.5) with an antialiasing kernel, no rounding.
    half = F.interpolate(gray, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([_scale_features(gray), _scale_features(half)], 1)


def brisque_score(images: Tensor, model: BrisqueModel) -> Tensor:
    """BRISQUE quality scores ``[B]`` (lower is better; NaN for a flat image).
    images ``[B,3,H,W]`` RGB in [0, 1]."""
    return model.predict(brisque_features(images))


# ---------------------------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------------------------

_MODEL_NAMES = ("svm.txt", "brisque_svm.txt", "allmodel")
_RANGE_NAMES = ("normalize.pickle", "allrange")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles numbers, strings, lists and dicts only: any class reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is accepted")


def _read_ranges(path: Path) -> tuple[Tensor, Tensor]:
    raw = path.read_bytes()
    if raw[:1] == b"\x80":  # a pickle (protocol ≥ 2)
        try:
            d = _PlainUnpickler(_io.BytesIO(raw)).load()
        except Exception as e:
            raise ValueError(f"{path.name}: not a plain pickle of {{'min_', 'max_'}} ({e}).") from e
        if not isinstance(d, dict) or "min_" not in d or "max_" not in d:
            raise ValueError(f"{path.name}: expected a dict with 'min_' and 'max_' lists.")
        lo = torch.tensor([float(v) for v in d["min_"]], dtype=torch.float64)
        hi = torch.tensor([float(v) for v in d["max_"]], dtype=torch.float64)
    else:  # libsvm svm-scale range file: "x", "lower upper", then "index min max" lines
        lines = raw.decode("ascii", errors="replace").split("\n")
        if not lines or lines[0].strip() != "x":
            raise ValueError(f"{path.name}: not a libsvm svm-scale range file (first line must be 'x').")
        low, up = (float(v) for v in lines[1].split())
        if (low, up) != (-1.0, 1.0):
            raise ValueError(f"{path.name}: features scaled to [{low}, {up}]; BRISQUE models use [-1, 1].")
        lo = torch.zeros(N_FEATURES, dtype=torch.float64)
        hi = torch.zeros(N_FEATURES, dtype=torch.float64)
        for ln in lines[2:]:
            if ln.strip():
                i, a, b = ln.split()
                lo[int(i) - 1], hi[int(i) - 1] = float(a), float(b)
    if lo.numel() != N_FEATURES or hi.numel() != N_FEATURES:
        raise ValueError(f"{path.name}: {lo.numel()} feature ranges, BRISQUE has {N_FEATURES}.")
    return lo, hi


def _read_svr(path: Path) -> tuple[Tensor, Tensor, float, float]:
    text = path.read_text(errors="replace").split("\n")
    header: dict[str, str] = {}
    i = 0
    while i < len(text) and text[i].strip() != "SV":
        parts = text[i].split(None, 1)
        if parts:
            header[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
        i += 1
    if i == len(text) or header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(
            f"{path.name}: not a libsvm ε-SVR model with an RBF kernel (expected 'svm_type "
            "epsilon_svr', 'kernel_type rbf' and an 'SV' section), so not a BRISQUE model."
        )
    coef, rows = [], []
    for ln in text[i + 1:]:
        parts = ln.split()
        if not parts:
            continue
        coef.append(float(parts[0]))
        row = [0.0] * N_FEATURES
        for item in parts[1:]:
            k, v = item.split(":")
            k = int(k)
            if not 1 <= k <= N_FEATURES:
                raise ValueError(f"{path.name}: feature index {k} outside 1..{N_FEATURES}; not a BRISQUE model.")
            row[k - 1] = float(v)
        rows.append(row)
    n = int(header.get("total_sv", len(rows)))
    if n != len(rows) or not rows:
        raise ValueError(f"{path.name}: header says {n} support vectors, found {len(rows)}; the file is truncated.")
    return (torch.tensor(rows, dtype=torch.float64), torch.tensor(coef, dtype=torch.float64),
            float(header["rho"]), float(header["gamma"]))


def load_brisque_model(model_path: PathLike, range_path: Optional[PathLike] = None) -> BrisqueModel:
    """Read a BRISQUE SVR: ``model_path`` a libsvm model file or a folder holding one (see the
    module docstring); ``range_path`` its feature ranges, by default found next to the model.
    Raises ValueError naming the file and what is expected."""
    p = Path(model_path)
    if p.is_dir():
        found = [p / n for n in _MODEL_NAMES if (p / n).is_file()]
        if not found:
            raise ValueError(f"{p}: no BRISQUE model in this folder (expected one of {_MODEL_NAMES}).")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"BRISQUE model file not found: {p}")
    if range_path is None:
        cands = [p.parent / n for n in _RANGE_NAMES if (p.parent / n).is_file()]
        if not cands:
            raise ValueError(f"{p.name}: no feature range file next to it (expected one of {_RANGE_NAMES}).")
        range_path = cands[0]
    sv, coef, rho, gamma = _read_svr(p)
    lo, hi = _read_ranges(Path(range_path))
    return BrisqueModel(sv, coef, rho, gamma, lo, hi, source=str(p))


def _package_model_dir(package: str, sub: str) -> Optional[Path]:
    """The data folder of an installed pip package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / sub
        if d.is_dir():
            return d
    return None


_CACHE: dict[str, BrisqueModel] = {}


def find_brisque_model(path: Optional[PathLike] = None) -> tuple[Optional[BrisqueModel], str]:
    """Locate a BRISQUE model (explicit path → ``$IMMUNIZE_BRISQUE_MODEL`` → the ``brisque`` /
    ``imquality`` pip packages' bundled model). Returns ``(model, "")`` or ``(None, reason)``;
    an explicit path or env var that is wrong raises ValueError instead of falling back."""
    explicit = str(path) if path else os.environ.get(BRISQUE_ENV, "")
    if explicit:
        if explicit not in _CACHE:
            _CACHE[explicit] = load_brisque_model(explicit)
        return _CACHE[explicit], ""
    for package in ("brisque", "imquality"):
        d = _package_model_dir(package, "models")
        if d is None:
            continue
        key = str(d)
        if key not in _CACHE:
            try:
                _CACHE[key] = load_brisque_model(d)
            except ValueError:
                continue
        return _CACHE[key], ""
    return None, (
        "no BRISQUE model found: install the pip package 'brisque' (its LIVE-trained SVR ships inside "
        f"it) or set {BRISQUE_ENV} to a libsvm BRISQUE model (svm.txt + normalize.pickle, or allmodel + allrange)"
    )

