"""The nodes through real ComfyUI classes (vendored ComfyUI), called under
``torch.inference_mode()`` exactly as ComfyUI's executor calls them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(comfy, fixtures, tmp_path_factory):
    """ComfyUI folders in a temp dir: the real face-api recogniser in models/face_recognition."""
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    fr = base / "models" / "face_recognition"
    fr.mkdir(parents=True)
    for f in (fixtures / "models" / "faceapi").iterdir():
        shutil.copyfile(f, fr / f.name)
    (base / "models" / "facenet").mkdir()
    (base / "models" / "clip_vision").mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.models_dir = str(base / "models")
    for name, exts in (("face_recognition", {".bin"}), ("facenet", {".pt", ".pth", ".safetensors"}),
                       ("clip_vision", {".safetensors", ".pt", ".bin"})):
        folder_paths.folder_names_and_paths[name] = ([str(base / "models" / name)], exts)
    from immunize.nodes import identity, loaders, protect, report

    class NS:
        pass

    ns = NS()
    ns.base, ns.loaders, ns.identity, ns.protect, ns.report = base, loaders, identity, protect, report
    return ns


def _photo(fixtures, who="matt_damon", n=0) -> torch.Tensor:
    path = sorted((fixtures / "faces" / who).glob("*.png"))[n]
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()[None] / 255.0  # [1,H,W,3]


def _run(node, **kw):
    with torch.inference_mode():
        return node.execute(**kw)


@pytest.fixture(scope="module")
def recognizer(env):
    return _run(env.loaders.LoadFaceRecognizer, recognizer_name="face_recognition/face_recognition_model.bin").result[0]


def _identity(env, **kw):
    args = dict(weight=1.0, stop_margin=1.5, min_face_confidence=0.9, align_jitter=2.0)
    args.update(kw)
    return _run(env.identity.IdentityLoss, **args).result[0]


def _pgd(env, image, objective, **kw):
    args = dict(image=image, objective=objective, epsilon=8.0, step=1.275, iterations=40, norm="Linf",
                early_stop=True, random_start=False, seed=0)
    args.update(kw)
    return _run(env.protect.PGDProtect, **args).result


def test_load_through_comfyui_own_loader(comfy, tmp_path):
    """ComfyUI's custom-node loader imports the pack via comfy_entrypoint and registers every node."""
    import nodes as comfy_nodes

    link = tmp_path / "immunize_pack"
    link.symlink_to(ROOT, target_is_directory=True)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(link)))
    assert ok
    ours = {k for k in comfy_nodes.NODE_CLASS_MAPPINGS if k.startswith("Immunize")}
    assert {"ImmunizeLoadFaceRecognizer", "ImmunizeLoadOpenCLIP", "ImmunizeIdentityLoss",
            "ImmunizeDenoisingLoss", "ImmunizeEncoderAttack",
            "ImmunizePGDProtect", "ImmunizeProtectionReport"} <= ours
    for k in ours:  # every input has a tooltip
        schema = comfy_nodes.NODE_CLASS_MAPPINGS[k].GET_SCHEMA()
        assert schema.category.startswith("Immunize")
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{k}: inputs without tooltip {missing}"


def test_protect_real_face_within_budget_and_leaves_shared_model_alone(env, fixtures, recognizer):
    img = torch.cat([_photo(fixtures, "matt_damon"), _photo(fixtures, "katy_perry")])
    before = {k: v.clone() for k, v in recognizer.state_dict().items()}
    was_inference = next(recognizer.parameters()).is_inference()
    obj = _identity(env, recognizer=recognizer)
    protected, view, rep = _pgd(env, img, obj)

    assert protected.shape == img.shape and view.shape == img.shape
    q = protected * 255
    assert torch.equal(q, q.round())  # on the 8-bit grid
    assert (protected - img).abs().max() * 255 <= 8 + 1e-4
    assert (protected != img).any(dim=(1, 2, 3)).all()
    # the report's own numbers: a different person by dlib's rule, high PSNR
    rows = rep.rows()
    assert all(r["identity/dlib-resnet (face-api)/distance"] > 0.6 for r in rows), rows
    assert all(r["psnr_db"] > 32 for r in rows)
    # the cached, shared recogniser is untouched (same values, still what the loader made)
    after = recognizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(recognizer.parameters()).is_inference() == was_inference
    # inputs were not modified in place
    assert torch.equal(img, torch.cat([_photo(fixtures, "matt_damon"), _photo(fixtures, "katy_perry")]))


