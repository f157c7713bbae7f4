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


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_every_link_points_at_the_slot_that_holds_it(path):
    """A link's origin/target slot numbers match the output/input that lists it (the frontend
    otherwise 'fixes' the graph on load and logs 'Expected node to match patched data')."""
    ui = json.loads(path.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, sslot, dst, dslot, _ in ui["links"]:
        ins = [i for i, inp in enumerate(nodes[dst].get("inputs", [])) if inp.get("link") == lid]
        outs = [i for i, o in enumerate(nodes[src].get("outputs", [])) if lid in (o.get("links") or [])]
        assert ins == [dslot] and outs == [sslot], (path.name, lid, ins, dslot, outs, sslot)
