"""insightface ArcFace ONNX recognisers: an IResNet written here from the ArcFace paper's
description (insightface's parameter names, random weights and BatchNorm statistics) is exported
to ONNX like glintr100.onnx / w600k_r50.onnx, loaded through the real path
(kernels.onnx_recognizer.load_onnx_recognizer), and compared with onnxruntime; gradients reach
the image through kernels.faces.align_faces; wrong files give ValueErrors naming the file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx", reason="needs 'onnx' (pip install onnx onnx2torch onnxruntime)")
pytest.importorskip("onnx2torch", reason="needs 'onnx2torch' (pip install onnx onnx2torch onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="needs 'onnxruntime' (pip install onnxruntime)")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from immunize.kernels import faces  # noqa: E402
from immunize.kernels.onnx_recognizer import (  # noqa: E402
    ARCFACE_TEMPLATE, ARCFACE_THRESHOLD, ArcFaceOnnx, load_onnx_recognizer)
from immunize.kernels.recognizers import FaceRecognizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# IResNet (ArcFace paper, "improved residual" unit: BN-Conv-BN-PReLU-Conv-BN), insightface names
# --------------------------------------------------------------------------------------------

class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """112x112 -> 512: conv1-bn1-prelu, four stages (64..512 channels, each halving the size),
    bn2, dropout, flatten, fc over the 7x7x512 map, features BatchNorm1d. Default: IResNet-50
    (buffalo_l's w600k_r50); IResNet-100 (glintr100) is layers (3, 13, 30, 3). The small test
    nets keep this structure and these names with fewer blocks and channels (``width``)."""

    def __init__(self, layers=(3, 4, 14, 3), width=64):
        super().__init__()
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        cin = width
        for i, (n, cout) in enumerate(zip(layers, widths), 1):
            blocks = [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(cin * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        return self.features(self.fc(x))


class MxnetStyle(nn.Module):
    """A graph that standardises raw [0,255] input itself, as MXNet-converted models do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - 127.5) * 0.0078125)


def randomise(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.1 + 0.2 * torch.rand(m.weight.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
        if hasattr(net, "features"):
            net.features.weight.fill_(1.0)  # fixed to 1 in ArcFace training
    return net.eval()


def export(net: nn.Module, path, fixed_batch: bool, size: int = 112):
    x = torch.rand(1, 3, size, size)
    kw = {} if fixed_batch else {"dynamic_axes": {"input.1": {0: "None"}, "embedding": {0: "None"}}}
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.eval(), (x,), str(path), input_names=["input.1"],
                          output_names=["embedding"], opset_version=11, do_constant_folding=True,
                          dynamo=False, **kw)
    return path


def ort_embed(path, blob: np.ndarray, one_by_one: bool) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if one_by_one:
        return np.concatenate([sess.run(None, {name: blob[i:i + 1]})[0] for i in range(len(blob))])
    return sess.run(None, {name: blob})[0]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("insightface")
    net = randomise(IResNet((1, 1, 1, 1), width=16), seed=1)
    return {
        # fixed batch 1, as some exports declare
        "fixed": export(net, d / "w600k_r50.onnx", fixed_batch=True),
        "dynamic": export(net, d / "glintr100.onnx", fixed_batch=False),
        "mxnet": export(MxnetStyle(randomise(IResNet((1, 1, 1, 1), width=16), seed=2)), d / "mx.onnx", False),
        "net": net,
    }


@pytest.fixture(scope="module")
def chips():
    return torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(3))


def blob(chips: torch.Tensor, raw: bool = False) -> np.ndarray:
    """What insightface feeds: RGB NCHW, (v − 127.5)/127.5 for v in [0,255] (raw: v itself)."""
    v = chips.double().numpy() * 255.0
    return (v if raw else (v - 127.5) / 127.5).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Loading, agreement with onnxruntime, batches
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_matches_onnxruntime_batch_of_three(files, chips, kind):
    rec = load_onnx_recognizer(files[kind])
    assert isinstance(rec, ArcFaceOnnx) and isinstance(rec, FaceRecognizer)
    assert rec.batched  # the fixed batch dim was freed: a batch runs in one pass
    with torch.no_grad():
        raw = rec.raw_embedding(chips)
        emb = rec(chips)
    ref = ort_embed(files[kind], blob(chips), one_by_one=(kind == "fixed"))
    assert raw.shape == (3, 512) and ref.shape == (3, 512)
    assert rel_err(raw, ref) < 1e-4, rel_err(raw, ref)
    ref_n = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(emb.numpy() - ref_n).max() < 1e-4
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # and the same as the torch model it was exported from
    with torch.no_grad():
        src = files["net"](torch.from_numpy(blob(chips)))
    assert rel_err(raw, src) < 1e-4


