"""TF.js graph models as torch face recognisers: the real human-models recognisers (faceres,
faceres-deep, mobileface) on the real fixture photos, the interpreter's TF semantics on a tiny
hand-written graph, gradients to the pixels, and helpful errors on broken files."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from immunize.kernels import faces, tfjs_graph

HUMAN = Path("models") / "human-models"
ALL = ("faceres", "faceres-deep", "mobileface")
DIMS = {"faceres": 1024, "faceres-deep": 1024, "mobileface": 256}
USABLE = tuple(k for k in ALL if tfjs_graph.TFJS_RECOGNIZERS[k].usable)
# lower bounds a little under what bench/fit_tfjs_templates.py measured (see TFJS_RECOGNIZERS)
BOUNDS = {  # pair accuracy at rec.threshold, rank-1 (leave one out)
    "faceres": (0.96, 0.97),       # measured 0.986, 48/48
    "faceres-deep": (0.86, 0.95),  # measured 0.898, 48/48
    "mobileface": (0.93, 0.95),    # measured 0.956, 47/48
}


@pytest.fixture(scope="module")
def photos(fixtures):
    paths = sorted((fixtures / "faces").glob("*/*.png"))
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths]).float() / 255.0
    found = faces.detect_faces(imgs)
    assert all(len(f) == 1 for f in found), [len(f) for f in found]
    return imgs, found, [p.parent.name for p in paths]


@pytest.fixture(scope="module")
def recognizers(fixtures):
    return {k: tfjs_graph.load_tfjs_recognizer(fixtures / HUMAN / f"{k}.json", allow_unusable=True)
            for k in ALL}


@pytest.mark.parametrize("key", ALL)
def test_loads_as_the_protocol(recognizers, fixtures, key):
    rec = recognizers[key]
    spec = tfjs_graph.TFJS_RECOGNIZERS[key]
    assert rec.name == key and rec.metric == "cosine" and rec.centred is True
    assert rec.chip_size == spec.input_size and rec.threshold == spec.threshold and 0 < rec.threshold < 1
    assert rec.template.shape == (5, 2)
    assert (rec.template >= 0).all() and (rec.template < rec.chip_size).all()
    assert not rec.training and not any(p.requires_grad for p in rec.parameters())
    assert not any(b.requires_grad for b in rec.buffers())
    s = rec.chip_size
    with torch.no_grad():
        out = rec(torch.rand(2, 3, s, s))
    assert out.shape == (2, DIMS[key]) and out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=rf"\[N,3,{s},{s}\]"):
        rec(torch.rand(1, 3, s + 2, s + 2))
    if not spec.usable:  # not offered unless asked for
        with pytest.raises(ValueError, match="not offered"):
            tfjs_graph.load_tfjs_recognizer(fixtures / HUMAN / f"{key}.json")


def _pairs(desc: torch.Tensor, ids: list[str], threshold: float):
    d = F.normalize(desc, dim=1)
    cos = d @ d.T
    iu = torch.triu_indices(len(ids), len(ids), 1)
    same = torch.tensor([[a == b for b in ids] for a in ids])[iu[0], iu[1]]
    c = cos[iu[0], iu[1]]
    acc = (((1 - c) < threshold) == same).float().mean().item()
    cos.fill_diagonal_(-2)
    rank1 = float(np.mean([ids[i] == ids[j] for i, j in enumerate(cos.argmax(1).tolist())]))
    return c[same].mean().item(), c[~same].mean().item(), acc, rank1


@pytest.mark.parametrize("key", USABLE)
def test_usable_models_separate_identities(recognizers, photos, key):
    rec = recognizers[key]
    imgs, found, ids = photos
    with torch.no_grad():
        chips, owner = faces.align_faces(imgs, found, rec.template, rec.chip_size)
        desc = rec(chips)
    assert owner.tolist() == list(range(len(ids)))
    same, diff, acc, rank1 = _pairs(desc, ids, rec.threshold)
    assert same > diff + 0.2, (same, diff)
    assert acc >= BOUNDS[key][0], (key, acc)
    assert rank1 >= BOUNDS[key][1], (key, rank1)
    # the distance method agrees with the threshold's definition
    assert rec.distance(desc[:1], desc[:1]).item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_reach_the_pixels(recognizers, photos):
    imgs, found, _ = photos
    for key in [k for k in ("faceres", "mobileface") if k in USABLE]:  # one per graph family
        rec = recognizers[key]
        x = imgs[:2].clone().requires_grad_(True)
        with torch.no_grad():
            clean = rec(faces.align_faces(imgs[:2], found[:2], rec.template, rec.chip_size)[0])
        chips, _ = faces.align_faces(x, found[:2], rec.template, rec.chip_size)
        loss = F.cosine_similarity(rec(chips), clean + 0.01 * torch.randn_like(clean)).sum()
        loss.backward()
        g = x.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, key
        assert (g[0].abs() > 0).float().mean() > 0.1 and (g[1].abs() > 0).float().mean() > 0.1


# --- the interpreter on a tiny hand-written graph (inline Consts, no .bin) --------------------


def _const(name, arr):
    arr = np.asarray(arr)
    dt = "DT_INT32" if arr.dtype.kind == "i" else "DT_FLOAT"
    raw = arr.astype("<i4" if dt == "DT_INT32" else "<f4").tobytes()
    return {"name": name, "op": "Const", "attr": {"dtype": {"type": dt}, "value": {"tensor": {
        "dtype": dt, "tensorShape": {"dim": [{"size": str(s)} for s in arr.shape]},
        "tensorContent": base64.b64encode(raw).decode()}}}}


def _s(v: str) -> dict:
    return {"s": base64.b64encode(v.encode()).decode()}


def test_interpreter_follows_tf_semantics(tmp_path):
    """SAME with an asymmetric pad (odd pixel after), depthwise channel order, a fused conv,
    Mean and a fused matmul, against the same computation written directly in torch."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, 2, 4, generator=g)
    dw = torch.randn(3, 3, 4, 2, generator=g)
    b = torch.randn(8, generator=g)
    fc = torch.randn(8, 5, generator=g)
    conv_attr = {"strides": {"list": {"i": ["1", "2", "2", "1"]}}, "padding": _s("SAME"),
                 "data_format": _s("NHWC")}
    nodes = [
        {"name": "x", "op": "Placeholder", "attr": {"shape": {"shape": {"dim": [
            {"size": "-1"}, {"size": "6"}, {"size": "6"}, {"size": "2"}]}}}},
        _const("w", w.numpy()), _const("dw", dw.numpy()), _const("b", b.numpy()),
        _const("fc", fc.numpy()), _const("axes", np.array([1, 2], dtype=np.int32)),
        {"name": "c1", "op": "Conv2D", "input": ["x", "w"], "attr": conv_attr},
        {"name": "c2", "op": "FusedDepthwiseConv2dNative", "input": ["c1", "dw", "b"],
         "attr": {**conv_attr, "strides": {"list": {"i": ["1", "1", "1", "1"]}},
                  "fused_ops": {"list": {"s": [base64.b64encode(s).decode() for s in (b"BiasAdd", b"Relu")]}},
                  "num_args": {"i": "1"}}},
        {"name": "m", "op": "Mean", "input": ["c2", "axes"], "attr": {"keep_dims": {"b": False}}},
        {"name": "y", "op": "MatMul", "input": ["m", "fc"], "attr": {}},
    ]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"format": "graph-model", "modelTopology": {"node": nodes},
                                "weightsManifest": []}))
    model = tfjs_graph.read_tfjs_graph_model(path)
    net = tfjs_graph.TfjsGraph(model, "y")
    x = torch.randn(2, 6, 6, 2, generator=g)

    xc = F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1))  # 6 -> 3 with stride 2: one pixel after only
    y = F.conv2d(xc, w.permute(3, 2, 0, 1), stride=2)
    y = F.conv2d(F.pad(y, (1, 1, 1, 1)), dw.permute(2, 3, 0, 1).reshape(8, 1, 3, 3), groups=4)
    y = F.relu(y + b.view(1, -1, 1, 1)).mean((2, 3)) @ fc
    assert torch.allclose(net(x), y, atol=1e-5)


