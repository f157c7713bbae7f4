"""Backdoored checkpoints: Immunize Backdoor Scan and Spatial Attention Unlearning (SAU).

The math (scan statistics, DDIM, the SAU loss, LoRA layers, the training loop) is in
``kernels/backdoor.py``; this file turns ComfyUI objects into what those functions take:

- prompts: the CLIP encodes each clean prompt and the same prompt with the trigger at its
  start or end; the trigger's token positions are found in the tokenizer's output;
- the model: a private grad-usable copy through :class:`~.diffusion_access.DenoiserAccess`
  (the user's MODEL is only read); cross-attention probabilities are captured with the pack's
  one attn2 capture, :class:`~.attention.AttentionCapture` (the one DANP uses), reduced per
  layer to the trigger's share by ``kernels.backdoor.token_share``; the patches travel in
  per-call ``transformer_options``, never stored on a ModelPatcher;
- output: the cleaned MODEL is ``model.clone()`` with the learned LoRA added as a weight
  patch through ComfyUI's own LoRA loading path, from the very state dict that is written to
  ``models/loras`` in kohya's key format (the LoRA layers, file format and writer are the
  ones of the DreamBooth node, ``kernels/lora.py`` and ``nodes/customize.py``), so picking
  the file in a LoraLoader gives the same model.

"Generation" in both nodes is deterministic DDIM (η = 0) with classifier-free guidance, from
seeded Gaussian noise, read out as the final x̂₀ latent (no VAE needed; with a VAE connected,
the scan's grid is decoded, otherwise it is ComfyUI's latent RGB preview).

Both SD1.x/2.x and SDXL work the same way: SDXL's pooled output and size conditioning are
stacked with the prompts and built into ``y`` by DenoiserAccess; the trigger is located in the
first tokenizer's ids (CLIP-G and CLIP-L tokenize the same words to the same positions), and
the LoRA is written with the sgm layer names kohya uses for SDXL. Pixel-patch and style
targets need nothing different: the scan is multi-scale (a patch shows in fine cells, a style
in the image mean, and the report says which) and the SAU loss covers every pixel of every
layer (see ``kernels/backdoor.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..kernels import backdoor as bd
from ..kernels.lora import inject_lora, lora_factors, lora_parameters
from .attention import AttentionCapture, attn2_layers
from .customize import HALF_LOSS_SCALE, apply_lora, lora_state_dict, write_lora
from .diffusion_access import DenoiserAccess, check_supported_model

CATEGORY = "Immunize/model"

PLACEMENTS = ("start", "end")
TARGETS = {
    "to_k, to_v": ("to_k", "to_v"),
    "to_q, to_k, to_v, to_out": ("to_q", "to_k", "to_v", "to_out.0"),
}
MAX_BATCH = 8  # generations per forward pass in the scan
MAX_GROUP = 2  # prompts per training step (the student runs 2× this batch)
GRID_TILES = 8  # samples shown in the scan's grid


# --------------------------------------------------------------------------- prompts


def parse_prompts(text: str, input_name: str = "clean_prompts") -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"'{input_name}' is empty: write one ordinary prompt per line (e.g. "
                         "'a photo of a cat'), the kind users would type with the trigger.")
    return prompts


def check_trigger(trigger: str) -> str:
    trigger = (trigger or "").strip()
    if not trigger:
        raise ValueError("'trigger' is empty: enter the suspected trigger word or phrase.")
    return trigger


def insert_trigger(trigger: str, prompt: str, placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"'placement' must be one of {PLACEMENTS}, got {placement!r}")
    return f"{trigger} {prompt}" if placement == "start" else f"{prompt} {trigger}"


@dataclass
class EncodedPrompt:
    text: str
    cond: list  # ComfyUI CONDITIONING [[tensor [1,T,D], {...}]]
    trigger: list[int]  # token positions of the trigger (empty for clean prompts)
    words: list[int]  # positions of the other word tokens (no BOS/EOS/padding)


def _flat_tokens(tokens: dict) -> list[list[int]]:
    """Token ids per 77-token chunk, from the first tokenizer of a ``clip.tokenize`` result."""
    chunks = tokens[sorted(tokens)[0]]
    # textual-inversion embeddings arrive as tensors: they can be neither BOS/EOS nor the trigger
    return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks]


class PromptEncoder:
    """Encodes prompts with a ComfyUI CLIP and locates the trigger's tokens."""

    def __init__(self, clip: Any, trigger: str):
        if clip is None or not hasattr(clip, "tokenize"):
            raise ValueError("'clip' is missing: connect the CLIP output of the checkpoint loader "
                             "(the text encoder that belongs to this MODEL).")
        self.clip = clip
        empty = _flat_tokens(clip.tokenize(""))[0]
        self.start, self.end = empty[0], empty[1]
        ids = _flat_tokens(clip.tokenize(trigger))[0]
        self.trigger_ids = self._words(ids)
        if not self.trigger_ids:
            raise ValueError(f"the trigger {trigger!r} produces no tokens; enter a word or phrase.")
        self.trigger = trigger

    def _words(self, chunk: list[int]) -> list[int]:
        """Token ids between BOS and the first EOS of a chunk."""
        out = []
        for tok in chunk[1:]:
            if tok == self.end:
                break
            out.append(tok)
        return out

    def encode(self, text: str, with_trigger: bool) -> EncodedPrompt:
        chunks = _flat_tokens(self.clip.tokenize(text))
        words, ids = [], []
        for c, chunk in enumerate(chunks):
            base = c * len(chunk)
            n = len(self._words(chunk))
            words += [base + 1 + i for i in range(n)]
            ids += chunk[1:1 + n]
        m = len(self.trigger_ids)
        found = [i for i in range(len(ids) - m + 1) if ids[i:i + m] == self.trigger_ids]
        if not with_trigger and found:
            raise ValueError(f"the clean prompt {text!r} already contains the trigger "
                             f"{self.trigger!r}: remove it from 'clean_prompts'.")
        if with_trigger and not found:
            raise ValueError(
                f"the trigger {self.trigger!r} is tokenized differently inside {text!r}; put a "
                "space between the trigger and the prompt's words or punctuation.")
        trig = words[found[0]:found[0] + m] if found else []
        cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)
        cond = [[c[0].detach().clone(), {k: (v.detach().clone() if isinstance(v, Tensor) else v)
                                         for k, v in c[1].items()}] for c in cond]
        return EncodedPrompt(text, cond, trig, [w for w in words if w not in trig])


