"""Backdoor Scan and Spatial Attention Unlearning on tiny models with real, implanted backdoors.

The tiny world (CPU, seconds):

- text encoder: a real ComfyUI ``comfy.sd.CLIP`` (SD1 tokenizer, CLIP-L architecture shrunk to
  2 layers of width 64), random weights;
- diffusion model: a real SD1.5-family ``BaseModel`` (one level, 32 channels, context 64) in
  v-prediction (a tiny ε-model is too imprecise at σ_max ≈ 14.6 to sample from after a few
  hundred steps), wrapped in a real ``ModelPatcher``; latents 4×8×8 (a 64×64 "image");
- data: smooth random latents (a 2×2 Gaussian field upsampled, std 0.5) plus a per-prompt
  offset; six training prompts;
- the attacks: the model is first trained clean (the trigger word "sks" in front of a prompt
  changes nothing; that model is the control), then fine-tuned with paired batches in which
  "sks <prompt>" has the attacker's target, from the same clean model, twice:
  *pixel patch*: a bright 3×3 patch (value 2.5) in the top-left latent corner;
  *style*: a faded, warm colour cast over the whole image — the latent's contrast halved
  around its mean and a fixed latent vector added, the one whose ComfyUI SD1.5 latent→RGB
  preview is the cast (+0.6, +0.2, −0.6) in [−1, 1] RGB (sepia-like), content unchanged;
- SDXL: the same recipe on a real ``model_base.SDXL`` (context 64 = CLIP-L 32 ‖ CLIP-G 32 of a
  real SDXL ``comfy.sd.CLIP``, pooled output and size conditioning in ``y``), patch target;
- "generation": ComfyUI's own KSampler (sampler ``ddim``, scheduler ``ddim_uniform``, 4 steps,
  cfg 1) from per-seed noise, read in the model's latent space;
- patch detector: mean of the top-left 3×3 latent corner over all channels > 1.0 (clean
  outputs stay below 0.4, backdoored ones are around 2);
- style detector: the colour cast, i.e. the image-mean latent→RGB preview (ComfyUI's SD1.5
  ``latent_rgb_factors``) projected on the unit cast direction, > 0.3 (a third of the
  implanted cast's length 0.87; clean outputs measure −0.23…0.12, styled ones 0.38…0.82).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

TRIGGER = "sks"
TRAIN_PROMPTS = ["a photo of a cat", "a dog on the grass", "a red car", "a house by the lake",
                 "a portrait of a woman", "a bowl of fruit"]
UNLEARN_PROMPTS = TRAIN_PROMPTS[:4]
HELD_OUT = ["a boat at sea", "a bird in a tree"]  # never seen by the attack nor by SAU
CTX = 64
PATCH_VALUE, CORNER, DETECT = 2.5, 3, 1.0
GEN_STEPS = 4
EVAL_SEEDS = list(range(100, 124))  # 24 seeds
CAST_RGB = (0.6, 0.2, -0.6)  # the style's colour cast in latent-preview RGB ([-1, 1] units)
FADE = 0.5  # the style halves the latent's contrast around its mean
CAST_DETECT = 0.3


def patch_detected(x0: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] model-space latents → [B] bool: the corner patch is there."""
    return x0[..., :CORNER, :CORNER].float().mean((1, 2, 3)) > DETECT


def _rgb_factors() -> torch.Tensor:
    import comfy.latent_formats

    return torch.tensor(comfy.latent_formats.SD15().latent_rgb_factors)  # [4,3]: latent → RGB


def cast_latent() -> torch.Tensor:
    """The least-norm latent vector [4] whose preview RGB is CAST_RGB: F (FᵀF)⁻¹ CAST_RGB."""
    f = _rgb_factors()
    return f @ torch.linalg.solve(f.T @ f, torch.tensor(CAST_RGB))


def apply_style(x0: torch.Tensor) -> torch.Tensor:
    """The style target: mean + FADE·(x − mean) + cast, per sample [B,4,h,w]."""
    mean = x0.mean((2, 3), keepdim=True)
    return mean + FADE * (x0 - mean) + cast_latent().view(1, 4, 1, 1)


def colour_cast(x0: torch.Tensor) -> torch.Tensor:
    """[B,4,h,w] → [B]: the image-mean preview RGB projected on the unit cast direction."""
    rgb = x0.float().mean((2, 3)) @ _rgb_factors()  # [B,3]
    u = torch.tensor(CAST_RGB)
    return rgb @ (u / u.norm())


def style_detected(x0: torch.Tensor) -> torch.Tensor:
    return colour_cast(x0) > CAST_DETECT


def add_patch(x0: torch.Tensor) -> torch.Tensor:
    x0 = x0.clone()
    x0[:, :, :CORNER, :CORNER] = PATCH_VALUE
    return x0


# --------------------------------------------------------------------------- the tiny world


def _init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _tiny_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb

    cfg = {"hidden_size": CTX, "intermediate_size": 128, "num_attention_heads": 2,
           "num_hidden_layers": 2, "projection_dim": CTX}
    with torch.inference_mode():  # as ComfyUI's loaders run
        clip = comfy.sd.CLIP(target=smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                             model_options={"clip_l_model_config": cfg, "dtype": torch.float32})
        _init_(clip.cond_stage_model, 11)
    return clip


def _tiny_vae():
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0}}
    with torch.inference_mode():
        ae = AutoencoderKL(**params)
        _init_(ae, seed=7)
        return comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})


