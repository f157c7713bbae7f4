"""End to end: a real ComfyUI server (headless, CPU) with the pack loaded, driven over HTTP.

One server per module (``scripts/engine.py`` over a temporary base directory) with the real
face-api recogniser from the shared fixtures in ``models/face_recognition/``. Every API-format
workflow in ``workflows/api/`` is queued with a real fixture face photo as its input and a few
PGD iterations, and its saved outputs are checked: the protected PNG stays within the
workflow's ε budget in 8-bit values, and the report files exist.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# IMMUNIZE_WORKFLOWS_DIR runs another folder of API workflows (e.g. one being written).
WORKFLOWS = sorted(Path(os.environ.get("IMMUNIZE_WORKFLOWS_DIR", ROOT / "workflows" / "api")).glob("*.json"))
E2E_ITERATIONS = 5
PROMPT_TIMEOUT_S = 600
EXPECTED_NODES = (
    "ImmunizeLoadFaceRecognizer",
    "ImmunizeIdentityLoss",
    "ImmunizePGDProtect",
    "ImmunizeProtectionReport",
)


def _load_engine_module():
    name = "immunize_engine"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "engine.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


engine_mod = _load_engine_module()


TINY_CHECKPOINT = "immunize_tiny_sd15.safetensors"
RANDOM_CLIP_VISION = "immunize_random_clip_vit_l.safetensors"
TINY_IPADAPTER = "immunize_tiny_ip-adapter-plus-face.safetensors"
# node type → {input: largest value an end-to-end run uses} (tiny models, CPU, CI budget)
E2E_CAPS = {
    "ImmunizePGDProtect": {"iterations": E2E_ITERATIONS},
    "ImmunizeLoRAFineTune": {"steps": 3},
    "ImmunizeEditImage": {"steps": 2},
    "ImmunizePurifySDEdit": {"steps": 2},
    "ImmunizePurifyGrIDPure": {"steps": 2, "iterations": 1},
    "ImmunizePurifyIMPRESS": {"steps": 2},
    "ImmunizePurifyAdverseCleaner": {"bilateral_iterations": 2, "guided_iterations": 1},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "ImmunizeDetectorCrop": {"size": 64},
    "ImmunizeTwoStageProtect": {"stage1_iterations": 3, "stage2_iterations": 3, "refine_iterations": 2},
    "ImmunizeBackdoorScan": {"seeds": 2, "steps": 2, "width": 64, "height": 64},
    "ImmunizeSpatialAttentionUnlearning": {"steps": 3, "width": 64, "height": 64, "pool_seeds": 1, "sample_steps": 2},
    "ImmunizeVerifyMatrix": {"steps": 2}, "ImmunizeLoRAFineTuneSet": {"steps": 3}, "ImmunizeEditImageSet": {"steps": 2},
    "ImmunizePurifySDEditSet": {"steps": 2}, "ImmunizePurifyGrIDPureSet": {"steps": 2, "iterations": 1},
    "ImmunizePurifyIMPRESSSet": {"steps": 2}, "ImmunizePurifyAdverseCleanerSet": {"bilateral_iterations": 2, "guided_iterations": 1},
}


def _random_models(eng) -> None:
    """Random-weight models the workflows need, in the engine's model folders: a tiny SD1.5
    checkpoint ComfyUI's loader detects, a CLIP-L vision model and an IP-Adapter that fits
    them (built in-process with the vendored ComfyUI's classes, then served as files)."""
    from immunize.tests import tiny_checkpoint as tiny

    types = {n["class_type"] for w in WORKFLOWS for n in engine_mod.load_workflow(w).values()}
    if not types & {"CheckpointLoaderSimple", "CLIPVisionLoader", "ImmunizeLoadIPAdapter"}:
        return
    comfy_dir = str(engine_mod.find_comfyui())
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    ckpt = tiny.make_tiny_sd15_checkpoint(eng.models_dir("checkpoints") / TINY_CHECKPOINT)
    if "CLIPVisionLoader" in types:
        tiny.make_random_clip_vision_vitl(eng.models_dir("clip_vision") / RANDOM_CLIP_VISION)
    if "ImmunizeLoadIPAdapter" in types:
        tiny.make_tiny_ipadapter(eng.models_dir("ipadapter") / TINY_IPADAPTER, ckpt)


def _face_photos(fixtures: Path) -> list[Path]:
    photos = sorted((fixtures / "faces").glob("*/*.png"))
    if not photos:
        pytest.skip(f"no face photos under {fixtures / 'faces'}")
    return photos


def serve_recognizers(eng, fixtures: Path) -> None:
    """The real recognisers the workflows load, into the engine's models/face_recognition: dlib
    (face-api) and the demo's FaceRes and MobileFace (TF.js graph models)."""
    dest = eng.models_dir("face_recognition")
    for f in (fixtures / "models" / "faceapi").iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    human = fixtures / "models" / "human-models"
    for name in ("faceres.json", "faceres.bin", "mobileface.json", "mobileface.bin"):
        if (human / name).is_file():
            shutil.copyfile(human / name, dest / name)


@pytest.fixture(scope="module")
def engine(fixtures, tmp_path_factory):
    if engine_mod.find_comfyui() is None:
        pytest.skip("ComfyUI is not installed: run scripts/setup.sh or set COMFYUI_DIR")
    faceapi = fixtures / "models" / "faceapi"
    if not (faceapi / "face_recognition_model.bin").is_file():
        pytest.skip(f"face-api recogniser not found in {faceapi}")
    eng = engine_mod.Engine(tmp_path_factory.mktemp("engine"))
    eng.prepare()
    serve_recognizers(eng, fixtures)
    _random_models(eng)
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def object_info(engine):
    return engine.object_info()


def test_server_lists_pack_nodes(engine, object_info):
    failures = engine.import_failures()
    assert not failures, "the pack failed to import:\n" + "\n".join(failures) + "\n" + engine._tail(80)
    assert engine.pack_loaded(), "the start-up log does not list the pack as imported:\n" + engine._tail(80)
    ours = sorted(k for k in object_info if k.startswith("Immunize"))
    assert ours, "no Immunize* nodes in /object_info"
    missing = [n for n in EXPECTED_NODES if n not in object_info]
    assert not missing, f"missing nodes {missing}; have {ours}"
    for node_id in ours:
        assert object_info[node_id]["category"].startswith("Immunize"), node_id
    # The face-api recogniser copied into models/face_recognition is offered by the loader.
    options = _combo_options(object_info["ImmunizeLoadFaceRecognizer"], "recognizer_name")
    assert any("face_recognition_model" in o for o in options), options


# ------------------------------------------------------------------ workflows
def _combo_options(info: dict, name: str) -> list[str] | None:
    """The allowed values of a combo input in /object_info (legacy list or V3 COMBO), else None."""
    for group in ("required", "optional"):
        spec = info.get("input", {}).get(group, {}).get(name)
        if not spec:
            continue
        kind = spec[0]
        if isinstance(kind, list):
            return [str(o) for o in kind]
        if kind == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(o) for o in spec[1].get("options", [])]
    return None


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _upstream_load_image(wf: dict, node_id: str, input_name: str) -> tuple[str | None, bool]:
    """The LoadImage node feeding *node_id*.*input_name*, and whether it is linked directly."""
    link = wf[node_id]["inputs"].get(input_name)
    if not _is_link(link):
        return None, False
    src = link[0]
    if wf[src]["class_type"] == "LoadImage":
        return src, True
    seen, todo = set(), [src]
    while todo:
        n = todo.pop()
        if n in seen or n not in wf:
            continue
        seen.add(n)
        if wf[n]["class_type"] == "LoadImage":
            return n, False
        todo += [v[0] for v in wf[n].get("inputs", {}).values() if _is_link(v)]
    return None, False


