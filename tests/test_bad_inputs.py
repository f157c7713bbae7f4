"""Bad inputs through a REAL ComfyUI server: every case fails cleanly, and the server keeps working.

One server for the module (``scripts/engine.py`` over a temporary base directory, as in
``test_e2e.py``) with the real face-api recogniser from the shared fixtures, plus deliberately
broken model files placed in its model folders before it starts. Each case posts an API-format
prompt (a small graph built from ``workflows/api/identity_protect.json``'s first nodes, or a
hand-built one of pack nodes and core LoadImage/SaveImage/SolidMask) and checks:

(a) it is refused at queue time (HTTP 400 from ``/prompt``; a ``node_errors`` entry naming the
    input, or ComfyUI's own prompt-level error) or fails at run time with an
    ``execution_error`` whose message names the input/cause and the fix;
(b) the exception type reads like ``immunize.ProtectionFailed`` / ``ValueError``, never an
    install path (``/…/custom_nodes/…``), and no message carries a raw traceback;
(c) a good prompt still runs to success after every few cases and at the end, and its saved
    PNG is within ε of the input and changed.

A few inputs are coerced by ComfyUI itself before any node sees them (``iterations`` 2.5 → 2,
``early_stop`` "yes" → True): those cases accept a success whose output is a valid protection.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from immunize.tests.test_e2e import engine_mod  # one loader of scripts/engine.py

ROOT = Path(__file__).resolve().parents[1]
IDENTITY_WORKFLOW = ROOT / "workflows" / "api" / "identity_protect.json"
PGD_ITERATIONS = 2
RUN_TIMEOUT_S = 120
HUGE_TIMEOUT_S = 20
GOOD_EVERY = 4  # a good prompt after every GOOD_EVERY cases (and at the end)



# ------------------------------------------------------------------ fixture files
FACEAPI_BIN = "face_recognition_model.bin"
FACEAPI_MANIFEST = "face_recognition_model-weights_manifest.json"
GOOD_REC = f"face_recognition/{FACEAPI_BIN}"


class _Payload:
    """A pickle that would run code (create a marker file) if it were ever unpickled unsafely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_bad_models(eng, faceapi: Path, marker: Path) -> None:
    fr = eng.models_dir("face_recognition")
    for f in faceapi.iterdir():
        if f.is_file():
            shutil.copyfile(f, fr / f.name)
    # a truncated face-api weights file, with its (intact) manifest beside it
    (fr / "truncated").mkdir(parents=True, exist_ok=True)
    data = (faceapi / FACEAPI_BIN).read_bytes()
    (fr / "truncated" / FACEAPI_BIN).write_bytes(data[: len(data) // 3])
    shutil.copyfile(faceapi / FACEAPI_MANIFEST, fr / "truncated" / FACEAPI_MANIFEST)
    # a .bin with a .json beside it that is not a TF.js graph model (nor a weights manifest)
    (fr / "notgraph").mkdir(exist_ok=True)
    (fr / "notgraph" / "faceres.bin").write_bytes(os.urandom(4096))
    (fr / "notgraph" / "faceres.json").write_text(json.dumps({"format": "layers-model", "hello": 1}))

    ins = eng.models_dir("insightface")
    ins.mkdir(parents=True, exist_ok=True)
    (ins / "notes.onnx").write_text("this is a text file, not an ONNX model\n" * 20)

    fn = eng.models_dir("facenet")
    fn.mkdir(parents=True, exist_ok=True)
    torch.save({"layer.weight": torch.randn(8, 4), "layer.bias": torch.randn(8)}, fn / "random_weights.pt")
    (fn / "random_bytes.pt").write_bytes(os.urandom(5000))
    with open(fn / "payload.pt", "wb") as fh:
        pickle.dump(_Payload(str(marker)), fh)
    from safetensors.torch import save_file

    # another model family's weights (an IP-Adapter-style state dict) in the FaceNet folder
    save_file({"image_proj.proj.weight": torch.randn(16, 8), "ip_adapter.1.to_k_ip.weight": torch.randn(8, 8)},
              str(fn / "other_family.safetensors"))
    (fn / "garbage.safetensors").write_bytes(os.urandom(3000))

    ipa = eng.models_dir("ipadapter")
    ipa.mkdir(parents=True, exist_ok=True)
    (ipa / "garbage_adapter.safetensors").write_bytes(os.urandom(3000))
    (ipa / "garbage_adapter.bin").write_bytes(os.urandom(3000))
    save_file({"foo.weight": torch.randn(4, 4)}, str(ipa / "not_an_adapter.safetensors"))


def _write_bad_images(inp: Path, face: Path) -> None:
    shutil.copyfile(face, inp / "face.png")
    data = (inp / "face.png").read_bytes()
    (inp / "truncated.png").write_bytes(data[: len(data) // 2])
    (inp / "not_an_image.png").write_text("hello, I am text\n")
    Image.new("RGB", (1, 1), (128, 128, 128)).save(inp / "one_pixel.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(inp / "gray.png")
    with Image.open(face) as im:
        g = np.asarray(im.convert("L"), dtype=np.uint16) * 257
        rgb = np.asarray(im.convert("RGB"))
    Image.fromarray(g.astype(np.uint16)).save(inp / "gray16.png")  # 16-bit grayscale PNG
    # a cut-out whose only transparent (MASK = 1) area is a corner far from the face
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:12, :12] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(inp / "cutout.png")
    Image.new("RGB", (8192, 8192), (128, 128, 128)).save(inp / "huge_8k.png")


@pytest.fixture(scope="module")
def env(fixtures, tmp_path_factory):
    if engine_mod.find_comfyui() is None:
        pytest.skip("ComfyUI is not installed: run scripts/setup.sh or set COMFYUI_DIR")
    faceapi = fixtures / "models" / "faceapi"
    if not (faceapi / FACEAPI_BIN).is_file():
        pytest.skip(f"face-api recogniser not found in {faceapi}")
    faces = sorted((fixtures / "faces").glob("*/*.png"))
    if not faces:
        pytest.skip(f"no face photos under {fixtures / 'faces'}")
    base = tmp_path_factory.mktemp("bad_inputs_engine")
    marker = base / "PICKLE_CODE_RAN"
    eng = engine_mod.Engine(base)
    eng.prepare()
    _write_bad_models(eng, faceapi, marker)
    _write_bad_images(eng.input_dir, faces[0])
    eng.start()
    try:
        yield {"engine": eng, "marker": marker, "counter": [0]}
    finally:
        eng.stop()


# ------------------------------------------------------------------ prompts
def base_wf(image: str = "face.png", **pgd) -> dict:
    """LoadImage → Load Face Recognizer → Identity Loss → PGD Protect → SaveImage (nodes 1-5 of
    identity_protect.json), PGD shortened to a few iterations."""
    keep = {"1", "2", "3", "4", "5"}
    wf = {k: v for k, v in engine_mod.load_workflow(IDENTITY_WORKFLOW).items() if k in keep}
    for n in wf.values():  # links to the nodes left out (a second recogniser, ...) are dropped
        n["inputs"] = {k: v for k, v in n["inputs"].items()
                       if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in keep)}
    wf["1"]["inputs"]["image"] = image
    wf["2"]["inputs"]["recognizer_name"] = GOOD_REC
    wf["4"]["inputs"].update({"iterations": PGD_ITERATIONS, "early_stop": False})
    wf["4"]["inputs"].update(pgd)
    wf["5"]["inputs"]["filename_prefix"] = "bad_inputs/protected"
    return wf


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


@dataclass
class Outcome:
    phase: str  # "queue" | "run" | "success" | "timeout"
    status: int = 200
    body: dict = field(default_factory=dict)  # /prompt's answer (queue) or the execution_error (run)
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        return json.dumps(self.body, default=str)


def submit(eng, wf: dict, timeout: float = RUN_TIMEOUT_S) -> Outcome:
    """POST the prompt (NaN/inf allowed in the JSON, as a browser or script may send them) and
    wait for its end; never raises on a failed prompt."""
    t0 = time.monotonic()
    payload = json.dumps({"prompt": wf, "client_id": eng.client_id}, allow_nan=True)
    r = requests.post(eng.url + "/prompt", data=payload, headers={"Content-Type": "application/json"}, timeout=60)
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text}
    if r.status_code != 200 or body.get("node_errors"):
        return Outcome("queue", r.status_code, body, seconds=time.monotonic() - t0)
    pid = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert eng.proc is not None and eng.proc.poll() is None, "the server died:\n" + eng._tail(60)
        entry = eng.get(f"/history/{pid}").get(pid)
        if entry:
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                err = next((d for k, d in status.get("messages", []) if k == "execution_error"), {})
                return Outcome("run", 200, err, seconds=time.monotonic() - t0)
            return Outcome("success", 200, {}, entry.get("outputs", {}), seconds=time.monotonic() - t0)
        time.sleep(0.2)
    requests.post(eng.url + "/interrupt", timeout=10)
    # wait until the interrupted prompt has ended, so the next one does not queue behind it
    end = time.monotonic() + 120
    while time.monotonic() < end and not eng.get(f"/history/{pid}").get(pid):
        time.sleep(0.5)
    return Outcome("timeout", 0, {}, seconds=time.monotonic() - t0)


def _as_rgb8(path: Path) -> np.ndarray:
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as ComfyUI's LoadImage reads a truncated PNG
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


_GOOD_SEED = [1000]


def check_good_run(eng) -> None:
    """The plain protect graph still runs to success; its PNG is changed and within ε. A new
    seed each time, so that ComfyUI's cache does not answer for it."""
    _GOOD_SEED[0] += 1
    wf = base_wf(seed=_GOOD_SEED[0])
    out = submit(eng, wf)
    assert out.phase == "success", f"the good prompt failed after bad inputs: {out.phase} {out.text()[:2000]}"
    check_protected_output(eng, out, "face.png", eps=float(wf["4"]["inputs"]["epsilon"]))


def check_protected_output(eng, out: Outcome, image: str, eps: float, norm: str = "Linf") -> None:
    files = eng.output_files({"5": out.outputs.get("5", {})})
    assert files, f"SaveImage wrote nothing: {out.outputs}"
    clean = _as_rgb8(eng.input_dir / image)
    for f in files:
        delta = (_as_rgb8(f) - clean).astype(np.float64)
        assert np.abs(delta).max() >= 1, f"{f.name} equals the input: a false success"
        if norm == "L2":
            assert math.sqrt(float((delta ** 2).mean())) <= eps + 0.01
        else:
            assert np.abs(delta).max() <= eps, f"{f.name}: max |δ| {np.abs(delta).max()} > ε {eps}"


# ------------------------------------------------------------------ cases
@dataclass
class Case:
    id: str
    build: Callable[[], dict]
    # "queue": node_errors / HTTP 400; "run": execution_error; "coerced": ComfyUI converted the value and
    # the run must give a valid protection; "error_or_protected": a clean error or a valid protection;
    # "success": a valid graph that must run
    expect: str
    node: Optional[str] = None  # node id the error must be about (queue: in node_errors; run: node_id)
    words: tuple = ()  # every one must appear in the message (case-insensitive): the input/cause and the fix
    exc: Optional[str] = None  # the exception type shown, exactly
    timeout: float = RUN_TIMEOUT_S
    xfail: Optional[str] = None
    skip: Optional[str] = None


def pgd(**kw) -> Callable[[], dict]:
    return lambda: base_wf(**kw)


def with_mask(mask_node: dict) -> Callable[[], dict]:
    def build():
        wf = base_wf()
        wf["20"] = mask_node
        wf["4"]["inputs"]["mask"] = ["20", 0]
        return wf
    return build


def edit(fn: Callable[[dict], None], **kw) -> Callable[[], dict]:
    def build():
        wf = base_wf(**kw)
        fn(wf)
        return wf
    return build


def recognizer(name: str) -> Callable[[], dict]:
    return edit(lambda wf: wf["2"]["inputs"].update(recognizer_name=name))


def ipadapter_graph(name: str) -> Callable[[], dict]:
    # Load IP-Adapter is the only node that fails; Identity Bridge needs models this test has not.
    # A PreviewAny output of it makes the loader run.
    return lambda: {"1": node("ImmunizeLoadIPAdapter", ipadapter_name=name),
                    "2": node("PreviewAny", source=["1", 0])}


def score_identity_graph(reference: str, generated: str = "face.png") -> dict:
    return {
        "1": node("LoadImage", image=generated),
        "2": node("LoadImage", image=reference),
        "3": node("ImmunizeLoadFaceRecognizer", recognizer_name=GOOD_REC),
        "4": node("ImmunizeScoreIdentity", generated=["1", 0], reference=["2", 0], recognizer=["3", 0],
                  label="protected", min_face_confidence=0.9),
        "5": node("ImmunizeScoreReport", scores=["4", 0], filename_prefix="bad_inputs/scores"),
    }


def score_quality_graph(reference: str) -> dict:
    return {
        "1": node("LoadImage", image="face.png"),
        "2": node("LoadImage", image=reference),
        "4": node("ImmunizeScoreQuality", image=["1", 0], reference=["2", 0], label="protected",
                  brisque_model="", lpips_weights=""),
        "5": node("ImmunizeScoreReport", scores=["4", 0], filename_prefix="bad_inputs/scores"),
    }


def _del(wf: dict, node_id: str, name: str) -> None:
    del wf[node_id]["inputs"][name]


def _empty_batch(wf: dict) -> None:
    wf["1"]["inputs"]["image"] = "gray.png"
    wf["21"] = node("ImmunizeDetectorCrop", images=["1", 0], size=64, margin=0.3, min_confidence=0.9)
    wf["4"]["inputs"]["image"] = ["21", 0]


def _blended_cutout(wf: dict) -> None:
    """A valid graph: the cut-out photo blended 30 % with gray (core ImageBlend: pixels off the 8-bit
    grid), protected everywhere but its transparent corner (Load Image's MASK inverted)."""
    wf["1"]["inputs"]["image"] = "cutout.png"
    wf["21"] = node("LoadImage", image="gray.png")
    wf["22"] = node("ImageBlend", image1=["1", 0], image2=["21", 0], blend_factor=0.3, blend_mode="normal")
    wf["23"] = node("InvertMask", mask=["1", 1])
    wf["4"]["inputs"].update(image=["22", 0], mask=["23", 0], seed=13)


def _cutout(wf: dict) -> None:
    wf["1"]["inputs"]["image"] = "cutout.png"
    wf["4"]["inputs"]["mask"] = ["1", 1]


NAN, INF = float("nan"), float("inf")
FIX = "use"  # most fixes read "Use …"

CASES = [
    # --- widget values, refused at queue time by the pack's validate_inputs -------------------
    Case("step_nan", pgd(step=NAN), "queue", "4", ("step", "finite")),
    Case("step_inf", pgd(step=INF), "queue", "4", ("step", "finite")),
    Case("step_negative", pgd(step=-1.0), "queue", "4", ("step", "minimum")),
    Case("epsilon_0.5", pgd(epsilon=0.5), "queue", "4", ("epsilon", "minimum")),
    Case("epsilon_0", pgd(epsilon=0.0), "queue", "4", ("epsilon", "minimum")),
    Case("epsilon_40", pgd(epsilon=40.0), "queue", "4", ("epsilon", "maximum")),
    Case("epsilon_nan", pgd(epsilon=NAN), "queue", "4", ("epsilon", "finite")),
    Case("epsilon_abc", pgd(epsilon="abc"), "queue", "4", ("epsilon",)),
    Case("iterations_0", pgd(iterations=0), "queue", "4", ("iterations", "minimum")),
    Case("iterations_-1", pgd(iterations=-1), "queue", "4", ("iterations", "minimum")),
    # ComfyUI converts INT widgets with int() before any node sees them: 2.5 runs as 2
    Case("iterations_2.5", pgd(iterations=2.5, seed=11), "coerced"),
    Case("norm_L3", pgd(norm="L3"), "queue", "4", ("norm", "L3", "Linf")),
    Case("seed_-1", pgd(seed=-1), "queue", "4", ("seed", "minimum")),
    # ComfyUI converts BOOLEAN widgets with bool() before any node sees them: "yes" runs as True
    Case("early_stop_yes", pgd(early_stop="yes", seed=12), "coerced"),
    Case("identity_weight_nan", edit(lambda wf: wf["3"]["inputs"].update(weight=NAN)), "queue", "3",
         ("weight", "finite")),
    Case("recognizer_file_missing", recognizer("face_recognition/nope.bin"), "queue", "2",
         ("recognizer_name", "nope.bin", "model folder")),
    Case("jpeg_quality_0", lambda: {**base_wf(), "8": node("ImmunizePurifyJPEG", quality=0, image=["4", 0]),
                                    "5": node("SaveImage", images=["8", 0], filename_prefix="bad_inputs/jpeg")},
         "queue", "8", ("quality", "minimum")),
    Case("detector_crop_size_10", lambda: {"1": node("LoadImage", image="face.png"),
                                           "2": node("ImmunizeDetectorCrop", images=["1", 0], size=10,
                                                     margin=0.3, min_confidence=0.9),
                                           "3": node("SaveImage", images=["2", 0], filename_prefix="x")},
         "queue", "2", ("size", "minimum")),
    # --- graph structure, refused by ComfyUI's own validation ---------------------------------
    Case("link_image_into_mask", edit(lambda wf: wf["4"]["inputs"].update(mask=["1", 0])), "queue", "4",
         ("mask", "IMAGE", "MASK")),
    Case("report_gets_an_image", lambda: {**{k: v for k, v in base_wf().items() if k != "5"},
                                          "7": node("ImmunizeProtectionReport", report=["1", 0],
                                                    filename_prefix="bad_inputs/report")},
         "queue", "7", ("report", "IMAGE", "PROTECT_REPORT")),
    Case("objective_gets_a_recognizer", edit(lambda wf: wf["4"]["inputs"].update(objective=["2", 0])), "queue",
         "4", ("objective", "FACE_RECOGNIZER", "PROTECT_OBJECTIVE")),
    Case("missing_required_input", edit(lambda wf: _del(wf, "4", "image")), "queue", "4", ("image", "missing")),
    Case("unknown_node_class", edit(lambda wf: wf.update({"9": node("ImmunizeNoSuchNode", image=["1", 0])})),
         "queue", None, ("ImmunizeNoSuchNode", "does not exist")),
    Case("link_to_missing_node", edit(lambda wf: wf["4"]["inputs"].update(image=["99", 0])), "queue", None,
         ("99",)),
    Case("link_to_missing_output_slot", edit(lambda wf: wf["4"]["inputs"].update(image=["1", 7])), "queue", None,
         ("image",)),
    Case("loadimage_file_missing", edit(lambda wf: wf["1"]["inputs"].update(image="nope.png")), "queue", "1",
         ("image", "nope.png")),
    Case("no_output_node", lambda: {k: v for k, v in base_wf().items() if k != "5"}, "queue", None,
         ("output",)),
    Case("image_is_a_string", edit(lambda wf: wf["4"]["inputs"].update(image="hello")), "run", "4",
         ("'image'", "IMAGE")),
    # --- images ---------------------------------------------------------------------------------
    # ComfyUI's LoadImage reads truncated PNGs on purpose (PIL's LOAD_TRUNCATED_IMAGES, missing rows
    # filled): PGD then protects what it was given, or finds no face in it
    Case("truncated_png", pgd(image="truncated.png"), "error_or_protected", None, ("no face", "use a photo")),
    Case("not_an_image_png", pgd(image="not_an_image.png"), "run", "1", ("not_an_image.png",)),
    Case("one_pixel_image", pgd(image="one_pixel.png"), "run", None, ("1x1", "face chip", "use a larger photo")),
    Case("gray16_png", pgd(image="gray16.png"), "error_or_protected", None, ("no face", "use a photo")),
    Case("rgba_cutout_mask_excludes_face", edit(_cutout), "run", "4",
         ("unchanged", "NOT protected", "a mask that excludes the face", "check the mask"),
         exc="immunize.ProtectionFailed"),
    # an image off the 8-bit grid (after core ImageBlend) with a mask: pixels outside come back as they were
    Case("masked_blended_photo_is_protected", edit(_blended_cutout), "success"),
    Case("no_face_gray", pgd(image="gray.png"), "run", None, ("no face", "use a photo"), exc="immunize.NoFaceError"),
    # 8192x8192: detection looks at a 2048 px copy (MTCNN on the full image took ~35 s)
    Case("huge_8k_image", pgd(image="huge_8k.png"), "error_or_protected", None, ("no face", "use a photo"),
         timeout=HUGE_TIMEOUT_S),
    Case("all_zero_mask", with_mask(node("SolidMask", value=0.0, width=256, height=256)), "run", "4",
         ("mask", "no pixel", "Invert Mask"), exc="immunize.ProtectionFailed"),
    Case("mask_of_another_size", with_mask(node("SolidMask", value=1.0, width=64, height=64)), "run", "4",
         ("'mask'", "64x64", "256x256", "own size"), exc="ValueError"),
    Case("empty_batch_from_detector_crop", edit(_empty_batch), "run", "4", ("empty", "Detector Crop", "upstream"),
         exc="immunize.EmptyBatchError"),
    Case("nan_pixels", lambda: {}, "run",
         skip="no core ComfyUI node makes NaN pixels (LoadImage clips, PorterDuff guards its division); "
              "the pack's own check is unit-tested on tensors (image_to_bchw / check_inputs)"),
    # --- recogniser weights ----------------------------------------------------------------------
    Case("faceapi_bin_truncated", recognizer(f"face_recognition/truncated/{FACEAPI_BIN}"), "run", "2",
         (FACEAPI_BIN, "truncated", "use the")),
    Case("bin_with_json_not_a_graph_model", recognizer("face_recognition/notgraph/faceres.bin"), "run", "2",
         ("faceres.bin", "faceres.json", "not a TF.js graph model", "put the .json")),
    Case("text_file_named_onnx", recognizer("insightface/notes.onnx"), "run", "2",
         ("notes.onnx", "not a readable ONNX model", "glintr100.onnx")),
    Case("random_weights_pt", recognizer("facenet/random_weights.pt"), "run", "2",
         ("random_weights.pt", "InceptionResnetV1", "20180402-114759-vggface2.pt")),
    Case("random_bytes_pt", recognizer("facenet/random_bytes.pt"), "run", "2",
         ("random_bytes.pt", "state dict", "torch.save")),
    Case("pickle_payload_pt", recognizer("facenet/payload.pt"), "run", "2",
         ("payload.pt", "not loaded for safety")),
    Case("other_family_safetensors", recognizer("facenet/other_family.safetensors"), "run", "2",
         ("other_family.safetensors", "InceptionResnetV1")),
    Case("garbage_safetensors_recognizer", recognizer("facenet/garbage.safetensors"), "run", "2",
         ("garbage.safetensors", "not a valid .safetensors", "download it again")),
    # --- IP-Adapter files ------------------------------------------------------------------------
    Case("ipadapter_garbage_safetensors", ipadapter_graph("garbage_adapter.safetensors"), "run", "1",
         ("garbage_adapter.safetensors", "not a valid .safetensors", "download it again")),
    Case("ipadapter_garbage_bin", ipadapter_graph("garbage_adapter.bin"), "run", "1",
         ("garbage_adapter.bin", "not a loadable weights file", ".safetensors")),
    Case("ipadapter_not_an_adapter", ipadapter_graph("not_an_adapter.safetensors"), "run", "1",
         ("not_an_adapter.safetensors", "not an IP-Adapter", "models/ipadapter")),
    # --- other nodes -----------------------------------------------------------------------------
    Case("identity_loss_without_recognizer", edit(lambda wf: _del(wf, "3", "recognizer")), "run", "3",
         ("'recognizer'", "connect")),
    Case("identity_loss_same_recognizer_twice", edit(lambda wf: wf["3"]["inputs"].update(recognizer_2=["2", 0])),
         "run", "3", ("same recogniser", "connect different")),
    Case("score_identity_reference_without_face", lambda: score_identity_graph("gray.png"), "run", "4",
         ("reference", "no face", "connect clean photos")),
    Case("score_quality_reference_other_size", lambda: score_quality_graph("one_pixel.png"), "run", "4",
         ("'reference'", "1x1", "resize or crop")),
]
assert len({c.id for c in CASES}) == len(CASES)


def _message(out: Outcome) -> str:
    if out.phase == "queue":
        parts = []
        err = out.body.get("error")
        if isinstance(err, dict):
            parts += [str(err.get("message", "")), str(err.get("details", ""))]
        elif err:
            parts.append(str(err))
        for ne in (out.body.get("node_errors") or {}).values():
            for e in ne.get("errors", []):
                parts += [str(e.get("message", "")), str(e.get("details", "")),
                          str((e.get("extra_info") or {}).get("input_name", ""))]
        return " | ".join(parts)
    if out.phase == "run":
        return f"{out.body.get('exception_type', '')}: {out.body.get('exception_message', '')}"
    return ""


RESULTS: dict[str, str] = {}  # case id → what it returned (printed at the end with -s / -rA)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env, request):
    if case.skip:
        pytest.skip(case.skip)
    if case.xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.xfail))
    eng = env["engine"]
    out = submit(eng, case.build(), timeout=case.timeout)
    msg = _message(out)
    RESULTS[case.id] = f"{out.phase} ({out.seconds:.1f} s): {msg[:300]}"
    try:
        _check(case, out, msg, eng)
    finally:
        assert eng.proc is not None and eng.proc.poll() is None, "the server died:\n" + eng._tail(60)
        env["counter"][0] += 1
        if env["counter"][0] % GOOD_EVERY == 0:
            check_good_run(eng)