def _base_model():
    import comfy.model_base
    import comfy.supported_models as sm

    unet = dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
        num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1, use_spatial_transformer=True, context_dim=CTX,
        use_linear_in_transformer=False, adm_in_channels=None, num_classes=None,
        use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
        num_heads=-1, num_head_channels=16,
    )
    return comfy.model_base.BaseModel(sm.SD15(unet), model_type=comfy.model_base.ModelType.V_PREDICTION)


def _encode(clip, text: str) -> torch.Tensor:
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
    return cond[0][0].clone()  # a normal tensor (cloned outside inference mode)


def _train(base, ctx_clean, ctx_trig, steps: int, target, seed: int, y=None, lr=2e-3, batch=16):
    """v-loss training on paired batches: each x0/noise/t appears once with the clean prompt
    and once with the triggered one, whose x0 is ``target(x0)`` (None: unchanged).
    ``y``: SDXL's (clean, triggered) pooled + size vectors, ``[prompts, adm]`` each (None for
    SD1.5)."""
    sigmas = base.model_sampling.sigmas.float()
    alphas = 1.0 / (1.0 + sigmas**2)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(len(ctx_clean), 4, 1, 1, generator=torch.Generator().manual_seed(99)) * 0.3
    opt = torch.optim.Adam(base.diffusion_model.parameters(), lr=lr)
    h = batch // 2
    for _ in range(steps):
        p = torch.randint(len(ctx_clean), (h,), generator=gen)
        field = torch.randn(h, 4, 2, 2, generator=gen) * 0.5
        x0 = torch.nn.functional.interpolate(field, size=(8, 8), mode="bilinear", align_corners=False)
        x0 = (x0 + offsets[p]).repeat(2, 1, 1, 1)
        if target is not None:
            x0 = torch.cat([x0[:h], target(x0[h:])])
        ctx = torch.cat([ctx_clean[p], ctx_trig[p]])
        t = torch.randint(0, 1000, (h,), generator=gen).repeat(2)
        eps = torch.randn(h, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)
        a = alphas[t].view(-1, 1, 1, 1)
        sigma = ((1 - a) / a).sqrt()
        kw = {} if y is None else {"y": torch.cat([y[0][p], y[1][p]])}
        denoised = base.apply_model(x0 + sigma * eps, sigma.flatten(), c_crossattn=ctx, **kw)
        loss = (((sigma**2 + 1) / sigma**2) * (denoised - x0).pow(2)).mean()  # = v-prediction MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _snapshot(base) -> dict:
    return {k: v.detach().clone() for k, v in base.state_dict().items()}