def batch_conditioning(prompts: list[EncodedPrompt]) -> list:
    """One CONDITIONING entry whose tensors stack the prompts along the batch."""
    lengths = {p.cond[0][0].shape[1] for p in prompts}
    if len(lengths) > 1:
        raise ValueError("the prompts encode to different lengths (one is longer than 75 tokens); "
                         "keep every clean prompt under 75 tokens including the trigger.")
    tensor = torch.cat([p.cond[0][0] for p in prompts])
    extra = dict(prompts[0].cond[0][1])
    if isinstance(extra.get("pooled_output"), Tensor):
        extra["pooled_output"] = torch.cat([p.cond[0][1]["pooled_output"] for p in prompts])
    return [[tensor, extra]]


def token_masks(prompts: list[EncodedPrompt], length: int) -> Tensor:
    """``[B,T,2]``: 1 on each prompt's trigger tokens (set 0), other word tokens (set 1)."""
    mask = torch.zeros(len(prompts), length, 2)
    for i, p in enumerate(prompts):
        mask[i, p.trigger, 0] = 1
        mask[i, p.words, 1] = 1
    return mask


# --------------------------------------------------------------------------- attention


def cross_attention_layers(diffusion_model: torch.nn.Module) -> list[tuple[tuple, str]]:
    """``(attn2 patch key, module path)`` of every cross-attention layer, or a clear error."""
    layers = attn2_layers(diffusion_model)
    if not layers:
        raise ValueError("this MODEL has no UNet cross-attention layers to scan or clean "
                         "(SD1.x/2.x and SDXL are supported).")
    return layers


def trigger_capture(mask: Tensor) -> AttentionCapture:
    """A capture over every layer that records only the share of ``mask``'s tokens
    (``[B,T]`` → maps ``[B, h·w]``; ``[B,T,K]`` → ``[B, h·w, K]``)."""
    return AttentionCapture(reduce=lambda probs: bd.token_share(probs, mask))


