#!/usr/bin/env python3
"""requirements.txt and the install lists of scripts/setup.sh, from pyproject.toml.

pyproject.toml holds the pack's one dependency list (``[project] dependencies``); this
script derives everything else from it:

    python scripts/requirements_from_pyproject.py            # rewrite requirements.txt
    python scripts/requirements_from_pyproject.py --check    # exit 1 if it is stale
    python scripts/requirements_from_pyproject.py --extra test   # print a group, one a line
    python scripts/requirements_from_pyproject.py --no-deps  # print [tool.immunize] install-no-deps

Standard library only (tomllib; on Python 3.10 the tomli that pip vendors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = ROOT / "requirements.txt"

HEADER = """\
# GENERATED from pyproject.toml ([project] dependencies) by
# scripts/requirements_from_pyproject.py -- do not edit; edit pyproject.toml and rerun it.
# tests/test_packaging.py fails when this file is stale.
#
# Also needed, installed WITHOUT their dependencies (their metadata pins an old torch/numpy
# or pulls a C++ build; see pyproject.toml):
#   pip install --no-deps {no_deps}
"""


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib


def load(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return _toml().load(f)


def dependencies(data: dict) -> list[str]:
    return list(data["project"]["dependencies"])


def extra(data: dict, name: str) -> list[str]:
    return list(data["project"].get("optional-dependencies", {})[name])


def no_deps(data: dict) -> list[str]:
    return list(data.get("tool", {}).get("immunize", {}).get("install-no-deps", []))


def render(data: dict) -> str:
    """The text requirements.txt must have."""
    head = HEADER.format(no_deps=" ".join(no_deps(data)) or "(nothing)")
    return head + "".join(f"{req}\n" for req in dependencies(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if requirements.txt is stale")
    mode.add_argument("--extra", metavar="GROUP", help="print [project.optional-dependencies] GROUP")
    mode.add_argument("--no-deps", action="store_true", help="print [tool.immunize] install-no-deps")
    args = ap.parse_args(argv)
    data = load()
    if args.extra:
        print("\n".join(extra(data, args.extra)))
        return 0
    if args.no_deps:
        print("\n".join(no_deps(data)))
        return 0
    text = render(data)
    current = REQUIREMENTS.read_text() if REQUIREMENTS.exists() else None
    if args.check:
        if current != text:
            print(f"{REQUIREMENTS.name} is stale: run python scripts/requirements_from_pyproject.py",
                  file=sys.stderr)
            return 1
        return 0
    if current != text:
        REQUIREMENTS.write_text(text)
        print(f"wrote {REQUIREMENTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
