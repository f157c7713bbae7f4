"""insightface ArcFace recognisers (``glintr100.onnx``, ``w600k_r50.onnx``) as torch modules.

ComfyUI users of InstantID, PuLID and IP-Adapter FaceID keep insightface's model packs under
``models/insightface/models/<pack>/``: antelopev2's ``glintr100.onnx`` (IResNet-100 trained on
Glint360K) and buffalo_l's ``w600k_r50.onnx`` (IResNet-50 trained on WebFace600K). Both map a
112x112 aligned face to a 512-D embedding compared by cosine. :func:`load_onnx_recognizer`
turns such a file into a differentiable, frozen :class:`~kernels.recognizers.FaceRecognizer`:

    rec = load_onnx_recognizer("models/insightface/models/antelopev2/glintr100.onnx")
    chips, owner = align_faces(x_adv, faces, rec.template, rec.chip_size)
    emb = rec(chips)                      # [N,3,112,112] RGB in [0,1] -> [N,512], unit norm

The ONNX graph is read with ``onnx`` (protobuf; no pickle) and converted to a ``torch.fx``
module with ``onnx2torch``, so gradients reach the input pixels. Conventions, and why:

- **Chip and template.** 112x112 chips, with the five landmarks on the ArcFace template
  :data:`ARCFACE_TEMPLATE` (the one insightface's ``norm_crop`` estimates a similarity onto and
  then applies with ``cv2.warpAffine``). ``cv2.warpAffine`` maps destination pixel (x, y), with
  integer coordinates at pixel centres, to the source point ``M⁻¹·(x, y)`` in the same
  convention, and :func:`kernels.faces.align_faces` uses that same convention (pixel i's centre
  at i, in image and chip). So the template is used as published, **without a half-pixel
  shift**; ``tests/test_onnx_recognizer.py`` checks that a face whose landmarks already sit on
  the template comes out of ``align_faces`` unchanged, as it would from ``cv2.warpAffine`` with
  the identity. What remains is which detector places the landmarks: insightface aligns with
  SCRFD/RetinaFace points and we with facenet-pytorch's MTCNN (also pixel-centre coordinates).
  Any systematic offset between the two detectors is well under a pixel, far below MTCNN's own
  landmark noise, and was not measured here (no insightface detector is available offline).
- **Colour and scaling.** insightface feeds ``cv2.dnn.blobFromImages(bgr_images, 1/127.5,
  (112, 112), (127.5,)*3, swapRB=True)``: OpenCV images are BGR, ``swapRB=True`` swaps channels
  0 and 2, so the network sees **RGB**, NCHW, as ``(v − 127.5) / 127.5`` with v in [0,255]
  (blobFromImage subtracts the mean, then multiplies by the scale factor). Our chips are RGB in
  [0,1], hence ``(255·x − 127.5) / 127.5``. Older insightface models converted from MXNet do
  this normalisation inside the graph (their first nodes subtract and multiply), and
  insightface then feeds raw [0,255] values. It recognises them by a subtraction and a
  multiplication among the first eight nodes (it looks at node names; we look at op types,
  ``Sub`` and ``Mul``) and we then feed ``255·x`` (``normalises_inside``).
- **Comparison.** ``forward`` returns the L2-normalised embedding (insightface's
  ``normed_embedding``); distance = 1 − cos, same person iff distance < :data:`ARCFACE_THRESHOLD`
  = 0.70, i.e. cos > 0.30. Why 0.30: ArcFace embeddings of different people are typically
  nearly orthogonal (cos centred near 0, spread about ±0.1), so cos 0.30 should be a false-match
  rate of roughly the 1e-4 operating point these models are benchmarked at (IJB-C TAR@FAR=1e-4);
  insightface's own SCRFD+ArcFace demo calls cos ≥ 0.28 "the same person" (0.20–0.28 "likely"),
  and deepface's LFW-tuned ArcFace threshold is cosine distance 0.68 (cos 0.32). For a
  protection tool the lenient end of that range is the conservative one: a face counts as
  protected only once cos to the clean face has fallen to 0.30 or below. This threshold is
  taken from those sources, not fitted on real glintr100/w600k_r50 weights (none can be
  downloaded here).
- **Batches.** Some exports declare a fixed batch of 1 (``[1,3,112,112]``). The declared batch
  size of the graph input and output is made dynamic before conversion; at load time such a
  graph runs a batch of two and its second row is compared with the second chip run alone
  (three passes of the network: tens of seconds for an IResNet-100 on a busy shared 2-core
  CPU). Graphs declaring a dynamic batch and [N,512] output skip this check. If a graph cannot
  run batches (e.g. a Reshape with a hard-coded 1), ``forward`` runs the chips one at a time
  (``batched`` is False).

``kernels`` is pure torch: this module never imports ComfyUI. ``onnx`` and ``onnx2torch`` are
imported when a model is loaded (``onnxruntime`` is not needed at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recognizers import FaceRecognizer

PathLike = Union[str, Path]


# Own copies of two small helpers (recognizers.py's are private and may change).
def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _check_chips(chips: Tensor, size: int) -> None:
    if chips.dim() != 4 or chips.shape[1] != 3 or chips.shape[2] != size or chips.shape[3] != size:
        raise ValueError(f"expected face chips [N,3,{size},{size}] RGB in [0,1], got {tuple(chips.shape)}")

ARCFACE_CHIP_SIZE = 112
ARCFACE_EMBED_DIM = 512
# insightface's 5-point ArcFace template in 112x112 chip pixels (pixel centres at integers),
# in MTCNN's landmark order: left eye, right eye, nose tip, left / right mouth corner.
ARCFACE_TEMPLATE = torch.tensor([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])
ARCFACE_THRESHOLD = 0.70  # 1 − cos: same person iff cos > 0.30 (see the module docstring)

# File stem -> description of the insightface model packs that ship it.
KNOWN_MODELS = {
    "glintr100": "antelopev2, IResNet-100 trained on Glint360K",
    "w600k_r50": "buffalo_l, IResNet-50 trained on WebFace600K",
}


class ArcFaceOnnx(FaceRecognizer):
    """An insightface ArcFace ONNX model converted to torch: 112x112 chips -> 512-D, cosine.

    Attributes: ``net`` (the converted ``torch.fx`` module, raw embeddings), ``name``
    (``arcface-<file stem>``), ``normalises_inside`` (the graph standardises [0,255] input
    itself), ``batched`` (the graph runs batches; otherwise chips go through one at a time),
    ``source`` (the file it was loaded from).
    """

    name = "arcface"
    chip_size = ARCFACE_CHIP_SIZE
    metric = "cosine"
    threshold = ARCFACE_THRESHOLD
    centred = True

    def __init__(self, net: nn.Module, name: str, normalises_inside: bool = False,
                 batched: bool = True, source: str = ""):
        super().__init__(ARCFACE_TEMPLATE)
        self.net = net
        self.name = name
        self.normalises_inside = normalises_inside
        self.batched = batched
        self.source = source

    def _dtype(self) -> torch.dtype:
        for t in self.net.parameters():
            return t.dtype
        for t in self.net.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _standardise(self, chips: Tensor) -> Tensor:
        x = chips.to(self._dtype()) * 255.0
        return x if self.normalises_inside else (x - 127.5) / 127.5

    def _run(self, x: Tensor) -> Tensor:
        if self.batched or x.shape[0] <= 1:
            return self.net(x)
        return torch.cat([self.net(x[i:i + 1]) for i in range(x.shape[0])], 0)

    def raw_embedding(self, chips: Tensor) -> Tensor:
        """chips ``[N,3,112,112]`` RGB in [0,1] -> the network's output ``[N,512]``, not
        normalised (insightface's ``embedding``)."""
        _check_chips(chips, self.chip_size)
        return self._run(self._standardise(chips)).reshape(chips.shape[0], -1)

    def forward(self, chips: Tensor) -> Tensor:
        """chips ``[N,3,112,112]`` RGB in [0,1] -> embeddings ``[N,512]``, L2-normalised."""
        return F.normalize(self.raw_embedding(chips), dim=-1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", normalises_inside={self.normalises_inside}, "
                f"batched={self.batched}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_HINT = ("Use insightface's glintr100.onnx (antelopev2) or w600k_r50.onnx (buffalo_l), found under "
         "ComfyUI/models/insightface/models/<pack>/.")


def _dims(value_info) -> list:
    """ONNX ValueInfo -> list of dims: int (fixed), str (symbolic) or None (unknown)."""
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return []
    out = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _fmt(dims: list) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _fits(dims: list, expected: list) -> bool:
    """Whether declared dims can be ``expected`` (ints; None = any), unknown dims fit anything."""
    if len(dims) != len(expected):
        return False
    return all(e is None or not isinstance(d, int) or d == e for d, e in zip(dims, expected))


def _graph_io(model, name: str):
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]  # old exports list weights as inputs
    if len(inputs) != 1:
        raise ValueError(
            f"{name}: expected an ONNX face recogniser with one image input, found "
            f"{len(inputs)} inputs ({[i.name for i in inputs][:4]}). {_HINT}")
    if len(g.output) < 1:
        raise ValueError(f"{name}: the ONNX graph has no output. {_HINT}")
    return inputs[0], g.output[0]


