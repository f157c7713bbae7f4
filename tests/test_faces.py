"""Face detection on real photos and differentiable alignment (geometry, gradients, anti-aliasing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from immunize.kernels import faces, recognizers

PHOTOS = ["angelina_jolie/1.png", "george_clooney/2.png", "katy_perry/3.png"]


@pytest.fixture(scope="module")
def photos(fixtures):
    arr = [np.array(Image.open(fixtures / "faces" / p).convert("RGB")) for p in PHOTOS]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def found(photos):
    return faces.detect_faces(photos)


@pytest.fixture(scope="module")
def dlib(fixtures):
    return recognizers.load_faceapi_recognizer(fixtures / "models" / "faceapi" / "face_recognition_model.bin")


def test_detects_one_face_with_plausible_landmarks(found, photos):
    assert len(found) == len(PHOTOS)
    for fs in found:
        assert len(fs) == 1
        assert fs.landmarks.shape == (1, 5, 2) and fs.boxes.shape == (1, 4) and fs.probs.shape == (1,)
        assert fs.landmarks.dtype == torch.float32 and fs.probs[0] >= 0.9
        (le, re, nose, lm, rm) = fs.landmarks[0]
        x1, y1, x2, y2 = fs.boxes[0]
        assert le[0] < re[0] and lm[0] < rm[0]  # "left" = smaller x
        assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])  # eyes above nose above mouth
        assert (fs.landmarks[0, :, 0] > x1).all() and (fs.landmarks[0, :, 0] < x2).all()
        assert (fs.landmarks[0, :, 1] > y1).all() and (fs.landmarks[0, :, 1] < y2).all()


def test_detection_works_in_inference_mode_and_ignores_grad(photos, found, monkeypatch):
    # ComfyUI runs nodes inside inference mode: the detector may even be built there first
    monkeypatch.setattr(faces, "_MTCNN", None)
    with torch.inference_mode():
        again = faces.detect_faces(photos[:1].clone())
    assert not any(p.is_inference() for p in faces._MTCNN.parameters())
    assert torch.allclose(again[0].landmarks, found[0].landmarks)
    x = photos[:1].clone().requires_grad_(True)
    assert torch.allclose(faces.detect_faces(x)[0].landmarks, found[0].landmarks)


def test_no_face_gives_an_empty_set_and_bad_input_an_error(photos):
    grey = torch.full((1, 3, 128, 128), 0.5)
    (fs,) = faces.detect_faces(grey)
    assert len(fs) == 0 and fs.landmarks.shape == (0, 5, 2)
    chips, owner = faces.align_faces(grey, [fs], torch.rand(5, 2) * 100, 150)
    assert chips.shape == (0, 3, 150, 150) and owner.shape == (0,)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        faces.detect_faces(photos[0])


def test_similarity_transform_recovers_a_known_similarity():
    torch.manual_seed(0)
    src = torch.rand(4, 5, 2, dtype=torch.float64) * 200
    ang = torch.tensor([0.3, -1.2, 2.5, 0.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
    a = scale[:, None, None] * rot
    t = torch.tensor([[3.0, -7.0], [0.0, 0.0], [100.0, 5.0], [-20.0, 40.0]], dtype=torch.float64)
    dst = src @ a.transpose(-1, -2) + t[:, None]
    m = faces.similarity_transform(src, dst)  # batched
    assert m.shape == (4, 2, 3)
    assert torch.allclose(m[..., :2], a, atol=1e-9) and torch.allclose(m[..., 2], t, atol=1e-7)
    # a mirror image is fitted by a rotation, never a reflection
    m1 = faces.similarity_transform(src[0], src[0] * torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.linalg.det(m1[:, :2]) > 0


def test_align_is_identity_when_landmarks_are_the_template():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 150, 150)
    tmpl = recognizers.DLIB_TEMPLATE
    fs = faces.FaceSet(tmpl[None].clone(), torch.zeros(1, 4), torch.ones(1))
    chips, owner = faces.align_faces(img, [fs], tmpl, 150)
    assert torch.allclose(chips, img, atol=1e-4) and owner.tolist() == [0]


def test_align_undoes_rotation_and_keeps_order_device_dtype():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 150, 150, dtype=torch.float64)
    tmpl = recognizers.DLIB_TEMPLATE
    rotated = torch.rot90(img, 1, dims=(2, 3))  # 90° counter-clockwise: (x, y) -> (y, W-1-x)
    lm_rot = torch.stack([tmpl[:, 1], 149 - tmpl[:, 0]], -1)
    fs_plain = faces.FaceSet(tmpl[None].clone(), torch.zeros(1, 4), torch.ones(1))
    fs_two = faces.FaceSet(torch.stack([lm_rot, lm_rot]), torch.zeros(2, 4), torch.ones(2))
    batch = torch.cat([img, rotated])
    chips, owner = faces.align_faces(batch, [fs_plain, fs_two], tmpl, 150)
    assert chips.dtype == torch.float64 and chips.shape == (3, 3, 150, 150)
    assert owner.tolist() == [0, 1, 1]
    for k in range(3):
        assert torch.allclose(chips[k], img[0], atol=1e-6)
    with pytest.raises(ValueError, match="face sets"):
        faces.align_faces(batch, [fs_plain], tmpl, 150)


def _large_face(photos, found):
    """The first photo upscaled 4x (1024 px), its face then shrunk ~3.3x into a dlib chip."""
    big = F.interpolate(photos[:1], size=1024, mode="bicubic", align_corners=False).clamp(0, 1)
    fs = faces.FaceSet(found[0].landmarks * 4 + 1.5, found[0].boxes * 4 + 1.5, found[0].probs)
    return big, fs


def _grad_coverage(big, fs, dlib, antialias):
    x = big.clone().requires_grad_(True)
    chips, _ = faces.align_faces(x, [fs], dlib.template, dlib.chip_size, antialias=antialias)
    dlib(chips).square().sum().backward()
    x1, y1, x2, y2 = fs.boxes[0].round().long().tolist()
    g = x.grad[0].abs().sum(0)[y1:y2, x1:x2]
    return (g > 0).float().mean().item()


def test_gradient_reaches_every_pixel_of_a_large_face(photos, found, dlib):
    big, fs = _large_face(photos, found)
    m = faces.similarity_transform(fs.landmarks[0], dlib.template)
    assert 1 / math.sqrt(torch.linalg.det(m[:, :2])) > 3  # the face is shrunk more than 3x
    dense = _grad_coverage(big, fs, dlib, antialias=True)
    sparse = _grad_coverage(big, fs, dlib, antialias=False)
    assert dense > 0.8, dense  # the box also holds a little hair/neck outside the chip
    assert sparse < 0.5 * dense, (sparse, dense)


def test_large_and_small_copies_of_a_face_give_the_same_identity(photos, found, dlib):
    big, fs = _large_face(photos, found)
    with torch.no_grad():
        small, _ = faces.align_faces(photos[:1], found[:1], dlib.template, dlib.chip_size)
        large, _ = faces.align_faces(big, [fs], dlib.template, dlib.chip_size)
        d = dlib.distance(dlib(small), dlib(large))
    assert d.item() < 0.2, d  # far below the 0.6 threshold; different photos score ~0.4
