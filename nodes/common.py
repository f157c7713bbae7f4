"""Shared pieces of the adapters: custom io types, model folders, tensor layout, progress."""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
from torch import Tensor

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

class Node(io.ComfyNode):
    """Base of every node of the pack: its widget values are checked at queue time, so a bad
    value fails as a ``node_errors`` entry naming the input before any work starts.

    ComfyUI's own check skips NaN (``nan < min`` is False) and V3 combos; and once a node
    defines ``validate_inputs`` it skips the min/max checks of the inputs it receives, so
    :func:`check_widget_values` does all of them. A node with more to check overrides
    ``validate_inputs`` and calls it first.
    """

    @classmethod
    def validate_inputs(cls, **values):
        return check_widget_values(cls, values)


def check_widget_values(node_cls, values: dict) -> "bool | str":
    """True, or one message naming every widget value that is not finite, outside its min/max,
    of the wrong type or not among a combo's options. Linked inputs arrive as None (their
    values are not known at queue time) and are skipped."""
    types = node_cls.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    problems = []
    for name, value in values.items():
        if name not in spec or value is None:
            continue
        kind, info = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {}) or {}
        if kind in ("FLOAT", "INT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"'{name}' must be a number, got {value!r}")
            elif not math.isfinite(value):
                problems.append(f"'{name}' is {value}: use a finite number"
                                + (f" between {info['min']} and {info['max']}" if "min" in info and "max" in info else ""))
            elif "min" in info and value < info["min"]:
                problems.append(f"'{name}' is {value}, below its minimum {info['min']}")
            elif "max" in info and value > info["max"]:
                problems.append(f"'{name}' is {value}, above its maximum {info['max']}")
            elif kind == "INT" and int(value) != value:
                problems.append(f"'{name}' must be a whole number, got {value}")
        elif kind == "COMBO":
            options = info.get("options", [])
            if value not in options:
                shown = ", ".join(repr(o) for o in options[:8]) + (", ..." if len(options) > 8 else "")
                problems.append(f"'{name}' is {value!r}, not one of the choices ({shown or 'none available'})"
                                + ("; put the file into the model folder and refresh" if "/" in str(value)
                                   or "." in str(value) else ""))
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"'{name}' must be true or false, got {value!r}")
        elif kind == "STRING" and not isinstance(value, str):
            problems.append(f"'{name}' must be text, got {value!r}")
    return True if not problems else "; ".join(problems)


def next_output_stem(filename_prefix: str, root: Optional[str] = None) -> tuple[str, str, str]:
    """A fresh file stem for one run of a node that writes several files (JSON, CSV, PNG, ...)
    → ``(directory, stem, subfolder)``; write ``directory/stem + ".json"`` etc.

    The stem is ``<name>_<NNNNN>_``, the pattern SaveImage uses (``_00001_.png``), so ComfyUI's
    own counter (``folder_paths.get_save_image_path``, which only counts names of that shape)
    sees these files too. The counter is one past the highest used by *any* file in the folder
    named ``<name>_<digits>``, whatever follows (other extensions, names written before this
    helper existed such as ``report_00001.json``), so nothing is ever overwritten.
    ``root``: the base folder (default: ComfyUI's output folder); the prefix must stay inside it.
    """
    root = os.path.abspath(root or folder_paths.get_output_directory())
    directory, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
    os.makedirs(directory, exist_ok=True)
    pattern = re.compile(re.escape(os.path.normcase(name)) + r"_(\d{5,})(?=[_.]|$)")
    for entry in os.listdir(directory):
        m = pattern.match(os.path.normcase(entry))
        if m:
            counter = max(counter, int(m.group(1)) + 1)
    return directory, f"{name}_{counter:05}_", subfolder


FaceRecognizerType = io.Custom("FACE_RECOGNIZER")
ObjectiveType = io.Custom("PROTECT_OBJECTIVE")
ReportType = io.Custom("PROTECT_REPORT")

CATEGORY = "Immunize"

# model folder name → file extensions it lists
MODEL_FOLDERS = {
    "face_recognition": {".bin"},  # face-api.js (manifest beside it) and TF.js graph models (.json beside it)
    "facenet": {".pt", ".pth", ".safetensors"},
    "insightface": {".onnx"},  # ArcFace recognisers (antelopev2 glintr100, buffalo_l w600k_r50)
}