def _free_batch(value_info) -> bool:
    """Make dim 0 of a graph input/output symbolic; True when it was a fixed size."""
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return False
    dims = t.tensor_type.shape.dim
    if not len(dims) or not dims[0].HasField("dim_value"):
        return False
    dims[0].dim_param = "N"  # a oneof: clears dim_value
    return True


def _unsupported_ops(model) -> list[str]:
    """Node types onnx2torch has no converter for, at this model's opset (empty if unknown)."""
    try:
        from onnx2torch.node_converters import get_converter
    except ImportError:  # layout of onnx2torch changed: conversion itself will report it
        return []
    opsets = {o.domain or "": o.version for o in model.opset_import}
    bad = []
    for node in model.graph.node:
        domain = node.domain or ""
        desc = node.op_type if not domain else f"{domain}::{node.op_type}"
        if domain not in opsets:
            bad.append(f"{desc} (domain {domain!r} not declared in opset_import)")
            continue
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=opsets[domain])
        except NotImplementedError:
            bad.append(f"{desc} (opset {opsets[domain]})")
    return list(dict.fromkeys(bad))


def _normalises_inside(model) -> bool:
    """MXNet-converted insightface models start with Sub and Mul nodes that standardise raw
    [0,255] input themselves (insightface then feeds them unnormalised values)."""
    first = [n.op_type for n in model.graph.node[:8]]
    return "Sub" in first and "Mul" in first


