"""The real ComfyUI frontend in a headless Chromium, against a real server with the pack.

One server per module (``scripts/engine.py`` over a temporary base directory, the helpers of
``test_e2e``) and one headless Chromium (selenium, Debian's ``/usr/bin/chromium`` and
``/usr/bin/chromedriver``; ``scripts/setup_browser.sh`` installs them). For every UI workflow in
``workflows/*.json``:

* it is loaded through the page (``app.loadGraphData``, what opening the file does) and nothing
  complains: no missing-node or missing-model dialog, no other dialog, no warning/error toast
  (the frontend's "Alert" toasts, e.g. "Invalid workflow against zod schema"), no
  ``window.alert``, no ``console.error`` and no uncaught exception;
* every ``Immunize*`` node renders its widgets with the file's values, name by name: the file's
  positional ``widgets_values`` are named from the server's ``/object_info`` input order and
  compared with the page's widget of that name;
* it is queued from the page (``app.queuePrompt``) and the server accepts it (model loaders are
  served placeholder files named as in the workflow, so validation passes; the prompt is
  interrupted at once, its outcome is not the point), and then every seed widget still holds
  the file's value (no control-after-generate "randomize"/"increment" on them).

Then the demo, ``workflows/identity_protect.json``, runs from the page by clicking Run, with
few PGD iterations set in the page and the face-api recogniser from the shared fixtures: the
PGD node's progress moves (the websocket ``progress`` events the page receives), the prompt
succeeds, its Save Image node reports a PNG that the page can load, and the seed is unchanged.

Screenshots (per workflow: ``<name>.png`` at the file's own view and ``<name>.fit.png`` zoomed
to the whole graph; the demo before and after its run) go to
``output/frontend-screenshots/`` (git-ignored; ``IMMUNIZE_SCREENSHOTS`` moves them).

Marked ``browser``: the fast loop skips it with ``-m "not browser"``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from immunize.tests.test_e2e import _face_photos, engine_mod, serve_recognizers

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
# IMMUNIZE_UI_WORKFLOWS_DIR checks another folder of UI workflows (e.g. an older revision).
UI_DIR = Path(os.environ.get("IMMUNIZE_UI_WORKFLOWS_DIR", ROOT / "workflows"))
UI_WORKFLOWS = sorted(UI_DIR.glob("*.json"))
DEMO = UI_DIR / "identity_protect.json"
DEMO_ITERATIONS = 4
CHROMIUM = os.environ.get("IMMUNIZE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IMMUNIZE_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(os.environ.get("IMMUNIZE_SCREENSHOTS", ROOT / "output" / "frontend-screenshots"))
PAGE_TIMEOUT_S = 90
DEMO_TIMEOUT_S = 120
# Loader node → model folder: the server is given an empty file of the workflow's model name,
# enough for ComfyUI's validation (it only checks the name is listed); nothing here loads them.
PLACEHOLDER_FOLDERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "CLIPVisionLoader": "clip_vision",
    "ImmunizeLoadIPAdapter": "ipadapter",
}
SEED_NAMES = ("seed", "noise_seed")

# Runs before any page script: record window.alert, console.error and uncaught errors.
HOOKS_JS = r"""
window.__imm = {alerts: [], errors: [], toasts: [], dialogs: [], progress: [], events: []};
window.alert = (m) => { window.__imm.alerts.push(String(m)); };
const __origError = console.error.bind(console);
console.error = (...args) => {
  window.__imm.errors.push(args.map((a) => (a && a.stack) ? String(a.stack) : String(a)).join(' '));
  __origError(...args);
};
window.addEventListener('error', (e) => window.__imm.errors.push('uncaught: ' + (e.message || e)));
window.addEventListener('unhandledrejection', (e) =>
  window.__imm.errors.push('unhandled rejection: ' + ((e.reason && e.reason.stack) || e.reason)));
