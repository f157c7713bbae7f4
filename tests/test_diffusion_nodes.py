"""The baseline objective nodes through real ComfyUI classes (vendored 0.3.75), on CPU.

Tiny random SD1.5- and SDXL-shaped UNets are built with ComfyUI's own ``supported_models``
configs and ``model_base`` classes and wrapped in a real ``ModelPatcher``; the VAE is a real
``comfy.sd.VAE`` with a tiny AutoencoderKL. Models and conditioning are created inside
``torch.inference_mode()`` (as ComfyUI's loaders run), nodes are executed inside it (as the
executor does), and PGD runs with ``torch.inference_mode(False)`` (as the PGD node does).
"""

from __future__ import annotations

import math

import pytest
import torch

EPS = 8 / 255


def _init_(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight init: give every tensor a sane seeded value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _unet_config(context_dim: int, adm: int | None, linear: bool) -> dict:
    return dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
        num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
        transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
        use_spatial_transformer=True, context_dim=context_dim, use_linear_in_transformer=linear,
        adm_in_channels=adm, num_classes=None if adm is None else "sequential",
        use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
    )


def _patcher(base):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def tiny(comfy):
    """{"sd15": (patcher, conditioning), "sdxl": (...), "vae": VAE}, built in inference mode."""
    import comfy.sd
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    with torch.inference_mode():
        out = {}
        for key, cls, ctx, pooled, linear in (("sd15", sm.SD15, 64, None, False),
                                              ("sdxl", sm.SDXL, 64, 32, True)):
            cfg = cls(_unet_config(ctx, None if pooled is None else pooled + 6 * 256, linear))
            cfg.unet_config.update(num_heads=-1, num_head_channels=16)
            base = cfg.get_model({})
            _init_(base, seed=len(key))
            extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled)}
            out[key] = (_patcher(base), [[torch.randn(1, 5, ctx), extra]])

        params = {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}}
        ae = AutoencoderKL(**params)
        _init_(ae, seed=7)
        out["vae"] = comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})
    return out


def _image(h=48, w=40, b=1, seed=0):
    """A smooth random test image, ComfyUI layout [B,H,W,3], made in inference mode."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 6, 5, generator=gen)
    with torch.inference_mode():
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
        return img.clamp(0, 1).movedim(1, -1).contiguous()


def _state(patcher):
    """What must not change on the user's ModelPatcher."""
    return {
        "patches": {k: len(v) for k, v in patcher.patches.items()},
        "object_patches": dict(patcher.object_patches),
        "model_options": repr(patcher.model_options),
        "wrappers": repr(patcher.wrappers),
        "callbacks": repr(patcher.callbacks),
        "injections": repr(patcher.injections),
        "uuid": patcher.patches_uuid,
        "backup": len(patcher.backup),
    }


