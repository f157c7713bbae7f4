"""Helpers to use shared, possibly inference-mode weights inside an autograd graph."""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import nn


def grad_ready(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A private copy of ``module`` usable in a backward pass, leaving the original untouched.

    Weights loaded by a host that runs under ``torch.inference_mode()`` are inference tensors:
    autograd refuses to save them for backward. A deep copy made *outside* inference mode holds
    ordinary tensors. The copy is in eval mode with ``requires_grad=False`` on every parameter
    (we differentiate with respect to the input image only), optionally cast to ``dtype``.
    """
    with torch.inference_mode(False):
        clone = copy.deepcopy(module)
        for name, t in list(clone.named_parameters()) + list(clone.named_buffers()):
            if t.is_inference():  # some tensor types slip through deepcopy: clone them explicitly
                _set_tensor(clone, name, t.clone())
        if dtype is not None:
            clone = clone.to(dtype)
    clone.eval()
    clone.requires_grad_(False)
    return clone


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if isinstance(getattr(mod, leaf), nn.Parameter):
        setattr(mod, leaf, nn.Parameter(value, requires_grad=False))
    else:
        mod._buffers[leaf] = value


def load_state_dict_file(path: str) -> dict:
    """Read a weights file safely: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (no pickled code is ever run). Tensors land on the CPU.
    A file that cannot be read raises ValueError naming the file (not its folder: that is the
    user's install path) and the fix."""
    name = os.path.basename(str(path))
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError (garbage, truncated header), OSError
            raise ValueError(f"{name} is not a valid .safetensors file ({_first_line(e)}): it is truncated, "
                             "corrupt or another format. Download it again.") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise ValueError(f"{name}: not a loadable weights file ({type(e).__name__}: {_first_line(e)}). Use a "
                         ".safetensors file or a plain state-dict checkpoint; whole pickled models are not "
                         "loaded for safety.") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a state dict (name → tensor), found {type(obj).__name__}.")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def first_tensor(module: nn.Module) -> torch.Tensor:
    """A tensor of ``module`` that tells its device and dtype: its first parameter, else its first
    buffer (graph-model recognisers keep their weights as buffers)."""
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    raise ValueError(f"{type(module).__name__} holds no tensors: cannot tell its device or dtype")
