"""Cross-attention capture and attn2 patch building for ComfyUI UNets (SD1.x/2.x, SDXL).

ComfyUI lets a caller replace the attention of any cross-attention layer through
``transformer_options["patches_replace"]["attn2"][key]``. ``BasicTransformerBlock`` then runs
``to_q``/``to_k``/``to_v`` itself, calls ``patch(q, k, v, extra_options)`` and applies
``to_out`` to what the patch returns (comfy/ldm/modules/attention.py):

- q ``[B, HW, heads·d]`` (image tokens), k and v ``[B, T, heads·d]`` (text tokens);
- the patch returns ``[B, HW, heads·d]``, the attention output before ``to_out``;
- extra_options holds ``n_heads``, ``dim_head``, ``attn_precision``, ``block`` (``("input", i)``,
  ``("middle", 0)``, ``("output", i)``: the index in ``input_blocks``/``output_blocks``, set by
  openaimodel's forward), ``block_index`` (the transformer block inside that SpatialTransformer),
  ``original_shape`` (the UNet input ``[B,C,H,W]``), ``activations_shape`` (this layer's
  ``[B,C,h,w]``) and, when called by a sampler, ``cond_or_uncond`` (one 0 = cond / 1 = uncond
  entry per equal chunk of the batch).
- The key looked up is ``(block[0], block[1], block_index)`` first, then ``(block[0], block[1])``.

This file provides

- :func:`attn2_keys` — every ``(name, id, index)`` key of a UNet's cross-attention layers
  (:func:`attn2_layers` — with each layer's module path, for LoRA targets);
- :func:`explicit_attention` — softmax(q·kᵀ/√d)·v with the probabilities returned, so they
  have a gradient (ComfyUI's fused kernels never materialise them);
- :func:`add_attn2_patches` — the reusable patch builder: a *new* transformer_options with a
  patch per key, each made by ``make_patch(key, existing)`` where ``existing`` is the patch
  already installed for that key (or None). IP-Adapter injection and attention capture both use it;
- :class:`AttentionCapture` — records the text-attention probabilities ``[B, heads, HW, T]`` of
  every (or chosen-resolution) layer while returning the normal attention output, and
  aggregates them into per-token maps ``[B, T, h, w]`` on the latent grid; with a ``reduce``
  function it keeps only what the caller needs of each layer (SAU: the trigger tokens' share
  ``[B, HW]``, so a sampling loop does not hold every layer's full probabilities). DANP's
  mask guidance and SAU's Backdoor Scan / unlearning both capture through it.

Composition rule (what happens when a key already has an attn2 patch): the capture *wraps* it.
The wrapped patch computes the layer's output, called exactly once with the same
(q, k, v, extra_options), so its effect (e.g. IP-Adapter's image tokens) is kept; the capture
records the softmax of q against the *text* keys ``k`` it was given, i.e. the cross-attention
to the prompt, computed separately. A patch that wants to wrap the capture likewise receives it
as ``existing`` and must call it once for the text part. We build our transformer_options per
call, so normally nothing is there before us; the user's ModelPatcher is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AttnFn = Callable[[Tensor, Tensor, Tensor, dict], Tensor]
"""ComfyUI's attn2 replace signature: ``(q, k, v, extra_options) → out [B, HW, heads·d]``."""

AttnKey = tuple  # ("input" | "middle" | "output", block id, transformer index)


# --------------------------------------------------------------------------- attention math


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, heads·d]`` → ``[B, heads, N, d]`` (ComfyUI's head layout)."""
    b, n, hd = x.shape
    return x.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3)