def _apply(patcher, cond):
    """Output of the user's model on a fixed input (the way a sampler would call it)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 6, 5, generator=gen)
    kw = {"c_crossattn": cond[0][0]}
    if "pooled_output" in cond[0][1]:
        base = patcher.model
        kw["y"] = base.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=40, height=48,
                                  device=x.device)
    with torch.inference_mode():
        return patcher.model.apply_model(x, torch.tensor([2.0]), **kw).clone()


def _bchw(img):
    return img.movedim(-1, 1).float().clone()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_denoising_loss_node(tiny, family):
    from immunize.kernels.pgd import PGDConfig, protect
    from immunize.nodes.baselines import ImmunizeDenoisingLoss

    patcher, cond = tiny[family]
    before_state, before_out = _state(patcher), _apply(patcher, cond)
    image = _image()  # 48x40: the latent is 6x5; not a square

    with torch.inference_mode():  # as the executor runs nodes
        (objs,) = ImmunizeDenoisingLoss.execute(
            model=patcher, vae=tiny["vae"], positive=cond, t_min=10, t_max=50, weight=1.0
        ).args
    assert isinstance(objs, tuple) and len(objs) == 1

    clean = _bchw(image)
    steps = 6
    with torch.inference_mode(False):  # as the PGD node runs protect()
        bound = objs[0].bind(clean)
        x = clean.clone().requires_grad_(True)
        out = bound(x)
        out.loss.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert out.loss.shape == (1,) and "eps_mse" in out.logs

        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=2 / 255, iterations=steps))
        kernel = objs[0].build()  # same seed: the same (t, ε) draws PGD used, step by step
        with torch.no_grad():
            clean_mse = torch.stack([kernel.mismatch(clean, k)[0] for k in range(steps)]).mean(0)
            prot_mse = torch.stack([kernel.mismatch(res.protected, k)[0] for k in range(steps)]).mean(0)
    assert res.protected.shape == clean.shape
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    # The protected image is harder to denoise than the clean one on PGD's own (t, ε) draws.
    # (A random tiny UNet has no structure for the attack to exploit on *fresh* draws; that
    # needs real weights.) Measured: +6 % (SD1.5-shaped), +16 % (SDXL-shaped).
    assert (prot_mse > clean_mse * 1.03).all(), (clean_mse, prot_mse)

    assert _state(patcher) == before_state
    assert torch.equal(_apply(patcher, cond), before_out)


def test_snapshot_applies_weight_patches_and_leaves_patcher_alone(tiny):
    from immunize.nodes.diffusion_access import snapshot_base_model

    patcher, cond = tiny["sd15"]
    key = "diffusion_model.out.2.weight"
    orig = patcher.model.diffusion_model.out[2].weight.detach().clone()
    diff = torch.full_like(orig, 0.01)
    lora = patcher.clone()
    lora.add_patches({key: (diff,)}, strength_patch=1.0)
    with torch.inference_mode(False):
        twin = snapshot_base_model(lora)
    w = twin.diffusion_model.out[2].weight
    assert torch.allclose(w, orig + diff, atol=1e-6)
    assert not w.is_inference() and not w.requires_grad
    assert all(not p.is_inference() for p in twin.parameters())
    assert torch.equal(patcher.model.diffusion_model.out[2].weight, orig)
    assert twin.diffusion_model is not patcher.model.diffusion_model
    assert patcher.patches == {}


@pytest.mark.parametrize("mode", ["toward_gray", "toward_target", "away_from_clean"])
def test_encoder_attack_node(tiny, mode):
    from immunize.kernels.encoder import latent_mse, pad_to_multiple
    from immunize.kernels.pgd import PGDConfig, protect
    from immunize.nodes.baselines import ImmunizeEncoderAttack
    from immunize.nodes.diffusion_access import VAEAccess

    vae = tiny["vae"]
    image = _image(h=42, w=37, seed=1)  # not multiples of 8: padded inside, never resized
    target = _image(h=64, w=64, seed=5)
    with torch.inference_mode():
        (objs,) = ImmunizeEncoderAttack.execute(
            vae=vae, mode=mode, weight=1.0, target=target if mode == "toward_target" else None
        ).args
        # chaining: the incoming tuple is kept and the new objective appended
        (chained,) = ImmunizeEncoderAttack.execute(vae=vae, mode=mode, weight=0.5,
                                                   target=target, objective=objs).args
    assert len(chained) == 2 and chained[0] is objs[0]

    clean = _bchw(image)
    with torch.inference_mode(False):
        bound = objs[0].bind(clean)
        x = clean.clone().requires_grad_(True)
        bound(x).loss.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()

        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=2 / 255, iterations=5))
        losses = [float(r.total[0]) for r in res.history]
        access = VAEAccess(vae)
        with torch.no_grad():
            z_clean = access.encode(pad_to_multiple(clean, 8))
            z_prot = access.encode(pad_to_multiple(res.protected, 8))
    assert res.protected.shape == clean.shape == (1, 3, 42, 37)
    assert losses[-1] < losses[0]  # the objective is being minimised
    assert float(latent_mse(z_prot, z_clean)[0]) > 0
    # the VAE's own (cached) module is untouched and still an ordinary ComfyUI VAE
    assert access.module is not vae.first_stage_model


def test_toward_target_needs_target(tiny):
    from immunize.nodes.baselines import ImmunizeEncoderAttack

    with torch.inference_mode(), pytest.raises(ValueError, match="target"):
        ImmunizeEncoderAttack.execute(vae=tiny["vae"], mode="toward_target", weight=1.0)


def test_wrong_model_family_is_a_clear_error(tiny):
    import comfy.supported_models as sm
    from immunize.nodes.baselines import ImmunizeDenoisingLoss

    cfg = sm.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
        axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
    ))
    flux = _patcher(cfg.get_model({}))
    with torch.inference_mode(), pytest.raises(ValueError, match="Flux"):
        ImmunizeDenoisingLoss.execute(model=flux, vae=tiny["vae"], positive=tiny["sd15"][1],
                                      t_min=0, t_max=999, weight=1.0)


def test_bad_timestep_range(tiny):
    from immunize.nodes.baselines import ImmunizeDenoisingLoss

    patcher, cond = tiny["sd15"]
    with torch.inference_mode(), pytest.raises(ValueError, match="t_min"):
        ImmunizeDenoisingLoss.execute(model=patcher, vae=tiny["vae"], positive=cond,
                                      t_min=800, t_max=200, weight=1.0)


def test_schemas(comfy):
    from immunize.nodes import baselines

    for node in baselines.NODES:
        schema = node.define_schema()
        assert schema.category == "Immunize/objectives"
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()  # what the front end receives
        assert info["output"] == ["PROTECT_OBJECTIVE"], info["output"]
        assert "objective" in info["input"]["optional"]


def test_a_flow_patched_sd15_model_gets_a_message_that_says_so(tiny):
    """An SD1.5 MODEL patched to flow sampling (ComfyUI's ModelSamplingSD3 node) is the right
    family with the wrong schedule: the error says which patch to remove, not 'load an SD1.5'."""
    import comfy_extras.nodes_model_advanced as adv

    from immunize.nodes.diffusion_access import check_supported_model

    patcher, _ = tiny["sd15"]
    check_supported_model(patcher)  # the plain checkpoint MODEL is fine
    patched = adv.ModelSamplingSD3().patch(patcher, shift=3.0)[0]
    with pytest.raises(ValueError, match=r"SD15 MODEL has been patched to another sampling.*ModelSampling"):
        check_supported_model(patched)
