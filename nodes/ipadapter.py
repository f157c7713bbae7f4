"""IP-Adapter loader and the Identity Bridge objective (IDGuardian's guided flow identity deflection).

The math is in ``kernels/ipadapter.py`` (decoupled cross-attention, projections, loader) and
``kernels/bridge.py`` (the bridge S* and its two PGD modes). This file only connects ComfyUI's
objects to them:

- the IP branch enters the UNet as ``patches_replace["attn2"]`` entries (:class:`IPAttn2Patch`),
  keyed ``(block, block_id, transformer_index)`` like ComfyUI's own attention patches and built by
  one function, :func:`ip_transformer_options`, through ``attention.add_attn2_patches`` (so an
  attention capture or an earlier patch at the same layer composes with it). The Identity Bridge
  puts them in the ``transformer_options`` of one ε̂ call; the attacker node
  (:class:`ImmunizeApplyIPAdapter`) puts them in the model options of a *clone* of the MODEL for
  ComfyUI's KSampler. Nothing is ever stored on the user's MODEL;
- the image tokens come from the CLIP_VISION (projected image embedding for plain IP-Adapters,
  penultimate hidden states via ``intermediate_output=-2`` for the others): for the bridge through
  grad-usable copies of the CLIP vision model and the IP-Adapter made in ``bind``, for the attacker
  node once, without a graph (:func:`reference_tokens`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..kernels.clip import ImageEncoder
from ..kernels.ipadapter import IPAdapter, IPLayer, attention, family_of, load_ipadapter
from ..kernels.modules import grad_ready
from .attention import AttnFn, AttnKey, add_attn2_patches, comfy_attention
from .common import Node, CATEGORY, ObjectiveType, register_model_folders
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, latent_encoder, model_family
from .loaders import OpenClipVision, as_image_encoder

IPAdapterType = io.Custom("IMMUNIZE_IPADAPTER")

IPADAPTER_FOLDER = "ipadapter"
IPADAPTER_EXTENSIONS = {".safetensors", ".bin"}


def register_ipadapter_folder() -> None:
    """Make ``models/ipadapter`` known to ComfyUI (idempotent; shares it with other IP-Adapter packs)."""
    register_model_folders({IPADAPTER_FOLDER: IPADAPTER_EXTENSIONS})


register_ipadapter_folder()


# --------------------------------------------------------------------------- UNet side


def unet_attn2_layers(patcher: Any) -> list[dict]:
    """The MODEL's cross-attention layers in IP-Adapter order (input → output → middle blocks).

    Each entry: ``key`` (block, block_id, transformer_index) as ComfyUI's attn2 patches use it,
    ``heads``, ``inner`` (attention width C) and ``context`` (text width D).
    """
    from comfy.ldm.modules.attention import SpatialTransformer

    dm = patcher.model.diffusion_model
    groups = [("input", list(dm.input_blocks)), ("output", list(dm.output_blocks)),
              ("middle", [dm.middle_block] if getattr(dm, "middle_block", None) is not None else [])]
    layers = []
    for block, modules in groups:
        for block_id, module in enumerate(modules):
            for layer in module:
                if not isinstance(layer, SpatialTransformer):
                    continue
                for i, tb in enumerate(layer.transformer_blocks):
                    if getattr(tb, "attn2", None) is None:
                        continue
                    w = tb.attn2.to_k.weight
                    layers.append({"key": (block, block_id, i), "heads": int(tb.n_heads),
                                   "inner": int(w.shape[0]), "context": int(w.shape[1])})
    return layers


def check_ipadapter_fits(ipadapter: IPAdapter, patcher: Any) -> list[dict]:
    """The MODEL's attn2 layers, after checking that ``ipadapter`` was made for this model."""
    if not isinstance(ipadapter, IPAdapter):
        raise ValueError(f"ipadapter: expected an IMMUNIZE_IPADAPTER (Immunize Load IP-Adapter), got "
                         f"{type(ipadapter).__name__}.")
    dm = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(dm, "input_blocks") or not hasattr(dm, "output_blocks"):
        raise ValueError(f"model: IP-Adapters patch the cross-attention of SD1.x/SDXL UNets; this MODEL is "
                         f"{model_family(patcher) if dm is not None else type(patcher).__name__}, which has none. "
                         "Load an SD1.5 or SDXL checkpoint.")
    layers = unet_attn2_layers(patcher)
    cfg = ipadapter.config
    ctx = sorted({l["context"] for l in layers})
    fits = (len(layers) == len(cfg.layer_ids) and ctx == [cfg.cross_dim]
            and [l["inner"] for l in layers] == list(cfg.inner_dims))
    if not fits:
        model_ctx = ctx[0] if len(ctx) == 1 else ctx
        raise ValueError(
            f"ipadapter {cfg.name!r} is a {cfg.describe()}, but MODEL is {model_family(patcher)} "
            f"({family_of(model_ctx) if isinstance(model_ctx, int) else model_ctx}: cross_attention_dim "
            f"{model_ctx}, {len(layers)} cross-attention layers). Load the IP-Adapter made for this model "
            "(ip-adapter*_sd15 for SD1.5, ip-adapter*_sdxl* for SDXL)."
        )
    return layers


