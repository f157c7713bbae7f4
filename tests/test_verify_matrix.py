"""Verify Matrix and the purifier / attacker set nodes, through real ComfyUI classes on CPU.

Tiny random SD1.5-shaped UNet + VAE, ComfyUI's own tiny ClipVisionModel and a tiny random
IP-Adapter (the ``world`` of tests/test_bridge.py); the judge is the real dlib recogniser and
the photos real fixture faces. Besides the LoRA and IP-Adapter attackers (random weights: they
generate no faces) the matrix gets a pass-through attacker that returns the purified photo
itself, so the identity numbers of its rows are real ones and clean and protected must differ.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from immunize.tests.test_bridge import _load, _write_ipadapter, world  # noqa: F401  (fixtures)
from immunize.tests.test_diffusion_nodes import tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SIZE = 128


@pytest.fixture(scope="module")
def judge(fixtures):
    from immunize.kernels.recognizers import load_face_recognizer

    path = fixtures / "models" / "faceapi" / "face_recognition_model.bin"
    if not path.is_file():
        pytest.skip(f"face-api recogniser not found at {path}")
    return load_face_recognizer(path)


@pytest.fixture(scope="module")
def photos(fixtures):
    """(clean, protected) IMAGE [1,128,128,3]: a fixture face and the same + ±8/255 noise."""
    import numpy as np
    from PIL import Image

    path = fixtures / "faces" / "george_clooney" / "1.png"
    if not path.is_file():
        pytest.skip(f"no fixture photo {path}")
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float().div(255).movedim(-1, 0)[None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    prot = (x + 8 / 255 * sign).clamp(0, 1)
    return x.movedim(1, -1).contiguous(), prot.movedim(1, -1).contiguous()


def _sets(world):
    """Purifiers JPEG 50 → Blur 1; attackers LoRA (2 steps) → IP-Adapter → the photo itself."""
    from immunize.nodes import verify_sets as V

    nodes = {n.GET_SCHEMA().node_id: n for n in V.NODES}
    patcher, cond = world["sd15"]
    ip = _load(_write_ipadapter(world, "sd15", "plus", name="vm-plus.safetensors", seed=3))
    with torch.inference_mode():
        (p,) = nodes["ImmunizePurifyJPEGSet"].execute(quality=50, label="").args
        (p,) = nodes["ImmunizePurifyGaussianBlurSet"].execute(sigma=1.0, kernel_size=0, label="", purifiers=p).args
        (a,) = nodes["ImmunizeLoRAFineTuneSet"].execute(
            model=patcher, vae=world["vae"], instance_conditioning=cond, rank=2, alpha=2.0, steps=2,
            learning_rate=1e-3, batch_size=1, t_min=0, t_max=999, seed=0, prior_weight=1.0, save_lora=False,
            lora_prefix="immunize/test", label="").args
        (a,) = nodes["ImmunizeApplyIPAdapterSet"].execute(
            model=patcher, ipadapter=ip, clip_vision=world["clip_vision"], weight=3.0, label="", attackers=a).args
    a = a + (V.Attacker("photo itself", lambda image: image, "image"),)
    return p, a


def test_set_nodes_chain_and_run_the_original_nodes(world, photos):
    from immunize.nodes.purify import ImmunizePurifyJPEG

    p, a = _sets(world)
    assert [x.label for x in p] == ["JPEG 50", "Blur 1"]
    assert [(x.label, x.kind) for x in a] == [("LoRA", "model"), ("IP-Adapter", "model"), ("photo itself", "image")]
    clean, _ = photos
    with torch.inference_mode():
        assert torch.equal(p[0].run(clean), ImmunizePurifyJPEG.execute(image=clean, quality=50).args[0])
        model = a[1].run(clean)
    assert model is not world["sd15"][0] and model.model is world["sd15"][0].model  # a patched clone


def test_matrix_rows_labels_grid_progress_and_clean_vs_protected(world, photos, judge):
    import comfy.utils
    from immunize.nodes.verify_matrix import ImmunizeVerifyMatrix

    p, a = _sets(world)
    clean, prot = photos
    patcher, cond = world["sd15"]
    neg = [[torch.zeros_like(cond[0][0]), {}]]
    ticks = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    record = lambda v, t, preview=None, **_: ticks.append((v, t))  # noqa: E731
    comfy.utils.set_progress_bar_global_hook(record)
    try:
        with torch.inference_mode():
            scores, grid = ImmunizeVerifyMatrix.execute(
                clean=clean, protected=prot, attackers=a, judge=judge, vae=world["vae"], positive=cond, negative=neg,
                latent_image={"samples": torch.zeros(2, 4, 8, 8)}, seed=0, steps=2, cfg=3.0, sampler_name="euler",
                scheduler="normal", min_face_confidence=0.9, brisque_model="", purifiers=p,
                protect_report=SimpleNamespace(attacked=(judge.name,))).args
    finally:
        hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(before)
    assert hook is record  # the matrix put the caller's hook back
    labels = [f"{ph} | {pu} | {at}" for ph in ("clean", "protected") for pu in ("none", "JPEG 50", "Blur 1")
              for at in ("LoRA", "IP-Adapter", "photo itself")]
    assert scores.names() == labels
    for row in scores.rows:
        assert "fdfr" in row.values and "brisque" in row.values, row.name
        assert any("white-box" in k for k in row.values), row.name  # the protect report's role reached the row
    # the random tiny models generate no faces; the photo itself keeps its face
    assert scores["clean | none | LoRA"].values["fdfr"] == 1.0
    ism = {r.name: next(v for k, v in r.values.items() if k.endswith("/ism_cosine")) for r in scores.rows
           if r.name.endswith("photo itself")}
    assert ism["clean | none | photo itself"] > 0.999  # the reference is the clean photo
    for pu in ("none", "JPEG 50", "Blur 1"):
        assert ism[f"clean | {pu} | photo itself"] != ism[f"protected | {pu} | photo itself"], pu
    # the grid: 6 rows (photo × purifier) of 3 cells; 2 samples per model cell, 1 photo for the last
    tile, gap = 128, 4
    assert grid.shape == (1, 6 * tile + 5 * gap, 5 * tile + 2 * 3 * gap, 3)
    clean_lora, prot_lora = grid[0, :tile, :2 * tile], grid[0, 3 * (tile + gap):3 * (tile + gap) + tile, :2 * tile]
    assert (clean_lora - prot_lora).abs().mean() > 1e-4  # the LoRA trained on the protected photo generates otherwise
    clean_ip = grid[0, :tile, 2 * tile + 3 * gap:4 * tile + 3 * gap]
    prot_ip = grid[0, 3 * (tile + gap):3 * (tile + gap) + tile, 2 * tile + 3 * gap:4 * tile + 3 * gap]
    assert (clean_ip - prot_ip).abs().mean() > 1e-5  # so does the IP-Adapter prompted with it
    total = 18 * 1000
    assert ticks and all(t == total for _, t in ticks) and ticks[-1][0] == total
    assert all(x <= y for (x, _), (y, _) in zip(ticks, ticks[1:])), "the matrix's bar went backwards"


def test_cancel_between_cells_and_clear_errors(world, photos, judge, monkeypatch):
    import comfy.model_management
    from immunize.nodes import verify_sets as V
    from immunize.nodes.verify_matrix import run_matrix

    clean, prot = photos
    ran = []
    attackers = (V.Attacker("photo itself", lambda image: ran.append(1) or image, "image"),)
    calls = [0]

    def interrupt():
        calls[0] += 1
        if calls[0] > 3:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt)
    kw = dict(vae=None, positive=None, negative=None, latent=None, seed=0, steps=1, cfg=1.0, sampler_name="euler",
              scheduler="normal")
    with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_matrix(clean, prot, (V.Purifier("a", lambda x: x), V.Purifier("b", lambda x: x)), attackers, judge, **kw)
    assert len(ran) < 6  # stopped before all cells ran
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'none' is always the first purifier"):
        run_matrix(clean, prot, (V.Purifier("none", lambda x: x),), attackers, judge, **kw)
    with pytest.raises(ValueError, match="two attackers are labelled 'x'"):
        run_matrix(clean, prot, None, (V.Attacker("x", None, "image"),) * 2, judge, **kw)
    with pytest.raises(ValueError, match="Attacker Set"):
        run_matrix(clean, prot, None, (), judge, **kw)
    with pytest.raises(ValueError, match="Purifier Set"):
        run_matrix(clean, prot, clean, attackers, judge, **kw)