def _prepare_workflow(wf: dict, engine, object_info: dict, photos: list[Path]) -> dict[str, Path]:
    """Point LoadImage nodes at fixture photos, shorten PGD, resolve model names; returns
    {LoadImage node id: the photo it now loads}."""
    inputs: dict[str, Path] = {}
    for i, (node_id, node) in enumerate(engine_mod.nodes_of(wf, "LoadImage")):
        photo = photos[(i * 7) % len(photos)]
        name = f"e2e_{node_id}_{photo.parent.name}_{photo.name}"
        shutil.copyfile(photo, engine.input_dir / name)
        node["inputs"]["image"] = name
        inputs[node_id] = engine.input_dir / name
    for node in wf.values():
        for name, cap in E2E_CAPS.get(node["class_type"], {}).items():
            v = node["inputs"].get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                node["inputs"][name] = min(type(cap)(v), cap)
    for node_id, node in wf.items():
        info = object_info.get(node["class_type"])
        if info is None:
            continue  # ComfyUI's validation reports unknown nodes with a clear message
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, str) or node["class_type"] == "LoadImage":
                continue
            options = _combo_options(info, name)
            if options is None or value in options:
                continue
            if not options:
                pytest.skip(f"node {node_id} ({node['class_type']}).{name}={value!r}: no model files for it here")
            for loader, fname in (("CheckpointLoaderSimple", TINY_CHECKPOINT), ("CLIPVisionLoader", RANDOM_CLIP_VISION),
                                  ("ImmunizeLoadIPAdapter", TINY_IPADAPTER)):
                if node["class_type"] == loader and fname in options:
                    node["inputs"][name] = fname
            if node["class_type"] == "ImmunizeLoadFaceRecognizer":
                faceapi = [o for o in options if "face_recognition_model" in o]
                if faceapi:
                    node["inputs"][name] = faceapi[0]
    return inputs