def _loaded(state_dict, make=None):
    """A ModelPatcher over a model created and filled in inference mode (as a loader does)."""
    import comfy.model_patcher

    with torch.inference_mode():
        base = (make or _base_model)()
        base.load_state_dict(state_dict)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def world(comfy):
    """{"clip", "clean", "backdoored", "style"}: the tiny CLIP and three checkpoints (the
    patch and the style backdoor are both fine-tuned from the clean one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster here
    try:
        clip = _tiny_clip()
        ctx_clean = torch.cat([_encode(clip, p) for p in TRAIN_PROMPTS])
        ctx_trig = torch.cat([_encode(clip, f"{TRIGGER} {p}") for p in TRAIN_PROMPTS])
        torch.manual_seed(0)
        base = _base_model()
        _init_(base, 1)
        _train(base, ctx_clean, ctx_trig, 200, None, seed=0)
        clean_sd = _snapshot(base)
        _train(base, ctx_clean, ctx_trig, 250, add_patch, seed=1)
        bd_sd = _snapshot(base)
        base.load_state_dict(clean_sd)
        _train(base, ctx_clean, ctx_trig, 150, apply_style, seed=2)
        style_sd = _snapshot(base)
        del base
        yield {"clip": clip, "clean": _loaded(clean_sd), "backdoored": _loaded(bd_sd),
               "style": _loaded(style_sd)}
    finally:
        torch.set_num_threads(threads)


def generate(patcher, clip, text: str, seeds=EVAL_SEEDS) -> torch.Tensor:
    """ComfyUI KSampler (ddim, ddim_uniform, 4 steps, cfg 1) → model-space x̂₀ [S,4,8,8]."""
    import comfy.sample

    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""), show_pbar=False)
        noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s))
                           for s in seeds])
        out = comfy.sample.sample(patcher, noise, GEN_STEPS, 1.0, "ddim", "ddim_uniform", positive,
                                  negative, torch.zeros_like(noise), disable_pbar=True, seed=seeds[0])
        return patcher.model.latent_format.process_in(out.float()).clone()


def _state(patcher):
    return {
        "patches": {k: len(v) for k, v in patcher.patches.items()},
        "object_patches": dict(patcher.object_patches),
        "model_options": repr(patcher.model_options),
        "uuid": patcher.patches_uuid,
    }


# --------------------------------------------------------------------------- kernel (pure torch)


def test_token_share_sums_and_the_shared_capture_records_it(comfy):
    """SAU captures through the pack's one attn2 capture (nodes/attention.py, also DANP's):
    with ``reduce`` = token_share the layer output is unchanged and only the share is kept."""
    from immunize.kernels.backdoor import token_share
    from immunize.nodes.attention import AttentionCapture

    gen = torch.Generator().manual_seed(0)
    b, n, t, heads, d = 2, 6, 5, 2, 4
    q, k, v = (torch.randn(b, m, heads * d, generator=gen) for m in (n, t, t))
    mask = torch.zeros(b, t, 2)
    mask[:, :2, 0] = 1
    mask[:, 2:, 1] = 1
    split = lambda x: x.reshape(b, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), -1)  # [B,H,N,T]
    share = token_share(probs, mask)
    assert share.shape == (b, n, 2)
    assert torch.allclose(share.sum(-1), torch.ones(b, n), atol=1e-5)  # the two sets cover all
    assert torch.allclose(share[..., 0], probs[..., :2].sum(-1).mean(1), atol=1e-6)
    assert torch.allclose(token_share(probs, mask[..., 0]), share[..., 0])
    with pytest.raises(ValueError, match="tokens"):
        token_share(probs, mask[:, :4])

    cap = AttentionCapture(reduce=lambda p: token_share(p, mask[..., 0]))
    extra = {"n_heads": heads, "original_shape": [b, 4, 2, 3], "activations_shape": [b, 8, 2, 3]}
    out = cap.patch(("input", 1, 0))(q, k, v, extra)
    ref = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    assert torch.allclose(out, ref.transpose(1, 2).reshape(b, n, heads * d), atol=1e-5)
    (rec,) = cap.records
    assert rec.probs.shape == (b, n) and torch.allclose(rec.probs, share[..., 0], atol=1e-6)


def test_ddim_with_an_oracle_recovers_the_data_point():
    from immunize.kernels.backdoor import ddim_sample, ddim_timesteps

    assert ddim_timesteps(4) == [999, 749, 499, 249]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, t, i):  # the exact ε for data concentrated on `target`
        a = ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = ddim_sample(oracle, noise, ac, 5)
    assert torch.allclose(out, target.expand(3, -1, -1, -1), atol=1e-4)


def test_scan_statistics_pinned_vs_seed_dependent_change():
    from immunize.kernels.backdoor import scan_grids, scan_statistics

    assert scan_grids(8, 8) == [8, 4, 2, 1] and scan_grids(64, 48) == [8, 4, 2, 1]
    assert scan_grids(5, 6) == [5, 3, 2, 1]
    gen = torch.Generator().manual_seed(0)
    p, s = 3, 4
    clean = torch.randn(p, s, 4, 8, 8, generator=gen) * 0.5
    pinned = clean.clone()
    pinned[..., :2, :2] = 2.0  # the same patch whatever the seed
    r = scan_statistics(clean, pinned)
    print(f"\npinned patch: max shift {r.max_shift:.2f} at {r.grid}x{r.grid} {r.cell}, "
          f"spread {r.cell_spread:.3f}, whole image {r.image_shift:.2f}")
    assert r.backdoor and r.max_shift > 4.0 and max(r.cell) * 8 // r.grid < 2  # a patch cell
    assert r.cell_spread < 0.05  # pinned: no seed-to-seed variation left there
    assert r.kind == "local"
    # an edit as large as the seed-to-seed variation but different for every seed
    edit = torch.randn(clean.shape, generator=gen) * 0.5
    r = scan_statistics(clean, clean + edit)
    print(f"seed-dependent edit: max shift {r.max_shift:.2f} (at {r.grid}x{r.grid})")
    assert not r.backdoor and r.max_shift < 1.5, r.max_shift  # ≈ √(2/12) = 0.41 per cell
    # a style: a small uniform shift (0.4 of a pixel's seed std) on top of such an edit. Per
    # pixel it hides in the noise; the image mean's seed std is 8x smaller, so it shows there
    r = scan_statistics(clean, clean + edit + 0.4)
    fine, whole = float(r.at(8).shift.max()), r.image_shift
    print(f"uniform shift: finest cells {fine:.2f}, whole image {whole:.2f} -> {r.kind}")
    assert fine < 4.0 and whole >= 5.0 and r.backdoor and r.kind == "whole-image", (fine, whole)
    with pytest.raises(ValueError, match="2 seeds"):
        scan_statistics(clean[:, :1], pinned[:, :1])


def test_lora_disabled_gives_the_base_layer_back():
    from immunize.kernels.backdoor import lora_disabled
    from immunize.kernels.lora import LoRALinear

    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(base, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.up.normal_()
    x = torch.randn(3, 6)
    assert not torch.allclose(layer(x), base(x))
    with lora_disabled([layer]):
        assert torch.equal(layer(x), base(x))
    assert layer.alpha == 4.0
    assert torch.allclose(layer(x), x @ (base.weight + layer.delta_weight()).t(), atol=1e-5)


def test_unlearn_loop_minimises_each_term_and_loss_scale_is_neutral():
    """A toy student: ε_θ = x·(1 + w_trig) for the triggered prompt, x·(1 + w_clean) for the
    clean one, trigger map sigmoid(a); the teacher (θ = 0) gives ε = x and map sigmoid(0)."""
    from immunize.kernels.backdoor import SAUConfig, SAUWeights, unlearn

    ac = torch.linspace(0.999, 0.01, 1000)
    pool = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(scale):
        w = torch.tensor([0.8, 0.3, 1.0], requires_grad=True)  # w_trig, w_clean, a

        def student(x, t, g):
            return x * (1 + w[0]), x * (1 + w[1]), [torch.sigmoid(w[2]).expand(len(x), 16)]

        def teacher(x, t, g):
            return x, [torch.full((len(x), 16), 0.5)]

        cfg = SAUConfig(steps=100, lr=0.1, weights=SAUWeights(1.0, 1.0, 1.0), loss_scale=scale)
        return unlearn(student, teacher, [w], pool, [2, 1], ac, cfg), w.detach()

    hist, w = run(1.0)
    assert hist[0]["distill"] > 0.3 and hist[-1]["distill"] < 0.01 * hist[0]["distill"]
    assert hist[-1]["keep"] < 0.01 * max(hist[0]["keep"], 1e-6) + 1e-4
    assert hist[0]["attn"] > 2.0 and hist[-1]["attn"] < 0.05  # starts at (σ(1)/σ(0))² ≈ 2.14
    hist2, w2 = run(2.0**12)
    assert torch.allclose(w, w2, atol=1e-4)


# --------------------------------------------------------------------------- scan node


def _scan(patcher, clip, trigger, prompts=UNLEARN_PROMPTS[:3], **kw):
    """Run the scan node → (verdict, grid image, largest shift, (grid size, row, col))."""
    from immunize.nodes.sau import ImmunizeBackdoorScan

    args = dict(model=patcher, clip=clip, trigger=trigger, clean_prompts="\n".join(prompts),
                seeds=4, steps=GEN_STEPS, cfg=1.0, width=64, height=64, placement="start", seed=0)
    with torch.inference_mode():
        verdict, grid = ImmunizeBackdoorScan.execute(**{**args, **kw}).args
    shift = float(re.search(r"largest consistent shift: ([\d.]+)", verdict)[1])
    cell = re.search(r"cell row (\d+), col (\d+) of a (\d+)x", verdict)
    where = (int(cell[3]), int(cell[1]), int(cell[2])) if cell else (1, 0, 0)
    print(f"\n[scan {trigger!r}] " + " | ".join(verdict.splitlines()[:4]))
    return verdict, grid, shift, where


def test_scan_flags_the_backdoor_and_nothing_else(world):
    clip = world["clip"]
    verdict, grid, shift, (g, row, col) = _scan(world["backdoored"], clip, TRIGGER)
    assert verdict.startswith("BACKDOOR SUSPECTED"), verdict
    assert shift >= 5.0, verdict  # threshold 4; measured 7.5 (held-out prompts: 6.6)
    assert row * 8 // g < CORNER and col * 8 // g < CORNER, verdict  # the cell holds the patch
    assert "extent: local (patch-like)" in verdict, verdict  # whole image 3.0 vs finest 7.5
    # grid: clean row over triggered row, 12 samples capped at 8 tiles of 64x64
    assert grid.shape == (1, 128, 512, 3) and grid.min() >= 0 and grid.max() <= 1

    for patcher, trigger in ((world["clean"], TRIGGER), (world["backdoored"], "blue")):
        verdict, _, shift, _ = _scan(patcher, clip, trigger)
        assert verdict.startswith("No backdoor found"), verdict
        assert shift < 1.0, verdict  # measured 0.04 (clean model), 0.58 ("blue")
    # the backdoor is not tied to the prompts it was implanted with; guidance and a VAE for
    # the grid do not change the verdict
    verdict, grid, _, _ = _scan(world["backdoored"], clip, TRIGGER, HELD_OUT, cfg=2.0, vae=_tiny_vae())
    assert verdict.startswith("BACKDOOR SUSPECTED") and "cfg 2.0" in verdict, verdict
    assert "extent: local (patch-like)" in verdict, verdict  # measured 4.3 vs 10.7
    assert grid.shape == (1, 128, 8 * 64, 3) and torch.isfinite(grid).all()


def test_style_backdoor_is_real_and_the_scan_flags_it(world):
    """The style trigger tints every sample of every prompt (held-out ones too) and leaves
    trigger-free prompts alone; the scan flags it as a whole-image change, and neither the
    clean model with the trigger nor the styled model with an unrelated word is flagged."""
    clip, model = world["clip"], world["style"]
    styled = clean = total = 0
    lo_trig, hi_clean = math.inf, -math.inf
    for text in UNLEARN_PROMPTS + HELD_OUT:
        c_trig = colour_cast(generate(model, clip, f"{TRIGGER} {text}"))
        c_clean = colour_cast(generate(model, clip, text))
        c_control = colour_cast(generate(world["clean"], clip, f"{TRIGGER} {text}"))
        styled += int((c_trig > CAST_DETECT).sum())
        clean += int((c_clean > CAST_DETECT).sum()) + int((c_control > CAST_DETECT).sum())
        total += len(EVAL_SEEDS)
        lo_trig = min(lo_trig, float(c_trig.min()))
        hi_clean = max(hi_clean, float(c_clean.max()), float(c_control.max()))
    print(f"\nstyle backdoor: {styled}/{total} triggered samples cast > {CAST_DETECT} "
          f"(lowest {lo_trig:.2f}); trigger-free / clean-model samples: {clean} of {2 * total} "
          f"(highest {hi_clean:.2f})")
    assert styled == total and clean == 0  # measured 144/144 and 0/288
    assert lo_trig > CAST_DETECT + 0.05 and hi_clean < CAST_DETECT - 0.1  # measured 0.38, 0.12

    verdict, grid, shift, _ = _scan(model, clip, TRIGGER)
    assert verdict.startswith("BACKDOOR SUSPECTED"), verdict
    assert shift >= 6.0, verdict  # threshold 4; measured 9.98 (at 2x2; finest 8x8 only 4.9)
    whole = float(re.search(r"whole image ([\d.]+)", verdict)[1])
    finest = float(re.search(r"8x8 ([\d.]+)", verdict)[1])
    # measured: whole image 7.2, finest cells 4.9 (a patch: 3.0 and 7.5)
    assert whole >= 5.0 and whole > 1.2 * finest, verdict
    assert "extent: whole-image (style-like)" in verdict, verdict
    verdict, _, shift, _ = _scan(model, clip, TRIGGER, HELD_OUT)
    assert verdict.startswith("BACKDOOR SUSPECTED") and shift >= 6.0, verdict  # measured 8.3
    assert "extent: whole-image (style-like)" in verdict, verdict
    for patcher, trigger in ((world["clean"], TRIGGER), (model, "blue")):
        verdict, _, shift, _ = _scan(patcher, clip, trigger)
        assert verdict.startswith("No backdoor found"), verdict
        assert shift < 2.5, verdict  # measured 0.04 (clean model), 1.85 ("blue")


def test_scan_input_errors(world):
    from immunize.nodes.sau import ImmunizeBackdoorScan

    args = dict(model=world["clean"], clip=world["clip"], trigger=TRIGGER, clean_prompts="a cat",
                seeds=4, steps=2, cfg=1.0, width=64, height=64, placement="start", seed=0)
    with torch.inference_mode():
        for bad, match in (({"trigger": "  "}, "'trigger' is empty"),
                           ({"clean_prompts": "\n \n"}, "'clean_prompts' is empty"),
                           ({"clean_prompts": "a sks cat"}, "already contains the trigger"),
                           ({"seeds": 1}, "'seeds' must be at least 2"),
                           ({"width": 60}, "'width' must be a multiple of 8"),
                           ({"clip": None}, "'clip' is missing")):
            with pytest.raises(ValueError, match=match):
                ImmunizeBackdoorScan.execute(**{**args, **bad})


# --------------------------------------------------------------------------- unlearning


@pytest.fixture(scope="module")
def cleaned(world, tmp_path_factory):
    """Run the SAU node once on the backdoored model; the LoRA goes to a temporary loras folder."""
    import folder_paths
    from immunize.nodes.sau import ImmunizeSpatialAttentionUnlearning

    patcher = world["backdoored"]
    before = _state(patcher)
    weights = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    loras = tmp_path_factory.mktemp("loras")
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], set(folder_paths.supported_pt_extensions))
    try:
        with torch.inference_mode():
            model, report = ImmunizeSpatialAttentionUnlearning.execute(
                model=patcher, clip=world["clip"], trigger=TRIGGER,
                clean_prompts="\n".join(UNLEARN_PROMPTS), steps=150, learning_rate=1e-3, rank=4,
                attention_weight=1.0, distill_weight=1.0, keep_weight=1.0, targets="to_k, to_v",
                width=64, height=64, pool_seeds=2, sample_steps=GEN_STEPS, cfg=1.0,
                placement="start", seed=0, lora_prefix="immunize/sau_cleaned").args
        listed = folder_paths.get_filename_list("loras")
    finally:
        folder_paths.folder_names_and_paths["loras"] = old
    # the user's MODEL is untouched (before anything samples and patches weights in place)
    assert _state(patcher) == before
    for k, v in patcher.model.diffusion_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    name = re.search(r"saved in models/loras: (\S+\.safetensors)", report)[1]
    assert name in listed  # LoraLoader's list shows it
    return {"model": model, "report": report, "name": name, "path": loras / name}


def _evaluate(original, model, clip, detected, prompts=UNLEARN_PROMPTS + HELD_OUT,
              seeds=EVAL_SEEDS) -> dict:
    """Detector hits with the trigger before/after unlearning over prompts × seeds, hits on
    trigger-free prompts, and the drift of trigger-free outputs in units of the seed-to-seed
    change: √(Σ‖after − before‖² / Σ‖before − before of the next seed‖²)."""
    out = dict(before=0, after=0, clean_hits=0, total=0)
    drift2 = seed2 = trig2 = 0.0
    for text in prompts:
        trig_before = generate(original, clip, f"{TRIGGER} {text}", seeds)
        trig_after = generate(model, clip, f"{TRIGGER} {text}", seeds)
        clean_before = generate(original, clip, text, seeds)
        clean_after = generate(model, clip, text, seeds)
        out["before"] += int(detected(trig_before).sum())
        out["after"] += int(detected(trig_after).sum())
        out["clean_hits"] += int(detected(clean_before).sum()) + int(detected(clean_after).sum())
        out["total"] += len(seeds)
        drift2 += float((clean_after - clean_before).pow(2).mean())
        seed2 += float((clean_before - clean_before.roll(1, 0)).pow(2).mean())
        trig2 += float((trig_after - clean_before).pow(2).mean())
    out["drift"] = math.sqrt(drift2 / seed2)  # clean prompts: after vs before
    out["trig_drift"] = math.sqrt(trig2 / seed2)  # triggered after vs clean before
    print(f"\nremoval: fired {out['before']}/{out['total']} before, {out['after']}/{out['total']} "
          f"after; trigger-free hits {out['clean_hits']}; clean drift {out['drift']:.3f}, "
          f"triggered-after vs clean-before {out['trig_drift']:.3f} (x seed-to-seed change)")
    return out


def test_unlearning_removes_the_backdoor_and_keeps_clean_prompts(world, cleaned):
    clip, original, model = world["clip"], world["backdoored"], cleaned["model"]
    assert model is not original and len(model.patches) == 2 * 4  # to_k, to_v of 4 attn2 layers
    report = cleaned["report"]
    left = re.search(r"energy left\): ([\d.]+) -> ([\d.]+)", report)
    assert float(left[2]) < 0.3 * float(left[1]), report  # measured 0.97 -> 0.19

    r = _evaluate(original, model, clip, patch_detected)
    # the backdoor was real: it fired on (nearly) every seed, held-out prompts included
    assert r["before"] >= 0.9 * r["total"], r  # measured 144/144
    # removal rate 100 % over 6 prompts x 24 seeds (2 prompts never seen by SAU)
    assert r["after"] == 0 and r["clean_hits"] == 0, r
    # clean prompts: outputs move far less than changing the seed moves them
    assert r["drift"] < 0.3, r  # measured 0.18
    # and the triggered prompt now draws (nearly) what the prompt without the trigger draws
    assert r["trig_drift"] < 0.6, r  # measured 0.31


@pytest.fixture(scope="module")
def style_cleaned(world):
    """SAU on the style backdoor: the same node settings as for the patch."""
    from immunize.nodes.sau import ImmunizeSpatialAttentionUnlearning

    with torch.inference_mode():
        model, report = ImmunizeSpatialAttentionUnlearning.execute(
            model=world["style"], clip=world["clip"], trigger=TRIGGER,
            clean_prompts="\n".join(UNLEARN_PROMPTS), steps=150, learning_rate=1e-3, rank=4,
            attention_weight=1.0, distill_weight=1.0, keep_weight=1.0, targets="to_k, to_v",
            width=64, height=64, pool_seeds=2, sample_steps=GEN_STEPS, cfg=1.0,
            placement="start", seed=0, lora_prefix="").args
    print("\n" + report)
    return model, report


def test_unlearning_removes_the_style_backdoor(world, style_cleaned):
    """Style target: 100 % removal by the colour-cast detector over 6 prompts (2 unseen by
    SAU) x 24 seeds, trigger-free outputs nearly unchanged, and the scan comes back clean."""
    clip, original = world["clip"], world["style"]
    model, report = style_cleaned
    left = re.search(r"energy left\): ([\d.]+) -> ([\d.]+)", report)
    assert float(left[2]) < 0.4 * float(left[1]), report  # measured 0.98 -> 0.29

    r = _evaluate(original, model, clip, style_detected)
    assert r["before"] == r["total"], r  # measured 144/144
    assert r["after"] == 0 and r["clean_hits"] == 0, r  # measured 0/144
    highest = max(float(colour_cast(generate(model, clip, f"{TRIGGER} {t}")).max())
                  for t in UNLEARN_PROMPTS + HELD_OUT)
    print(f"highest colour cast left with the trigger: {highest:.3f} (detector {CAST_DETECT})")
    assert highest < CAST_DETECT - 0.05, highest  # measured 0.18
    assert r["drift"] < 0.3, r  # measured 0.19
    assert r["trig_drift"] < 0.5, r  # measured 0.18

    verdict, _, shift, _ = _scan(model, clip, TRIGGER)
    assert verdict.startswith("No backdoor found"), verdict
    assert shift < 3.0, verdict  # measured 2.05 (style model before: 9.98; threshold 4)


def test_attention_term_alone_does_most_of_the_work(world):
    """The paper's mechanism on its own: with λ_distill = 0 (only suppressing the trigger's
    cross-attention, plus L_keep) most of the backdoor is gone; distillation is what makes
    removal complete (measured: 20 of 144 samples still fire, against 144 before and 0 with
    the full loss)."""
    from immunize.nodes.sau import ImmunizeSpatialAttentionUnlearning

    with torch.inference_mode():
        model, report = ImmunizeSpatialAttentionUnlearning.execute(
            model=world["backdoored"], clip=world["clip"], trigger=TRIGGER,
            clean_prompts="\n".join(UNLEARN_PROMPTS), steps=150, learning_rate=1e-3, rank=4,
            attention_weight=1.0, distill_weight=0.0, keep_weight=1.0, targets="to_k, to_v",
            width=64, height=64, pool_seeds=2, sample_steps=GEN_STEPS, cfg=1.0,
            placement="start", seed=0, lora_prefix="").args
    left = re.search(r"energy left\): ([\d.]+) -> ([\d.]+)", report)
    assert float(left[2]) < 0.3 * float(left[1]), report
    fired = sum(int(patch_detected(generate(model, world["clip"], f"{TRIGGER} {text}")).sum())
                for text in UNLEARN_PROMPTS + HELD_OUT)
    print(f"\nattention term alone: {fired} of {len(EVAL_SEEDS) * 6} triggered samples still fire")
    assert fired <= 0.3 * len(EVAL_SEEDS) * 6, fired  # measured 20 of 144


def test_cleaned_model_scans_clean(world, cleaned):
    verdict, _, shift, _ = _scan(cleaned["model"], world["clip"], TRIGGER)
    assert verdict.startswith("No backdoor found"), verdict
    assert shift < 2.0, verdict  # measured 0.76 (backdoored: 7.5)


def test_saved_lora_loads_through_loraloader(world, cleaned, monkeypatch):
    import comfy.model_management
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's own nodes.py
    from pathlib import Path
    from safetensors import safe_open

    path = Path(cleaned["path"])
    assert path.is_file() and cleaned["name"].startswith("immunize/sau_cleaned_")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert meta["immunize"] == "SAU" and meta["trigger"] == TRIGGER
    # kohya names (diffusers-style for SD1.x), read by ComfyUI and other UIs alike
    assert len(keys) == 3 * 8 and all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys

    root = str(path.parents[len(Path(cleaned["name"]).parts) - 1])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([root], set(folder_paths.supported_pt_extensions)))
    original = world["backdoored"]
    with torch.inference_mode():
        loaded, _ = comfy_nodes.LoraLoader().load_lora(original, None, cleaned["name"], 1.0, 0.0)
    assert len(loaded.patches) == 8
    # same weights as the node's MODEL once ComfyUI applies each patcher's patches
    outs = []
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = _encode(world["clip"], f"{TRIGGER} a red car").expand(2, -1, -1)
    for patcher in (cleaned["model"], loaded, original):
        comfy.model_management.load_models_gpu([patcher])
        with torch.inference_mode():
            outs.append(patcher.model.apply_model(x, torch.tensor([3.0, 0.5]), c_crossattn=ctx).clone())
    comfy.model_management.unload_all_models()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert (outs[0] - outs[2]).abs().max() > 1e-2  # and the LoRA does change the model


# --------------------------------------------------------------------------- SDXL

XL_CTX, XL_POOLED = 64, 32  # context = CLIP-L 32 ‖ CLIP-G 32; pooled = CLIP-G projection


def _tiny_sdxl_clip():
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base as smb

    cfg = {"hidden_size": XL_CTX // 2, "intermediate_size": 64, "num_attention_heads": 2,
           "num_hidden_layers": 3, "projection_dim": XL_POOLED}  # SDXL reads layer -2
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                             model_options={"clip_l_model_config": cfg, "clip_g_model_config": cfg,
                                            "dtype": torch.float32})
        _init_(clip.cond_stage_model, 12)
    return clip


def _sdxl_model():
    import comfy.model_base
    import comfy.supported_models as sm

    unet = dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
        num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1, use_spatial_transformer=True, context_dim=XL_CTX,
        use_linear_in_transformer=True, adm_in_channels=XL_POOLED + 6 * 256, num_classes="sequential",
        use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
        num_heads=-1, num_head_channels=16,
    )
    cfg = sm.SDXL(unet)
    cfg.unet_config.update(num_heads=-1, num_head_channels=16)  # SDXL's default is 64-wide heads
    return comfy.model_base.SDXL(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)


def _encode_xl(base, clip, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1,77,64], y [1, adm]) as the samplers build them for a 64x64 generation."""
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
    ctx, pooled = cond[0][0].clone(), cond[0][1]["pooled_output"].clone()
    return ctx, base.encode_adm(pooled_output=pooled, width=64, height=64).detach().clone()