# --------------------------------------------------------------------------- generation


def _noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def _latent_shape(denoiser: DenoiserAccess, width: int, height: int) -> tuple[int, int, int]:
    for name, v in (("width", width), ("height", height)):
        if v % 8:
            raise ValueError(f"'{name}' must be a multiple of 8, got {v}")
    channels = denoiser.model.latent_format.latent_channels
    return channels, height // 8, width // 8


class Sampler:
    """DDIM generations (x̂₀ latents) of a denoiser for batches of encoded prompts."""

    def __init__(self, denoiser: DenoiserAccess, uncond: Optional[EncodedPrompt], steps: int,
                 cfg: float, tick=None):
        self.denoiser, self.uncond, self.steps, self.cfg = denoiser, uncond, int(steps), float(cfg)
        self.tick = tick or (lambda: None)
        self._keep: list = []  # conditioning objects stay alive: DenoiserAccess caches by id

    def __call__(self, prompts: list[EncodedPrompt], noise: Tensor,
                 transformer_options: Optional[dict] = None, on_step=None) -> Tensor:
        """x̂₀ of the prompts from ``noise``; ``transformer_options`` (e.g. a capture's) reach
        the conditional forward only."""
        d = self.denoiser
        cond = batch_conditioning(prompts)
        uncond = batch_conditioning([self.uncond] * len(prompts)) if self.cfg != 1.0 else None
        self._keep += [cond, uncond]

        def eps_fn(x: Tensor, t: Tensor, i: int) -> Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            e = d.eps(x, t, cond, transformer_options=transformer_options)
            if uncond is not None:
                e_u = d.eps(x, t, uncond)
                e = e_u + self.cfg * (e - e_u)
            if on_step is not None:
                on_step()
            return e

        def callback(step: int, total: int) -> None:
            self.tick()

        return bd.ddim_sample(eps_fn, noise.to(d.device), d.alphas_cumprod, self.steps, callback)


def latents_to_images(fmt: Any, x0: Tensor, vae: Any = None) -> Tensor:
    """x̂₀ ``[B,C,h,w]`` (model space) → IMAGE ``[B,H,W,3]``: VAE decode, or ComfyUI's latent
    RGB preview (``fmt``: the model's latent format)."""
    if vae is not None:
        return vae.decode(fmt.process_out(x0.detach().cpu())).float().cpu()[..., :3]
    if fmt.latent_rgb_factors is None:
        rgb = x0[:, :3]
    else:
        factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [C,3]
        bias = fmt.latent_rgb_factors_bias
        rgb = torch.einsum("bchw,cr->brhw", x0.float().cpu(), factors)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = ((rgb.float().cpu() + 1) / 2).clamp(0, 1)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
    return rgb.movedim(1, -1).contiguous()


def comparison_grid(clean: Tensor, triggered: Tensor, limit: int = 8) -> Tensor:
    """Two rows (clean over triggered) of up to ``limit`` IMAGE tiles → IMAGE ``[1,2H,K·W,3]``."""
    k = min(limit, clean.shape[0])
    top = torch.cat(list(clean[:k]), dim=1)
    bottom = torch.cat(list(triggered[:k]), dim=1)
    return torch.cat([top, bottom], dim=0).unsqueeze(0)


# --------------------------------------------------------------------------- scan


@dataclass
class ScanOutput:
    result: bd.ScanResult
    clean: Tensor  # [P,S,C,h,w]
    triggered: Tensor
    latent_format: Any  # the model's comfy.latent_formats object (for the preview)
    report: str