"""

# Once the app is up: record every toast and dialog the frontend shows (its Pinia stores
# "toast" and "dialog", reached through the workspace store's Pinia instance, _p._s), and the
# websocket events the page receives for its prompts.
STORE_HOOKS_JS = r"""
const app = window.app, imm = window.__imm, stores = app.extensionManager._p._s;
stores.get('toast').$onAction(({name, args}) => {
  if (name === 'add') imm.toasts.push(args[0]);
  if (name === 'addAlert') imm.toasts.push({severity: 'warn', summary: 'Alert', detail: args[0]});
});
stores.get('dialog').$onAction(({name, args}) => {
  if (name !== 'showDialog') return;
  let props = '';
  try { props = JSON.stringify(args[0].props || {}, (k, v) => (v instanceof Error ? String(v) : v)); }
  catch (e) { props = String(e); }
  imm.dialogs.push({key: args[0].key, title: args[0].title || '', props: props.slice(0, 800)});
});
for (const ev of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted',
                  'executed', 'progress']) {
  app.api.addEventListener(ev, (e) => {
    if (ev === 'progress') imm.progress.push(e.detail);
    imm.events.push({type: ev, detail: e.detail});
  });
}
return true;
"""

# console.error noise of an offline machine, not of a workflow: the page's lookups of
# api.comfy.org (node registry, release notes). (Failed loads of local files such as user.css
# are network log entries, not console.error calls, and are not collected.)
IGNORED_ERRORS = ("api.comfy.org", "ERR_NAME_NOT_RESOLVED", "Failed to fetch")


# ----------------------------------------------------------------------- fixtures
def _placeholder_models(eng) -> None:
    for path in UI_WORKFLOWS:
        for node in json.loads(path.read_text()).get("nodes", []):
            folder = PLACEHOLDER_FOLDERS.get(node.get("type"))
            values = node.get("widgets_values") or []
            if folder and values and isinstance(values[0], str):
                target = eng.models_dir(folder) / values[0]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()


def _input_images(eng, photos: list[Path]) -> None:
    """Every LoadImage file name the UI workflows use, as a real fixture face photo."""
    names = set()
    for path in UI_WORKFLOWS:
        for node in json.loads(path.read_text()).get("nodes", []):
            if node.get("type") == "LoadImage" and node.get("widgets_values"):
                names.add(node["widgets_values"][0])
    for i, name in enumerate(sorted(names)):
        shutil.copyfile(photos[i % len(photos)], eng.input_dir / name)


@pytest.fixture(scope="module")
def server(fixtures, tmp_path_factory):
    _browser_or_skip()
    if engine_mod.find_comfyui() is None:
        pytest.skip("ComfyUI is not installed: run scripts/setup.sh or set COMFYUI_DIR")
    faceapi = fixtures / "models" / "faceapi"
    if not (faceapi / "face_recognition_model.bin").is_file():
        pytest.skip(f"face-api recogniser not found in {faceapi}")
    eng = engine_mod.Engine(tmp_path_factory.mktemp("frontend-engine"))
    eng.prepare()
    serve_recognizers(eng, fixtures)
    _placeholder_models(eng)
    _input_images(eng, _face_photos(fixtures))
    # A returning user (no template browser over the canvas at start-up) who keeps node text
    # drawn when zoomed out (readable whole-graph screenshots).
    settings = eng.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0}))
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def _browser_or_skip():
    """selenium's webdriver module, or skip (before any server is started) saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: run scripts/setup_browser.sh")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} not found: run scripts/setup_browser.sh (apt-get install chromium chromium-driver)")
    return webdriver


@pytest.fixture(scope="module")
def page(server):
    webdriver = _browser_or_skip()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_script_timeout(PAGE_TIMEOUT_S)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOOKS_JS})
        driver.get(server.url)
        _wait(driver, "return !!(window.app && window.app.graph && window.app.extensionManager"
                      " && window.app.extensionManager._p && window.app.extensionManager._p._s.get('dialog')"
                      " && document.querySelector('canvas'))",
              PAGE_TIMEOUT_S, "the ComfyUI page did not come up")
        driver.execute_script(STORE_HOOKS_JS)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} within {timeout:.0f}s")


# ------------------------------------------------------------------------ helpers
def _reset(driver) -> None:
    """Forget what was recorded, close dialogs and toasts left by the previous workflow."""
    driver.execute_script(r"""
      const app = window.app, d = app.extensionManager._p._s.get('dialog');
      for (let i = 0; i < 20 && d.dialogStack.length; i++) d.closeDialog(d.dialogStack[d.dialogStack.length - 1]);
      app.extensionManager._p._s.get('toast').removeAll();
      for (const k of Object.keys(window.__imm)) window.__imm[k] = [];
    """)


