#!/usr/bin/env python3
"""locales/en/main.json (the ComfyUI frontend's i18n file of this pack), from nodes/*.py.

ComfyUI serves ``locales/<lang>/main.json`` of every custom node pack at ``/i18n``; the
frontend looks node names up under ``nodeDefs.<node id>.display_name`` / ``.description``.
For English those strings override the ones in the node schemas, so the file must say what
the schemas say: this script reads every ``io.Schema(node_id=..., display_name=...,
description=...)`` in nodes/*.py (parsing the source, importing nothing) and writes them.

    python scripts/locales_from_nodes.py          # rewrite locales/en/main.json
    python scripts/locales_from_nodes.py --check  # exit 1 if it is stale

tests/test_packaging.py fails when the file is stale: rerun this after changing a node's
id, display name or description, or adding a node.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = ROOT / "nodes"
MAIN_JSON = ROOT / "locales" / "en" / "main.json"
FIELDS = ("display_name", "description")


def schemas(nodes_dir: Path = NODES) -> dict[str, dict[str, str]]:
    """``{node id: {"display_name": ..., "description": ...}}`` of every io.Schema call."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(nodes_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, (ast.Attribute, ast.Name))
                    and getattr(call.func, "attr", getattr(call.func, "id", None)) == "Schema"):
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            if "node_id" not in kw:
                continue
            try:
                node_id = ast.literal_eval(kw["node_id"])
                entry = {f: ast.literal_eval(kw[f]) for f in FIELDS if f in kw}
            except ValueError as e:
                raise SystemExit(f"{path.name}:{call.lineno}: node_id/display_name/description "
                                 f"must be string literals for {MAIN_JSON.name} ({e})") from e
            if node_id in out:
                raise SystemExit(f"{path.name}:{call.lineno}: node id {node_id!r} defined twice")
            out[node_id] = entry
    return out


def render(nodes_dir: Path = NODES) -> str:
    data = {"nodeDefs": dict(sorted(schemas(nodes_dir).items()))}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = ap.parse_args(argv)
    text = render()
    current = MAIN_JSON.read_text(encoding="utf-8") if MAIN_JSON.exists() else None
    if args.check:
        if current != text:
            print(f"{MAIN_JSON.relative_to(ROOT)} is stale: run python scripts/locales_from_nodes.py",
                  file=sys.stderr)
            return 1
        return 0
    if current != text:
        MAIN_JSON.parent.mkdir(parents=True, exist_ok=True)
        MAIN_JSON.write_text(text, encoding="utf-8")
        print(f"wrote {MAIN_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