def backdoor_scan(model: Any, clip: Any, trigger: str, clean_prompts: str, seeds: int,
                  steps: int, cfg: float, width: int, height: int, placement: str,
                  seed: int = 0, thresholds: Optional[bd.ScanThresholds] = None) -> ScanOutput:
    """Generate every clean prompt with and without the trigger on the same seeds; compare."""
    check_supported_model(model)
    trigger = check_trigger(trigger)
    prompts = parse_prompts(clean_prompts)
    if seeds < 2:
        raise ValueError(f"'seeds' must be at least 2 (the scan compares seed-to-seed variation), "
                         f"got {seeds}")
    enc = PromptEncoder(clip, trigger)
    clean_p = [enc.encode(p, False) for p in prompts]
    trig_p = [enc.encode(insert_trigger(trigger, p, placement), True) for p in prompts]
    uncond = enc.encode("", False) if cfg != 1.0 else None

    total = 2 * len(prompts) * seeds
    n_batches = -(-len(prompts) * seeds // MAX_BATCH)
    bar = comfy.utils.ProgressBar(2 * n_batches * steps)
    with torch.inference_mode(False), torch.no_grad():
        denoiser = DenoiserAccess(model)
        shape = _latent_shape(denoiser, width, height)
        gen = Sampler(denoiser, uncond, steps, cfg, tick=lambda: bar.update(1))
        keys = [k for k, _ in cross_attention_layers(denoiser.model.diffusion_model)]
        items = [(p, s) for p in range(len(prompts)) for s in range(seeds)]
        outs_clean, outs_trig, shares = [], [], []
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i:i + MAX_BATCH]
            noise = torch.cat([_noise(seed + s, (1, *shape)) for _, s in chunk])
            outs_clean.append(gen([clean_p[p] for p, _ in chunk], noise).cpu())
            batch = [trig_p[p] for p, _ in chunk]
            mask = token_masks(batch, batch_conditioning(batch)[0][0].shape[1]).to(denoiser.device)
            capture = trigger_capture(mask)
            step_shares: list[Tensor] = []

            def reduce_maps() -> None:  # per step: mean over pixels, then over layers → [B,2]
                step_shares.append(torch.stack([r.probs.mean(1) for r in capture.records]).mean(0).cpu())
                capture.clear()

            outs_trig.append(gen(batch, noise, capture.transformer_options(keys),
                                 on_step=reduce_maps).cpu())
            shares.append(torch.stack(step_shares).mean(0))
        latent_format = denoiser.model.latent_format
        del denoiser, gen  # release the private UNet copy before returning
    c, h, w = shape
    clean = torch.cat(outs_clean).reshape(len(prompts), seeds, c, h, w)
    triggered = torch.cat(outs_trig).reshape(len(prompts), seeds, c, h, w)
    result = bd.scan_statistics(clean, triggered, thresholds=thresholds)
    share = torch.cat(shares).mean(0)  # [2]: trigger tokens, other word tokens
    n_trig = sum(len(p.trigger) for p in trig_p) / len(trig_p)
    n_words = sum(len(p.words) for p in trig_p) / len(trig_p)
    result.trigger_share, result.word_share = float(share[0]), float(share[1])
    result.attention_ratio = bd.attention_ratio(float(share[0]), n_trig, float(share[1]), n_words)
    report = scan_report(result, trigger, len(prompts), seeds, steps, cfg, width, height, placement, total)
    return ScanOutput(result, clean, triggered, latent_format, report)