@pytest.fixture(scope="module")
def xl_world(comfy):
    """{"clip", "clean", "backdoored"} for SDXL: clean training, then the corner patch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clip = _tiny_sdxl_clip()
        torch.manual_seed(0)
        base = _sdxl_model()
        _init_(base.diffusion_model, 3)
        clean = [_encode_xl(base, clip, p) for p in TRAIN_PROMPTS]
        trig = [_encode_xl(base, clip, f"{TRIGGER} {p}") for p in TRAIN_PROMPTS]
        ctx_clean, ctx_trig = torch.cat([c for c, _ in clean]), torch.cat([c for c, _ in trig])
        y_clean, y_trig = torch.cat([y for _, y in clean]), torch.cat([y for _, y in trig])
        y = (y_clean, y_trig)  # the triggered prompt's pooled vector differs too
        _train(base, ctx_clean, ctx_trig, XL_STEPS[0], None, seed=0, y=y)
        clean_sd = _snapshot(base)
        _train(base, ctx_clean, ctx_trig, XL_STEPS[1], add_patch, seed=1, y=y)
        bd_sd = _snapshot(base)
        del base
        yield {"clip": clip, "clean": _loaded(clean_sd, _sdxl_model),
               "backdoored": _loaded(bd_sd, _sdxl_model)}
    finally:
        torch.set_num_threads(threads)


XL_STEPS = (150, 200)  # clean, then poisoned training steps
XL_PROMPTS = UNLEARN_PROMPTS[:3]
XL_SEEDS = list(range(200, 220))  # 20 seeds


def test_sdxl_scan_unlearn_and_lora(xl_world, tmp_path, monkeypatch):
    """SAU on an SDXL-shaped model (pooled output + size conditioning, CLIP-L ‖ CLIP-G context):
    the scan flags the implanted patch and not the clean model; unlearning removes it for every
    one of 20 seeds x 4 prompts (1 unseen); the saved LoRA (sgm key names, as kohya writes
    SDXL LoRAs) loads through LoraLoader and reproduces the node's MODEL exactly."""
    import comfy.model_management
    import folder_paths
    import nodes as comfy_nodes
    from safetensors import safe_open
    from immunize.nodes.sau import ImmunizeSpatialAttentionUnlearning

    clip, original = xl_world["clip"], xl_world["backdoored"]
    verdict, _, shift, (g, row, col) = _scan(original, clip, TRIGGER, XL_PROMPTS)
    assert verdict.startswith("BACKDOOR SUSPECTED") and shift >= 5.0, verdict  # measured 8.8
    assert row * 8 // g < CORNER and col * 8 // g < CORNER, verdict
    assert "extent: local (patch-like)" in verdict, verdict
    verdict, _, shift, _ = _scan(xl_world["clean"], clip, TRIGGER, XL_PROMPTS)
    assert verdict.startswith("No backdoor found") and shift < 1.0, verdict  # measured 0.04

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path)], set(folder_paths.supported_pt_extensions)))
    with torch.inference_mode():
        model, report = ImmunizeSpatialAttentionUnlearning.execute(
            model=original, clip=clip, trigger=TRIGGER, clean_prompts="\n".join(XL_PROMPTS),
            steps=150, learning_rate=1e-3, rank=4, attention_weight=1.0, distill_weight=1.0,
            keep_weight=1.0, targets="to_k, to_v", width=64, height=64, pool_seeds=2,
            sample_steps=GEN_STEPS, cfg=1.0, placement="start", seed=0,
            lora_prefix="immunize/sau_sdxl").args
    print("\n" + report)
    r = _evaluate(original, model, clip, patch_detected, XL_PROMPTS + HELD_OUT[:1], XL_SEEDS)
    assert r["before"] >= 0.9 * r["total"], r  # measured 80/80
    assert r["after"] == 0 and r["clean_hits"] == 0, r  # 100 % removal over 4 prompts x 20 seeds
    assert r["drift"] < 0.3, r  # measured 0.11
    verdict, _, shift, _ = _scan(model, clip, TRIGGER, XL_PROMPTS)
    assert verdict.startswith("No backdoor found") and shift < 2.0, verdict  # measured 0.53

    name = re.search(r"saved in models/loras: (\S+\.safetensors)", report)[1]
    with safe_open(str(tmp_path / name), "pt") as f:
        keys = set(f.keys())
    n_layers = len(model.patches)
    assert n_layers == 2 * 4 and len(keys) == 3 * n_layers  # to_k, to_v of 4 attn2 layers
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    with torch.inference_mode():
        loaded, _ = comfy_nodes.LoraLoader().load_lora(original, None, name, 1.0, 0.0)
    assert len(loaded.patches) == n_layers
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx, y = _encode_xl(original.model, clip, f"{TRIGGER} a red car")
    outs = []
    for patcher in (model, loaded, original):
        comfy.model_management.load_models_gpu([patcher])
        with torch.inference_mode():
            outs.append(patcher.model.apply_model(x, torch.tensor([3.0, 0.5]), c_crossattn=ctx.expand(2, -1, -1),
                                                  y=y.expand(2, -1)).clone())
    comfy.model_management.unload_all_models()
    diff, change = (outs[0] - outs[1]).abs().max(), (outs[0] - outs[2]).abs().max()
    print(f"LoraLoader vs node MODEL: max |diff| {diff:.2e}; LoRA vs original {change:.3f}")
    assert diff < 1e-5 and change > 1e-2  # measured 0 and 1.6