def attention_probs(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(q·kᵀ/√d) over the keys, in float32: ``[B, heads, Nq, Nk]``, rows sum to 1."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    scale = qh.shape[-1] ** -0.5
    return torch.matmul(qh, kh.transpose(-1, -2)).mul(scale).softmax(dim=-1)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Attention with the probabilities materialised (differentiable).

    q ``[B, Nq, heads·d]``, k/v ``[B, Nk, heads·d]`` → (out ``[B, Nq, heads·d]`` in v's dtype,
    probs ``[B, heads, Nq, Nk]`` float32). Same math as ComfyUI's ``attention_basic``.
    """
    probs = attention_probs(q, k, heads)
    vh = split_heads(v, heads)
    out = torch.matmul(probs.to(vh.dtype), vh)  # [B, heads, Nq, d]
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d), probs


def comfy_attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    """What the layer computes when it is not patched (ComfyUI's configured attention)."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"],
                               attn_precision=extra_options.get("attn_precision"))


# --------------------------------------------------------------------------- keys and builder


def attn2_layers(diffusion_model: torch.nn.Module) -> list[tuple[AttnKey, str]]:
    """Every cross-attention layer of a UNet: ``(key, module path)`` in forward order.

    diffusion_model: ComfyUI's ``openaimodel.UNetModel`` (``model.diffusion_model``). The key
    ``(name, block id, transformer index)`` is what openaimodel's forward puts in
    ``transformer_options["block"]`` plus the index of the BasicTransformerBlock inside the
    block's SpatialTransformer; the path names that block inside ``diffusion_model`` (e.g.
    ``input_blocks.1.1.transformer_blocks.0``; its ``.attn2.to_k`` is the key projection),
    for callers that put LoRA layers on the same projections. Blocks whose attn2 is None (no
    cross-attention) are skipped.
    """
    from comfy.ldm.modules.attention import SpatialTransformer

    out: list[tuple[AttnKey, str]] = []
    groups = (("input", "input_blocks", list(getattr(diffusion_model, "input_blocks", []))),
              ("middle", "middle_block", [getattr(diffusion_model, "middle_block", None)]),
              ("output", "output_blocks", list(getattr(diffusion_model, "output_blocks", []))))
    for name, attr, blocks in groups:
        for block_id, block in enumerate(blocks):
            if block is None:
                continue
            prefix = attr if name == "middle" else f"{attr}.{block_id}"
            for pos, layer in enumerate(block):
                if isinstance(layer, SpatialTransformer):
                    for index, tb in enumerate(layer.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            out.append(((name, block_id, index),
                                        f"{prefix}.{pos}.transformer_blocks.{index}"))
    return out


def attn2_keys(diffusion_model: torch.nn.Module) -> list[AttnKey]:
    """Every cross-attention key ``(name, block id, transformer index)`` of a UNet (see
    :func:`attn2_layers`)."""
    return [key for key, _ in attn2_layers(diffusion_model)]


def add_attn2_patches(
    transformer_options: Optional[dict],
    keys: Iterable[AttnKey],
    make_patch: Callable[[AttnKey, Optional[AttnFn]], AttnFn],
) -> dict:
    """A new transformer_options with an attn2 replace patch at each key.

    transformer_options: the options to extend (not modified; None = empty); keys: from
    :func:`attn2_keys`; make_patch(key, existing) returns the patch for ``key`` given the patch
    already there (None if none; a 2-tuple ``(name, id)`` key counts as already there for every
    index of that block, as ComfyUI's lookup does). The nested ``patches_replace`` and
    ``attn2`` dicts are copied, so the caller's dicts (e.g. a ModelPatcher's model_options)
    stay untouched.

    Example (IP-Adapter-style injection that keeps any earlier patch):
        >>> def make(key, existing):
        ...     def patch(q, k, v, extra):
        ...         text = existing(q, k, v, extra) if existing else comfy_attention(q, k, v, extra)
        ...         return text + scale * my_image_attention(q, extra)
        ...     return patch
        >>> opts = add_attn2_patches(None, attn2_keys(unet), make)
    """
    opts = dict(transformer_options or {})
    replace = dict(opts.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    for key in keys:
        key = tuple(key)
        existing = attn2.get(key)
        if existing is None and len(key) == 3:
            existing = attn2.get(key[:2])
        attn2[key] = make_patch(key, existing)
    replace["attn2"] = attn2
    opts["patches_replace"] = replace
    return opts


# --------------------------------------------------------------------------- capture


@dataclass
class AttentionRecord:
    """One layer's text-attention probabilities for one UNet call.

    probs: ``[B, heads, h·w, T]`` float32 (rows sum to 1 over the T text tokens), with the graph
    — or, when the capture has a ``reduce`` function, what it returned for them;
    size: the layer's ``(h, w)``; factor: the latent-to-layer downscale (1, 2, 4, 8).
    """

    key: AttnKey
    probs: Tensor
    size: tuple[int, int]
    factor: int


def _layer_size(extra_options: dict, hw: int) -> tuple[tuple[int, int], int]:
    """The layer's (h, w) and its downscale factor relative to the UNet input grid."""
    original = extra_options.get("original_shape")
    act = extra_options.get("activations_shape")
    if act is not None and int(act[-2]) * int(act[-1]) == hw:
        h, w = int(act[-2]), int(act[-1])
    elif original is not None:  # older ComfyUI: infer from the latent grid and the token count
        factor = max(1, round(math.sqrt(original[-2] * original[-1] / hw)))
        h, w = math.ceil(original[-2] / factor), math.ceil(original[-1] / factor)
    else:
        raise ValueError("cannot tell the size of an attention layer (no shapes in extra_options)")
    if h * w != hw:
        raise ValueError(f"attention layer with {hw} tokens does not match a {h}x{w} grid")
    factor = 1
    if original is not None:  # the UNet halves with ceil: count the halvings from the input
        size = int(original[-2])
        while size > h:
            size, factor = math.ceil(size / 2), factor * 2
    return (h, w), factor


class AttentionCapture:
    """Records cross-attention probabilities per layer while leaving the output unchanged.

    factors: latent-to-layer downscale factors to record (e.g. ``{2, 4}``), None = all layers;
    keep_uncond: also record the uncond chunks of a cond/uncond batch (default: cond only);
    reduce: optional ``f(probs [B, heads, h·w, T]) → Tensor`` applied to each kept layer's
    probabilities before they are recorded (differentiable if f is), e.g. a token share
    ``[B, h·w]``; the records then hold f's result. It may be swapped between calls.

    Usage, one capture per UNet call (records accumulate until :meth:`clear`):
        >>> cap = AttentionCapture(factors={2, 4})
        >>> opts = cap.transformer_options(attn2_keys(unet))
        >>> eps = denoiser.eps(x_t, t, cond, transformer_options=opts)
        >>> maps = cap.maps(size=x_t.shape[-2:])  # [B, T, h, w]
    """

    def __init__(self, factors: Optional[Iterable[int]] = None, keep_uncond: bool = False,
                 reduce: Optional[Callable[[Tensor], Tensor]] = None):
        self.factors = None if factors is None else {int(f) for f in factors}
        self.keep_uncond = bool(keep_uncond)
        self.reduce = reduce
        self.records: list[AttentionRecord] = []

    def clear(self) -> None:
        self.records = []

    def wants(self, factor: int) -> bool:
        return self.factors is None or factor in self.factors

    def patch(self, key: AttnKey, inner: Optional[AttnFn] = None) -> AttnFn:
        """The attn2 replace patch for ``key``; ``inner`` (an earlier patch) computes the output."""

        def capture(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
            size, factor = _layer_size(extra_options, q.shape[1])
            if not self.wants(factor):
                return inner(q, k, v, extra_options) if inner else comfy_attention(q, k, v, extra_options)
            heads = int(extra_options["n_heads"])
            if inner is None:
                out, probs = explicit_attention(q, k, v, heads)
            else:
                out, probs = inner(q, k, v, extra_options), attention_probs(q, k, heads)
            probs = self._cond_part(probs, extra_options.get("cond_or_uncond"))
            if probs is not None and self.reduce is not None:
                probs = self.reduce(probs)
            if probs is not None:
                self.records.append(AttentionRecord(key=key, probs=probs, size=size, factor=factor))
            return out

        return capture

    def _cond_part(self, probs: Tensor, cond_or_uncond: Optional[list]) -> Optional[Tensor]:
        """Keep the cond chunks of a batched cond/uncond call (sampler layout), else everything."""
        if self.keep_uncond or not cond_or_uncond or len(cond_or_uncond) <= 1:
            return probs
        chunks = probs.chunk(len(cond_or_uncond), dim=0)
        kept = [c for c, kind in zip(chunks, cond_or_uncond) if kind == 0]
        return torch.cat(kept, dim=0) if kept else None

    def transformer_options(self, keys: Iterable[AttnKey], base: Optional[dict] = None) -> dict:
        """New transformer_options (``base`` extended, not modified) with a capture at each key."""
        return add_attn2_patches(base, keys, lambda key, existing: self.patch(key, existing))

    def maps(self, size: tuple[int, int]) -> Tensor:
        """Per-token maps ``[B, T, h, w]`` on the grid ``size``; see :func:`aggregate_maps`."""
        return aggregate_maps(self.records, size)


def aggregate_maps(records: list[AttentionRecord], size: tuple[int, int]) -> Tensor:
    """Average cross-attention over heads and layers at a common resolution → ``[B, T, h, w]``.

    Each layer's head-mean ``[B, T, h_l, w_l]`` is bilinearly upsampled to ``size`` (the latent
    grid) and the layers are averaged with equal weight. Bilinear weights sum to 1, so the
    result still sums to 1 over the tokens at every position. Differentiable.
    """
    if not records:
        raise ValueError(
            "no cross-attention was recorded: the model has no attn2 layer at the chosen "
            "resolution (pick 'all' layers), or it is not a UNet with cross-attention"
        )
    tokens = {r.probs.shape[-1] for r in records}
    if len(tokens) > 1:
        raise ValueError(
            f"the conditioning's entries have different token counts {sorted(tokens)}; the "
            "attention maps need one text: use a single text encode (no Conditioning Concat)"
        )
    h, w = int(size[0]), int(size[1])
    total = None
    for r in records:
        m = r.probs.mean(dim=1)  # [B, h_l·w_l, T]
        m = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], r.size[0], r.size[1])
        if (r.size[0], r.size[1]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        total = m if total is None else total + m
    return total / len(records)


def record_summary(records: list[AttentionRecord]) -> list[dict[str, Any]]:
    """Readable description of what was captured (key, grid, factor, heads, tokens)."""
    return [dict(key=r.key, size=r.size, factor=r.factor, heads=r.probs.shape[1],
                 tokens=r.probs.shape[-1]) for r in records]