def load_onnx_recognizer(path: PathLike) -> ArcFaceOnnx:
    """Load an insightface ArcFace recogniser (``glintr100.onnx``, ``w600k_r50.onnx``, or any
    ONNX model mapping ``[N,3,112,112]`` to ``[N,512]``) as a frozen, differentiable
    :class:`ArcFaceOnnx` (eval mode, ``requires_grad=False``, built outside inference mode).

    The file is read with ``onnx`` only (protobuf, never pickle). Raises ValueError naming the
    file for: a missing file; a file that is not a (complete) ONNX model; an input that is not
    ``[*,3,112,112]`` or an output that is not ``[*,512]``; operators onnx2torch cannot convert
    (named). See the module docstring for the conventions (template, RGB, threshold, batches).

    Example:
        >>> rec = load_onnx_recognizer("models/insightface/models/buffalo_l/w600k_r50.onnx")
        >>> rec.name, rec.chip_size, rec.threshold
        ('arcface-w600k_r50', 112, 0.7)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ArcFace ONNX file not found: {path}. {_HINT}")
    name = path.name
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        raise ValueError(
            f"{name}: loading ONNX face recognisers needs the 'onnx' and 'onnx2torch' packages "
            f"({e}); pip install onnx onnx2torch") from e

    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(
            f"{name} is a Git LFS pointer (a small text file), not the model itself: download "
            f"the real file (git lfs pull, or the file's download link). {_HINT}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError on text / truncated files, OSError, ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            f"{name} is not a readable ONNX model (truncated, corrupt or another format: "
            f"{type(e).__name__}: {msg}). {_HINT}") from e
    if not model.HasField("graph") or not len(model.graph.node) or not len(model.opset_import):
        raise ValueError(
            f"{name} is not a complete ONNX model (graph with {len(model.graph.node)} nodes, "
            f"{len(model.opset_import)} opset imports; the file may be truncated or not ONNX). "
            f"{_HINT}")

    inp, out = _graph_io(model, name)
    in_dims, out_dims = _dims(inp), _dims(out)
    if in_dims and not _fits(in_dims, [None, 3, ARCFACE_CHIP_SIZE, ARCFACE_CHIP_SIZE]):
        raise ValueError(
            f"{name}: input {inp.name!r} has shape {_fmt(in_dims)}, expected [N,3,112,112] "
            f"(a 112x112 RGB ArcFace recogniser). {_HINT}")
    if out_dims and not _fits(out_dims, [None, ARCFACE_EMBED_DIM]):
        raise ValueError(
            f"{name}: output {out.name!r} has shape {_fmt(out_dims)}, expected [N,512] "
            f"(a 512-D ArcFace embedding). {_HINT}")

    bad = _unsupported_ops(model)
    if bad:
        raise ValueError(
            f"{name}: onnx2torch cannot convert these operators: {', '.join(bad)}. Only graphs "
            f"made of operators onnx2torch supports can be made differentiable. {_HINT}")

    inside = _normalises_inside(model)
    fixed_batch = _free_batch(inp) | _free_batch(out)
    declared = (in_dims[1:] == [3, ARCFACE_CHIP_SIZE, ARCFACE_CHIP_SIZE]
                and out_dims[1:] == [ARCFACE_EMBED_DIM])
    if fixed_batch:
        del model.graph.value_info[:]  # recomputed by onnx2torch's shape inference

    with torch.inference_mode(False):
        try:
            net = convert(model)
        except Exception as e:
            check = ""
            try:
                onnx.checker.check_model(model)
            except Exception as ce:  # noqa: BLE001 - only used to explain the failure
                check = f"; onnx.checker: {str(ce).splitlines()[0][:200]}"
            raise ValueError(
                f"{name}: onnx2torch could not convert the graph ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}{check}). {_HINT}") from e
        net = _freeze(net)
        stem = path.stem
        rec = ArcFaceOnnx(net, name=f"arcface-{stem}", normalises_inside=inside, source=str(path))
        _freeze(rec)
        _probe_batches(rec, name, fixed_batch, declared)
    return rec


def _probe_batches(rec: ArcFaceOnnx, name: str, fixed_batch: bool, declared: bool) -> None:
    """Check, by running the converted net, what the graph does not declare: that it gives a
    512-D output, and whether a graph exported with a fixed batch of 1 runs batches. Skipped
    (free) for graphs declaring a dynamic batch, [N,3,112,112] in and [N,512] out."""
    if not fixed_batch and declared:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, ARCFACE_CHIP_SIZE, ARCFACE_CHIP_SIZE, generator=g)
    with torch.no_grad():
        try:
            y2 = rec.raw_embedding(x)
        except Exception:  # noqa: BLE001 - a graph that only runs batch 1 is handled below
            y2 = None
        if y2 is not None and tuple(y2.shape) == (2, ARCFACE_EMBED_DIM) and not fixed_batch:
            return
        rec.batched = False
        try:
            # the second chip alone: a graph that assumes batch 1 (e.g. a Gather or Slice of
            # item 0) gets item 1 of a batch wrong, so this row is the one to compare
            y1 = rec.raw_embedding(x[1:])
        except Exception as e:
            raise ValueError(
                f"{name}: the converted model fails on a [1,3,112,112] input ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}). {_HINT}") from e
        if tuple(y1.shape) != (1, ARCFACE_EMBED_DIM):
            raise ValueError(
                f"{name}: the model's output has {y1.numel()} values per face, expected a "
                f"512-D embedding. {_HINT}")
        if y2 is not None and tuple(y2.shape) == (2, ARCFACE_EMBED_DIM):
            tol = 1e-4 * float(y1.abs().max()) + 1e-6
            rec.batched = bool((y2[1:] - y1).abs().max() <= tol)