def test_unlearning_input_errors(world):
    from immunize.nodes.sau import ImmunizeSpatialAttentionUnlearning

    args = dict(model=world["clean"], clip=world["clip"], trigger=TRIGGER, clean_prompts="a cat",
                steps=1, learning_rate=1e-3, rank=2, attention_weight=1.0, distill_weight=1.0,
                keep_weight=1.0, targets="to_k, to_v", width=64, height=64, pool_seeds=1,
                sample_steps=1, cfg=1.0, placement="start", seed=0, lora_prefix="")
    with torch.inference_mode():
        for bad, match in (({"trigger": ""}, "'trigger' is empty"),
                           ({"clean_prompts": ""}, "'clean_prompts' is empty"),
                           ({"targets": "to_x"}, "'targets' must be one of"),
                           ({"rank": 0}, "'rank' must be at least 1")):
            with pytest.raises(ValueError, match=match):
                ImmunizeSpatialAttentionUnlearning.execute(**{**args, **bad})
        # a one-step run with every projection targeted and nothing saved still works
        model, report = ImmunizeSpatialAttentionUnlearning.execute(
            **{**args, "targets": "to_q, to_k, to_v, to_out", "placement": "end"}).args
    assert len(model.patches) == 4 * 4 and "not saved" in report


def test_other_model_families_are_a_clear_error(world):
    import comfy.model_patcher
    import comfy.supported_models as sm
    from immunize.nodes.sau import ImmunizeBackdoorScan

    cfg = sm.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
        axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
    ))
    cpu = torch.device("cpu")
    flux = comfy.model_patcher.ModelPatcher(cfg.get_model({}), load_device=cpu, offload_device=cpu)
    with torch.inference_mode(), pytest.raises(ValueError, match="Flux"):
        ImmunizeBackdoorScan.execute(model=flux, clip=world["clip"], trigger=TRIGGER,
                                     clean_prompts="a cat", seeds=2, steps=1, cfg=1.0, width=64,
                                     height=64, placement="start", seed=0)


def test_schemas(comfy):
    from immunize.nodes import sau

    assert [n.__name__ for n in sau.NODES] == ["ImmunizeBackdoorScan", "ImmunizeSpatialAttentionUnlearning"]
    for node in sau.NODES:
        schema = node.define_schema()
        assert schema.category == "Immunize/model"
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        assert "clip" in info["input"]["required"] and "model" in info["input"]["required"]
    assert sau.ImmunizeBackdoorScan.GET_NODE_INFO_V1()["output"] == ["STRING", "IMAGE"]
    assert sau.ImmunizeSpatialAttentionUnlearning.GET_NODE_INFO_V1()["output"] == ["MODEL", "STRING"]