def _load(driver, workflow: dict, name: str) -> None:
    err = driver.execute_async_script(r"""
      const [wf, name, done] = arguments;
      window.app.loadGraphData(wf, true, true, name)
        .then(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))))
        .then(() => done(null), (e) => done(String((e && e.stack) || e)));
    """, workflow, name)
    assert err is None, f"loadGraphData threw: {err}"
    time.sleep(0.3)  # toasts and dialogs are shown from promises settled after the load


def _complaints(driver) -> list[str]:
    """Everything the page said went wrong since the last reset: alerts, warn/error toasts,
    dialogs (in the store and in the DOM), console errors."""
    rec = driver.execute_script(r"""
      const imm = window.__imm, d = window.app.extensionManager._p._s.get('dialog');
      const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
      return {
        alerts: imm.alerts, errors: imm.errors, toasts: imm.toasts, dialogs: imm.dialogs,
        stack: d.dialogStack.map((x) => x.key),
        domDialogs: [...document.querySelectorAll('.p-dialog')].filter(visible)
          .map((el) => el.innerText.slice(0, 400)),
        domToasts: [...document.querySelectorAll('.p-toast-message')].filter(visible)
          .map((el) => el.innerText.slice(0, 400)),
      };
    """)
    out = [f"window.alert: {a}" for a in rec["alerts"]]
    for t in rec["toasts"]:
        if isinstance(t, dict) and t.get("severity") in ("warn", "error"):
            out.append(f"toast [{t.get('severity')}] {t.get('summary', '')}: {t.get('detail', '')}")
    out += [f"dialog {d['key']!r} {d['title']} {d['props']}".rstrip() for d in rec["dialogs"]]
    out += [f"dialog still open: {k!r}" for k in rec["stack"] if k not in {d["key"] for d in rec["dialogs"]}]
    out += [f"dialog in the page: {t!r}" for t in rec["domDialogs"] if not rec["dialogs"] and not rec["stack"]]
    out += [f"toast in the page: {t!r}" for t in rec["domToasts"] if not rec["toasts"]]
    out += [f"console.error: {e[:600]}" for e in rec["errors"] if not any(s in e for s in IGNORED_ERRORS)]
    return out


def _page_nodes(driver) -> dict[str, dict]:
    """{node id: {type, widgets: [[name, value, serialised], ...]}} of the graph in the page."""
    return driver.execute_script(r"""
      const out = {};
      for (const n of window.app.graph._nodes) {
        out[String(n.id)] = {type: n.type, widgets: (n.widgets || []).map((w) =>
          [w.name, w.value === undefined ? null : w.value,
           w.serialize !== false && !(w.options && w.options.serialize === false)])};
      }
      return out;
    """)


def _widget_inputs(info: dict) -> list[str]:
    """Names of *info*'s inputs that are widgets, in the order the frontend creates them
    (input_order), with the frontend's extra control_after_generate widget where it adds one."""
    inputs = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
    order = info.get("input_order") or {}
    names = [*order.get("required", []), *order.get("optional", [])] or list(inputs)
    out = []
    for name in names:
        spec = inputs.get(name)
        if not spec:
            continue
        kind = spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
            if opts.get("forceInput"):
                continue
            out.append(name)
            if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
                out.append("control_after_generate")
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _widget_mismatches(workflow: dict, page_nodes: dict, object_info: dict) -> list[str]:
    bad = []
    for node in workflow["nodes"]:
        if not str(node.get("type", "")).startswith("Immunize"):
            continue
        nid, ntype = str(node["id"]), node["type"]
        shown = page_nodes.get(nid)
        if shown is None or shown["type"] != ntype:
            bad.append(f"node {nid} ({ntype}) is not in the page (got {shown and shown['type']})")
            continue
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # named form: nothing positional to map
            pairs = list(values.items())
        else:
            names = _widget_inputs(object_info.get(ntype, {}))
            if len(names) != len(values):
                bad.append(f"node {nid} ({ntype}): the file has {len(values)} widget values {values}, "
                           f"the server's inputs make {len(names)} widgets {names}")
            pairs = list(zip(names, values))
        widgets = {w[0]: w[1] for w in shown["widgets"]}
        for name, want in pairs:
            if name not in widgets:
                bad.append(f"node {nid} ({ntype}): no widget {name!r} in the page (has {list(widgets)})")
            elif not _same(widgets[name], want):
                bad.append(f"node {nid} ({ntype}).{name}: page shows {widgets[name]!r}, file has {want!r}")
    return bad


