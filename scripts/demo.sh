#!/usr/bin/env bash
# Command 1: protect a public-domain face photo with a real face recogniser, end to end.
#
#   1. set up .venv (scripts/setup.sh; a no-op when already done)
#   2. fetch the face-api recogniser (MIT, dlib ResNet port) with `npm pack` into
#      .engine/models/face_recognition/ (checked by SHA-256; never runs without real weights)
#   3. write scikit-image's astronaut photo (NASA, public domain) into .engine/input/
#   4. run workflows/api/identity_protect.json on a headless ComfyUI (scripts/engine.py)
#   5. copy the protected PNG and the report files into ./output/ and print the key numbers
#
# Environment: COMFYUI_DIR=/path/to/ComfyUI to use your own ComfyUI instead of the vendored one;
# IMMUNIZE_ENGINE=DIR for another engine base directory (default .engine/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORKFLOW="${1:-workflows/api/identity_protect.json}"
BASE="${IMMUNIZE_ENGINE:-$ROOT/.engine}"
PY="$ROOT/.venv/bin/python"
FACEAPI_PKG="@vladmandic/face-api@1.7.15"
FACEAPI_DIR="$BASE/models/face_recognition"
declare -A FACEAPI_SHA256=(
    [face_recognition_model.bin]=b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589
    [face_recognition_model-weights_manifest.json]=cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b
)

bash scripts/setup.sh

if [[ ! -f "$WORKFLOW" ]]; then
    echo "demo: workflow $WORKFLOW not found" >&2
    exit 1
fi

"$PY" scripts/engine.py prepare --base "$BASE" >/dev/null

# --- 2. the real face recogniser -------------------------------------------------------
faceapi_ok() {
    local f
    for f in "${!FACEAPI_SHA256[@]}"; do
        [[ -f "$FACEAPI_DIR/$f" ]] || return 1
        [[ "$(sha256sum "$FACEAPI_DIR/$f" | cut -d' ' -f1)" == "${FACEAPI_SHA256[$f]}" ]] || return 1
    done
}

faceapi_help() {
    cat >&2 <<EOF
demo: could not fetch the face recogniser ($1).
Put these files (from the npm package $FACEAPI_PKG, folder model/; MIT licence) into
  $FACEAPI_DIR/
    face_recognition_model.bin                     sha256 ${FACEAPI_SHA256[face_recognition_model.bin]}
    face_recognition_model-weights_manifest.json   sha256 ${FACEAPI_SHA256[face_recognition_model-weights_manifest.json]}
e.g. on a machine with npm:  npm pack $FACEAPI_PKG && tar -xzf vladmandic-face-api-1.7.15.tgz package/model package/LICENSE
then run this script again. (No protection is run without the real recogniser.)
EOF
    exit 1
}

if ! faceapi_ok; then
    command -v npm >/dev/null || faceapi_help "npm is not installed"
    cache="$ROOT/.cache/npm-pack"
    mkdir -p "$cache"
    tgz="$cache/vladmandic-face-api-1.7.15.tgz"
    if [[ ! -f "$tgz" ]]; then
        echo "demo: fetching $FACEAPI_PKG with npm pack"
        (cd "$cache" && npm pack "$FACEAPI_PKG" --silent >/dev/null) || faceapi_help "npm pack $FACEAPI_PKG failed"
    fi
    tmp="$(mktemp -d)"
    tar -xzf "$tgz" -C "$tmp" package/model/face_recognition_model.bin \
        package/model/face_recognition_model-weights_manifest.json package/LICENSE \
        || faceapi_help "the tarball $tgz lacks the model files"
    cp "$tmp/package/model/face_recognition_model.bin" \
       "$tmp/package/model/face_recognition_model-weights_manifest.json" "$FACEAPI_DIR/"
    cp "$tmp/package/LICENSE" "$FACEAPI_DIR/LICENSE"
    rm -rf "$tmp"
    faceapi_ok || { rm -f "$tgz"; faceapi_help "SHA-256 mismatch for the files from $tgz"; }
fi
echo "demo: face recogniser ready in $FACEAPI_DIR"

# --- 3.-5. photo, run, collect -----------------------------------------------------------
exec "$PY" - "$WORKFLOW" "$BASE" "$ROOT/output" <<'PYEOF'
import json, shutil, subprocess, sys
from pathlib import Path

workflow, base, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, "scripts")
import engine

wf = engine.load_workflow(workflow)
loads = engine.nodes_of(wf, "LoadImage")
if not loads:
    sys.exit(f"demo: {workflow} has no LoadImage node")

# The astronaut photo under every name the workflow's LoadImage nodes expect.
import numpy as np
from PIL import Image
from skimage import data
photo = Image.fromarray(np.asarray(data.astronaut()))
for _, node in loads:
    dst = base / "input" / node["inputs"]["image"]
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        photo.save(dst)
    print(f"demo: input photo {dst} (scikit-image astronaut, public domain)")

print(f"demo: running {workflow} on ComfyUI (CPU; this can take a few minutes)", flush=True)
proc = subprocess.run([sys.executable, "scripts/engine.py", "run", str(workflow), "--base", str(base)],
                      stdout=subprocess.PIPE, text=True)
if proc.returncode != 0:
    sys.exit(f"demo: the workflow failed (see above; server log {base / 'comfyui.log'})")
res = json.loads(proc.stdout)

out_dir.mkdir(parents=True, exist_ok=True)
copied = []
for f in dict.fromkeys(res["files"] + res["new_files"]):
    src = Path(f)
    if src.is_file() and base / "input" not in src.parents:
        dst = out_dir / src.name
        shutil.copyfile(src, dst)
        copied.append(dst)
if not any(p.suffix == ".png" for p in copied):
    sys.exit("demo: the workflow saved no PNG")

print(f"\ndemo: server start {res['server_start_s']} s, workflow {res['run_s']} s")
print("demo: files in ./output/:")
for p in copied:
    print(f"  {p}")


def numbers(obj, prefix=""):
    """Scalar numbers (and booleans) of a JSON report, flattened to dotted keys."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        if len(obj) <= 4:
            for i, v in enumerate(obj):
                yield from numbers(v, f"{prefix}{i}.")
    elif isinstance(obj, (int, float)):
        yield prefix[:-1], obj


for rep in (p for p in copied if p.suffix == ".json"):
    print(f"\ndemo: key numbers from {rep.name}:")
    items = list(numbers(json.loads(rep.read_text())))
    for k, v in items[:40]:
        print(f"  {k:48s} {v:.4g}" if isinstance(v, float) else f"  {k:48s} {v}")
    if len(items) > 40:
        print(f"  ... {len(items) - 40} more in {rep}")
PYEOF