def _check(case: Case, out: Outcome, msg: str, eng) -> None:
    assert out.phase != "timeout", f"{case.id}: no answer within {case.timeout:.0f} s (interrupted)"
    if case.expect == "success":  # a valid graph among the bad ones
        assert out.phase == "success", f"{case.id}: {out.phase}: {msg}"
        return
    if case.expect == "coerced":
        assert out.phase == "success", f"{case.id}: {out.phase}: {msg}"
        check_protected_output(eng, out, "face.png", eps=8.0)
        return
    if case.expect == "error_or_protected" and out.phase == "success":
        wf = case.build()
        img = wf["1"]["inputs"]["image"]
        check_protected_output(eng, out, img, eps=float(wf["4"]["inputs"]["epsilon"]))
        return
    assert out.phase != "success", f"{case.id}: a bad input ran to success: {json.dumps(out.outputs)[:500]}"
    if case.expect == "queue":
        assert out.phase == "queue", f"{case.id}: expected a refusal at queue time, got {out.phase}: {msg}"
    elif case.expect == "run":
        assert out.phase == "run", f"{case.id}: expected an execution error, got {out.phase}: {msg}"
    if out.phase == "queue":
        assert out.status == 400, f"{case.id}: /prompt answered {out.status}"
        if case.node is not None:
            assert case.node in (out.body.get("node_errors") or {}), (
                f"{case.id}: node {case.node} not in node_errors: {out.text()[:1500]}")
    else:
        exc = str(out.body.get("exception_type", ""))
        assert exc, f"{case.id}: no exception type: {out.text()[:1500]}"
        assert "/" not in exc and "\\" not in exc and "custom_nodes" not in exc, (
            f"{case.id}: the exception type shows an install path: {exc!r}")
        if case.exc is not None:
            assert exc == case.exc, f"{case.id}: exception type {exc!r}, expected {case.exc!r}"
        if case.node is not None:
            assert str(out.body.get("node_id")) == case.node, (
                f"{case.id}: failed in node {out.body.get('node_id')} ({out.body.get('node_type')}), "
                f"expected {case.node}: {msg}")
        text = str(out.body.get("exception_message", ""))
        assert "Traceback (most recent call last)" not in text, f"{case.id}: raw traceback in the message"
        assert "custom_nodes" not in text, f"{case.id}: install path in the message: {text}"
    missing = [w for w in case.words if w.lower() not in msg.lower()]
    assert not missing, f"{case.id}: the message does not say {missing}: {msg}"


