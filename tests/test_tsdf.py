"""TSDF: detector poisoning against the real MTCNN on real photos, the diffusion-edit
interruption on a tiny SD1.5-shaped ComfyUI model, the two-stage scheme and its nodes.

Photo subset (to keep the suite fast, ~10 photos spread over identities): the first two photos
of the first two identities and the first photo of each of the six others (10 photos, 8
identities, all 256x256). The full 48-photo numbers are in the report of the change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from immunize.kernels import detector as D
from immunize.kernels import tsdf as T
from immunize.kernels.metrics import psnr
from immunize.kernels.pgd import PGDConfig, protect
from immunize.tests.test_diffusion_nodes import _image, _state, tiny  # noqa: F401  (module fixture)

EPS = 8 / 255


def _load(paths, size=None) -> torch.Tensor:
    imgs = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(imgs)


def _subset(fixtures: Path) -> list[Path]:
    ids = sorted(d for d in (fixtures / "faces").iterdir() if d.is_dir())
    out = []
    for k, d in enumerate(ids):
        files = sorted(d.glob("*.png"))
        out += files[:2] if k < 2 else files[:1]
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def photos(fixtures):
    return _load(_subset(fixtures))


@pytest.fixture(scope="module")
def mtcnn():
    from immunize.kernels.faces import _mtcnn

    return _mtcnn()


# --------------------------------------------------------------------------- detector kernel


def test_cascade_replays_mtcnn_exactly(photos, mtcnn):
    runs = D.mtcnn_cascade(mtcnn, photos)
    ref = D.detect_boxes(mtcnn, photos)
    for run, boxes in zip(runs, ref):
        # MTCNN.detect sorts by area (select_largest); the cascade keeps NMS order
        area = (run.boxes[:, 2] - run.boxes[:, 0]) * (run.boxes[:, 3] - run.boxes[:, 1])
        mine = run.boxes[torch.argsort(area, descending=True)]
        assert mine.shape == boxes.shape and torch.allclose(mine, boxes, atol=1e-3)
        assert len(run.rnet_in) >= len(run.onet_in) >= len(run.boxes) >= 1
        assert (run.probs > 0.7).all()


def test_crop_matrices_match_mtcnn_crops_and_carry_gradient():
    gen = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 100, 90, generator=gen) * 255).requires_grad_(True)
    boxes = torch.tensor([[10.3, 5.7, 60.2, 55.9], [-5.0, -3.0, 40.0, 38.0], [50.0, 60.0, 130.0, 140.0],
                          [0.5, 0.2, 89.9, 99.9], [20.0, 20.0, 21.0, 21.0]])
    many = D.crop_resize_many(img, boxes, 24)
    one = torch.cat([D.crop_resize(img, b.tolist(), 24) for b in boxes])
    assert many.shape == (5, 3, 24, 24)
    assert (many - one).abs().max() < 1e-3  # the same averages, summed in another order
    many[0].sum().backward()
    g = img.grad[0]
    # MTCNN's crop of (10.3, 5.7, 60.2, 55.9): truncated, rows y−1 … ey−1 = 4 … 54, columns 9 … 59
    assert g[4:55, 9:60].min() > 0
    assert g[:4].abs().sum() == 0 and g[:, :9].abs().sum() == 0 and g[55:].abs().sum() == 0
    assert g[:, 60:].abs().sum() == 0


def test_precision_recall_fdfr_on_known_boxes():
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
             torch.tensor([[20.0, 20.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    pred = [torch.tensor([[0.0, 0.0, 10.0, 9.0]]),  # IoU 0.9: found
            torch.tensor([[0.0, 0.0, 10.0, 6.0]]),  # IoU 0.6: misplaced
            torch.zeros(0, 4),  # missed
            torch.tensor([[1.0, 1.0, 5.0, 5.0]])]  # a false detection on an image without a face
    pr = D.detector_precision_recall(pred, truth, iou=0.7)
    assert (pr.true_positives, pr.predicted, pr.true) == (1, 3, 3)
    assert pr.precision == pytest.approx(1 / 3) and pr.recall == pytest.approx(1 / 3)
    assert D.fdfr(pred) == pytest.approx(0.25)
    assert D.missed_or_misplaced(pred, truth).tolist() == [False, True, True, False]
    assert D.miss_or_misplace_rate(pred, truth) == pytest.approx(2 / 3)
    assert D.detector_precision_recall(pred, truth, iou=0.5).true_positives == 2
    m = D.face_mask([torch.tensor([[2.0, 3.0, 5.0, 4.0]]), torch.zeros(0, 4)], 8, 8)
    assert m.shape == (2, 1, 8, 8) and m[0].sum() == 4 * 2 and m[1].sum() == 64


def test_masked_l2_and_success_rate():
    white, black = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert torch.allclose(T.masked_l2(white, black), torch.full((2,), 4.0))  # [−1, 1] range
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2] = 1
    a = black.clone()
    a[..., 2:] = 1  # differs only outside the mask
    assert torch.allclose(T.masked_l2(a, black, half), torch.zeros(2))
    assert torch.allclose(T.masked_l2(a, black), torch.full((2,), 2.0))
    assert T.distortion_success_rate(torch.tensor([0.01, 0.05, 0.2, 0.0])) == pytest.approx(0.5)
    assert T.ddim_timesteps(0.5, 2) == [499, 250] and T.ddim_timesteps(1.0, 1) == [999]
    with pytest.raises(ValueError, match="strength"):
        T.ddim_timesteps(0.0, 2)


# --------------------------------------------------------------------------- detector poisoning


def test_detector_poison_defeats_real_mtcnn_on_real_photos(photos, mtcnn):
    """ε = 8/255, ≤ 500 steps ("any": shrink the box, hide the face, then grow the box from a fresh
    start, twice), perturbation restricted to the face square grown by 1.3 (the only
    part MTCNN's face candidates read; it keeps PSNR ≥ 32 dB). Success = the real MTCNN on the
    saved 8-bit image finds no box with IoU ≥ 0.7 to the face it finds on the original."""
    truth = D.detect_boxes(mtcnn, photos)
    assert all(len(t) >= 1 for t in truth)
    mask = D.face_mask([D.square(t) for t in truth], *photos.shape[-2:], grow=1.3)
    obj = D.DetectorPoisonObjective(mode="any")
    start = time.time()
    res = protect(photos, [obj], PGDConfig(eps=EPS, step=1 / 255, iterations=500), mask=mask)
    seconds = time.time() - start
    prot = res.protected
    saved = torch.from_numpy(np.clip(255.0 * prot.numpy(), 0, 255).astype(np.uint8)).float() / 255
    assert torch.equal(saved, prot)  # what SaveImage writes
    assert (prot - photos).abs().max() <= EPS + 1e-6

    pred = D.detect_boxes(mtcnn, saved)
    rate = D.miss_or_misplace_rate(pred, truth)
    pr = D.detector_precision_recall(pred, truth)
    q = psnr(saved, photos)
    print(f"\n[detector poison] miss-or-misplace {rate:.0%} of {len(photos)}, FDFR {D.fdfr(pred):.0%}, "
          f"P/R@0.7 {pr.precision:.2f}/{pr.recall:.2f}, PSNR min {q.min():.2f} mean {q.mean():.2f} dB, "
          f"{res.steps_run} steps, {seconds:.0f} s")
    # measured: 8 of 10 in 189 s (7 of 10 when phases 3-4 grew towards 1.25/1.35 instead of
    # 1.6/2.0). Which of the hardest faces give way varies with the random draw and float
    # rounding, so the bound leaves one photo of room. The ≥ 80 % target is measured on all 48
    # fixture photos by bench/bench_detector_poison.py: 83-88 % over four draws. The unprotected
    # baseline is 0 of 10.
    assert rate >= 0.7, rate
    assert q.min() >= 32.0
    noisy = _random_sign(photos, EPS, 2)  # ±ε noise of the same budget does nothing
    assert D.miss_or_misplace_rate(D.detect_boxes(mtcnn, noisy), truth) == 0.0
    # the objective's own verdict agrees with the independent check
    assert torch.equal(res.final_logs["detector_poison/success"].bool(), D.missed_or_misplaced(pred, truth))


def test_detector_poison_any_starts_fresh_phases_from_scratch(photos):
    """Mode "any" walks ANY_PHASES at the steps ``switch_after``; a phase marked fresh (growing
    the box, the opposite of the first phase's shrinking) asks PGD to restart the images the real
    MTCNN still finds — here both, as the image never changes."""
    assert [fresh for _, _, fresh in D.ANY_PHASES] == [False, False, True, True]
    x = photos[:2]
    f = D.DetectorPoisonObjective(mode="any", switch_after=(1, 2, 3)).bind(x)
    outs = [f(x.clone().requires_grad_(True)) for _ in range(4)]
    assert outs[0].restart is None and outs[1].restart is None  # shrink → miss keeps δ
    assert outs[2].restart.tolist() == [True, True] and outs[3].restart.tolist() == [True, True]
    assert not outs[3].reached.any()


def test_detector_poison_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        D.DetectorPoisonObjective(mode="hide")
    grey = torch.full((1, 3, 96, 96), 0.5)
    with pytest.raises(ValueError, match="No face"):
        D.DetectorPoisonObjective().bind(grey)


# --------------------------------------------------------------------------- interruption (tiny SD1.5)


def _edit_objective(tiny, region="image", strength=0.5, steps=2, weight=1.0):
    from immunize.nodes.tsdf import ImmunizeInterruptionObjective

    patcher, cond = tiny["sd15"]
    with torch.inference_mode():  # as the executor runs nodes
        (objs,) = ImmunizeInterruptionObjective.execute(
            model=patcher, vae=tiny["vae"], edit_prompt=cond, strength=strength, steps=steps,
            region=region, weight=weight).args
    return objs


def _random_sign(clean: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """The unprotected baseline: ±ε noise of the same L∞ budget, saved as 8 bits."""
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.randint(0, 2, clean.shape, generator=gen).float() * 2 - 1) * eps
    from immunize.kernels.pgd import quantize_within_budget

    return quantize_within_budget(clean, (clean + noise).clamp(0, 1), eps, "linf")


def test_interruption_beats_random_noise_of_the_same_budget(tiny):
    """End to end through VAE encode → 2 DDIM steps of the UNet → VAE decode, on ComfyUI's own
    model classes (random tiny weights). Measured on fresh noise seeds, not those PGD used."""
    patcher, cond = tiny["sd15"]
    before = _state(patcher)
    objs = _edit_objective(tiny)
    assert len(objs) == 1
    clean = _image(h=48, w=40, b=2, seed=3).movedim(-1, 1).float().clone()
    with torch.inference_mode(False):
        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=1 / 255, iterations=25))
        edit = objs[0].build().pipelines[0]
        seeds = (1000, 1001, 1002)
        attacked = T.forgery_distortion([edit], clean, res.protected, seeds=seeds)
        noise = T.forgery_distortion([edit], clean, _random_sign(clean, EPS, 0), seeds=seeds)
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    curve = [float(r.logs["interruption/distortion"].mean()) for r in res.history]
    assert curve[-1] > curve[0]
    print(f"\n[interruption] L2_mask protected {attacked.tolist()} vs ±ε noise {noise.tolist()}")
    assert (attacked > 10.0 * noise).all(), (attacked, noise)  # measured: ~60–90x
    assert _state(patcher) == before


def test_inpainting_interruption_keeps_the_unmasked_latent_and_beats_noise(tiny):
    """The Interruption Objective with an inpaint mask: the forger repaints the left half only.
    Outside the mask the edit ends on the photo's own latent (so the forgery there is the VAE
    round trip), inside it is repainted; the protection still disrupts the inpainted forgery far
    more than ±ε noise does."""
    from immunize.nodes.tsdf import ImmunizeInterruptionObjective

    patcher, cond = tiny["sd15"]
    clean = _image(h=48, w=64, b=2, seed=5).movedim(-1, 1).float().clone()
    mask = torch.zeros(48, 64)
    mask[:, :32] = 1.0  # latent columns 0–3 repainted, 4–7 kept
    with torch.inference_mode():
        (objs,) = ImmunizeInterruptionObjective.execute(
            model=patcher, vae=tiny["vae"], edit_prompt=cond, strength=0.6, steps=2, region="image",
            weight=1.0, inpaint_mask=mask).args
    with torch.inference_mode(False):
        inpaint = objs[0].build(clean).pipelines[0]
        img2img = objs[0].build().pipelines[0]
        assert inpaint.inpaint_mask is not None and img2img.inpaint_mask is None
        with torch.no_grad():  # the edit's final latent (decode = identity) against the photo's own
            z0 = inpaint.encode(clean).float()
            z_inpaint = dataclasses.replace(inpaint, decode=lambda z: z)(clean, 7)
            z_plain = dataclasses.replace(img2img, decode=lambda z: z)(clean, 7)
        kept = (z_inpaint - z0)[..., 4:].abs().max()
        painted = (z_inpaint - z0)[..., :4].abs().mean()
        print(f"\n[inpaint] latent change: kept side max {float(kept):.2e}, repainted side mean {float(painted):.4f}, "
              f"img2img kept side mean {float((z_plain - z0)[..., 4:].abs().mean()):.4f}")
        assert kept < 1e-5  # outside the mask the edit ends on the photo's own latent
        assert painted > 0.05 and (z_plain - z0)[..., 4:].abs().mean() > 0.05
        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=1 / 255, iterations=25))
        seeds = (1000, 1001, 1002)
        attacked = T.forgery_distortion([inpaint], clean, res.protected, seeds=seeds)
        noise = T.forgery_distortion([inpaint], clean, _random_sign(clean, EPS, 0), seeds=seeds)
    print(f"[inpaint] L2 protected {attacked.tolist()} vs ±ε noise {noise.tolist()}")
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    assert (attacked > 10.0 * noise).all(), (attacked, noise)
    with pytest.raises(ValueError, match="inpaint_mask"):
        with torch.inference_mode():
            (bad,) = ImmunizeInterruptionObjective.execute(
                model=patcher, vae=tiny["vae"], edit_prompt=cond, strength=0.6, steps=2, region="image",
                weight=1.0, inpaint_mask=torch.ones(10, 10)).args
        bad[0].build(clean)


# --------------------------------------------------------------------------- two stages, nodes


@pytest.fixture(scope="module")
def small_photos(fixtures):
    """Two photos of different people at 128x128 (faces ~70 px), so the tiny SD model's VAE and
    UNet stay cheap on the CPU."""
    faces = fixtures / "faces"
    return _load([faces / "katy_perry" / "1.png", faces / "matt_damon" / "1.png"], size=128)


def test_two_stage_node_stays_in_budget_and_keeps_both_effects(tiny, small_photos, mtcnn, tmp_path, monkeypatch):
    from immunize.kernels.report import ProtectionReport
    from immunize.nodes.tsdf import (
        ImmunizeDetectorPoisonObjective, ImmunizeScoreTSDF, ImmunizeTwoStageProtect,
    )

    patcher, cond = tiny["sd15"]
    before = _state(patcher)
    interruption = _edit_objective(tiny, region="face")
    with torch.inference_mode():
        (poison,) = ImmunizeDetectorPoisonObjective.execute(mode="miss", weight=1.0).args
        image = small_photos.movedim(1, -1).contiguous()
        start = time.time()
        out = ImmunizeTwoStageProtect.execute(
            image=image, interruption=interruption, poison=poison, epsilon=8.0, inner_epsilon=8.0,
            interruption_strength=0.5, poison_strength=1.0, stage1_iterations=15,
            stage2_iterations=60, refine_iterations=10, step=1.0, seed=0)
        seconds = time.time() - start
    protected_img, view, report = out.args
    assert isinstance(report, ProtectionReport) and len(report.rows()) == 2
    clean = small_photos
    prot = protected_img.movedim(-1, 1).float()
    saved = torch.from_numpy(np.clip(255.0 * prot.numpy(), 0, 255).astype(np.uint8)).float() / 255
    assert torch.equal(saved, prot)
    assert (prot - clean).abs().max() <= EPS + 1e-6  # the user's ε, after 8-bit quantisation
    assert view.shape == protected_img.shape

    # poisoning: the real MTCNN on the saved image
    truth = D.detect_boxes(mtcnn, clean)
    hit = D.missed_or_misplaced(D.detect_boxes(mtcnn, saved), truth)
    # interruption: the same diffusion edit on fresh seeds, against ±ε noise of the same budget
    with torch.inference_mode(False):
        edit = interruption[0].build().pipelines[0]
        region = D.face_mask(truth, *clean.shape[-2:])
        seeds = (1000, 1001)
        dist = T.forgery_distortion([edit], clean, saved, region, seeds)
        noise = T.forgery_distortion([edit], clean, _random_sign(clean, EPS, 1), region, seeds)
    logs = report.result.final_logs
    print(f"\n[two-stage] {seconds:.0f} s, {report.result.steps_run} steps; poisoning: missed/misplaced "
          f"{hit.tolist()}; interruption L2_mask {[round(v, 4) for v in dist.tolist()]} vs ±ε noise "
          f"{[round(v, 5) for v in noise.tolist()]}; PSNR {[round(v, 2) for v in psnr(saved, clean).tolist()]}; "
          f"final logs {({k: [round(x, 4) for x in v.tolist()] for k, v in logs.items() if 'loss' not in k})}")
    assert hit.float().mean() >= 0.5
    assert (dist > 5.0 * noise).all(), (dist, noise)
    assert _state(patcher) == before

    # the score node on these images and their forgeries
    monkeypatch.setattr("folder_paths.get_output_directory", lambda: str(tmp_path))
    with torch.inference_mode(False), torch.no_grad():
        forged_clean = edit(clean, 7).clamp(0, 1)
        forged_prot = edit(saved, 7).clamp(0, 1)
    with torch.inference_mode():
        res = ImmunizeScoreTSDF.execute(
            clean=image, protected=protected_img, forged_clean=forged_clean.movedim(1, -1),
            forged_protected=forged_prot.movedim(1, -1), label="TSDF", filename_prefix="tsdf/scores")
    summary, scores = res.args
    assert "recall" in summary and "L2_mask" in summary
    files = list((tmp_path / "tsdf").glob("scores_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["poisoning"]["recall"] == pytest.approx(1.0 - float(hit.float().mean()))
    assert data["poisoning"]["fdfr_clean"] == 0.0
    assert len(data["interruption"]["distortion_l2_mask"]) == 2

    # the same numbers as a PROTECT_SCORES row, next to another score node's row, in Score Report
    from immunize.nodes.scores import ScoreQuality, ScoreReport

    with torch.inference_mode():
        (quality,) = ScoreQuality.execute(image=protected_img, reference=image, label="TSDF", brisque_model="",
                                          lpips_weights="").args
        (_, merged) = ImmunizeScoreTSDF.execute(
            clean=image, protected=protected_img, forged_clean=forged_clean.movedim(1, -1),
            forged_protected=forged_prot.movedim(1, -1), label="TSDF", filename_prefix="tsdf/scores",
            scores=quality).args
    row = scores["TSDF"].values
    assert row["tsdf/l2_mask"] == pytest.approx(data["interruption"]["mean_distortion_l2_mask"])
    assert row["tsdf/success_rate"] == data["interruption"]["success_rate"]
    assert row["detector/recall"] == pytest.approx(data["poisoning"]["recall"])
    assert row["detector/fdfr"] == data["poisoning"]["fdfr_protected"]
    assert merged.names() == ["TSDF"] and "psnr_db" in merged["TSDF"].values
    with torch.inference_mode():
        chart, table = ScoreReport.execute(scores=merged, filename_prefix="tsdf/report").args
    header = table.splitlines()[0].split(",")
    assert {"psnr_db", "tsdf/l2_mask", "detector/recall"} <= set(header)
    assert chart.shape[0] == 1 and chart.shape[-1] == 3


def test_bad_inputs_are_clear_errors(tiny):
    import comfy.supported_models as sm
    from immunize.nodes.tsdf import (
        ImmunizeDetectorPoisonObjective, ImmunizeInterruptionObjective, ImmunizeTwoStageProtect,
    )
    from immunize.tests.test_diffusion_nodes import _patcher

    patcher, cond = tiny["sd15"]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="mode"):
            ImmunizeDetectorPoisonObjective.execute(mode="hide", weight=1.0)
        with pytest.raises(ValueError, match="CONDITIONING"):
            ImmunizeInterruptionObjective.execute(model=patcher, vae=tiny["vae"], edit_prompt=[],
                                                  strength=0.5, steps=2, region="face", weight=1.0)
        with pytest.raises(ValueError, match="strength"):
            ImmunizeInterruptionObjective.execute(model=patcher, vae=tiny["vae"], edit_prompt=cond,
                                                  strength=0.0, steps=2, region="face", weight=1.0)
        cfg = sm.Flux(dict(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
            hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
            axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
        ))
        with pytest.raises(ValueError, match="Flux"):
            ImmunizeInterruptionObjective.execute(model=_patcher(cfg.get_model({})), vae=tiny["vae"],
                                                  edit_prompt=cond, strength=0.5, steps=2, region="face",
                                                  weight=1.0)
        (poison,) = ImmunizeDetectorPoisonObjective.execute(mode="misplace", weight=0.5).args
        (chained,) = ImmunizeDetectorPoisonObjective.execute(mode="miss", weight=1.0, objective=poison).args
        assert len(chained) == 2 and chained[0] is poison[0] and chained[0].mode == "misplace"
        image = _image(h=64, w=64)
        with pytest.raises(ValueError, match="interruption"):
            ImmunizeTwoStageProtect.execute(
                image=image, interruption=(), poison=poison, epsilon=8.0, inner_epsilon=8.0,
                interruption_strength=0.5, poison_strength=1.0, stage1_iterations=1, stage2_iterations=1,
                refine_iterations=1, step=1.0, seed=0)
        with pytest.raises(ValueError, match="mask"):
            ImmunizeTwoStageProtect.execute(
                image=image, interruption=poison, poison=poison, epsilon=8.0, inner_epsilon=8.0,
                interruption_strength=0.5, poison_strength=1.0, stage1_iterations=1, stage2_iterations=1,
                refine_iterations=1, step=1.0, seed=0, mask=torch.ones(32, 32))
    with pytest.raises(ValueError, match="interruption_strength"):
        T.TwoStageConfig(interruption_strength=0.0).validate()


def test_schemas(comfy):
    from immunize.nodes import tsdf

    for node in tsdf.NODES:
        schema = node.define_schema()
        assert schema.category == ("Immunize/attacker" if node is tsdf.ImmunizeDetectorCrop else "Immunize/tsdf")
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        if node.__name__.endswith("Objective"):
            assert info["output"] == ["PROTECT_OBJECTIVE"] and "objective" in info["input"]["optional"]
    info = tsdf.ImmunizeTwoStageProtect.GET_NODE_INFO_V1()
    assert info["output"] == ["IMAGE", "IMAGE", "PROTECT_REPORT"]
    assert tsdf.ImmunizeScoreTSDF.GET_NODE_INFO_V1()["output"] == ["STRING", "PROTECT_SCORES"]
