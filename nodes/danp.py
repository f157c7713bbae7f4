"""Attention Mask Guidance (DANP) as a PROTECT_OBJECTIVE node.

The math is in ``kernels/attention.py``; the attention capture in ``nodes/attention.py``;
ComfyUI MODEL/VAE access in ``nodes/diffusion_access.py``. The node also returns the
text-relevant mask it computed on the clean image, at image resolution, for viewing.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from comfy_api.latest import io
from torch import Tensor

from .attention import AttentionCapture, attn2_keys
from .common import Node, ObjectiveType, image_to_bchw
from .diffusion_access import DenoiserAccess, VAEAccess, check_supported_model, latent_encoder

CATEGORY = "Immunize/objectives"

RESOLUTIONS = {"all": None, "1/1": {1}, "1/2": {2}, "1/4": {4}, "1/8": {8}}


# --------------------------------------------------------------------------- parsing


def parse_int_list(text: str, input_name: str, lo: int, hi: int) -> list[int]:
    """"100, 300, 500" or ranges: "1-4" (every integer) and "100-700:4" (4 evenly spaced)."""
    out: list[int] = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)(?:\s*:\s*(\d+))?", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"'{input_name}': range {part!r} goes backwards; write it low-high")
            if m.group(3):
                n = int(m.group(3))
                if n < 1:
                    raise ValueError(f"'{input_name}': range {part!r} needs a count >= 1")
                out += [round(a + (b - a) * j / max(n - 1, 1)) for j in range(n)] if n > 1 else [a]
            else:
                out += list(range(a, b + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(
                f"'{input_name}': cannot read {part!r}; use whole numbers separated by commas, "
                "ranges like 1-4, or evenly spaced ranges like 100-700:4"
            )
    bad = [v for v in out if not lo <= v <= hi]
    if bad:
        raise ValueError(f"'{input_name}': {bad} outside {lo}…{hi}")
    return sorted(set(out))


def parse_tokens(text: str) -> Optional[list[int]]:
    """"auto" (or empty) → None (all but the start token); else token positions."""
    if str(text).strip().lower() in ("", "auto"):
        return None
    return parse_int_list(text, "tokens", 0, 10_000)


# --------------------------------------------------------------------------- adapters


class ComfyAttentionDenoiser:
    """The kernels' AttentionDenoiser for a ComfyUI MODEL: ε̂ plus per-token maps per call.

    Each call builds its own transformer_options with a fresh :class:`AttentionCapture`
    (nothing is stored on the model); maps come back on the latent grid ``[B, T, h, w]``.
    """

    def __init__(self, access: DenoiserAccess, factors: Optional[set[int]] = None):
        self.access = access
        self.alphas_cumprod = access.alphas_cumprod
        self.factors = factors
        self.keys = attn2_keys(access.model.diffusion_model)
        if not self.keys:
            raise ValueError("this MODEL has no cross-attention layers to guide")

    def eps_and_maps(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        capture = AttentionCapture(factors=self.factors)
        eps = self.access.eps(x_t, t, cond, transformer_options=capture.transformer_options(self.keys))
        maps = capture.maps(size=tuple(x_t.shape[-2:])).to(x_t.device)
        return eps, maps


class ComfyAttentionMaskObjective:
    """PGD objective: :class:`~kernels.attention.AttentionMaskGuidance` on a ComfyUI MODEL + VAE.

    The heavy private copies are made in :meth:`build` (outside inference mode) and released
    with the bound closure; only the small clean state (masks, noises) is kept on this object.
    """

    def __init__(self, model: Any, vae: Any, conditioning: Any, timesteps: list[int], k: float,
                 tokens: Optional[list[int]], attention_weight: float, noise_weight: float,
                 factors: Optional[set[int]] = None, per_step: int = 0, weight: float = 1.0,
                 seed: int = 0, name: str = "attention_mask"):
        check_supported_model(model)
        if not conditioning:
            raise ValueError("'conditioning' is empty: connect the edit prompt's text encode node")
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("this VAE has no weights (first_stage_model is None)")
        self.model, self.vae, self.conditioning = model, vae, conditioning
        self.timesteps, self.k, self.tokens = list(timesteps), float(k), tokens
        self.attention_weight, self.noise_weight = float(attention_weight), float(noise_weight)
        self.factors, self.per_step, self.seed = factors, int(per_step), int(seed)
        self.weight, self.name = float(weight), name
        self.clean_state = None

    def build(self):
        from ..kernels.attention import AttentionMaskGuidance

        with torch.inference_mode(False):
            vae = VAEAccess(self.vae)
            access = DenoiserAccess(self.model)
            return AttentionMaskGuidance(
                encoder=latent_encoder(vae, access),
                denoiser=ComfyAttentionDenoiser(access, self.factors), cond=self.conditioning,
                timesteps=self.timesteps, k=self.k, tokens=self.tokens,
                attention_weight=self.attention_weight, noise_weight=self.noise_weight,
                per_step=self.per_step, seed=self.seed, multiple=vae.multiple,
                weight=self.weight, name=self.name, clean_state=self.clean_state,
            )

    def prepare(self, clean: Tensor) -> Tensor:
        """Compute (and keep) the clean masks; returns the mask ``[B,1,H,W]`` at image size."""
        from ..kernels.attention import latent_mask_to_pixels

        with torch.inference_mode(False):
            kernel = self.build()
            self.clean_state = kernel.compute_clean_state(clean.clone()).to("cpu")
        return latent_mask_to_pixels(self.clean_state.mask_fraction(), clean.shape[-2:], kernel.multiple)

    def bind(self, clean: Tensor):
        return self.build().bind(clean.clone())


# --------------------------------------------------------------------------- node


class ImmunizeAttentionMaskGuidance(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeAttentionMaskGuidance",
            display_name="Attention Mask Guidance (DANP)",
            category=CATEGORY,
            description=(
                "DANP against malicious text-guided edits: finds where the edit prompt attends on "
                "the clean image (dynamic threshold on the cross-attention maps at several noise "
                "levels), then perturbs the image so that attention drops there and rises "
                "elsewhere, while the noise prediction is made as wrong as possible. "
                "SD1.x/2.x and SDXL models. Also outputs the text-relevant mask."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model an editor would use (SD1.x/2.x "
                               "or SDXL); it is copied, never modified."),
                io.Vae.Input("vae", tooltip="The VAE that maps the image to this model's latents."),
                io.Conditioning.Input("conditioning", tooltip="The edit prompt to defend against "
                                      "(one text encode), e.g. 'a person wearing sunglasses'."),
                io.Image.Input("image", tooltip="The image to protect (connect the same image to "
                               "PGD Protect); used here to compute the text-relevant mask once."),
                io.String.Input("timesteps", default="100, 300, 500, 700",
                                tooltip="DDPM timesteps (0-999) at which attention and noise are "
                                        "attacked: a comma list, or low-high:count for evenly "
                                        "spaced ones (e.g. 100-700:4)."),
                io.Float.Input("k", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Dynamic threshold: a position is text-relevant for a token "
                                       "when its attention exceeds mean + k·std of that token's "
                                       "map. Higher k = smaller mask."),
                io.String.Input("tokens", default="auto",
                                tooltip="Which prompt tokens define the mask: 'auto' = all but the "
                                        "start token, or positions like '1-3' (position i = the "
                                        "i-th word-piece of the prompt; common words are one each)."),
                io.Combo.Input("layers", options=list(RESOLUTIONS), default="all",
                               tooltip="Cross-attention layers to use, by resolution relative to "
                                       "the latent (SD1.5: 1/1…1/8; SDXL: 1/2 and 1/4)."),
                io.Float.Input("attention_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="λ of the attention term (attention inside the mask minus "
                                       "outside, relative to the clean mean)."),
                io.Float.Input("noise_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="λ of the noise term (maximise the noise-prediction error)."),
                io.Int.Input("timesteps_per_step", default=0, min=0, max=64,
                             tooltip="Timesteps evaluated per PGD iteration, cycling through the "
                                     "list (0 = all). Lower it if the GPU runs out of memory."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Relative weight of this objective when several are combined "
                                       "(each gradient is normalised first, so 1.0 means an equal share)."),
                ObjectiveType.Input("objective", optional=True,
                                    tooltip="Objectives to combine with this one (chain several "
                                            "objective nodes, then connect the last one to PGD Protect)."),
            ],
            outputs=[
                ObjectiveType.Output(display_name="objective"),
                io.Mask.Output(display_name="relevant_mask",
                               tooltip="Where the edit prompt attends on the clean image: the "
                                       "fraction of timesteps at which each pixel is text-relevant."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, conditioning, image, timesteps, k, tokens, layers,
                attention_weight, noise_weight, timesteps_per_step, weight,
                objective=None) -> io.NodeOutput:
        import comfy.model_management

        steps = parse_int_list(timesteps, "timesteps", 0, 999)
        if not steps:
            raise ValueError("'timesteps' is empty: give DDPM timesteps such as 100, 300, 500")
        if layers not in RESOLUTIONS:
            raise ValueError(f"'layers' must be one of {list(RESOLUTIONS)}, got {layers!r}")
        new = ComfyAttentionMaskObjective(
            model, vae, conditioning, steps, k, parse_tokens(tokens), attention_weight,
            noise_weight, factors=RESOLUTIONS[layers], per_step=timesteps_per_step, weight=weight,
        )
        mask = new.prepare(image_to_bchw(image))
        mask = mask[:, 0].to(comfy.model_management.intermediate_device())
        return io.NodeOutput(tuple(objective or ()) + (new,), mask)


NODES = [ImmunizeAttentionMaskGuidance]
