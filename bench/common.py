"""What the benchmarks share: importing this checkout as the package ``immunize`` and finding
the fixtures (``../shared/fixtures`` beside the checkout, or $IMMUNIZE_FIXTURES)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_pack() -> None:
    """Import the checkout as ``immunize`` (its folder name may be anything)."""
    spec = importlib.util.spec_from_file_location("immunize", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["immunize"] = mod
    spec.loader.exec_module(mod)


def fixtures() -> Path:
    return Path(os.environ.get("IMMUNIZE_FIXTURES", ROOT.parent / "shared" / "fixtures"))