class IPAttn2Patch:
    """attn2 replace patch adding the IP-Adapter image branch (IP-Adapter eq. 5) to one layer.

    ComfyUI hands it q = to_q(n) ``[B,HW,C]``, k = to_k(text), v = to_v(text); it returns
    text(q, k, v) + λ·Attn(q, W'_k c_i, W'_v c_i) ``[B,HW,C]`` (before the block's ``to_out``), where
    text is the patch already at this key (``existing``, called exactly once) or ComfyUI's attention.

    layer: the adapter's :class:`IPLayer` (W'_k, W'_v); tokens: image tokens c_i ``[B|1, N, D]``;
    scale: λ; uncond_tokens: c_i ``[1, N, D]`` for the uncond chunks of a sampler batch (found from
    ``cond_or_uncond``; None: ``tokens`` everywhere); sigmas: ``(σ_start, σ_end)``, the branch is on
    only while σ_end ≤ σ ≤ σ_start (None: always); frozen: tokens and weights are constants (the
    attacker node), so K_i, V_i are computed once per device and dtype, without a graph.
    """

    def __init__(self, layer: IPLayer, tokens: Tensor, scale: float, existing: Optional[AttnFn] = None,
                 uncond_tokens: Optional[Tensor] = None, sigmas: Optional[tuple[float, float]] = None,
                 frozen: bool = False):
        self.layer, self.tokens, self.scale, self.existing = layer, tokens, float(scale), existing
        self.uncond_tokens, self.sigmas, self.frozen = uncond_tokens, sigmas, bool(frozen)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options; the patch is immutable, so share it
        # instead of copying the adapter's weights with every clone.
        return self

    def _kv(self, tokens: Tensor, which: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(K_i, V_i) ``[B|1, N, C]`` in q's device and dtype."""
        w = self.layer.to_k_ip.weight
        if not self.frozen:
            tokens = tokens.to(device, w.dtype)
            return self.layer.to_k_ip(tokens).to(dtype), self.layer.to_v_ip(tokens).to(dtype)
        key = (which, device, dtype)
        if key not in self._cache:  # ordinary tensors, usable in and out of inference mode
            with torch.inference_mode(False), torch.no_grad():
                tokens = tokens.to(w.device, w.dtype)
                self._cache[key] = (self.layer.to_k_ip(tokens).to(device, dtype),
                                    self.layer.to_v_ip(tokens).to(device, dtype))
        return self._cache[key]

    def active(self, extra_options: dict) -> bool:
        if self.scale == 0:
            return False
        sigma = extra_options.get("sigmas")
        if self.sigmas is None or sigma is None:
            return True
        s = float(sigma.reshape(-1)[0]) if isinstance(sigma, Tensor) else float(sigma)
        return self.sigmas[1] <= s <= self.sigmas[0]

    def image_kv(self, q: Tensor, extra_options: dict) -> tuple[Tensor, Tensor]:
        """K_i, V_i for q's batch: per chunk cond or uncond tokens in a sampler's batch."""
        chunks = extra_options.get("cond_or_uncond") or []
        if self.uncond_tokens is None or 1 not in chunks:
            k, v = self._kv(self.tokens, 0, q.device, q.dtype)
            return _batched(k, q.shape[0]), _batched(v, q.shape[0])
        size = q.shape[0] // len(chunks)
        kv = [self._kv(self.uncond_tokens if c == 1 else self.tokens, int(c == 1), q.device, q.dtype)
              for c in chunks]
        return (torch.cat([_batched(k, size) for k, _ in kv]), torch.cat([_batched(v, size) for _, v in kv]))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        out = self.existing(q, k, v, extra_options) if self.existing else comfy_attention(q, k, v, extra_options)
        if not self.active(extra_options):
            return out
        k_img, v_img = self.image_kv(q, extra_options)
        return out + self.scale * attention(q, k_img, v_img, extra_options["n_heads"]).to(out.dtype)


def _batched(t: Tensor, b: int) -> Tensor:
    """Tokens ``[n, N, C]`` → ``[b, N, C]``: shared (n = 1), as is (n = b) or each repeated b/n times."""
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, -1, -1)
    if b % t.shape[0] == 0:
        return t.repeat_interleave(b // t.shape[0], dim=0)
    raise ValueError(f"image tokens for a batch of {t.shape[0]} cannot serve a batch of {b}")


def ip_transformer_options(base: Optional[dict], keys: Sequence[AttnKey], layers: Sequence[IPLayer], tokens: Tensor,
                           scale: float, **patch_options: Any) -> dict:
    """New transformer_options (``base`` extended, not modified) with an :class:`IPAttn2Patch` at every key.

    keys: the attn2 keys in IP-Adapter order (``unet_attn2_layers``/:func:`check_ipadapter_fits`);
    layers: ``ipadapter.layers``, one per key; tokens: c_i ``[B|1, N, D]``; scale: λ;
    patch_options: ``uncond_tokens``, ``sigmas``, ``frozen`` as in :class:`IPAttn2Patch`. A patch
    already at a key is kept and computes the text part.
    """
    by_key = {tuple(key): layer for key, layer in zip(keys, layers)}
    if len(by_key) != len(layers):
        raise ValueError(f"{len(layers)} IP-Adapter layers for {len(by_key)} cross-attention layers")
    return add_attn2_patches(base, by_key, lambda key, existing: IPAttn2Patch(
        by_key[key], tokens, scale, existing=existing, **patch_options))


class IPAdapterDenoiser:
    """The bridge's denoiser protocol: ε̂(x_t, t | text cond, image tokens) for a ComfyUI MODEL.

    access: a :class:`DenoiserAccess` (private UNet copy); ipadapter: a grad-usable copy;
    layers: from :func:`check_ipadapter_fits`; scale: λ.
    """

    def __init__(self, access: DenoiserAccess, cond: Any, ipadapter: IPAdapter, layers: list[dict],
                 scale: float):
        self.access, self.cond, self.ipadapter, self.scale = access, cond, ipadapter, float(scale)
        self.keys = [l["key"] for l in layers]
        self.alphas_cumprod = access.alphas_cumprod

    def transformer_options(self, tokens: Tensor) -> dict:
        return ip_transformer_options(None, self.keys, self.ipadapter.layers, tokens, self.scale)

    def eps(self, x_t: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        return self.access.eps(x_t, t, self.cond, transformer_options=self.transformer_options(tokens))


# --------------------------------------------------------------------------- CLIP side


def clip_features_encoder(clip_vision: Any, features: str) -> ImageEncoder:
    """A differentiable CLIP encoder giving what the IP-Adapter reads (not yet a private copy).

    features: ``image_embeds`` (projected embedding ``[B,d]``) or ``penultimate`` (hidden states
    ``[B,P,w]`` of the second-to-last layer, ComfyUI's ``intermediate_output=-2``).
    """
    if features == "image_embeds":
        return as_image_encoder(clip_vision)
    if isinstance(clip_vision, OpenClipVision):
        raise ValueError("clip_vision: plus / full-face IP-Adapters read CLIP's penultimate hidden states, which "
                         "Load OpenCLIP Vision does not expose. Load the CLIP vision model with ComfyUI's "
                         "Load CLIP Vision node.")
    if not (hasattr(clip_vision, "model") and hasattr(clip_vision, "patcher")):
        raise ValueError(f"clip_vision: unsupported object {type(clip_vision).__name__}; use Load CLIP Vision.")
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    return ImageEncoder(f"clip_vision-penultimate-{type(clip_vision.model).__name__}", clip_vision.model,
                        _penultimate_states, size=clip_vision.image_size, mean=clip_vision.image_mean,
                        std=clip_vision.image_std)


def _penultimate_states(model, pixels):
    # ComfyUI's CLIP layers add residuals in place; functionalize makes them autograd-friendly.
    from torch.func import functionalize

    return functionalize(lambda px: model(pixel_values=px, intermediate_output=-2)[1])(pixels)


def _clip_width(clip_vision: Any, features: str) -> Optional[int]:
    """The width of the CLIP features, read from the weights when that is cheap (else None)."""
    model = getattr(clip_vision, "model", None)
    try:
        if features == "image_embeds":
            return int(model.visual_projection.weight.shape[0])
        return int(model.vision_model.embeddings.patch_embedding.weight.shape[0])
    except AttributeError:
        return None


def check_clip_vision_fits(clip_vision: Any, ipadapter: IPAdapter) -> None:
    """A ValueError unless ``clip_vision`` is connected and (where its weights tell) gives the width
    of features the IP-Adapter reads."""
    if clip_vision is None:
        raise ValueError("clip_vision: connect the CLIP vision model the IP-Adapter was trained with.")
    width = _clip_width(clip_vision, ipadapter.config.features)
    if width is not None and width != ipadapter.config.clip_dim:
        raise ValueError(
            f"clip_vision gives {ipadapter.config.features} of width {width}, but the {ipadapter.config.describe()} "
            f"needs width {ipadapter.config.clip_dim}. Use the CLIP vision model it was trained with (ViT-H/14 "
            "for ip-adapter_sd15/-plus and *_vit-h; ViT-bigG/14 for ip-adapter_sdxl)."
        )


def reference_tokens(ipadapter: IPAdapter, clip_vision: Any, images: Tensor, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """The attacker's image tokens, computed once without a graph.

    images: reference images ``[B,3,H,W]`` in [0, 1]. Returns (cond, uncond), each ``[1, N, D]``
    float32 on the adapter's device: cond is the mean over the images of their tokens; uncond are
    the tokens of an empty CLIP input, as the IP-Adapter reference pipeline makes them for the
    negative side (a zero image embedding for plain adapters; for the others the penultimate states
    of zero pixel values after CLIP's normalisation, i.e. an image of CLIP's mean colour).
    """
    encoder = clip_features_encoder(clip_vision, ipadapter.config.features)
    device = next(encoder.parameters()).device
    dev_ip = next(ipadapter.parameters()).device
    with torch.no_grad():
        feats = torch.cat([encoder(images[i:i + chunk].to(device)) for i in range(0, images.shape[0], chunk)])
        cond = ipadapter.tokens(feats.to(dev_ip)).float().mean(dim=0, keepdim=True)
        if ipadapter.config.features == "image_embeds":
            blank = torch.zeros(1, ipadapter.config.clip_dim, device=dev_ip)
        else:
            mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1)
            blank = encoder(mean.expand(1, 3, encoder.size, encoder.size)).to(dev_ip)
        uncond = ipadapter.tokens(blank).float()
    return cond, uncond


def apply_ipadapter(model: Any, ipadapter: IPAdapter, clip_vision: Any, image: Tensor, weight: float,
                    start_at: float = 0.0, end_at: float = 1.0) -> Any:
    """A clone of ``model`` whose every cross-attention layer adds the IP-Adapter image branch.

    image: the reference image(s) ``[B,H,W,3]`` in [0, 1] (several: their tokens are averaged);
    weight: λ; start_at / end_at: the fraction of sampling (0 = first step) during which the branch
    is on. The user's MODEL is not touched: the patches live in the clone's model options.
    """
    layers = check_ipadapter_fits(ipadapter, model)
    check_clip_vision_fits(clip_vision, ipadapter)
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[-1] != 3 or image.shape[0] == 0:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image: expected a ComfyUI IMAGE [B,H,W,3] with at least one picture, got {shape}. "
                         "Connect Load Image (RGB) with the reference face(s).")
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must not exceed end_at ({end_at}); both are fractions of "
                         "sampling in [0, 1].")
    cond, uncond = reference_tokens(ipadapter, clip_vision, image.movedim(-1, 1).float())
    sigmas = None
    if start_at > 0.0 or end_at < 1.0:
        sampling = model.get_model_object("model_sampling")
        sigmas = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
    m = model.clone()
    m.model_options["transformer_options"] = ip_transformer_options(
        m.model_options.get("transformer_options"), [l["key"] for l in layers], ipadapter.layers, cond, weight,
        uncond_tokens=uncond, sigmas=sigmas, frozen=True)
    return m


