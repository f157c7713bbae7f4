"""DANP attention mask guidance: the kernel's math on synthetic maps, the attn2 capture and the
node through real ComfyUI classes (tiny random SD1.5- and SDXL-shaped UNets from
test_diffusion_nodes), under ``torch.inference_mode()`` as the executor runs nodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from immunize.kernels.attention import (
    AttentionMaskGuidance, latent_mask_to_pixels, region_means, relevant_mask, select_tokens,
    threshold_masks,
)
from immunize.kernels.pgd import PGDConfig, protect
from immunize.tests.test_diffusion_nodes import _apply, _bchw, _image, _state, tiny  # noqa: F401

EPS = 8 / 255


# --------------------------------------------------------------------------- kernel, synthetic


def _blob_maps() -> torch.Tensor:
    """[2, 3, 8, 8]: token 1 bright on a 2x2 blob, token 2 on another, token 0 flat."""
    m = torch.full((2, 3, 8, 8), 0.1)
    m[:, 1, 1:3, 1:3] = 0.9
    m[:, 2, 5:7, 4:6] = 0.8
    m[1, 2] = 0.1  # second sample: token 2 flat
    return m


def test_threshold_mask_on_synthetic_maps():
    maps = _blob_maps()
    masks = threshold_masks(maps, k=1.0)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    assert masks[0, 1].sum() == 4 and masks[0, 1, 1:3, 1:3].all()
    assert masks[0, 2].sum() == 4 and masks[0, 2, 5:7, 4:6].all()
    assert not masks[:, 0].any()  # a constant map has no region above mean + k·std
    assert not masks[1, 2].any()
    assert not threshold_masks(maps, k=10.0).any()  # 4 of 64 at +3.7σ: nothing above 10σ
    # the union over the selected tokens; an unselected token does not count
    union = relevant_mask(maps, [1, 2], k=1.0)
    assert union.shape == (2, 1, 8, 8) and union[0].sum() == 8 and union[1].sum() == 4
    assert relevant_mask(maps, [2], k=1.0)[0, 0, 1:3, 1:3].sum() == 0


def test_token_selection_and_region_means():
    assert select_tokens(5, None) == [1, 2, 3, 4]  # the start token is not content
    assert select_tokens(5, [3, 1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="tokens"):
        select_tokens(5, [1, 7])
    attn = torch.zeros(1, 1, 4, 4)
    attn[..., :2, :] = 0.75
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1, :] = 1
    a_in, a_out = region_means(attn, mask)
    assert torch.allclose(a_in, torch.tensor([0.75])) and torch.allclose(a_out, torch.tensor([0.25]))
    up = latent_mask_to_pixels(mask, (29, 27), 8)  # padded 32x32 grid cropped back, never resized
    assert up.shape == (1, 1, 29, 27) and up[0, 0, :8].all() and not up[0, 0, 8:].any()


class _ToyDenoiser:
    """Differentiable stand-in: token logits and ε̂ are fixed linear maps of the latent."""

    def __init__(self, tokens: int = 4, channels: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.w_tok = torch.randn(tokens, channels, generator=gen)
        self.w_eps = torch.randn(channels, channels, generator=gen) * 0.5
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)

    def eps_and_maps(self, x_t, t, cond):
        logits = torch.einsum("tc,bchw->bthw", self.w_tok, x_t) * 3.0
        return torch.einsum("dc,bchw->bdhw", self.w_eps, x_t), logits.softmax(dim=1)


def _toy_encoder():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 1, 1, generator=gen)
    return lambda x: F.conv2d(F.avg_pool2d(x * 4 - 2, 8), w)


def _toy_objective(**kw):
    kw = dict(encoder=_toy_encoder(), denoiser=_ToyDenoiser(), timesteps=[100, 400], k=1.0,
              tokens=[1, 2]) | kw
    return AttentionMaskGuidance(**kw)


def _smooth(h, w, seed):
    low = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def test_loss_sign_conventions():
    """Lower attention inside the mask → lower loss; larger ε-mismatch → lower loss."""
    clean = _smooth(64, 64, 0)
    obj = _toy_objective(noise_weight=0.0, balance=False)
    state = obj.compute_clean_state(clean)
    bound = obj.bind(clean)
    base = float(bound(clean).loss[0])
    assert abs(base - float(torch.stack(
        [(i - o) / s for i, o, s in zip(state.attn_in, state.attn_out, state.scales)]).mean())) < 1e-5
    mask = latent_mask_to_pixels(state.mask_fraction(), (64, 64), 8) > 0
    # make the relevant region look like the irrelevant one and vice versa: contrast flips
    swapped = torch.where(mask, clean.flip(-1).flip(-2), clean)
    r_c = obj.evaluate(clean, state)
    r_s = obj.evaluate(swapped, state)
    loss_s = float(bound(swapped).loss[0])
    assert (float(r_s["attn_in"][0]) < float(r_c["attn_in"][0])) == (loss_s < base)

    noisy = _toy_objective(attention_weight=0.0, balance=False)
    nb = noisy.bind(clean)
    out = nb(clean)
    assert torch.allclose(out.loss, -out.logs["eps_mse"])  # maximising the mismatch = minimising −MSE
    assert out.loss[0] < 0


def test_pgd_moves_attention_out_of_the_mask_on_toy_model():
    clean = _smooth(64, 64, 3)
    obj = _toy_objective()
    state = obj.compute_clean_state(clean)
    obj.clean_state = state
    res = protect(clean, [obj], PGDConfig(eps=EPS, step=1 / 255, iterations=20))
    before, after = obj.evaluate(clean, state), obj.evaluate(res.protected, state)
    gap = float(before["attn_in"][0] - before["attn_out"][0])
    assert gap > 0.05  # the mask found the high-attention region
    # default λ's (1, 1), balanced. Measured: in −0.031, out +0.028 (gap 0.34), ε-MSE +5.4 %
    assert float(after["attn_in"][0]) < float(before["attn_in"][0]) - 0.05 * gap
    assert float(after["attn_out"][0]) > float(before["attn_out"][0]) + 0.05 * gap
    assert float(after["noise_term"][0]) > float(before["noise_term"][0]) * 1.03
    # balance: both terms' gradients have unit mean norm on the clean image
    sa, sn = state.term_scales
    x = clean.clone().requires_grad_(True)
    r = obj.evaluate(x, state)
    ga, = torch.autograd.grad(sa * r["attn_term"].sum(), x, retain_graph=True)
    gn, = torch.autograd.grad(sn * r["noise_term"].sum(), x)
    assert abs(float(ga.norm()) - 1) < 1e-3 and abs(float(gn.norm()) - 1) < 1e-3


def test_too_high_k_is_a_clear_error():
    with pytest.raises(ValueError, match="k = 50"):
        _toy_objective(k=50.0).compute_clean_state(_smooth(32, 32, 0))
    with pytest.raises(ValueError, match="timestep"):
        _toy_objective(timesteps=[1000])
    with pytest.raises(ValueError, match="not both 0"):
        _toy_objective(attention_weight=0.0, noise_weight=0.0)


# --------------------------------------------------------------------------- capture


def test_capture_splits_cond_uncond_and_wraps_existing_patch(comfy):
    from immunize.nodes.attention import AttentionCapture, add_attn2_patches, explicit_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 32, generator=gen) for n in (12, 5, 5))
    extra = {"n_heads": 4, "dim_head": 8, "attn_precision": None, "original_shape": [2, 4, 6, 8],
             "activations_shape": [2, 32, 3, 4], "cond_or_uncond": [1, 0]}
    cap = AttentionCapture()
    out = cap.patch(("input", 1, 0))(q, k, v, extra)
    ref, probs = explicit_attention(q, k, v, 4)
    assert torch.allclose(out, ref)
    (rec,) = cap.records
    assert rec.probs.shape == (1, 4, 12, 5) and torch.allclose(rec.probs, probs[1:])  # cond only
    assert rec.size == (3, 4) and rec.factor == 2

    calls = []

    def earlier(q_, k_, v_, extra_):  # e.g. an IP-Adapter patch already installed
        calls.append(1)
        return torch.zeros_like(q_)

    base = {"patches_replace": {"attn2": {("input", 1): earlier}}}
    opts = cap.transformer_options([("input", 1, 0)], base=base)
    assert base["patches_replace"]["attn2"] == {("input", 1): earlier}  # caller's dict untouched
    cap.clear()
    out = opts["patches_replace"]["attn2"][("input", 1, 0)](q, k, v, dict(extra, cond_or_uncond=None))
    assert calls == [1] and torch.equal(out, torch.zeros_like(q))  # the earlier patch's output
    assert torch.allclose(cap.records[0].probs, probs)  # recorded: the text attention
    same = add_attn2_patches(None, [("a", 0, 0)], lambda key, ex: ex)
    assert same["patches_replace"]["attn2"] == {("a", 0, 0): None}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_capture_through_comfy_unet(tiny, family):  # noqa: F811
    from immunize.nodes.attention import AttentionCapture, attn2_keys
    from immunize.nodes.diffusion_access import DenoiserAccess, VAEAccess, latent_encoder

    patcher, cond = tiny[family]
    before_state, before_out = _state(patcher), _apply(patcher, cond)
    clean = _bchw(_image(h=48, w=40, seed=4))
    with torch.inference_mode(False):
        access, vae = DenoiserAccess(patcher), VAEAccess(tiny["vae"])
        keys = attn2_keys(access.model.diffusion_model)
        assert keys and all(name in ("input", "middle", "output") for name, _, _ in keys)
        x = clean.clone().requires_grad_(True)
        z = latent_encoder(vae, access)(x)
        t = torch.tensor([300])
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        x_t = 0.8 * z + 0.6 * noise
        plain = access.eps(x_t, t, cond)
        cap = AttentionCapture()
        patched = access.eps(x_t, t, cond, transformer_options=cap.transformer_options(keys))
        assert torch.allclose(plain, patched, atol=1e-5), (plain - patched).abs().max()
        assert len(cap.records) == len(keys)
        for rec in cap.records:
            assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)
        maps = cap.maps(size=tuple(z.shape[-2:]))
        assert maps.shape == (1, cond[0][0].shape[1], *z.shape[-2:])
        assert torch.allclose(maps.sum(1), torch.ones(()), atol=1e-5)
        maps[:, 1:].sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

        only = AttentionCapture(factors={4})  # no attn2 at 1/4 in the tiny UNet
        filtered = access.eps(x_t.detach(), t, cond, transformer_options=only.transformer_options(keys))
        assert torch.allclose(plain, filtered, atol=1e-5) and not only.records
        with pytest.raises(ValueError, match="resolution"):
            only.maps(size=(6, 5))
    assert _state(patcher) == before_state
    assert torch.equal(_apply(patcher, cond), before_out)


# --------------------------------------------------------------------------- node


@pytest.mark.parametrize("noise_weight", [0.0, 1.0])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_node_moves_attention_out_of_the_relevant_region(tiny, family, noise_weight):  # noqa: F811
    from immunize.nodes.danp import ImmunizeAttentionMaskGuidance

    patcher, cond = tiny[family]
    before_state = _state(patcher)
    image = _image(h=46, w=37, seed=2)  # not multiples of 8: padded inside, never resized
    with torch.inference_mode():
        objs, mask = ImmunizeAttentionMaskGuidance.execute(
            model=patcher, vae=tiny["vae"], conditioning=cond, image=image, timesteps="200, 500",
            k=1.0, tokens="auto", layers="all", attention_weight=1.0,
            noise_weight=noise_weight, timesteps_per_step=0, weight=1.0,
        ).args
    assert len(objs) == 1 and mask.shape == (1, 46, 37)
    assert 0.1 < float((mask > 0).float().mean()) < 0.9  # a region, not everything or nothing
    clean = _bchw(image)
    with torch.inference_mode(False):
        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=2 / 255, iterations=5))
    logs, state = res.final_logs, objs[0].clean_state
    clean_in, clean_out = float(torch.stack(state.attn_in).mean()), float(torch.stack(state.attn_out).mean())
    prot_in, prot_out = float(logs["attention_mask/attn_in"][0]), float(logs["attention_mask/attn_out"][0])
    # Random tiny UNets attend almost uniformly (≈ 1/5 per token), so the changes are small in
    # absolute terms but deterministic. Measured (SD1.5 / SDXL-shaped), attention only:
    # in −0.0019 / −0.0020, out +0.0039 / +0.0025; with the default balanced λ = (1, 1):
    # in −0.0014 / −0.0015, out +0.0028 / +0.0013, ε-MSE +11 % / +12 %.
    margin = 1e-3 if noise_weight == 0 else 5e-4
    assert prot_in < clean_in - margin, (clean_in, prot_in)
    assert prot_out > clean_out + margin, (clean_out, prot_out)
    if noise_weight > 0:
        kernel = objs[0].build()
        mse_clean = kernel.evaluate(clean, state)["noise_term"]
        assert float(logs["attention_mask/eps_mse"][0]) > float(mse_clean[0]) * 1.05
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    assert _state(patcher) == before_state


def test_node_inputs_and_schema(tiny):  # noqa: F811
    from immunize.nodes import danp

    patcher, cond = tiny["sd15"]
    kw = dict(model=patcher, vae=tiny["vae"], conditioning=cond, image=_image(h=32, w=32),
              timesteps="300", k=1.0, tokens="auto", layers="all", attention_weight=1.0,
              noise_weight=0.0, timesteps_per_step=0, weight=1.0)
    assert danp.parse_int_list("100-700:4, 50", "timesteps", 0, 999) == [50, 100, 300, 500, 700]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="timesteps"):
            danp.ImmunizeAttentionMaskGuidance.execute(**(kw | {"timesteps": "soon"}))
        with pytest.raises(ValueError, match="tokens"):
            danp.ImmunizeAttentionMaskGuidance.execute(**(kw | {"tokens": "3-9"}))
        with pytest.raises(ValueError, match="resolution"):
            danp.ImmunizeAttentionMaskGuidance.execute(**(kw | {"layers": "1/8"}))
        (chained, _) = danp.ImmunizeAttentionMaskGuidance.execute(**(kw | {"objective": ("x",)})).args
    assert chained[0] == "x" and len(chained) == 2

    for node in danp.NODES:
        schema = node.define_schema()
        assert schema.category == "Immunize/objectives"
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        assert info["output"] == ["PROTECT_OBJECTIVE", "MASK"], info["output"]
        assert "objective" in info["input"]["optional"]
