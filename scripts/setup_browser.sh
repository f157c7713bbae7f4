#!/usr/bin/env bash
# The browser for tests/test_frontend.py (marked `browser`): Debian's chromium and
# chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium in .venv.
#
# Idempotent and quick when everything is there. Installs the browser with apt-get only when
# running as root with apt-get available; otherwise it says what is missing and returns 0, and
# the browser tests skip with that reason. Run after scripts/setup.sh (it needs .venv).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
CHROMIUM="${IMMUNIZE_CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${IMMUNIZE_CHROMEDRIVER:-/usr/bin/chromedriver}"
# Same pins as scripts/setup.sh: no dependency may pull another torch.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
SELENIUM="selenium>=4.11,<5"

have_browser() { [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; }
have_selenium() { [[ -x "$PY" ]] && "$PY" -c "import selenium.webdriver" 2>/dev/null; }

if have_browser && have_selenium; then
    echo "setup_browser: chromium, chromedriver and selenium present"
    exit 0
fi

if ! have_browser; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup_browser: apt-get install chromium chromium-driver"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
               && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }; then
            echo "setup_browser: apt-get could not install chromium/chromium-driver: the browser tests will skip"
        fi
    else
        echo "setup_browser: $CHROMIUM or $CHROMEDRIVER missing and no root apt-get to install them" \
             "(run: apt-get install chromium chromium-driver): the browser tests will skip"
    fi
fi

if ! have_selenium; then
    if [[ -x "$PY" ]]; then
        echo "setup_browser: pip install $SELENIUM into .venv"
        "$PY" -m pip install -q --disable-pip-version-check "$SELENIUM" "${TORCH_PINS[@]}" \
            || echo "setup_browser: pip could not install selenium: the browser tests will skip"
    else
        echo "setup_browser: no .venv (run scripts/setup.sh first): the browser tests will skip"
    fi
fi
exit 0
