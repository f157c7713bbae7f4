"""The attacker's IP-Adapter node (Apply IP-Adapter) through real ComfyUI classes, on CPU.

Tiny random SD1.5- and SDXL-shaped UNets in real ``ModelPatcher``s, ComfyUI's own tiny
``ClipVisionModel`` and tiny random IP-Adapter checkpoints (the ``world`` of ``test_bridge``).
The node and every model call run under ``torch.inference_mode()`` as in ComfyUI; the patched
clone is evaluated the way ComfyUI's sampler calls the UNet (its model options'
``transformer_options`` plus ``cond_or_uncond`` / ``sigmas``) and sampled with ``comfy.sample``.
"""

from __future__ import annotations

import pytest
import torch

from immunize.tests.test_bridge import _load, _rms, _write_ipadapter, world  # noqa: F401
from immunize.tests.test_diffusion_nodes import _apply, _image, _state, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# ip-adapter-{kind}_{family} files of a fixed seed, written once per test module
CASES = [("sd15", "plain"), ("sdxl", "plus")]


@pytest.fixture(scope="module")
def adapters(world):
    return {(f, k): _load(_write_ipadapter(world, f, k, seed=5)) for f, k in CASES + [("sd15", "full-face")]}


def _apply_node(world, family, ip, image=None, weight=1.0, **kw):
    from immunize.nodes.ipadapter import ImmunizeApplyIPAdapter

    image = _image() if image is None else image
    with torch.inference_mode():
        (m,) = ImmunizeApplyIPAdapter.execute(model=world[family][0], ipadapter=ip, clip_vision=world["clip_vision"],
                                              image=image, weight=weight, **kw).args
    return m


def _eps(model, cond, batch=1, sigma=2.0, **extra):
    """ε̂ of ``model`` (a ModelPatcher, patched or not) on a fixed input, called as the sampler does:
    its model options' transformer_options plus ``extra`` (e.g. cond_or_uncond, sigmas)."""
    x = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3)).expand(batch, -1, -1, -1)
    opts = dict(model.model_options.get("transformer_options", {}))
    opts.update(extra)
    kw = {"c_crossattn": cond[0][0].expand(batch, -1, -1)}
    if "pooled_output" in cond[0][1]:
        kw["y"] = model.model.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=40, height=48,
                                         device=x.device).expand(batch, -1)
    s = torch.full((batch,), sigma)
    with torch.inference_mode():
        return (x - model.model.apply_model(x, s, transformer_options=opts, **kw)) / sigma


# --------------------------------------------------------------------------- ε̂


@pytest.mark.parametrize("family,kind", CASES)
def test_weight_moves_eps_and_zero_gives_the_model_back(world, adapters, family, kind):
    patcher, cond = world[family]
    ip = adapters[(family, kind)]
    base = _eps(patcher, cond)
    one = _eps(_apply_node(world, family, ip, weight=1.0), cond)
    zero = _eps(_apply_node(world, family, ip, weight=0.0), cond)
    other = _eps(_apply_node(world, family, ip, image=_image(seed=4), weight=1.0), cond)
    assert torch.isfinite(one).all()
    # λ = 0: the patch's text part is ComfyUI's own attention
    assert torch.allclose(zero, base, atol=1e-5), _rms(zero - base)
    # λ = 1 moves ε̂ (measured 0.57 and 0.81 of ‖ε̂‖), another face moves it differently (0.011, 0.07)
    assert _rms(one - base) > 0.05 * _rms(base), (_rms(one - base), _rms(base))
    assert _rms(one - other) > 0.005 * _rms(base), (_rms(one - other), _rms(base))


def test_several_references_average_their_tokens(world, adapters):
    from immunize.nodes.ipadapter import reference_tokens

    ip, cv = adapters[("sdxl", "plus")], world["clip_vision"]
    a, b = _image(seed=1), _image(seed=2)
    with torch.inference_mode():
        both, uncond = reference_tokens(ip, cv, torch.cat([a, b]).movedim(-1, 1))
        ta, ua = reference_tokens(ip, cv, a.movedim(-1, 1))
        tb, _ = reference_tokens(ip, cv, b.movedim(-1, 1))
    assert both.shape == (1, 4, 96) and uncond.shape == (1, 4, 96)
    assert torch.allclose(both, (ta + tb) / 2, atol=1e-5)
    assert torch.equal(uncond, ua) and _rms(uncond - ta) > 1e-3  # the blank input is not the face


def test_uncond_chunks_get_the_blank_tokens(world, adapters):
    """In a cond/uncond batch the uncond chunk sees the blank image's tokens (IP-Adapter's reference
    pipeline), so CFG amplifies the face instead of cancelling it."""
    patcher, cond = world["sd15"]
    m = _apply_node(world, "sd15", adapters[("sd15", "plain")])
    pair = _eps(m, cond, batch=2, cond_or_uncond=[0, 1])
    flipped = _eps(m, cond, batch=2, cond_or_uncond=[1, 0])
    alone = _eps(m, cond, cond_or_uncond=[0])
    assert torch.allclose(pair[:1], alone, atol=1e-5)
    assert torch.allclose(pair[1:], flipped[:1], atol=1e-5) and torch.allclose(pair[:1], flipped[1:], atol=1e-5)
    assert _rms(pair[0] - pair[1]) > 1e-3 * _rms(alone)


