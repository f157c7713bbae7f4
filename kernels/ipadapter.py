"""IP-Adapter in pure torch: image projections, decoupled cross-attention and a weights loader.

IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models") conditions a frozen UNet on an image. A CLIP vision encoder's features are
projected to a few *image tokens* c_i, and every cross-attention layer of the UNet gets a second,
image-only attention that shares the query (paper eq. 5, "decoupled cross-attention"):

    Z = Attention(Q, K_t, V_t) + λ · Attention(Q, K_i, V_i)
    Q = Z_in W_q,  K_t = c_t W_k,  V_t = c_t W_v        (the UNet's own attn2, text tokens c_t)
    K_i = c_i W'_k,  V_i = c_i W'_v                      (the adapter's ``to_k_ip``, ``to_v_ip``)

with λ the IP scale (0 gives back the text-only model). Image token projections P, c_i = P(·):

- ``plain`` (ip-adapter_sd15, ip-adapter_sdxl[_vit-h]): from the projected CLIP image embedding
  e ∈ R^{d_clip}:  c_i = LayerNorm(reshape(W e + b, [N, D]))  (N = 4 tokens, D = cross-attn dim).
- ``plus`` / ``plus-face`` (ip-adapter-plus[-face]_*): a Perceiver *Resampler* over the CLIP
  vision tower's penultimate hidden states h ∈ R^{P×w} (P = 257 patches + class token):

      x = h W_in;  L⁰ = learned queries ∈ R^{Q×d}
      Lˡ⁺¹ = Lˡ + PerceiverAttn(x, Lˡ);  Lˡ⁺¹ ← Lˡ⁺¹ + FF(Lˡ⁺¹)           (depth layers)
      PerceiverAttn(x, L) = W_o · softmax((L̂W_q)(Ŝ W_k)ᵀ/√d_h) (Ŝ W_v),  L̂ = LN₂(L),  Ŝ = [LN₁(x); L̂]
      FF = Linear(4d → d) ∘ GELU ∘ Linear(d → 4d) ∘ LN
      c_i = LN_out(L W_out)

  ``plus-face`` has exactly the plus layout (trained on face crops); it is told apart by name only.
- ``full-face`` (ip-adapter-full-face_sd15): an MLP on every penultimate token:
  c_i = LN(W₂ GELU(W₁ h)).

Checkpoint layout (safetensors, or the official ``.bin`` with the same two sub-dicts):
``image_proj.*`` and ``ip_adapter.<n>.to_k_ip.weight`` / ``.to_v_ip.weight`` where n enumerates
diffusers' attention processors (attn1, attn2 interleaved, so n = 1, 3, 5, …) in the order
down blocks → up blocks → mid block, i.e. ComfyUI's input → output → middle transformer blocks.
Everything here is shape-driven: the kind, D (768 → SD1.5, 2048 → SDXL), the CLIP width and the
number of cross-attention layers are read from the tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import load_state_dict_file

KINDS = ("plain", "plus", "plus-face", "full-face")
FAMILY_BY_CROSS_DIM = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


def family_of(cross_attention_dim: int) -> str:
    """A readable base-model family for a cross-attention width (768 → 'SD1.5', 2048 → 'SDXL')."""
    return FAMILY_BY_CROSS_DIM.get(int(cross_attention_dim), f"cross_attention_dim {cross_attention_dim}")


# --------------------------------------------------------------------------- attention


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax attention on flat heads: q ``[B,Lq,H·d]``, k/v ``[B,Lk,H·d]`` → ``[B,Lq,H·d]``."""
    b, lq, c = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, lq, -1)


def ip_attention(q: Tensor, k_text: Tensor, v_text: Tensor, k_img: Tensor, v_img: Tensor,
                 heads: int, scale: float) -> Tensor:
    """Decoupled cross-attention (IP-Adapter eq. 5): Attn(Q,K_t,V_t) + λ·Attn(Q,K_i,V_i).

    q ``[B,Lq,C]``; k_text, v_text ``[B,Lt,C]``; k_img, v_img ``[B,N,C]`` (a batch of 1 is
    broadcast); heads: attention heads (C divisible by it); scale: λ. Returns ``[B,Lq,C]``.

    Example:
        >>> out = ip_attention(q, k, v, layer.to_k_ip(tokens), layer.to_v_ip(tokens), 8, 1.0)
    """
    out = attention(q, k_text, v_text, heads)
    if scale == 0:
        return out
    if k_img.shape[0] != q.shape[0]:
        k_img, v_img = _match_batch(k_img, q.shape[0]), _match_batch(v_img, q.shape[0])
    return out + scale * attention(q, k_img.to(q.dtype), v_img.to(q.dtype), heads)