def register_model_folders(folders: Optional[dict[str, set[str]]] = None) -> None:
    """Make model folders (default: ``models/face_recognition`` and ``models/facenet``) known to
    ComfyUI, adding our extensions to a folder another pack registered already (idempotent)."""
    for name, exts in (MODEL_FOLDERS if folders is None else folders).items():
        path = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, old = folder_paths.folder_names_and_paths[name]
            if path not in paths:
                paths.append(path)
            folder_paths.folder_names_and_paths[name] = (paths, set(old) | exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([path], set(exts))


def model_file(path: str, what: str) -> str:
    """An absolute path, or one relative to ComfyUI's models folder; '' stays ''. ``what`` names
    the input in the error when the file is not there."""
    path = (path or "").strip()
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    cand = os.path.join(folder_paths.models_dir, path)
    if os.path.exists(cand):
        return cand
    raise ValueError(f"'{what}': {path!r} not found (absolute, or relative to {folder_paths.models_dir}).")


def image_to_bchw(image: Tensor, input_name: str = "image") -> Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` → a new float tensor ``[B,3,H,W]``; clear errors otherwise."""
    if not isinstance(image, Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"'{input_name}' must be an IMAGE batch [B,H,W,C]; got {shape}.")
    channels = image.shape[-1]
    if channels == 1:
        raise ValueError(
            f"'{input_name}' is grayscale (1 channel). Protection works on RGB: convert it first "
            "(e.g. load it with Load Image, which returns RGB)."
        )
    if channels == 4:
        raise ValueError(
            f"'{input_name}' has an alpha channel (4 channels). Pass the RGB image (Load Image "
            "returns RGB plus a separate MASK; wire that MASK to 'mask' to protect only there)."
        )
    if channels != 3:
        raise ValueError(f"'{input_name}' has {channels} channels; an RGB IMAGE has 3.")
    out = image.movedim(-1, 1).float().clone()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"'{input_name}' contains NaN or infinite pixel values: the node upstream produced a "
                         "broken image. Fix or replace it; nothing can be protected or scored on it.")
    return out


def bchw_to_image(x: Tensor) -> Tensor:
    """``[B,C,H,W]`` → ComfyUI IMAGE ``[B,H,W,C]`` on the intermediate device, detached."""
    return x.detach().movedim(1, -1).contiguous().to(comfy.model_management.intermediate_device())


def mask_to_b1hw(mask: Optional[Tensor], like: Tensor, input_name: str = "mask") -> Optional[Tensor]:
    """ComfyUI MASK ``[H,W]`` or ``[B,H,W]`` → ``[B,1,H,W]`` matching ``like`` ``[B,C,H,W]``."""
    if mask is None:
        return None
    m = mask if mask.dim() == 3 else mask.reshape(1, *mask.shape[-2:])
    b, _, h, w = like.shape
    if tuple(m.shape[-2:]) != (h, w):
        raise ValueError(
            f"'{input_name}' is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}. Use a mask "
            "of the image's own size (e.g. from the same Load Image node), or resize it first."
        )
    if m.shape[0] not in (1, b):
        raise ValueError(f"'{input_name}' has {m.shape[0]} masks for a batch of {b} images; use 1 or {b}.")
    return m.float().clone().unsqueeze(1).expand(b, 1, h, w).clone()


def record_protection(hidden, report, measured: dict) -> None:
    """Put what a protect node did into the prompt's ``extra_pnginfo``, which ComfyUI documents as
    "copied into the metadata of any .png files saved": Save Image then writes it into the PNG
    (key ``immunize``, one entry per protect node): method, budget, steps, the networks
    attacked, and per image the measured L∞ (/255) and PSNR (dB)."""
    extra_pnginfo = getattr(hidden, "extra_pnginfo", None)
    node_id = getattr(hidden, "unique_id", None)
    if not isinstance(extra_pnginfo, dict):
        return  # called directly, or a prompt sent without extra_data: nothing to write into
    cfg = report.result.config
    extra_pnginfo.setdefault("immunize", {})[str(node_id)] = {
        "method": "+".join(report.result.final_losses), "norm": cfg.norm, "epsilon_255": round(cfg.eps * 255, 4),
        "steps_run": report.result.steps_run, "stopped_early": report.result.stopped_early,
        "attacked": list(report.attacked),
        "images": [{"linf_255": float(li), "psnr_db": round(float(ps), 3)}
                   for li, ps in zip(measured["linf_255"], measured["psnr_db"])],
        "note": "white-box: these networks were attacked; judge with one that was not",
    }


def mask_input() -> io.Mask.Input:
    """The optional MASK every protect node takes."""
    return io.Mask.Input("mask", optional=True,
                         tooltip="Only pixels where the mask is > 0 may change. Same size as the image.")


def protect_outputs() -> list:
    """What every protect node returns: the protected image, the amplified perturbation, a report."""
    return [
        io.Image.Output("protected", display_name="protected", tooltip="The protected image(s)."),
        io.Image.Output("perturbation", display_name="perturbation",
                        tooltip="The perturbation, amplified for viewing: 0.5 + δ/(2ε)."),
        ReportType.Output("report", display_name="report", tooltip="Numbers for Protection Report."),
    ]


class Progress:
    """ComfyUI progress bar + preview + cancellation, as a PGD step callback."""

    def __init__(self, total: int, preview_every: int = 10):
        self.bar = comfy.utils.ProgressBar(max(total, 1))
        self.preview_every = max(1, preview_every)

    def __call__(self, step: int, total: int, x_adv: Tensor, record=None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview = None
        if step % self.preview_every == 0 or step == total:
            preview = ("JPEG", _to_pil(x_adv[0]), 512)
        self.bar.update_absolute(step, total, preview)


def _to_pil(x: Tensor):
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def device() -> torch.device:
    return comfy.model_management.get_torch_device()