# --------------------------------------------------------------------------- objective


def private_ip_parts(model: Any, vae: Any, clip_vision: Any, ipadapter: IPAdapter, conditioning: Any,
                     scale: float) -> tuple:
    """Grad-usable private copies for an objective through an IP-Adapter (call outside inference
    mode): (VAEAccess, DenoiserAccess, IP-Adapter copy, CLIP encoder copy, IPAdapterDenoiser)."""
    layers = check_ipadapter_fits(ipadapter, model)
    vae_access = VAEAccess(vae)
    access = DenoiserAccess(model)
    ip = grad_ready(ipadapter, torch.float32).to(access.device)
    clip = grad_ready(clip_features_encoder(clip_vision, ip.config.features)).to(access.device)
    return vae_access, access, ip, clip, IPAdapterDenoiser(access, conditioning, ip, layers, scale)


class ComfyIdentityBridgeObjective:
    """PGD objective: :class:`~kernels.bridge.IdentityBridge` on ComfyUI's MODEL, VAE, CLIP_VISION
    and an IMMUNIZE_IPADAPTER. Validates in ``__init__``; private copies are made in ``bind``."""

    def __init__(self, model: Any, vae: Any, clip_vision: Any, ipadapter: IPAdapter, conditioning: Any,
                 t_min: int, t_max: int, mode: str = "paper", ip_scale: float = 1.0, weight: float = 1.0,
                 seed: int = 0, draws: int = 1, name: str = "bridge"):
        from ..kernels.bridge import MODES
        from ..kernels.denoising import check_timestep_range

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_supported_model(model)
        check_timestep_range(t_min, t_max)
        check_ipadapter_fits(ipadapter, model)
        if not conditioning:
            raise ValueError("positive: the Identity Bridge needs a CONDITIONING (e.g. CLIP Text Encode of "
                             "'a photo of a person').")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("vae: this VAE has no weights (first_stage_model is None)")
        check_clip_vision_fits(clip_vision, ipadapter)
        self.model, self.vae, self.clip_vision, self.ipadapter = model, vae, clip_vision, ipadapter
        self.conditioning, self.t_min, self.t_max = conditioning, int(t_min), int(t_max)
        self.mode, self.ip_scale, self.weight = mode, float(ip_scale), float(weight)
        self.seed, self.draws, self.name = int(seed), int(draws), name

    def build(self):
        """The kernel objective with fresh private copies (call outside inference mode)."""
        from ..kernels.bridge import IdentityBridge

        with torch.inference_mode(False):
            vae, access, ip, clip, denoiser = private_ip_parts(self.model, self.vae, self.clip_vision, self.ipadapter,
                                                               self.conditioning, self.ip_scale)
            rgb = getattr(getattr(self.model.model, "latent_format", None), "latent_rgb_factors", None)
            return IdentityBridge(
                encoder=latent_encoder(vae, access), image_tokens=lambda x: ip.tokens(clip(x.to(access.device))),
                denoiser=denoiser, mode=self.mode, t_min=self.t_min, t_max=self.t_max, draws=self.draws,
                seed=self.seed, multiple=vae.multiple, latent_rgb=None if rgb is None else torch.tensor(rgb),
                weight=self.weight, name=self.name,
            )

    def bind(self, clean: Tensor):
        return self.build().bind(clean.clone())