def _match_batch(t: Tensor, b: int) -> Tensor:
    if b % t.shape[0] != 0:
        raise ValueError(f"image tokens for a batch of {t.shape[0]} cannot serve a batch of {b}")
    return t.repeat_interleave(b // t.shape[0], dim=0)


# --------------------------------------------------------------------------- projections


class PlainImageProjection(nn.Module):
    """c = LayerNorm(reshape(W e + b, [N, D])): ``[B, d_clip]`` → ``[B, N, D]``."""

    def __init__(self, clip_dim: int, cross_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.cross_dim = num_tokens, cross_dim
        self.proj = nn.Linear(clip_dim, num_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.num_tokens, self.cross_dim))


class MLPImageProjection(nn.Module):
    """full-face: c = LN(W₂ GELU(W₁ h)) per token: ``[B, P, w]`` → ``[B, P, D]``."""

    def __init__(self, clip_dim: int, cross_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, cross_dim),
                                  nn.LayerNorm(cross_dim))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """Queries L attend to [LN₁(x); LN₂(L)] (the Resampler's attention; see the module docstring)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(q, k, v, self.heads))


class Resampler(nn.Module):
    """plus / plus-face: penultimate CLIP states ``[B, P, w]`` → ``[B, Q, D]`` image tokens."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_queries: int,
                 embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, heads, dim_head),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPLayer(nn.Module):
    """One attn2 layer's image K/V projections W'_k, W'_v: ``[B,N,D]`` → ``[B,N,C]``."""

    def __init__(self, cross_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, inner_dim, bias=False)


# --------------------------------------------------------------------------- the adapter


@dataclass
class IPAdapterConfig:
    """What the tensors say about an IP-Adapter (see :func:`detect_config`).

    kind: one of :data:`KINDS`; clip_dim: width of the CLIP features it reads (the projected
    image embedding for ``plain``, the hidden width for the others); cross_dim: D, the UNet's
    cross-attention width; layer_ids: the ``ip_adapter.<n>`` indices in order; inner_dims: each
    layer's attention width C; num_tokens: N (plain; the query count Q for plus).
    Resampler only: dim, depth, heads, dim_head, ff_mult.
    """

    kind: str
    clip_dim: int
    cross_dim: int
    layer_ids: list[int]
    inner_dims: list[int]
    num_tokens: int = 4
    dim: int = 0
    depth: int = 0
    heads: int = 0
    dim_head: int = 64
    ff_mult: int = 4
    name: str = ""

    @property
    def family(self) -> str:
        return family_of(self.cross_dim)

    @property
    def features(self) -> str:
        """Which CLIP vision output feeds the projection: ``image_embeds`` or ``penultimate``."""
        return "image_embeds" if self.kind == "plain" else "penultimate"

    def describe(self) -> str:
        return (f"{self.kind} IP-Adapter for {self.family} (cross_attention_dim {self.cross_dim}, "
                f"{len(self.layer_ids)} cross-attention layers, CLIP {self.features} width {self.clip_dim})")