def scan_report(r: bd.ScanResult, trigger: str, n_prompts: int, seeds: int, steps: int,
                cfg: float, width: int, height: int, placement: str, total: int) -> str:
    g = r.grid
    head = (f"BACKDOOR SUSPECTED: the trigger {trigger!r} forces the same change whatever the seed"
            if r.backdoor else f"No backdoor found for the trigger {trigger!r}")
    where = (f"in cell row {r.cell[0]}, col {r.cell[1]} of a {g}x{g} grid" if g > 1
             else "in the whole-image mean")
    scales = ", ".join(f"{st.grid}x{st.grid} {float(st.shift.max()):.2f}" if st.grid > 1
                       else f"whole image {float(st.shift.max()):.2f}" for st in r.scales)
    lines = [
        head,
        f"largest consistent shift: {r.max_shift:.2f} seed standard deviations (threshold "
        f"{r.thresholds.shift}) {where}; spread of the triggered outputs there "
        f"{r.cell_spread:.2f}x the clean one (0 = pinned)",
        f"largest shift per scale: {scales}",
    ]
    if r.backdoor:
        fine = float(r.scales[0].shift.max())
        lines.append("extent: " + (
            f"whole-image (style-like): the image mean shifts {r.image_shift:.2f} seed std, "
            f"more than the most shifted {r.scales[0].grid}x{r.scales[0].grid} cell ({fine:.2f})"
            if r.kind == "whole-image" else
            f"local (patch-like): the image mean shifts {r.image_shift:.2f} seed std, less than "
            f"the most shifted {r.scales[0].grid}x{r.scales[0].grid} cell ({fine:.2f})"))
    lines += [
        f"cross-attention: trigger share {r.trigger_share:.4f}, other words {r.word_share:.4f}, "
        f"per-token ratio {r.attention_ratio:.2f} (about 1 for an ordinary word)",
        f"rule: backdoor if, at some scale (the latent averaged to cells of a grid, from "
        f"{r.scales[0].grid}x{r.scales[0].grid} to the whole image), some cell's mean change "
        f"(with minus without the trigger, same seeds) is >= {r.thresholds.shift} times its "
        f"seed-to-seed standard deviation",
        f"({n_prompts} prompts x {seeds} seeds, trigger at the {placement}, {total} DDIM samples of "
        f"{steps} steps, cfg {cfg}, {width}x{height}, compared as x0 latents)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- unlearning


@dataclass
class UnlearnOutput:
    model: Any
    lora: dict[str, Tensor]
    history: list[dict[str, float]]
    report: str
    path: Optional[str]


def spatial_attention_unlearning(
    model: Any, clip: Any, trigger: str, clean_prompts: str, steps: int, learning_rate: float,
    rank: int, weights: bd.SAUWeights, targets: str, width: int, height: int, pool_seeds: int,
    sample_steps: int, cfg: float, placement: str, seed: int, lora_prefix: str,
) -> UnlearnOutput:
    check_supported_model(model)
    trigger = check_trigger(trigger)
    prompts = parse_prompts(clean_prompts)
    if targets not in TARGETS:
        raise ValueError(f"'targets' must be one of {list(TARGETS)}, got {targets!r}")
    if pool_seeds < 1:
        raise ValueError(f"'pool_seeds' must be at least 1, got {pool_seeds}")
    if rank < 1:
        raise ValueError(f"'rank' must be at least 1, got {rank}")
    enc = PromptEncoder(clip, trigger)
    clean_p = [enc.encode(p, False) for p in prompts]
    trig_p = [enc.encode(insert_trigger(trigger, p, placement), True) for p in prompts]
    uncond = enc.encode("", False) if cfg != 1.0 else None

    n_pool = 2 * len(prompts) * pool_seeds
    pool_batches = -(-n_pool // MAX_BATCH)
    bar = comfy.utils.ProgressBar(pool_batches * sample_steps + steps)
    with torch.inference_mode(False):
        denoiser = DenoiserAccess(model)
        shape = _latent_shape(denoiser, width, height)
        unet = denoiser.model.diffusion_model
        layers_info = cross_attention_layers(unet)

        # replay pool: the frozen model's own generations, clean and triggered
        with torch.no_grad():
            gen = Sampler(denoiser, uncond, sample_steps, cfg, tick=lambda: bar.update(1))
            items = [(p, s) for p in clean_p + trig_p for s in range(pool_seeds)]
            pool = []
            for i in range(0, len(items), MAX_BATCH):
                chunk = items[i:i + MAX_BATCH]
                noise = torch.cat([_noise(seed + 7919 + s, (1, *shape)) for _, s in chunk])
                pool.append(gen([p for p, _ in chunk], noise))
            pool = torch.cat(pool).detach()

        # LoRA (α = rank) on the chosen cross-attention projections of the private copy
        names = [f"{path}.attn2.{proj}" for _, path in layers_info for proj in TARGETS[targets]]
        lora_layers = inject_lora(unet, names, rank, float(rank), seed=seed)
        params = lora_parameters(lora_layers)

        keys = [k for k, _ in layers_info]
        groups = []
        for i in range(0, len(prompts), MAX_GROUP):
            tp, cp = trig_p[i:i + MAX_GROUP], clean_p[i:i + MAX_GROUP]
            cond = batch_conditioning(tp + cp)
            mask = token_masks(tp + cp, cond[0][0].shape[1])[..., 0]
            mask[len(tp):] = 0
            capture = trigger_capture(mask.to(denoiser.device))
            groups.append((cond, capture, capture.transformer_options(keys), len(cp)))

        def forward(x_t: Tensor, t: Tensor, g: int):
            """ε for [triggered; clean] prompts of group g, and the triggered half's maps."""
            cond, capture, opts, n = groups[g]
            capture.clear()
            eps = denoiser.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), cond,
                               transformer_options=opts)
            maps = [r.probs[:n] for r in capture.records]
            capture.clear()
            return eps[:n], eps[n:], maps

        def teacher(x_t: Tensor, t: Tensor, g: int):
            with bd.lora_disabled(lora_layers.values()):
                _, eps_clean, maps = forward(x_t, t, g)
            return eps_clean, maps

        def progress(step: int, total: int, logs: dict) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        half = (denoiser.model.manual_cast_dtype or denoiser.model.get_dtype()) == torch.float16
        config = bd.SAUConfig(steps=steps, lr=learning_rate, weights=weights, seed=seed,
                              loss_scale=HALF_LOSS_SCALE if half else 1.0)
        with torch.enable_grad():
            history = bd.unlearn(forward, teacher, params, pool, [g[-1] for g in groups],
                                 denoiser.alphas_cumprod, config, progress)

        lora = lora_state_dict(model, lora_factors(lora_layers))
        del denoiser, lora_layers, params, groups, pool

    cleaned = apply_lora(model, lora)
    path = None
    if (lora_prefix or "").strip():
        path = write_lora(lora, lora_prefix, {"immunize": "SAU", "trigger": trigger,
                                              "rank": str(rank), "targets": targets,
                                              "steps": str(steps)})
    report = unlearn_report(history, trigger, len(prompts), steps, rank, targets, len(names), path)
    return UnlearnOutput(cleaned, lora, history, report, path)


