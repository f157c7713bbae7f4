"""The UI-format workflows users open and their API-format twins the tests run say the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI = sorted((ROOT / "workflows").glob("*.json"))


def test_every_ui_workflow_has_an_api_twin_and_back():
    api = {p.name for p in (ROOT / "workflows" / "api").glob("*.json")}
    assert UI, "no workflows"
    assert {p.name for p in UI} == api


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_twins_agree(path, comfy):
    from immunize.nodes import _all_nodes

    ours = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in _all_nodes()}
    ui = json.loads(path.read_text())
    api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
    assert "nodes" in ui and "links" in ui
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api), "the twins have different node ids"
    links = {link[0]: link for link in ui["links"]}
    for nid, node in nodes.items():
        entry = api[nid]
        assert entry["class_type"] == node["type"], nid
        # every UI link arrives in the API as [source id, slot] on the same input
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                assert not isinstance(entry["inputs"].get(inp["name"]), list), (nid, inp["name"])
                continue
            _, src, slot, dst, _, _ = links[inp["link"]]
            assert dst == node["id"]
            assert entry["inputs"][inp["name"]] == [str(src), slot], (nid, inp["name"])
        widgets = [v for k, v in entry["inputs"].items() if not isinstance(v, list)]
        if node["type"] in ours:
            schema = ours[node["type"]]
            order = [i.id for i in schema.inputs if i.io_type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            assert node["widgets_values"] == [entry["inputs"][k] for k in order], nid
            required = {i.id for i in schema.inputs if not i.optional}
            assert required <= set(entry["inputs"]), (nid, required - set(entry["inputs"]))
        else:  # core nodes: the API's widget values appear in the UI's widget list
            for v in widgets:
                assert v in node["widgets_values"], (nid, v)