class IPAdapter(nn.Module):
    """An IP-Adapter whose ``state_dict`` keys are the checkpoint's (``image_proj.*``, ``ip_adapter.<n>.*``).

    ``tokens(features)`` maps CLIP vision features (``[B, d]`` image embeds for plain, ``[B, P, w]``
    penultimate hidden states otherwise) to image tokens c_i ``[B, N, D]``; ``layers`` lists the
    per-attn2 :class:`IPLayer` in UNet order (input → output → middle blocks).
    """

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        c = config
        if c.kind not in KINDS:
            raise ValueError(f"IP-Adapter kind must be one of {KINDS}, got {c.kind!r}")
        self.config = c
        if c.kind == "plain":
            self.image_proj = PlainImageProjection(c.clip_dim, c.cross_dim, c.num_tokens)
        elif c.kind == "full-face":
            self.image_proj = MLPImageProjection(c.clip_dim, c.cross_dim)
        else:
            self.image_proj = Resampler(c.dim, c.depth, c.heads, c.dim_head, c.num_tokens, c.clip_dim, c.cross_dim,
                                        c.ff_mult)
        self.ip_adapter = nn.ModuleDict({str(i): IPLayer(c.cross_dim, d) for i, d in zip(c.layer_ids, c.inner_dims)})

    @property
    def layers(self) -> list[IPLayer]:
        return [self.ip_adapter[str(i)] for i in self.config.layer_ids]

    def tokens(self, features: Tensor) -> Tensor:
        """CLIP features → image tokens ``[B, N, D]`` (float32 math in the module's dtype)."""
        want = 2 if self.config.features == "image_embeds" else 3
        if features.dim() != want or features.shape[-1] != self.config.clip_dim:
            what = ("a projected image embedding [B, d]" if want == 2
                    else "penultimate hidden states [B, tokens, width]")
            raise ValueError(
                f"clip_vision gives features of shape {tuple(features.shape)} but this {self.config.describe()} "
                f"needs {what} with d = {self.config.clip_dim}. Use the CLIP vision model the IP-Adapter was "
                "trained with (ViT-H/14 for ip-adapter_sd15/-plus and *_vit-h; ViT-bigG/14 for ip-adapter_sdxl)."
            )
        dtype = next(self.parameters()).dtype
        return self.image_proj(features.to(dtype))


