#!/usr/bin/env bash
# Command 2: set up .venv (no-op when already done) and run the whole test suite.
# Extra arguments go to pytest; when the first one is a test path (file, folder or
# file::test) it replaces the default `tests`, e.g. `bash scripts/test.sh tests/test_e2e.py -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
bash scripts/setup_browser.sh
targets=(tests)
if [[ $# -gt 0 && -e "${1%%::*}" ]]; then
    targets=()
fi
exec .venv/bin/python -m pytest "${targets[@]}" "$@" -p no:cacheprovider --import-mode=importlib -q -rs