# --------------------------------------------------------------------------- nodes


class ImmunizeLoadIPAdapter(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeLoadIPAdapter",
            display_name="Load IP-Adapter",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads an IP-Adapter (plain, plus, plus-face or full-face; SD1.5 or SDXL, detected from the "
                "tensors) from models/ipadapter for the Identity Bridge objective. Local files only."
            ),
            inputs=[
                io.Combo.Input("ipadapter_name", options=folder_paths.get_filename_list(IPADAPTER_FOLDER),
                               tooltip="An IP-Adapter .safetensors (or .bin) in models/ipadapter, e.g. "
                                       "ip-adapter-plus-face_sd15.safetensors."),
            ],
            outputs=[IPAdapterType.Output("ipadapter", display_name="IMMUNIZE_IPADAPTER")],
        )

    @classmethod
    def execute(cls, ipadapter_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(IPADAPTER_FOLDER, ipadapter_name)
        if path is None:
            raise ValueError(f"ipadapter_name: {ipadapter_name!r} not found in models/{IPADAPTER_FOLDER}. Put the "
                             "file there and refresh the node list.")
        return io.NodeOutput(load_ipadapter(path))


class ImmunizeIdentityBridge(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeIdentityBridge",
            display_name="Identity Bridge (IDGuardian, IP-Adapter)",
            category=f"{CATEGORY}/objectives",
            description=(
                "IDGuardian's adversarial conceptual bridge: makes the diffusion model, conditioned on the photo "
                "through an IP-Adapter, predict noise as if shown another identity. S* = −(ε(x_t,t,y_adv) − "
                "ε(x_t,t,y_clean))/√(1−ᾱ_t). Chain it with Identity Loss; SD1.x and SDXL."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the IP-Adapter belongs to (SD1.x or SDXL); it is "
                               "copied, never modified."),
                io.Vae.Input("vae", tooltip="The VAE that maps the image to this model's latents."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the IP-Adapter was trained with "
                                    "(ViT-H/14 for most; ViT-bigG/14 for ip-adapter_sdxl)."),
                IPAdapterType.Input("ipadapter", tooltip="From Immunize Load IP-Adapter; must match the model "
                                    "family (SD1.5 vs SDXL)."),
                io.Conditioning.Input("positive", tooltip="Text conditioning for the noise prediction, e.g. CLIP "
                                      "Text Encode of 'a photo of a person'."),
                io.Int.Input("t_min", default=100, min=0, max=999, step=1,
                             tooltip="Lowest DDPM timestep (of 1000) to draw noise levels from."),
                io.Int.Input("t_max", default=700, min=0, max=999, step=1,
                             tooltip="Highest DDPM timestep (of 1000) to draw noise levels from."),
                io.Combo.Input("mode", options=["paper", "vae"], default="paper",
                               tooltip="paper: step along the latent score shift S* upsampled to pixels (cheap, no "
                                       "VAE backward). vae: maximise ‖ε(y_adv) − sg ε(y_clean)‖² by back-propagation "
                                       "through the IP-Adapter image path and the VAE encoder (slower)."),
                io.Float.Input("ip_scale", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="IP-Adapter strength λ in Attn(text) + λ·Attn(image), as an attacker "
                                       "would use it (1.0 is the usual setting)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Relative weight of this objective when several are combined (each "
                                       "gradient is normalised first, so 1.0 means an equal share)."),
                ObjectiveType.Input("objective", optional=True,
                                    tooltip="Objectives to combine with this one (e.g. Identity Loss); connect the "
                                            "last one to Immunize PGD."),
            ],
            outputs=[ObjectiveType.Output("objective_out", display_name="objective")],
        )

    @classmethod
    def execute(cls, model, vae, clip_vision, ipadapter, positive, t_min, t_max, mode, ip_scale, weight,
                objective=None) -> io.NodeOutput:
        new = ComfyIdentityBridgeObjective(model, vae, clip_vision, ipadapter, positive, t_min, t_max, mode=mode,
                                           ip_scale=ip_scale, weight=weight)
        return io.NodeOutput(tuple(objective or ()) + (new,))


