"""Loaders: face recognisers from models/face_recognition and models/facenet, OpenCLIP vision
towers from models/clip_vision. Local files only; nothing is ever downloaded."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..kernels.clip import ImageEncoder
from ..kernels.modules import load_state_dict_file
from ..kernels.recognizers import load_face_recognizer
from .common import Node, CATEGORY, MODEL_FOLDERS, FaceRecognizerType, register_model_folders

register_model_folders()


def _recognizer_files() -> list[str]:
    files = []
    for folder in MODEL_FOLDERS:
        files += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder)]
    return files


class LoadFaceRecognizer(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeLoadFaceRecognizer",
            display_name="Load Face Recognizer",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads a face recogniser: an insightface ArcFace .onnx (glintr100 of antelopev2, w600k_r50 of "
                "buffalo_l — the embeddings InstantID, PuLID and IP-Adapter FaceID inject) from models/insightface; "
                "the dlib ResNet in face-api.js format (face_recognition_model.bin with its weights manifest "
                "beside it) or a TF.js graph model (faceres.bin with faceres.json beside it) from "
                "models/face_recognition; facenet-pytorch InceptionResnetV1 weights from models/facenet."
            ),
            inputs=[
                io.Combo.Input("recognizer_name", options=_recognizer_files(),
                               tooltip="A file in models/insightface, models/face_recognition or models/facenet. "
                                       "Attack with some recognisers and judge with one the attack did not use."),
            ],
            outputs=[FaceRecognizerType.Output("recognizer", display_name="FACE_RECOGNIZER")],
        )

    @classmethod
    def execute(cls, recognizer_name) -> io.NodeOutput:
        folder, _, name = recognizer_name.partition("/")
        if folder not in MODEL_FOLDERS or not name:
            raise ValueError(f"recognizer_name {recognizer_name!r} should look like 'insightface/<file>', "
                             "'face_recognition/<file>' or 'facenet/<file>'.")
        path = folder_paths.get_full_path(folder, name)
        if path is None:
            raise ValueError(f"recognizer_name: {name!r} not found in models/{folder}. Put the file there "
                             "and refresh the node list.")
        return io.NodeOutput(load_face_recognizer(path))


class OpenClipVision:
    """An open_clip vision tower that core nodes can use like ComfyUI's CLIP_VISION.

    ``encode_image`` mirrors ``ClipVisionModel.encode_image`` (IMAGE [B,H,W,C] → an object with
    ``image_embeds``); ``immunize_encoder`` is the differentiable :class:`ImageEncoder`.
    """

    def __init__(self, encoder: ImageEncoder):
        self.immunize_encoder = encoder
        self.image_size = encoder.size
        self.image_mean, self.image_std = list(encoder.mean), list(encoder.std)

    def encode_image(self, image, crop=True):
        with torch.no_grad():
            emb = self.immunize_encoder(image.movedim(-1, 1))
        return _Output(image_embeds=emb.to(comfy.model_management.intermediate_device()))


class _Output(dict):
    __getattr__ = dict.__getitem__


def _open_clip_architectures() -> list[str]:
    import open_clip

    return open_clip.list_models()


class LoadOpenCLIP(Node):
    @classmethod
    def define_schema(cls):
        archs = _open_clip_architectures()
        return io.Schema(
            node_id="ImmunizeLoadOpenCLIP",
            display_name="Load OpenCLIP Vision",
            category=f"{CATEGORY}/loaders",
            description="Loads the vision tower of a local open_clip checkpoint (models/clip_vision) as CLIP_VISION.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="An open_clip checkpoint (.safetensors/.pt/.bin) in models/clip_vision."),
                io.Combo.Input("architecture", options=archs, default="ViT-H-14" if "ViT-H-14" in archs else archs[0],
                               tooltip="The open_clip architecture the checkpoint was trained with."),
            ],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, clip_name, architecture) -> io.NodeOutput:
        path = folder_paths.get_full_path("clip_vision", clip_name)
        if path is None:
            raise ValueError(f"clip_name: {clip_name!r} not found in models/clip_vision.")
        return io.NodeOutput(OpenClipVision(load_open_clip_vision(path, architecture)))


def load_open_clip_vision(path: str, architecture: str) -> ImageEncoder:
    """Build ``architecture`` without pretrained weights and load the vision tower from ``path``."""
    import open_clip

    sd = load_state_dict_file(path)
    sd = sd.get("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    if not visual:
        visual = sd  # a vision-tower-only checkpoint
    model = open_clip.create_model(architecture, pretrained=None)
    tower = model.visual
    try:
        missing, unexpected = tower.load_state_dict(visual, strict=False)
        problem = (f"{len(missing)} missing, {len(unexpected)} unexpected weights, e.g. "
                   f"{(list(missing) + list(unexpected))[:3]}") if missing or unexpected else None
    except RuntimeError as e:  # same names, other shapes
        problem = str(e).splitlines()[-1].strip()
    if problem:
        raise ValueError(
            f"clip_name {os.path.basename(path)!r} does not fit open_clip architecture {architecture!r} "
            f"({problem}). Pick the architecture it was trained with; for ComfyUI-format CLIP vision "
            "files use ComfyUI's own Load CLIP Vision node."
        )
    tower.eval().requires_grad_(False)
    cfg = getattr(tower, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(tower, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageEncoder(f"openclip-{architecture}", tower, lambda m, px: m(px), size=int(size),
                        mean=cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                        std=cfg.get("std", open_clip.OPENAI_DATASET_STD))


def as_image_encoder(clip_vision) -> ImageEncoder:
    """Any CLIP_VISION (ours or ComfyUI's ClipVisionModel) → a differentiable :class:`ImageEncoder`."""
    if isinstance(clip_vision, OpenClipVision):
        return clip_vision.immunize_encoder
    if hasattr(clip_vision, "model") and hasattr(clip_vision, "patcher"):
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        name = f"clip_vision-{type(clip_vision.model).__name__}"
        return ImageEncoder(name, clip_vision.model, _comfy_image_embeds, size=clip_vision.image_size,
                            mean=clip_vision.image_mean, std=clip_vision.image_std)
    raise ValueError(f"clip_vision: unsupported object {type(clip_vision).__name__}; use Load CLIP Vision "
                     "or Load OpenCLIP Vision.")


def _comfy_image_embeds(model, pixels):
    # ComfyUI's CLIP layers add residuals in place (x += attn(norm(x))), which autograd refuses
    # to differentiate; functionalize runs the same code with out-of-place ops.
    from torch.func import functionalize

    return functionalize(lambda px: model(pixel_values=px)[2])(pixels)


NODES = [LoadFaceRecognizer, LoadOpenCLIP]