def _as_rgb8(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("workflow_path", WORKFLOWS or [None], ids=lambda p: p.stem if p else "none")
def test_workflow_runs(workflow_path, engine, object_info, fixtures):
    if workflow_path is None:
        pytest.skip("no API workflows in workflows/api/")
    wf = engine_mod.load_workflow(workflow_path)
    inputs = _prepare_workflow(wf, engine, object_info, _face_photos(fixtures))

    result = engine.run(wf, timeout=PROMPT_TIMEOUT_S)

    assert result.files, f"the workflow saved no files; outputs: {json.dumps(result.outputs)[:2000]}"
    for node_id, _ in engine_mod.nodes_of(wf, "SaveImage"):
        saved = engine.output_files({node_id: result.outputs.get(node_id, {})})
        assert saved, f"SaveImage node {node_id} wrote nothing"

    pgd_nodes = engine_mod.nodes_of(wf, "ImmunizePGDProtect") + engine_mod.nodes_of(wf, "ImmunizeTwoStageProtect")
    for pgd_id, pgd in pgd_nodes:
        _check_budget(wf, pgd_id, pgd, engine, result, inputs)

    if engine_mod.nodes_of(wf, "ImmunizeProtectionReport") or engine_mod.nodes_of(wf, "ImmunizeScoreReport"):
        reports_json = [p for p in result.new_files if p.suffix == ".json"]
        reports_csv = [p for p in result.new_files if p.suffix == ".csv"]
        assert reports_json, f"no report .json written; new files: {result.new_files}"
        assert reports_csv, f"no report .csv written; new files: {result.new_files}"
        for p in reports_json:
            json.loads(p.read_text())
        for p in reports_csv:
            assert p.read_text().strip(), f"{p} is empty"
    for p in (p for p in result.new_files if p.suffix == ".csv"):
        # every cell filled: a number, or an explicit marker such as "unavailable"
        rows = list(csv.reader(p.open()))
        assert len(rows) >= 2, f"{p.name} has no data rows"
        empty = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if not c.strip()]
        assert not empty, f"{p.name}: empty cells at {empty[:5]}\n{p.read_text()[:1500]}"


def _check_budget(wf, pgd_id, pgd, engine, result, inputs):
    """Every SaveImage fed directly by the PGD node's protected output (slot 0) wrote PNGs
    within ε of the input photo, in 8-bit values, and not identical to it."""
    eps = pgd["inputs"].get("epsilon")
    if not isinstance(eps, (int, float)):
        return  # ε comes from another node: nothing literal to check against
    load_id, direct = _upstream_load_image(wf, pgd_id, "image")
    assert load_id is not None, f"PGD node {pgd_id} has no LoadImage upstream"
    clean = _as_rgb8(inputs[load_id])
    savers = [
        sid for sid, s in engine_mod.nodes_of(wf, "SaveImage")
        if _is_link(s["inputs"].get("images")) and s["inputs"]["images"] == [pgd_id, 0]
    ]
    assert savers, f"no SaveImage saves the protected output of PGD node {pgd_id}"
    norm = str(pgd["inputs"].get("norm", "linf")).lower()
    for sid in savers:
        files = engine.output_files({sid: result.outputs.get(sid, {})})
        assert files, f"SaveImage {sid} (protected) wrote nothing"
        for f in files:
            prot = _as_rgb8(f)
            if prot.shape != clean.shape:
                assert not direct, f"{f.name}: shape {prot.shape} != input {clean.shape}"
                continue  # resized upstream of PGD: no pixel-wise comparison to the photo
            delta = (prot - clean).astype(np.float64)
            linf = float(np.abs(delta).max())
            assert linf >= 1, f"{f.name}: the protected image equals the input"
            if "2" in norm:
                rms = math.sqrt(float((delta**2).mean()))
                assert rms <= eps + 0.01, f"{f.name}: RMS perturbation {rms:.3f}/255 > ε={eps}/255"
            else:
                assert linf <= eps + 1e-6, f"{f.name}: max |δ| = {linf}/255 > ε={eps}/255"
            # the PNG says what protected it: method, ε, steps, measured L∞ and PSNR (PNG text chunk)
            with Image.open(f) as im:
                meta = json.loads(im.info["immunize"])[pgd_id]
            assert meta["epsilon_255"] == pytest.approx(eps) and meta["steps_run"] >= 1 and meta["method"]
            assert meta["images"][0]["linf_255"] == pytest.approx(linf)
            assert meta["images"][0]["psnr_db"] > 20


def test_bad_input_reports_a_clear_error_and_the_server_stays_up(engine, object_info, fixtures):
    """A photo without a face fails with an actionable message; the next prompt still runs."""
    path = ROOT / "workflows" / "api" / "identity_protect.json"
    wf = engine_mod.load_workflow(path)
    _prepare_workflow(wf, engine, object_info, _face_photos(fixtures))
    blank = engine.input_dir / "e2e_blank.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)
    for _, node in engine_mod.nodes_of(wf, "LoadImage"):
        node["inputs"]["image"] = blank.name
    with pytest.raises(engine_mod.EngineError, match="No face found"):
        engine.run(wf, timeout=PROMPT_TIMEOUT_S)
    assert engine.proc.poll() is None, "the server died on bad input"

    wf = engine_mod.load_workflow(path)
    _prepare_workflow(wf, engine, object_info, _face_photos(fixtures))
    assert engine.run(wf, timeout=PROMPT_TIMEOUT_S).files