def test_protocol_fields_and_names(files):
    rec = load_onnx_recognizer(files["fixed"])
    assert rec.name == "arcface-w600k_r50"
    assert load_onnx_recognizer(files["dynamic"]).name == "arcface-glintr100"
    assert rec.chip_size == 112 and rec.metric == "cosine" and rec.centred
    assert rec.threshold == ARCFACE_THRESHOLD == 0.70
    assert rec.template.shape == (5, 2)
    torch.testing.assert_close(rec.template, ARCFACE_TEMPLATE)
    assert not rec.normalises_inside
    assert not any(p.requires_grad for p in rec.parameters()) and not rec.training
    a, b = torch.randn(2, 512), torch.randn(2, 512)
    torch.testing.assert_close(rec.distance(a, b), 1 - F.cosine_similarity(a, b))
    with pytest.raises(ValueError, match=r"\[N,3,112,112\]"):
        rec(torch.rand(1, 3, 160, 160))


def test_graph_that_standardises_itself_gets_raw_pixels(files, chips):
    rec = load_onnx_recognizer(files["mxnet"])
    assert rec.normalises_inside and rec.name == "arcface-mx"
    with torch.no_grad():
        raw = rec.raw_embedding(chips)
    ref = ort_embed(files["mxnet"], blob(chips, raw=True), one_by_one=False)
    assert rel_err(raw, ref) < 1e-4


def test_fixed_batch_graph_that_cannot_batch_runs_one_by_one(tmp_path, chips):
    """A Reshape with a hard-coded batch of 1 survives freeing the input's batch dim: the loader
    measures that batches fail and falls back to one chip at a time."""
    w = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Reshape", ["p", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "shape"), numpy_helper.from_array(w, "w")])
    path = tmp_path / "fixed_reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    rec = load_onnx_recognizer(path)
    assert not rec.batched
    with torch.no_grad():
        raw = rec.raw_embedding(chips)
    assert rel_err(raw, ort_embed(path, blob(chips), one_by_one=True)) < 1e-4


# --------------------------------------------------------------------------------------------
# Alignment convention and gradients
# --------------------------------------------------------------------------------------------

def test_template_needs_no_half_pixel_shift():
    """align_faces uses cv2.warpAffine's convention (pixel centres at integers): a 112x112 image
    whose landmarks already sit on the ArcFace template comes back unchanged, as warpAffine
    with the identity matrix would return it."""
    img = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    fs = faces.FaceSet(ARCFACE_TEMPLATE.clone()[None], torch.tensor([[20.0, 30.0, 90.0, 110.0]]),
                       torch.ones(1))
    chip, _ = faces.align_faces(img, [fs], ARCFACE_TEMPLATE, 112)
    torch.testing.assert_close(chip, img, atol=3e-5, rtol=0)