def test_start_and_end_bound_the_branch(world, adapters):
    patcher, cond = world["sd15"]
    m = _apply_node(world, "sd15", adapters[("sd15", "plain")], start_at=0.5, end_at=1.0)
    sampling = patcher.get_model_object("model_sampling")
    high, low = float(sampling.sigma_max), float(sampling.sigma_min) * 2
    on = lambda s: _eps(m, cond, sigma=s, sigmas=torch.tensor([s]))
    assert torch.allclose(on(high), _eps(patcher, cond, sigma=high), atol=1e-5)  # early: off
    assert _rms(on(low) - _eps(patcher, cond, sigma=low)) > 1e-3 * _rms(on(low))  # late: on
    with pytest.raises(ValueError, match="start_at"):
        _apply_node(world, "sd15", adapters[("sd15", "plain")], start_at=0.8, end_at=0.2)


# --------------------------------------------------------------------------- the user's MODEL


def test_users_model_is_untouched_and_sampling_works(world, adapters):
    import comfy.sample

    patcher, cond = world["sd15"]
    before_state, before_out = _state(patcher), _apply(patcher, cond)
    m = _apply_node(world, "sd15", adapters[("sd15", "full-face")])
    assert m is not patcher and m.model is patcher.model
    assert not patcher.model_options.get("transformer_options", {}).get("patches_replace")
    assert len(m.model_options["transformer_options"]["patches_replace"]["attn2"]) == 4
    # a clone of the patched model (e.g. by a LoRA loader) shares the patches instead of copying them
    m2 = m.clone()
    assert torch.equal(_eps(m2, cond), _eps(m, cond))
    gen = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        neg = [[torch.randn(cond[0][0].shape, generator=gen), {}]]
        latent = torch.zeros(1, 4, 6, 5)
        noise = comfy.sample.prepare_noise(latent, 0)
        run = lambda model: comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", cond, neg, latent,
                                                disable_pbar=True, seed=0)
        out, plain = run(m), run(patcher)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert _rms(out - plain) > 1e-3 * _rms(plain)  # the sampler used the IP branch
    assert _state(patcher) == before_state
    assert torch.equal(_apply(patcher, cond), before_out)


def test_composes_with_an_earlier_attn2_patch(world, adapters):
    """A patch already at a layer computes the text part, called exactly once per layer call."""
    from immunize.nodes.attention import add_attn2_patches, attn2_keys, comfy_attention

    patcher, cond = world["sd15"]
    calls = []

    def make(key, existing):
        def patch(q, k, v, extra):
            calls.append(key)
            return comfy_attention(q, k, v, extra)
        return patch

    first = patcher.clone()
    first.model_options["transformer_options"] = add_attn2_patches(
        None, attn2_keys(patcher.model.diffusion_model), make)
    both = _apply_node({**world, "sd15": (first, cond)}, "sd15", adapters[("sd15", "plain")])
    alone = _apply_node(world, "sd15", adapters[("sd15", "plain")])
    calls.clear()
    assert torch.allclose(_eps(both, cond), _eps(alone, cond), atol=1e-5)
    assert sorted(calls) == sorted(attn2_keys(patcher.model.diffusion_model))


# --------------------------------------------------------------------------- errors


def test_mismatches_are_clear_errors(world, adapters):
    from immunize.kernels.ipadapter import build_ipadapter

    with pytest.raises(ValueError, match=r"MODEL is SDXL .*cross_attention_dim 96, 7 cross-attention layers"):
        _apply_node(world, "sdxl", adapters[("sd15", "plain")])
    with pytest.raises(ValueError, match=r"MODEL is SD15 .*cross_attention_dim 64, 4 cross-attention layers"):
        _apply_node(world, "sd15", adapters[("sdxl", "plus")])
    wide = build_ipadapter({**adapters[("sdxl", "plus")].state_dict(),
                            "image_proj.proj_in.weight": torch.zeros(64, 48)}, "wide.safetensors")
    with pytest.raises(ValueError, match="clip_vision gives penultimate of width 32"):
        _apply_node(world, "sdxl", wide)
    with pytest.raises(ValueError, match="ipadapter: expected an IMMUNIZE_IPADAPTER"):
        _apply_node(world, "sd15", object())
    with pytest.raises(ValueError, match=r"image: expected a ComfyUI IMAGE \[B,H,W,3\]"):
        _apply_node(world, "sd15", adapters[("sd15", "plain")], image=torch.rand(1, 3, 48, 40))


def test_schema(comfy):
    from immunize.nodes.ipadapter import NODES, ImmunizeApplyIPAdapter

    assert ImmunizeApplyIPAdapter in NODES
    schema = ImmunizeApplyIPAdapter.define_schema()
    assert schema.category == "Immunize/attacker" and schema.display_name == "Apply IP-Adapter (attacker)"
    assert all(i.tooltip for i in schema.inputs)
    ImmunizeApplyIPAdapter.VALIDATE_CLASS()
    info = ImmunizeApplyIPAdapter.GET_NODE_INFO_V1()
    assert info["output"] == ["MODEL"]
    assert info["input"]["required"]["ipadapter"][0] == "IMMUNIZE_IPADAPTER"
    assert set(info["input"]["optional"]) == {"start_at", "end_at"}