# --------------------------------------------------------------------------- loading

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def split_state_dict(sd: Mapping[str, object]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A flat (``image_proj.x`` / ``ip_adapter.x``) or nested ({"image_proj": …, "ip_adapter": …})
    state dict → (image_proj dict, ip_adapter dict) with the prefixes removed."""
    if isinstance(sd.get("image_proj"), Mapping) and isinstance(sd.get("ip_adapter"), Mapping):
        return dict(sd["image_proj"]), dict(sd["ip_adapter"])
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    return proj, ip


def detect_config(sd: Mapping[str, object], name: str = "") -> IPAdapterConfig:
    """Read an IP-Adapter's kind and sizes from its tensors; a ValueError says what is wrong."""
    label = f"IP-Adapter {name!r}" if name else "IP-Adapter"
    proj, ip = split_state_dict(sd)
    if not proj or not ip:
        sample = list(sd.keys())[:4]
        raise ValueError(
            f"{label}: not an IP-Adapter checkpoint — expected keys 'image_proj.*' and 'ip_adapter.<n>.to_k_ip.weight', "
            f"found e.g. {sample}. Put an IP-Adapter file (e.g. ip-adapter_sd15.safetensors) in models/ipadapter."
        )
    if any("lora" in k for k in ip) or "perceiver_resampler.proj_in.weight" in proj or (
            "norm.weight" in proj and "proj.0.weight" in proj):
        raise ValueError(
            f"{label} is a FaceID IP-Adapter (InsightFace embeddings + LoRA); it is not supported here. Use a "
            "CLIP-image IP-Adapter: ip-adapter[-plus][-face]_sd15 or ip-adapter[-plus][-face]_sdxl[_vit-h]."
        )

    layers: dict[int, dict[str, Tensor]] = {}
    for k, v in ip.items():
        m = _LAYER_KEY.match(k)
        if m is None:
            raise ValueError(f"{label}: unexpected key 'ip_adapter.{k}' (only to_k_ip/to_v_ip weights are known).")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
    ids = sorted(layers)
    inner, cross = [], set()
    for i in ids:
        if set(layers[i]) != {"to_k_ip", "to_v_ip"}:
            raise ValueError(f"{label}: layer ip_adapter.{i} lacks {({'to_k_ip', 'to_v_ip'} - set(layers[i]))}; "
                             "the file is incomplete.")
        wk, wv = layers[i]["to_k_ip"], layers[i]["to_v_ip"]
        if wk.dim() != 2 or wk.shape != wv.shape:
            raise ValueError(f"{label}: ip_adapter.{i} to_k_ip {tuple(wk.shape)} / to_v_ip {tuple(wv.shape)} "
                             "are not matching 2-D weights.")
        inner.append(int(wk.shape[0]))
        cross.add(int(wk.shape[1]))
    if len(cross) != 1:
        raise ValueError(f"{label}: layers disagree on the cross-attention width ({sorted(cross)}).")
    (cross_dim,) = cross

    base = dict(clip_dim=0, cross_dim=cross_dim, layer_ids=ids, inner_dims=inner, name=name)
    if "proj.weight" in proj and "norm.weight" in proj:
        d = int(proj["norm.weight"].shape[0])
        out, clip_dim = proj["proj.weight"].shape
        if d != cross_dim or out % d:
            raise ValueError(f"{label}: image_proj gives tokens of width {d} (proj {tuple(proj['proj.weight'].shape)}) "
                             f"but its attention layers read width {cross_dim}.")
        cfg = IPAdapterConfig(kind="plain", num_tokens=int(out) // d, **{**base, "clip_dim": int(clip_dim)})
    elif "proj.3.weight" in proj:
        cfg = IPAdapterConfig(kind="full-face", num_tokens=0, **{**base, "clip_dim": int(proj["proj.0.weight"].shape[1])})
        if int(proj["proj.3.weight"].shape[0]) != cross_dim:
            raise ValueError(f"{label}: image_proj output width {proj['proj.3.weight'].shape[0]} ≠ {cross_dim}.")
    elif "latents" in proj and "proj_in.weight" in proj:
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        q_out = int(proj["layers.0.0.to_q.weight"].shape[0])
        dim_head = 64 if q_out % 64 == 0 else q_out  # the official Resamplers use 64-wide heads
        ff_mult = int(proj["layers.0.1.1.weight"].shape[0]) // int(proj["latents"].shape[2])
        kind = "plus-face" if "face" in os.path.basename(name).lower() else "plus"
        cfg = IPAdapterConfig(
            kind=kind, num_tokens=int(proj["latents"].shape[1]), dim=int(proj["latents"].shape[2]), depth=depth,
            heads=q_out // dim_head, dim_head=dim_head, ff_mult=ff_mult,
            **{**base, "clip_dim": int(proj["proj_in.weight"].shape[1])},
        )
        if int(proj["proj_out.weight"].shape[0]) != cross_dim:
            raise ValueError(f"{label}: image_proj output width {proj['proj_out.weight'].shape[0]} ≠ {cross_dim}.")
    else:
        raise ValueError(
            f"{label}: unknown image projection (keys {sorted(proj)[:6]}). Supported: plain (proj + norm), plus / "
            "plus-face (Resampler: latents, proj_in, layers, proj_out), full-face (proj.0 … proj.3)."
        )
    return cfg


def build_ipadapter(sd: Mapping[str, object], name: str = "") -> IPAdapter:
    """An :class:`IPAdapter` with ``sd``'s weights (float32, CPU, eval, no grad); ValueError if it does not fit."""
    cfg = detect_config(sd, name)
    proj, ip = split_state_dict(sd)
    flat = {f"image_proj.{k}": v for k, v in proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip.items()})
    model = IPAdapter(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in flat.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"IP-Adapter {name!r}: weights do not fit the detected {cfg.describe()}: "
                         f"{str(e).splitlines()[-1].strip()}") from e
    return model.eval().requires_grad_(False)


def load_ipadapter(path: str | os.PathLike) -> IPAdapter:
    """Load an IP-Adapter from ``.safetensors`` (or a ``.bin`` state dict, read with weights_only=True)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"IP-Adapter file {path!r} does not exist. Put the file in models/ipadapter.")
    return build_ipadapter(load_state_dict_file(path), os.path.basename(path))


__all__ = [
    "KINDS", "IPAdapter", "IPAdapterConfig", "IPLayer", "MLPImageProjection", "PerceiverAttention",
    "PlainImageProjection", "Resampler", "attention", "build_ipadapter", "detect_config", "family_of",
    "ip_attention", "load_ipadapter", "split_state_dict",
]