def _seeds(page_nodes: dict) -> dict[str, object]:
    return {f"{nid}.{w[0]}": w[1] for nid, n in page_nodes.items() for w in n["widgets"] if w[0] in SEED_NAMES}


def _screenshot(driver, name: str, fit: bool = False) -> Path:
    """Save the page as SCREENSHOTS/<name>.png; *fit*: zoomed out to the whole graph first."""
    if fit:
        driver.execute_async_script(r"""
          const done = arguments[arguments.length - 1];
          window.app.canvas.deselectAll && window.app.canvas.deselectAll();
          Promise.resolve(window.app.extensionManager.command.execute('Comfy.Canvas.FitView'))
            .then(() => requestAnimationFrame(() => requestAnimationFrame(() => done(null))), () => done(null));
        """)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _queue_from_page(driver) -> str | None:
    """Queue the page's graph (app.queuePrompt, what Run does); the prompt id once the server
    started it, None when the page reported a problem instead (see _complaints)."""
    before = driver.execute_script("return window.__imm.events.length")
    # (its return value is no use: 1.32 returns false whenever the reply has a node_errors
    # object, even an empty one; a rejected prompt shows up as a dialog and console error)
    driver.execute_async_script(r"""
      const done = arguments[arguments.length - 1];
      window.app.queuePrompt(0).then(() => done(null), (e) => done(String(e)));
    """)
    started = _wait(driver, f"""
      const imm = window.__imm;
      const e = imm.events.slice({before}).find((x) => x.type === 'execution_start');
      if (e) return {{id: e.detail.prompt_id}};
      return (imm.dialogs.length || imm.errors.length || imm.alerts.length) ? {{id: null}} : null;""",
        30, "the server neither started the prompt queued from the page nor did the page complain")
    return started["id"]


