"""Packaging and install conventions: the Comfy Registry's pyproject fields, one dependency list
(requirements.txt generated from pyproject.toml), the template folder ComfyUI reads
(example_workflows/ = workflows/), workflow ids the frontend accepts, the i18n file, the
.comfyignore, and seed widgets without a control-after-generate widget. No ComfyUI needed."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI = sorted((ROOT / "workflows").glob("*.json"))
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
# zod's z.string().uuid(), which the frontend's workflow schema applies to a workflow's "id"
ZOD_UUID = re.compile(r"^[0-9a-fA-F]{8}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{12}$")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_immunize_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reqs():
    return _script("requirements_from_pyproject")


@pytest.fixture(scope="module")
def pyproject(reqs):
    return reqs.load(ROOT / "pyproject.toml")


# --------------------------------------------------------------------------- pyproject


def test_registry_fields(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    name = project["name"]
    # the registry's node id rules: < 100 chars, letters/digits/-_. without consecutive
    # specials, starts with a letter; and no "ComfyUI" in it
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]


def test_icon_is_the_repos_svg(pyproject):
    """Icon is the raw URL of a file of this repository: an SVG the registry accepts (≤ 800×400)."""
    icon = pyproject["tool"]["comfy"]["Icon"]
    repo = pyproject["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    m = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repo)}/[^/]+/(.+)", icon)
    assert m, f"Icon {icon!r} is not a raw URL into {repo}"
    path = ROOT / m.group(1)
    assert path.is_file() and path.suffix == ".svg", path
    svg = ET.parse(path).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(svg.get("width")) <= 800 and float(svg.get("height")) <= 400


def test_requirements_txt_is_generated_from_pyproject(reqs, pyproject):
    text = (ROOT / "requirements.txt").read_text()
    assert text == reqs.render(pyproject), (
        "requirements.txt differs from pyproject.toml: run python scripts/requirements_from_pyproject.py")
    assert "GENERATED from pyproject.toml" in text.splitlines()[0]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_dependency_groups(reqs, pyproject):
    deps = {_name(r) for r in reqs.dependencies(pyproject)}
    no_deps = {_name(r) for r in reqs.no_deps(pyproject)}
    test = {_name(r) for r in reqs.extra(pyproject, "test")}
    # what the pack imports at run time
    assert {"torch", "torchvision", "numpy", "safetensors", "kornia", "open-clip-torch",
            "matplotlib", "onnx", "onnx2torch", "diffusers"} <= deps
    # --no-deps packages must stay out of the resolver's list (their pins would swap torch)
    assert no_deps == {"facenet-pytorch", "brisque"} and not no_deps & deps
    assert all(re.search(r"==\d", r) for r in reqs.no_deps(pyproject)), "pin the --no-deps packages"
    assert {"pytest", "hypothesis", "requests", "selenium", "onnxruntime", "libsvm-official"} <= test
    # torch is never pinned here: scripts/setup.sh pins it on every pip call
    assert all(r in ("torch", "torchvision") for r in reqs.dependencies(pyproject) if _name(r).startswith("torch"))


# --------------------------------------------------------------------------- workflows


def test_example_workflows_are_the_ui_workflows():
    """ComfyUI's template browser reads example_workflows/: the same files as workflows/."""
    assert EXAMPLES, "example_workflows/ is empty"
    assert [p.name for p in EXAMPLES] == [p.name for p in UI], \
        "example_workflows/*.json and workflows/*.json name different files"
    for ex, ui in zip(EXAMPLES, UI):
        assert ex.read_bytes() == ui.read_bytes(), (
            f"example_workflows/{ex.name} differs from workflows/{ui.name}: cp workflows/*.json example_workflows/")


def test_workflow_ids_are_unique_uuids():
    ids = {}
    for path in UI + EXAMPLES:
        wid = json.loads(path.read_text())["id"]
        assert isinstance(wid, str) and ZOD_UUID.match(wid), f"{path}: id {wid!r} is not a UUID"
        if path.parent.name == "workflows":
            assert wid not in ids, f"{path.name} and {ids.get(wid)} share the id {wid}"
            ids[wid] = path.name


# --------------------------------------------------------------------------- i18n


def _node_ids() -> set[str]:
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r"""node_id\s*=\s*["'](Immunize\w+)["']""", path.read_text(encoding="utf-8")))
    return ids


def test_locale_names_every_node():
    main = json.loads((ROOT / "locales" / "en" / "main.json").read_text(encoding="utf-8"))
    defs = main["nodeDefs"]
    ids = _node_ids()
    assert len(ids) > 30
    missing = ids - set(defs)
    assert not missing, f"locales/en/main.json lacks {sorted(missing)}: run python scripts/locales_from_nodes.py"
    assert not set(defs) - ids, f"locales/en/main.json names unknown nodes {sorted(set(defs) - ids)}"
    for nid in ids:
        assert defs[nid].get("display_name") and defs[nid].get("description"), nid


def test_locale_says_what_the_schemas_say():
    """English locale strings override the schema's: they must be the same text."""
    loc = _script("locales_from_nodes")
    assert (ROOT / "locales" / "en" / "main.json").read_text(encoding="utf-8") == loc.render(), \
        "locales/en/main.json is stale: run python scripts/locales_from_nodes.py"


# --------------------------------------------------------------------------- .comfyignore


def test_comfyignore_keeps_what_runs():
    patterns = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert {"/tests/", "/scripts/", "/bench/", "/.ci/"} <= set(patterns)
    needed = ["__init__.py", "nodes/", "kernels/", "locales/", "example_workflows/",
              "pyproject.toml", "requirements.txt", "README.md", "LICENSE"]
    for pattern in patterns:
        bare = pattern.lstrip("/")
        assert not any(n == bare or n.startswith(bare.rstrip("/") + "/") or n.rstrip("/") == bare.rstrip("/")
                       for n in needed), f".comfyignore drops {pattern}, which the pack needs"
        assert not any(c in pattern for c in "*?[!"), f"keep .comfyignore to plain paths: {pattern}"


# --------------------------------------------------------------------------- seed widgets


def _int_inputs(path: Path):
    for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "Input"
                and isinstance(call.func.value, ast.Attribute) and call.func.value.attr == "Int"
                and call.args and isinstance(call.args[0], ast.Constant)):
            yield call.args[0].value, call


@pytest.mark.parametrize("path", sorted((ROOT / "nodes").glob("*.py")), ids=lambda p: p.stem)
def test_seed_inputs_have_no_control_widget(path):
    """The frontend adds a control-after-generate widget to an INT input named 'seed' or
    'noise_seed' unless the schema says control_after_generate=False; that widget randomizes
    the seed on every run and takes a slot in widgets_values, shifting the workflow files."""
    for name, call in _int_inputs(path):
        if name in ("seed", "noise_seed"):
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("control_after_generate")
            assert isinstance(value, ast.Constant) and value.value is False, \
                f"{path.name}:{call.lineno}: io.Int.Input({name!r}) needs control_after_generate=False"