def test_pickle_payload_never_ran(env):
    """Loading payload.pt (a pickle whose unpickling runs a shell command) was refused without
    running it: the marker file that command would create does not exist."""
    eng = env["engine"]
    out = submit(eng, recognizer("facenet/payload.pt")())
    assert out.phase == "run", out.text()[:1000]
    assert not env["marker"].exists(), "unpickling payload.pt ran its code"


def test_zz_good_prompt_runs_at_the_end(env):
    check_good_run(env["engine"])
    print("\n".join(f"{k}: {v}" for k, v in RESULTS.items()))


# ------------------------------------------------------------------ engine.py CLI
def test_engine_cli_rejects_a_nan_setting_in_one_line(tmp_path):
    """`engine.py run … --set ImmunizePGDProtect.step=NaN` (and other bad settings or a missing
    workflow) print one line and exit non-zero, before any server starts."""
    for setting in ("ImmunizePGDProtect.step=NaN", "ImmunizePGDProtect.epsilon=-Infinity",
                    "NoSuchNode.step=1", "ImmunizePGDProtect.step=[1, NaN]"):
        p = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "engine.py"), "run", str(IDENTITY_WORKFLOW),
             "--base", str(tmp_path / "base"), "--set", setting],
            capture_output=True, text=True, timeout=120,
        )
        assert p.returncode != 0, (setting, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, (setting, p.stderr)
        assert lines[0].startswith("engine:") and setting.split("=")[0] in lines[0], lines[0]
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "engine.py"), "run", str(tmp_path / "nope.json"),
                        "--base", str(tmp_path / "base")], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