# --- errors -----------------------------------------------------------------------------------


def _copy(fixtures: Path, tmp_path: Path, key: str = "mobileface") -> Path:
    for ext in (".json", ".bin"):
        shutil.copy(fixtures / HUMAN / f"{key}{ext}", tmp_path / f"{key}{ext}")
    return tmp_path / f"{key}.json"


def test_truncated_or_missing_bin_is_named(fixtures, tmp_path):
    js = _copy(fixtures, tmp_path)
    binp = js.with_suffix(".bin")
    data = binp.read_bytes()
    binp.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"mobileface\.bin has \d+ bytes .*describes \d+.*truncated"):
        tfjs_graph.read_tfjs_graph_model(js)
    binp.unlink()
    with pytest.raises(ValueError, match=r"mobileface\.bin.*missing"):
        tfjs_graph.load_tfjs_recognizer(js)


def test_not_a_graph_model(fixtures, tmp_path):
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"format": "layers-model", "modelTopology": {"config": {}},
                                  "weightsManifest": []}))
    with pytest.raises(ValueError, match=r"layers\.json is not a TF\.js graph model \(format 'layers-model'\)"):
        tfjs_graph.read_tfjs_graph_model(layers)
    manifest = fixtures / "models" / "faceapi" / "face_recognition_model-weights_manifest.json"
    if manifest.is_file():  # a bare weights manifest (a JSON list)
        with pytest.raises(ValueError, match="not a TF.js graph model"):
            tfjs_graph.load_tfjs_recognizer(manifest)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not a readable JSON"):
        tfjs_graph.read_tfjs_graph_model(broken)


def test_unsupported_op_is_named(fixtures, tmp_path):
    js = _copy(fixtures, tmp_path)
    doc = json.loads(js.read_text())
    conv = next(n for n in doc["modelTopology"]["node"] if n["op"] == "Conv2D")
    conv["op"] = "Conv3DBackpropFilterV2"
    js.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"unsupported op\(s\) Conv3DBackpropFilterV2 .*{conv['name']}"):
        tfjs_graph.load_tfjs_recognizer(js, allow_unusable=True)


def test_recognised_by_its_graph_when_renamed(fixtures, tmp_path):
    js = _copy(fixtures, tmp_path)
    renamed = js.rename(tmp_path / "my-recogniser.json")  # still names mobileface.bin
    rec = tfjs_graph.load_tfjs_recognizer(renamed, allow_unusable=True)
    assert rec.name == "mobileface" and rec.chip_size == 112
