"""Efficacy on real weights: the dlib ResNet recogniser (face-api port) and real photos.

Judged by the recogniser's own decision rule (Euclidean distance, same person iff < 0.6),
never by raw cosine (dlib descriptors are not centred). The protected photos are scored the
way an attacker would: faces detected afresh *on the protected image*, aligned, embedded.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from immunize.kernels import metrics
from immunize.kernels.faces import align_faces, detect_faces
from immunize.kernels.identity import IdentityObjective
from immunize.kernels.pgd import PGDConfig, protect
from immunize.kernels.recognizers import load_face_recognizer


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def dlib(fixtures):
    path = fixtures / "models" / "faceapi" / "face_recognition_model.bin"
    if not path.is_file():
        pytest.skip(f"face-api recogniser not found at {path}")
    return load_face_recognizer(path)


@pytest.fixture(scope="module")
def photos(fixtures):
    ids = {d.name: sorted(d.glob("*.png")) for d in sorted((fixtures / "faces").iterdir()) if d.is_dir()}
    ids = {k: v for k, v in ids.items() if len(v) >= 2}
    if len(ids) < 2:
        pytest.skip("need at least two identities with two photos each")
    return ids


def _describe(rec, images: torch.Tensor) -> torch.Tensor:
    """Detect on these very images (as an attacker would), align, embed the largest face."""
    faces = detect_faces(images)
    assert all(len(f) > 0 for f in faces), "a face was not detected"
    faces = [type(f)(f.landmarks[:1], f.boxes[:1], f.probs[:1]) for f in faces]
    chips, _ = align_faces(images, faces, rec.template, rec.chip_size)
    with torch.no_grad():
        return rec(chips)


def test_identity_protection_defeats_the_real_recogniser(dlib, photos):
    names = sorted(photos)
    firsts = torch.stack([_load(photos[n][0]) for n in names])
    seconds = torch.stack([_load(photos[n][1]) for n in names])
    d_first, d_second = _describe(dlib, firsts), _describe(dlib, seconds)

    # the recogniser works: every identity's second photo matches its first photo ...
    same = dlib.distance(d_first, d_second)
    assert (same < dlib.threshold).all(), f"same-person distances {same.tolist()}"
    # ... and the typical different-person distance of the fixture set is what we must beat
    all_desc = torch.cat([d_first, d_second])
    owner = names + names
    diff = [float(dlib.distance(all_desc[i:i + 1], all_desc[j:j + 1]))
            for i, j in itertools.combinations(range(len(owner)), 2) if owner[i] != owner[j]]
    mean_diff = float(np.mean(diff))
    assert mean_diff > dlib.threshold

    result = protect(firsts, [IdentityObjective([dlib], stop_margin=1.7)],
                     PGDConfig(eps=8 / 255, step=0.005, iterations=200))
    prot = result.protected
    assert result.steps_run <= 200
    assert (metrics.linf_255(prot, firsts) <= 8 + 1e-4).all()
    psnr = metrics.psnr(prot, firsts)
    assert (psnr >= 32).all(), f"PSNR {psnr.tolist()}"

    d_prot = _describe(dlib, prot)
    moved = dlib.distance(d_prot, d_first)
    assert (moved > dlib.threshold).all(), f"clean↔protected distances {moved.tolist()}"
    assert (moved > mean_diff).all(), f"clean↔protected {moved.tolist()} vs different-person mean {mean_diff:.3f}"
    # and the protected photo no longer verifies against the person's other photo
    cross = dlib.distance(d_prot, d_second)
    assert (cross > dlib.threshold).float().mean() >= 0.75, f"protected↔second photo {cross.tolist()}"
    print(f"\nsteps {result.steps_run}, PSNR {psnr.min():.2f}–{psnr.max():.2f} dB, clean↔protected "
          f"{moved.min():.3f}–{moved.max():.3f} (different-person mean {mean_diff:.3f}), "
          f"protected↔second photo {cross.min():.3f}–{cross.max():.3f}")


def test_early_stop_uses_fewer_changes_than_the_full_budget(dlib, photos):
    """A target (early stop, and the loss saturating there) spends less of the budget than
    optimising without one (stop_margin 0: no target, no saturation)."""
    x = _load(photos[sorted(photos)[0]][0])[None]
    early = protect(x, [IdentityObjective([dlib], stop_margin=1.5)], PGDConfig(iterations=60))
    full = protect(x, [IdentityObjective([dlib], stop_margin=0.0)], PGDConfig(iterations=60, early_stop=False))
    assert early.stopped_early and early.steps_run < full.steps_run
    assert metrics.psnr(early.protected, x) > metrics.psnr(full.protected, x) + 1.0


def test_every_face_of_a_group_photo_is_protected(dlib, photos):
    """Two people side by side in one odd-sized image: both faces are found and both lose their
    identity; the background away from the faces is not touched."""
    names = sorted(photos)
    a, b = _load(photos[names[1]][0]), _load(photos[names[4]][0])
    group = torch.cat([a, b], dim=2)[:, 3:250, :][None]  # [1,3,247,512]
    result = protect(group, [IdentityObjective([dlib], stop_margin=1.5)], PGDConfig(iterations=80))
    faces = detect_faces(group)[0]
    assert len(faces) == 2
    # the attacker's view: each face detected afresh on the protected image, matched by position
    d_clean = {}
    for img, key in ((group, "clean"), (result.protected, "prot")):
        fs = detect_faces(img)[0]
        assert len(fs) == 2
        order = fs.boxes[:, 0].argsort()
        fs = type(fs)(fs.landmarks[order], fs.boxes[order], fs.probs[order])
        chips, _ = align_faces(img, [fs], dlib.template, dlib.chip_size)
        with torch.no_grad():
            d_clean[key] = dlib(chips)
    moved = dlib.distance(d_clean["prot"], d_clean["clean"])
    assert (moved > dlib.threshold).all(), moved.tolist()
    assert metrics.psnr(result.protected, group).item() >= 32
    changed = (result.protected != group).any(dim=1)[0]
    assert changed.float().mean() < 0.6
    assert not changed[:, :8].any() and not changed[:, -8:].any()  # left and right borders