def _wait_idle(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = requests.get(server.url + "/queue", timeout=10).json()
        if not q.get("queue_running") and not q.get("queue_pending"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the server's queue did not empty within {timeout:.0f}s")


# -------------------------------------------------------------------------- tests
@pytest.mark.parametrize("workflow_path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_renders_and_queues(workflow_path, server, object_info, page):
    workflow = json.loads(workflow_path.read_text())
    _reset(page)
    _load(page, workflow, workflow_path.name)
    problems = [f"on load: {c}" for c in _complaints(page)]
    _screenshot(page, workflow_path.stem)  # the file's own view, as a user opening it sees it
    _screenshot(page, f"{workflow_path.stem}.fit", fit=True)  # the whole graph

    nodes = _page_nodes(page)
    missing = [n["type"] for n in workflow["nodes"] if str(n["id"]) not in nodes]
    if missing:
        problems.append(f"nodes not in the page: {missing}")
    problems += _widget_mismatches(workflow, nodes, object_info)

    seeds = _seeds(nodes)
    _reset(page)
    prompt_id = _queue_from_page(page)
    if prompt_id is None:
        problems += [f"on queue: {c}" for c in _complaints(page)]
    else:
        # Accepted: its run is not the point here (placeholder models), stop it.
        requests.post(server.url + "/interrupt", json={"prompt_id": prompt_id}, timeout=10)
        after = _seeds(_page_nodes(page))
        changed = {k: (v, after.get(k)) for k, v in seeds.items() if not _same(after.get(k), v)}
        if changed:
            problems.append(f"seed widgets changed by queueing (before, after): {changed}")
        # Let its end (an error from a placeholder model, or the interrupt) reach the page
        # now, not during the next workflow's load.
        _wait(page, f"""return window.__imm.events.some((e) => ['execution_success', 'execution_error',
              'execution_interrupted'].includes(e.type) && e.detail.prompt_id === {json.dumps(prompt_id)});""",
              60, f"the page did not hear the end of prompt {prompt_id}")
    _wait_idle(server)
    assert not problems, f"{workflow_path.name} in the frontend:\n  " + "\n  ".join(problems)


def test_demo_runs_from_the_page_with_progress(server, page):
    workflow = json.loads(DEMO.read_text())
    _reset(page)
    _load(page, workflow, DEMO.name)
    pgd = page.execute_script(f"""
      const n = window.app.graph._nodes.find((n) => n.type === 'ImmunizePGDProtect');
      const w = n.widgets.find((w) => w.name === 'iterations');
      w.value = {DEMO_ITERATIONS}; if (w.callback) w.callback(w.value);
      n.setDirtyCanvas(true, true);
      return String(n.id);""")
    seeds = _seeds(_page_nodes(page))
    assert seeds, "the demo has no seed widget"
    _reset(page)
    _screenshot(page, f"{DEMO.stem}.before-run")

    # Click the Run button of the action bar, as a user would.
    clicked = page.execute_script(r"""
      const b = [...document.querySelectorAll('button')].find((b) =>
        b.offsetParent && /^\s*Run\s*$/.test(b.innerText) );
      if (!b) return false;
      b.click();
      return true;""")
    if not clicked:
        page.execute_script("window.app.queuePrompt(0)")
    t0 = time.monotonic()
    end = _wait(page, r"""
      const e = window.__imm.events.find((x) => ['execution_success', 'execution_error',
        'execution_interrupted'].includes(x.type));
      return e ? e.type : null;""", DEMO_TIMEOUT_S, "the demo prompt did not finish", poll=0.5)
    seconds = time.monotonic() - t0
    page.execute_script("window.app.canvas.setDirty(true, true)")
    time.sleep(0.5)
    _screenshot(page, f"{DEMO.stem}.after-run")
    rec = page.execute_script("return window.__imm")
    assert end == "execution_success", (
        f"the demo ended with {end}: "
        + json.dumps([e for e in rec["events"] if e["type"] == "execution_error"])[:3000]
        + "\n" + server._tail(40))
    assert clicked, "no Run button found in the page (queued with app.queuePrompt instead)"

    steps = [p["value"] for p in rec["progress"] if str(p.get("node")) == pgd]
    assert len(steps) >= 2, f"PGD node {pgd} sent {len(steps)} progress events: {rec['progress'][:20]} {[e['type'] for e in rec['events']]}"
    assert steps == sorted(steps) and steps[-1] > steps[0], f"PGD progress did not move forward: {steps}"
    assert all(str(p.get("max")) == str(DEMO_ITERATIONS) for p in rec["progress"] if str(p.get("node")) == pgd), (
        f"PGD progress max is not the {DEMO_ITERATIONS} iterations set in the page: {rec['progress'][:5]}")

    save_ids = {str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"}
    images = [img for e in rec["events"] if e["type"] == "executed" and str(e["detail"].get("node")) in save_ids
              for img in (e["detail"].get("output") or {}).get("images", [])]
    assert images, f"no Save Image output reached the page in {seconds:.0f}s: {json.dumps(rec['events'])[:2000]}"
    for img in images:
        assert img["filename"].endswith(".png"), img
        r = requests.get(server.url + "/view", params={k: img.get(k, "") for k in ("filename", "subfolder", "type")},
                         timeout=30)
        assert r.ok and r.content[:8] == b"\x89PNG\r\n\x1a\n", f"/view of {img} gave {r.status_code}"
    shown = page.execute_script(f"""
      const out = window.app.nodeOutputs || {{}};
      return Object.entries(out).filter(([k, v]) => {json.dumps(sorted(save_ids))}.includes(String(k).split(':').pop())
        && v && v.images && v.images.length).length;""")
    assert shown, "the page's node outputs hold no image for the Save Image node"

    after = _seeds(_page_nodes(page))
    assert after == seeds, f"seed widgets changed by the run: before {seeds}, after {after}"
    problems = [c for c in _complaints(page)]
    assert not problems, "the page complained during the run:\n  " + "\n  ".join(problems)