def test_report_node_writes_files_and_chart(env, fixtures, recognizer):
    img = _photo(fixtures, "jennifer_aniston")
    _, _, rep = _pgd(env, img, _identity(env, recognizer=recognizer), iterations=5)
    out = _run(env.report.ProtectionReportNode, report=rep, filename_prefix="immunize/test_report",
               recognizer=recognizer)
    chart = out.result[0]
    assert chart.dim() == 4 and chart.shape[-1] == 3 and chart.shape[1] > 100
    files = sorted((env.base / "output" / "immunize").glob("test_report_*"))
    data = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    row = data["images"][0]
    for key in ("psnr_db", "ssim", "linf_255", "identity/dlib-resnet (face-api)/distance",
                "check [white-box]/dlib-resnet (face-api)/distance"):
        assert row[key] is not None, key
    assert row["linf_255"] <= 8 + 1e-4
    assert len(data["loss_curves"]["total"]) == row["steps_run"]
    assert any(f.suffix == ".csv" for f in files)
    assert data["attacked"] == ["dlib-resnet (face-api)"]
    assert any("White-box: dlib-resnet (face-api) was attacked" in v for v in data["verdict"])
    assert any("No held-out recogniser judged" in v for v in data["verdict"])


def _tiny_comfy_clip_vision(tmp_path):
    """ComfyUI's own ClipVisionModel with a tiny config and random weights."""
    import comfy.clip_vision

    cfg = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 64, "intermediate_size": 64,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
           "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": 24}
    path = tmp_path / "tiny_clip_vision.json"
    path.write_text(json.dumps(cfg))
    with torch.inference_mode():
        cv = comfy.clip_vision.ClipVisionModel(str(path))
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in cv.get_sd().items()}
        cv.load_sd(sd)
    return cv


def test_comfy_clip_vision_gets_a_real_gradient(env, fixtures, tmp_path):
    cv = _tiny_comfy_clip_vision(tmp_path)
    img = _photo(fixtures)
    # ComfyUI's own preprocessing rounds pixels to 8 bits: its gradient is exactly zero
    import comfy.clip_vision

    x = img.clone().requires_grad_(True)
    comfy.clip_vision.clip_preprocess(x, size=64).sum().backward()
    assert x.grad.abs().sum() == 0
    obj = _identity(env, clip_vision=cv)
    protected, _, rep = _pgd(env, img, obj, iterations=5)
    sim = rep.result.final_logs
    key = next(k for k in sim if k.endswith("/similarity"))
    assert float(sim[key][0]) < 0.999, sim  # the embedding moved: gradients reached the pixels
    assert (protected - img).abs().max() * 255 <= 8 + 1e-4