class ImmunizeApplyIPAdapter(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeApplyIPAdapter",
            display_name="Apply IP-Adapter (attacker)",
            category=f"{CATEGORY}/attacker",
            description=(
                "The attacker's training-free customisation: a copy of the model whose cross-attention also "
                "attends to the reference face(s) through the IP-Adapter (Attn(text) + weight·Attn(image)). "
                "Sample from it with ComfyUI's KSampler to see whether the protection holds."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL model to customise; it is cloned, never modified."),
                IPAdapterType.Input("ipadapter", tooltip="From Immunize Load IP-Adapter; must match the model "
                                    "family (SD1.5 vs SDXL)."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the IP-Adapter was trained with "
                                    "(ViT-H/14 for most; ViT-bigG/14 for ip-adapter_sdxl)."),
                io.Image.Input("image", tooltip="The reference face(s), e.g. the protected photo; with several "
                               "images their image tokens are averaged."),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="IP-Adapter strength λ in Attn(text) + λ·Attn(image); 0 gives back the "
                                       "model, 1.0 is the usual setting."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of sampling (0 = first step) at which the image branch turns on."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of sampling after which the image branch turns off (1 = never)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, start_at=0.0, end_at=1.0) -> io.NodeOutput:
        return io.NodeOutput(apply_ipadapter(model, ipadapter, clip_vision, image, weight, start_at, end_at))


NODES = [ImmunizeLoadIPAdapter, ImmunizeIdentityBridge, ImmunizeApplyIPAdapter]
