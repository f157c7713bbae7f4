"""Face recognisers: the real dlib ResNet (face-api.js weights) on real photos, FaceNet loading
round trips with a randomly initialised InceptionResnetV1, and helpful errors on wrong files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from immunize.kernels import faces, recognizers

FACEAPI = Path("models") / "faceapi"
BIN = "face_recognition_model.bin"
MANIFEST = "face_recognition_model-weights_manifest.json"


@pytest.fixture(scope="module")
def dlib(fixtures):
    return recognizers.load_faceapi_recognizer(fixtures / FACEAPI / BIN)


def _load_photos(fixtures: Path):
    paths = sorted((fixtures / "faces").glob("*/*.png"))
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths]).float() / 255.0
    return imgs, [p.parent.name for p in paths], [p.stem for p in paths]


@pytest.fixture(scope="module")
def descriptors(fixtures, dlib):
    """dlib descriptors of all 48 fixture photos, detected and aligned by kernels.faces."""
    imgs, ids, stems = _load_photos(fixtures)
    found = faces.detect_faces(imgs)
    assert all(len(f) == 1 for f in found), [len(f) for f in found]
    with torch.no_grad():
        chips, owner = faces.align_faces(imgs, found, dlib.template, dlib.chip_size)
        desc = dlib(chips)
    assert owner.tolist() == list(range(len(ids)))
    return desc, ids, stems


def test_faceapi_model_is_the_protocol(dlib):
    assert dlib.name == "dlib-resnet (face-api)"
    assert dlib.chip_size == 150 and dlib.metric == "euclidean" and dlib.threshold == 0.6
    assert dlib.centred is False
    assert dlib.template.shape == (5, 2)
    assert not dlib.training and not any(p.requires_grad for p in dlib.parameters())
    out = dlib(torch.rand(3, 3, 150, 150))
    assert out.shape == (3, 128) and out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N,3,150,150\]"):
        dlib(torch.rand(1, 3, 160, 160))


def test_dlib_recognises_the_same_person_on_real_photos(descriptors, dlib):
    desc, ids, stems = descriptors
    index = {(i, s): k for k, (i, s) in enumerate(zip(ids, stems))}
    for person in sorted(set(ids)):
        d = dlib.distance(desc[index[(person, "1")]][None], desc[index[(person, "2")]][None])
        assert d.item() < 0.6, f"{person}: photo 2 does not match photo 1 (d={d.item():.3f})"

    dist = torch.cdist(desc, desc)
    iu = torch.triu_indices(len(ids), len(ids), 1)
    same = torch.tensor([[a == b for b in ids] for a in ids])[iu[0], iu[1]]
    d = dist[iu[0], iu[1]]
    # reference numbers from the fixture notes: ~0.39 same person, ~0.87 different persons
    assert 0.30 < d[same].mean() < 0.48, d[same].mean()
    assert 0.78 < d[~same].mean() < 0.95, d[~same].mean()
    accuracy = ((d < dlib.threshold) == same).float().mean()
    assert accuracy > 0.97, accuracy
    # descriptors of dlib are not centred: cosine similarity is high even across people
    cos = torch.nn.functional.cosine_similarity(desc[:, None], desc[None], dim=-1)[iu[0], iu[1]]
    assert cos[~same].mean() > 0.8


def test_gradients_reach_every_chip_pixel(dlib, descriptors):
    desc, _, _ = descriptors
    chips = torch.rand(2, 3, 150, 150, requires_grad=True)
    dlib.distance(dlib(chips), desc[:2]).sum().backward()
    g = chips.grad.abs().sum(1)
    assert torch.isfinite(chips.grad).all()
    # the stride-2 valid convolutions never read the last row/column or two (as in dlib)
    assert (g[:, :146, :146] > 0).float().mean() > 0.99


def test_distance_has_finite_gradient_where_pgd_starts(dlib):
    # PGD's first step evaluates the distance at x_adv == clean, i.e. at exactly zero
    chips = torch.rand(1, 3, 150, 150, requires_grad=True)
    ref = dlib(chips).detach()
    d = dlib.distance(dlib(chips), ref)
    assert d.item() == pytest.approx(0.0, abs=1e-5)
    d.sum().backward()
    assert torch.isfinite(chips.grad).all()


def test_loaded_in_inference_mode_still_gives_gradients(fixtures):
    # ComfyUI runs loaders inside torch.inference_mode(); the module must still be usable by PGD
    with torch.inference_mode():
        rec = recognizers.load_face_recognizer(fixtures / FACEAPI / BIN)
    chips = torch.rand(1, 3, 150, 150, requires_grad=True)
    rec(chips).sum().backward()
    assert chips.grad is not None and chips.grad.abs().sum() > 0


def test_faceapi_rejects_wrong_files(fixtures, tmp_path):
    src = fixtures / FACEAPI
    # a truncated .bin
    shutil.copy(src / MANIFEST, tmp_path / MANIFEST)
    (tmp_path / BIN).write_bytes((src / BIN).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="bytes.*do not belong together"):
        recognizers.load_faceapi_recognizer(tmp_path / BIN)

    # a manifest of another TF.js network
    other = [{"paths": ["x.bin"], "weights": [{"name": "dense/kernel", "shape": [4, 4], "dtype": "float32"}]}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not face-api.js's face recognition network"):
        recognizers.load_faceapi_recognizer(src / BIN, tmp_path / "other.json")

    # not JSON at all, and not a manifest
    (tmp_path / "bad.json").write_text("<html>")
    with pytest.raises(ValueError, match="not a readable JSON"):
        recognizers.load_faceapi_recognizer(src / BIN, tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="not a TF.js weights manifest"):
        recognizers.load_faceapi_recognizer(src / BIN, tmp_path / "dict.json")

    # a .bin with no manifest next to it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / BIN).write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights_manifest.json"):
        recognizers.load_faceapi_recognizer(lone / BIN)


def _tiny_facenet(tmp_path: Path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=True, num_classes=7).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_facenet_round_trips_through_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = _tiny_facenet(tmp_path)
    sd = net.state_dict()
    assert any(k.startswith("logits.") for k in sd)
    torch.save(sd, tmp_path / "facenet.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "facenet.safetensors"))

    recs = [recognizers.load_facenet(tmp_path / "facenet.pt"),
            recognizers.load_face_recognizer(tmp_path / "facenet.safetensors")]
    chips = torch.rand(2, 3, 160, 160)
    outs = []
    for rec in recs:
        assert isinstance(rec, recognizers.FaceNet)
        assert rec.chip_size == 160 and rec.template.shape == (5, 2)
        assert rec.metric == "cosine" and rec.centred is True
        assert not rec.training and not any(p.requires_grad for p in rec.parameters())
        for k, v in rec.net.state_dict().items():
            assert torch.equal(v, sd[k]), k
        with torch.no_grad():
            outs.append(rec(chips))
    assert outs[0].shape == (2, 512)
    assert torch.allclose(outs[0], outs[1])
    assert torch.allclose(outs[0].norm(dim=1), torch.ones(2), atol=1e-5)
    # same decision as Euclidean 1.1 on unit vectors
    assert recs[0].threshold == pytest.approx(1.1 ** 2 / 2, abs=1e-3)
    assert recs[0].distance(outs[0][:1], outs[0][:1]).item() == pytest.approx(0.0, abs=1e-6)

    x = chips.clone().requires_grad_(True)
    recs[0].distance(recs[0](x), outs[0].flip(0)).sum().backward()
    # FaceNet sees the central 160/1.38 ≈ 116 columns of the chip (the MTCNN box crop)
    g = x.grad.abs().sum(1)
    assert (g[:, :150, 30:130] > 0).float().mean() > 0.99  # valid stride-2 convs skip the last rows
    assert g[:, :, :15].abs().sum() == 0


def test_facenet_rejects_wrong_files(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.save(InceptionResnetV1(pretrained=None), tmp_path / "whole_model.pt")
    with pytest.raises(ValueError, match=r"state_dict\(\)"):
        recognizers.load_facenet(tmp_path / "whole_model.pt")

    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an InceptionResnetV1"):
        recognizers.load_facenet(tmp_path / "other.pth")

    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a valid .safetensors"):
        recognizers.load_facenet(tmp_path / "junk.safetensors")

    (tmp_path / "net.onnx").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"\.pt, \.pth or \.safetensors"):
        recognizers.load_facenet(tmp_path / "net.onnx")


def test_load_face_recognizer_dispatches_on_the_file(fixtures, tmp_path):
    src = fixtures / FACEAPI
    for path in (src / BIN, src / MANIFEST, src):
        assert isinstance(recognizers.load_face_recognizer(path), recognizers.DlibResNet)

    (tmp_path / "model.tflite").write_bytes(b"\0")
    with pytest.raises(ValueError, match="face_recognition_model.bin.*InceptionResnetV1"):
        recognizers.load_face_recognizer(tmp_path / "model.tflite")
    with pytest.raises(ValueError, match="not found"):
        recognizers.load_face_recognizer(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="exactly one face-api.js"):
        recognizers.load_face_recognizer(tmp_path)


def test_load_face_recognizer_dispatches_every_format(fixtures, tmp_path):
    """One entry point for every recogniser family: face-api (dlib), TF.js graph models (by the
    .bin with its graph .json beside it, or the .json), ArcFace ONNX, and clear errors."""
    from immunize.kernels.tfjs_graph import TfjsFaceRecognizer

    human = fixtures / "models" / "human-models"
    if not human.is_dir():
        pytest.skip(f"{human} not found")
    for f in ("faceres.json", "faceres.bin"):
        shutil.copyfile(human / f, tmp_path / f)
    by_bin = recognizers.load_face_recognizer(tmp_path / "faceres.bin")
    by_json = recognizers.load_face_recognizer(tmp_path / "faceres.json")
    assert isinstance(by_bin, TfjsFaceRecognizer) and isinstance(by_json, TfjsFaceRecognizer)
    assert by_bin.name == "faceres"
    # weights kept as buffers (no parameters): the scores still find its device and dtype
    from immunize.kernels.scores import embed_faces

    photo = _load_photos(fixtures)[0][:1]
    emb, owner = embed_faces(photo, faces.detect_faces(photo), by_bin)
    assert emb.shape == (1, 1024) and owner.tolist() == [0]
    assert isinstance(recognizers.load_face_recognizer(fixtures / FACEAPI / BIN), recognizers.DlibResNet)
    (tmp_path / "det_10g.onnx").write_bytes(b"not an onnx graph")
    pytest.importorskip("onnx2torch")
    with pytest.raises(ValueError, match="det_10g.onnx"):
        recognizers.load_face_recognizer(tmp_path / "det_10g.onnx")
    (tmp_path / "x.tflite").write_bytes(b"")
    with pytest.raises(ValueError, match="insightface ArcFace .onnx"):
        recognizers.load_face_recognizer(tmp_path / "x.tflite")
