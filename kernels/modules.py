"""Helpers to use shared, possibly inference-mode weights inside an autograd graph."""

from __future__ import annotations

import copy
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
    ``torch.load(weights_only=True)`` (no pickled code is ever run). Tensors land on the CPU."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: {e}). Use a "
                         ".safetensors file or a plain state-dict checkpoint.") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name → tensor), found {type(obj).__name__}.")
    return obj