def test_gradient_reaches_pixels_through_align_faces(files):
    g = torch.Generator().manual_seed(5)
    img = torch.rand(1, 3, 200, 180, generator=g)
    # a face about 1.3x the chip, rotated by 10 degrees, somewhere in the image
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
    lm = (ARCFACE_TEMPLATE - 56.0) @ rot.T * 1.3 + torch.tensor([95.0, 100.0])
    fs = faces.FaceSet(lm[None], torch.tensor([[20.0, 20.0, 170.0, 190.0]]), torch.ones(1))
    with torch.inference_mode():  # loaded as ComfyUI would, inside inference mode
        rec = load_onnx_recognizer(files["dynamic"])
    with torch.no_grad():
        ref = rec(faces.align_faces(img, [fs], rec.template, rec.chip_size)[0])
    x = (img + 0.01 * torch.randn(img.shape, generator=g)).clamp(0, 1).requires_grad_(True)
    chips, owner = faces.align_faces(x, [fs], rec.template, rec.chip_size)
    assert chips.shape == (1, 3, 112, 112) and owner.tolist() == [0]
    d = rec.distance(rec(chips), ref).sum()
    d.backward()
    grad = x.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the face region (landmark bounding box) gets gradient almost everywhere
    x0, y0 = lm.min(0).values.int().tolist()
    x1, y1 = lm.max(0).values.int().tolist()
    face = grad[0, :, y0:y1, x0:x1].abs().sum(0)
    assert (face > 0).float().mean() > 0.9


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def _tiny(path, in_shape, out_dim, op=None):
    """Conv-GlobalAveragePool-Flatten-Gemm graph (optionally with an extra elementwise op)."""
    rng = np.random.default_rng(1)
    nodes, x = [], "x"
    if op:
        nodes.append(helper.make_node(op, [x], ["x2"]))
        x = "x2"
    nodes += [helper.make_node("Conv", [x, "cw"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              helper.make_node("GlobalAveragePool", ["c"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((8, in_shape[1], 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.standard_normal((out_dim, 8)).astype(np.float32), "fw")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_tiny_valid_graph_loads(tmp_path):
    rec = load_onnx_recognizer(_tiny(tmp_path / "other.onnx", ["N", 3, 112, 112], 512))
    assert rec.name == "arcface-other" and rec(torch.rand(2, 3, 112, 112)).shape == (2, 512)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found.*glintr100.onnx"):
        load_onnx_recognizer(tmp_path / "glintr100.onnx")


def test_truncated_file(files, tmp_path):
    data = files["dynamic"].read_bytes()
    for frac in (0.5, 0.999):
        p = tmp_path / f"cut{frac}_w600k_r50.onnx"
        p.write_bytes(data[:int(len(data) * frac)])
        with pytest.raises(ValueError, match=p.name):
            load_onnx_recognizer(p)


def test_text_file_renamed_onnx(tmp_path):
    p = tmp_path / "glintr100.onnx"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 260665334\n")
    with pytest.raises(ValueError, match="glintr100.onnx is a Git LFS pointer"):
        load_onnx_recognizer(p)
    p.write_text("<html><body>Access denied</body></html>\n")
    with pytest.raises(ValueError, match="glintr100.onnx is not a readable ONNX model"):
        load_onnx_recognizer(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="glintr100.onnx"):
        load_onnx_recognizer(p)


def test_wrong_input_size(tmp_path):
    p = _tiny(tmp_path / "r50_128.onnx", ["N", 3, 128, 128], 512)
    with pytest.raises(ValueError, match=r"r50_128.onnx.*\[N,3,128,128\], expected \[N,3,112,112\]"):
        load_onnx_recognizer(p)
    p = _tiny(tmp_path / "gray.onnx", [1, 1, 112, 112], 512)
    with pytest.raises(ValueError, match=r"gray.onnx.*\[1,1,112,112\]"):
        load_onnx_recognizer(p)


def test_wrong_output_size(tmp_path):
    p = _tiny(tmp_path / "d128.onnx", ["N", 3, 112, 112], 128)
    with pytest.raises(ValueError, match=r"d128.onnx.*\[N,128\], expected \[N,512\]"):
        load_onnx_recognizer(p)


def test_operator_onnx2torch_cannot_convert(tmp_path):
    p = _tiny(tmp_path / "shrink.onnx", ["N", 3, 112, 112], 512, op="Shrink")
    with pytest.raises(ValueError, match=r"shrink.onnx: onnx2torch cannot convert.*Shrink"):
        load_onnx_recognizer(p)


# --------------------------------------------------------------------------------------------
# The real buffalo_l layout (IResNet-50: 3, 4, 14, 3 blocks)
# --------------------------------------------------------------------------------------------

def test_r50_layout_exports_and_loads(tmp_path, chips):
    """Full depth and names; channels divided by 8 (width 8) to keep the file and the test small:
    at the real width (174 MB) export, load and a batch of two took ~25 s on this busy 2-core CPU."""
    with torch.device("meta"):  # skip the default initialisation, randomise() sets everything
        net = IResNet((3, 4, 14, 3), width=8)
    net = randomise(net.to_empty(device="cpu"), seed=6)
    path = export(net, tmp_path / "w600k_r50.onnx", fixed_batch=False)
    rec = load_onnx_recognizer(path)
    convs = [m for m in rec.net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 24 + 4  # stem, two per block, four downsample shortcuts
    x = chips[:2].clone().requires_grad_(True)
    raw = rec.raw_embedding(x)
    assert rel_err(raw.detach(), ort_embed(path, blob(chips[:2]), one_by_one=False)) < 1e-4
    F.normalize(raw, dim=-1)[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.5