def test_open_clip_loader_and_core_compatibility(env, fixtures, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg_path = tmp_path / "ImmunizeTinyViT.json"
    cfg_path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("ImmunizeTinyViT", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(env.base / "models" / "clip_vision" / "tiny_openclip.safetensors"))
    cv = _run(env.loaders.LoadOpenCLIP, clip_name="tiny_openclip.safetensors",
              architecture="ImmunizeTinyViT").result[0]
    img = _photo(fixtures)
    with torch.inference_mode():
        emb = cv.encode_image(img)["image_embeds"]  # what core nodes call
    assert emb.shape == (1, 16)
    ref = model.encode_image(torch.nn.functional.interpolate(
        ((img.movedim(-1, 1) - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
         / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)),
        size=(64, 64), mode="bicubic", antialias=True))
    assert torch.allclose(emb, ref, atol=1e-2)
    _, _, rep = _pgd(env, img, _identity(env, clip_vision=cv), iterations=3)
    sims = [v for k, v in rep.result.final_logs.items() if k.endswith("/similarity")]
    assert sims and float(sims[0][0]) < 0.9999

    # a checkpoint of another architecture: a clear error naming the fix
    with pytest.raises(ValueError, match="architecture"):
        _run(env.loaders.LoadOpenCLIP, clip_name="tiny_openclip.safetensors", architecture="RN50")


def test_chained_objectives_and_mask(env, fixtures, recognizer, tmp_path):
    cv = _tiny_comfy_clip_vision(tmp_path)
    img = _photo(fixtures)
    chain = _identity(env, recognizer=recognizer)
    chain = _identity(env, clip_vision=cv, objective=chain, weight=0.5)
    assert len(chain) == 2
    mask = torch.zeros(1, 256, 256)
    mask[:, 64:192, 64:192] = 1.0
    protected, _, rep = _pgd(env, img, chain, iterations=4, mask=mask)
    changed = (protected != img).any(dim=-1)[0]
    assert changed[64:192, 64:192].any() and not changed[:64].any() and not changed[192:].any()
    assert set(rep.result.history[0].losses) == {"identity", "identity#2"}


# ------------------------------------------------------------------ bad input: clear errors

def test_bad_inputs_give_actionable_errors(env, fixtures, recognizer, tmp_path):
    img = _photo(fixtures)
    obj = _identity(env, recognizer=recognizer)
    with pytest.raises(ValueError, match="mask.*size"):
        _pgd(env, img, obj, mask=torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="grayscale"):
        _pgd(env, img[..., :1], obj)
    with pytest.raises(ValueError, match="alpha"):
        _pgd(env, torch.cat([img, torch.ones_like(img[..., :1])], -1), obj)
    with pytest.raises(ValueError, match="/255"):
        _pgd(env, img, obj, epsilon=0.0)
    with pytest.raises(ValueError, match="No face found"):
        _pgd(env, torch.full_like(img, 0.5), obj)
    with pytest.raises(ValueError, match="smaller than"):
        _pgd(env, img[:, :100, :100], obj)
    with pytest.raises(ValueError, match="recognizer"):
        _run(env.identity.IdentityLoss, weight=1.0, stop_margin=1.5, min_face_confidence=0.9)
    # a checkpoint of the wrong format in models/facenet
    bad = env.base / "models" / "facenet" / "not_facenet.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError) as e:
        _run(env.loaders.LoadFaceRecognizer, recognizer_name="facenet/not_facenet.pt")
    assert "InceptionResnetV1" in str(e.value) or "FaceNet" in str(e.value)


def test_cancel_stops_between_steps(env, fixtures, recognizer):
    import comfy.model_management as mm

    img = _photo(fixtures)
    obj = _identity(env, recognizer=recognizer, stop_margin=0.0)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _pgd(env, img, obj, iterations=50)
    finally:
        mm.interrupt_current_processing(False)


def test_pgd_protect_never_returns_an_unprotected_image_as_success(env, fixtures, recognizer):
    """The cases that used to come back with a success status and the input's pixels."""
    from immunize.kernels.errors import EmptyBatchError, ProtectionFailed

    img = _photo(fixtures)
    obj = _identity(env, recognizer=recognizer)
    with pytest.raises(ProtectionFailed, match="no pixel to change"):
        _pgd(env, img, obj, mask=torch.zeros(1, 256, 256))
    # Load Image's MASK of a cut-out portrait is 1 outside the face only: the recogniser's
    # gradient never reaches pixels there far from the face, so nothing may change
    cutout = torch.zeros(1, 256, 256)
    cutout[:, :8, :8] = 1.0
    with pytest.raises(ProtectionFailed, match=r"image\(s\) \[0\] came out unchanged.*mask"):
        _pgd(env, img, obj, mask=cutout, iterations=3)
    with pytest.raises(ProtectionFailed, match="came out unchanged"):  # run directly: the node refuses it at queue time
        _pgd(env, img, obj, iterations=0)
    with pytest.raises(ValueError, match="step must be a finite number"):
        _pgd(env, img, obj, step=float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite pixel"):
        _pgd(env, img * float("nan"), obj)
    with pytest.raises(EmptyBatchError, match="empty"):
        _pgd(env, img[:0], obj)


def test_bad_widget_values_fail_at_queue_time(env):
    """validate_inputs (what ComfyUI runs when a prompt is queued) names every bad widget value,
    including the ones ComfyUI's own min/max check lets through (NaN, V3 combos)."""
    v = env.protect.PGDProtect.validate_inputs
    good = dict(epsilon=8.0, step=1.275, iterations=200, norm="Linf", early_stop=True, random_start=False, seed=0,
                image=None, objective=None)
    assert v(**good) is True
    for bad, message in [({"epsilon": 0.5}, "'epsilon' is 0.5, below its minimum 1.0"),
                         ({"epsilon": 40.0}, "'epsilon' is 40.0, above its maximum 32.0"),
                         ({"step": float("nan")}, "'step' is nan: use a finite number"),
                         ({"epsilon": float("inf")}, "'epsilon' is inf"),
                         ({"iterations": 0}, "'iterations' is 0, below its minimum 1"),
                         ({"iterations": 2.5}, "'iterations' must be a whole number"),
                         ({"norm": "L3"}, "'norm' is 'L3', not one of the choices ('Linf', 'L2')"),
                         ({"early_stop": "yes"}, "'early_stop' must be true or false"),
                         ({"seed": "7"}, "'seed' must be a number")]:
        assert message in v(**{**good, **bad}), bad
    missing = env.loaders.LoadFaceRecognizer.validate_inputs(recognizer_name="face_recognition/nothing.bin")
    assert "'recognizer_name' is 'face_recognition/nothing.bin', not one of the choices" in missing
    assert "refresh" in missing