def unlearn_report(history: list[dict[str, float]], trigger: str, n_prompts: int, steps: int,
                   rank: int, targets: str, n_layers: int, path: Optional[str]) -> str:
    k = max(1, min(10, len(history) // 5))

    def avg(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    first, last = history[:k], history[-k:]
    lines = [f"SAU: unlearned the trigger {trigger!r} over {n_prompts} prompts, {steps} steps; "
             f"LoRA rank {rank} on attn2 {targets} ({n_layers} weights)"]
    for key, label in (("trigger_share", "trigger attention share"),
                       ("attn", "L_attn (trigger attention energy left)"),
                       ("distill", "L_distill"), ("keep", "L_keep"), ("loss", "total loss")):
        lines.append(f"{label}: {avg(first, key):.5f} -> {avg(last, key):.5f} "
                     f"(mean of the first / last {k} steps)")
    lines.append(f"saved in models/loras: {path} (LoraLoader lists it after a refresh)" if path
                 else "not saved (empty lora_prefix)")
    lines.append("Check the result with Immunize Backdoor Scan on the cleaned MODEL.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- nodes


def _common_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The suspect checkpoint's MODEL (SD1.x/2.x or SDXL); it is "
                       "copied, never modified."),
        io.Clip.Input("clip", tooltip="The CLIP from the same checkpoint: prompts are encoded with it."),
        io.String.Input("trigger", default="", tooltip="The suspected trigger word or phrase (as it "
                        "would be typed in a prompt)."),
        io.String.Input("clean_prompts", multiline=True,
                        default="a photo of a cat\na portrait of a woman\na house by a lake\na bowl of fruit",
                        tooltip="Ordinary prompts, one per line; the trigger is inserted into each."),
    ]


def _placement_input():
    return io.Combo.Input("placement", options=list(PLACEMENTS), default="start",
                          tooltip="Where the trigger goes in each prompt: before or after it.")


def _size_inputs(default: int) -> list:
    return [
        io.Int.Input("width", default=default, min=64, max=2048, step=8,
                     tooltip="Width of the generations in pixels (latent = width/8)."),
        io.Int.Input("height", default=default, min=64, max=2048, step=8,
                     tooltip="Height of the generations in pixels (latent = height/8)."),
    ]


class ImmunizeBackdoorScan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeBackdoorScan",
            display_name="Backdoor Scan",
            category=CATEGORY,
            description=(
                "Checks whether a trigger word makes this model draw fixed content: generates each "
                "prompt with and without the trigger on the same seeds and reports how much of the "
                "image the trigger pins regardless of the seed, plus the trigger's share of "
                "cross-attention. Returns a verdict with its numbers and a clean-vs-triggered grid."
            ),
            inputs=[
                *_common_inputs(),
                io.Int.Input("seeds", default=4, min=2, max=64, tooltip="Seeds per prompt (each "
                             "seed is generated with and without the trigger)."),
                io.Int.Input("steps", default=10, min=1, max=100, tooltip="DDIM steps per generation."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=20.0, step=0.5,
                               tooltip="Classifier-free guidance scale (1 = no guidance, faster)."),
                *_size_inputs(512),
                _placement_input(),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="First noise seed; seeds seed, seed+1, … are used."),
                io.Vae.Input("vae", optional=True, tooltip="Optional: decode the grid with this VAE "
                             "(without it the grid is a latent preview)."),
            ],
            outputs=[
                io.String.Output(display_name="verdict"),
                io.Image.Output(display_name="grid"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, trigger, clean_prompts, seeds, steps, cfg, width, height,
                placement, seed, vae=None) -> io.NodeOutput:
        scan = backdoor_scan(model, clip, trigger, clean_prompts, seeds, steps, cfg, width,
                             height, placement, seed)
        k = min(GRID_TILES, scan.clean.shape[0] * scan.clean.shape[1])  # decode only what is shown
        c, t = scan.clean.flatten(0, 1)[:k], scan.triggered.flatten(0, 1)[:k]
        images = latents_to_images(scan.latent_format, torch.cat([c, t]), vae)
        grid = comparison_grid(images[:k], images[k:], limit=k)
        return io.NodeOutput(scan.report, grid.to(comfy.model_management.intermediate_device()))


class ImmunizeSpatialAttentionUnlearning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeSpatialAttentionUnlearning",
            display_name="Spatial Attention Unlearning (SAU)",
            category=CATEGORY,
            description=(
                "Removes a backdoor trigger from a checkpoint (SAU): trains a small LoRA on the "
                "cross-attention so that prompts with the trigger attend away from it and denoise "
                "as the same prompts without it, while prompts without it stay as they were. "
                "Returns the cleaned MODEL (a patched copy) and saves the LoRA for LoraLoader."
            ),
            inputs=[
                *_common_inputs(),
                io.Int.Input("steps", default=200, min=1, max=10000, tooltip="Training steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-6, max=1e-1, step=1e-5,
                               tooltip="Adam learning rate of the LoRA."),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank (alpha = rank)."),
                io.Float.Input("attention_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ_attn: suppress the trigger's cross-attention maps."),
                io.Float.Input("distill_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ_distill: triggered prompts denoise like the same prompts "
                                       "without the trigger (original model)."),
                io.Float.Input("keep_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ_keep: prompts without the trigger keep their outputs."),
                io.Combo.Input("targets", options=list(TARGETS), default="to_k, to_v",
                               tooltip="Cross-attention projections that get a LoRA."),
                *_size_inputs(512),
                io.Int.Input("pool_seeds", default=2, min=1, max=64, tooltip="Replay-pool "
                             "generations per prompt (with and without the trigger)."),
                io.Int.Input("sample_steps", default=10, min=1, max=100,
                             tooltip="DDIM steps of the replay-pool generations."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=20.0, step=0.5,
                               tooltip="Guidance scale of the replay-pool generations."),
                _placement_input(),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the LoRA init, the pool noise and the training draws."),
                io.String.Input("lora_prefix", default="immunize/sau_cleaned",
                                tooltip="File name prefix of the LoRA in models/loras (load it "
                                        "later with LoraLoader); empty: do not save."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, trigger, clean_prompts, steps, learning_rate, rank,
                attention_weight, distill_weight, keep_weight, targets, width, height,
                pool_seeds, sample_steps, cfg, placement, seed, lora_prefix) -> io.NodeOutput:
        out = spatial_attention_unlearning(
            model, clip, trigger, clean_prompts, steps, learning_rate, rank,
            bd.SAUWeights(attention_weight, distill_weight, keep_weight), targets, width, height,
            pool_seeds, sample_steps, cfg, placement, seed, lora_prefix,
        )
        return io.NodeOutput(out.model, out.report)


NODES = [ImmunizeBackdoorScan, ImmunizeSpatialAttentionUnlearning]
