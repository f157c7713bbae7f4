"""IP-Adapter kernels, the loader and the Identity Bridge objective through real ComfyUI classes.

Tiny random SD1.5- and SDXL-shaped UNets (ComfyUI's own ``supported_models`` and ``model_base``
in a real ``ModelPatcher``), ComfyUI's own ``ClipVisionModel`` with a tiny config, a real
``comfy.sd.VAE``, and tiny random IP-Adapter checkpoints written as ``.safetensors`` in the
checkpoint's own key layout. Models and nodes run under ``torch.inference_mode()`` as in ComfyUI;
PGD runs with ``torch.inference_mode(False)`` as the PGD node does.
"""

from __future__ import annotations

import pytest
import torch

from immunize.tests.test_diffusion_nodes import (  # noqa: F401  (tiny is a pytest fixture)
    _apply, _bchw, _image, _init_, _patcher, _state, _unet_config, tiny,
)

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """SD1.5-shaped model (text width 64, 4 attn2 layers), SDXL-shaped model (width 96, 7 layers),
    a tiny ComfyUI CLIP vision (hidden 32, projection 24), the VAE, and an ipadapter folder."""
    import comfy.supported_models as sm
    import folder_paths
    from immunize.tests.test_nodes import _tiny_comfy_clip_vision

    with torch.inference_mode():
        cfg = sm.SDXL(_unet_config(96, 32 + 6 * 256, True))
        cfg.unet_config.update(num_heads=-1, num_head_channels=16, transformer_depth=[0, 2],
                               transformer_depth_output=[0, 0, 2, 2])
        base = cfg.get_model({})
        _init_(base, seed=11)
        sdxl = (_patcher(base), [[torch.randn(1, 5, 96), {"pooled_output": torch.randn(1, 32)}]])
    folder = tmp_path_factory.mktemp("models") / "ipadapter"
    folder.mkdir()
    folder_paths.folder_names_and_paths["ipadapter"] = ([str(folder)], {".safetensors", ".bin"})
    return {"sd15": tiny["sd15"], "sdxl": sdxl, "vae": tiny["vae"], "folder": folder,
            "clip_vision": _tiny_comfy_clip_vision(tmp_path_factory.mktemp("cv"))}


def _ip_config(layers, kind):
    from immunize.kernels.ipadapter import IPAdapterConfig

    common = dict(cross_dim=layers[0]["context"], layer_ids=[2 * i + 1 for i in range(len(layers))],
                  inner_dims=[l["inner"] for l in layers])
    if kind == "plain":  # reads the projected CLIP embedding (24 wide in the tiny CLIP)
        return IPAdapterConfig(kind="plain", clip_dim=24, num_tokens=4, **common)
    if kind == "full-face":  # an MLP on every penultimate token (17 in the tiny CLIP)
        return IPAdapterConfig(kind="full-face", clip_dim=32, num_tokens=0, **common)
    # plus: a 2-layer Resampler over the penultimate hidden states (32 wide), 4 queries
    return IPAdapterConfig(kind="plus", clip_dim=32, num_tokens=4, dim=64, depth=2, heads=1, dim_head=64, **common)


def _write_ipadapter(world, family, kind, name=None, seed=0):
    """A random IP-Adapter for ``world[family]`` saved as safetensors; returns the file name."""
    from safetensors.torch import save_file

    from immunize.kernels.ipadapter import IPAdapter
    from immunize.nodes.ipadapter import unet_attn2_layers

    model = IPAdapter(_ip_config(unet_attn2_layers(world[family][0]), kind))
    _init_(model, seed=seed)
    name = name or f"ip-adapter-{kind}_{family}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(world["folder"] / name))
    return name


def _load(name):
    from immunize.nodes.ipadapter import ImmunizeLoadIPAdapter

    with torch.inference_mode():
        (ip,) = ImmunizeLoadIPAdapter.execute(ipadapter_name=name).args
    return ip


def _objective(world, family, ip, mode, scale=1.0):
    from immunize.nodes.ipadapter import ImmunizeIdentityBridge

    patcher, cond = world[family]
    with torch.inference_mode():
        (objs,) = ImmunizeIdentityBridge.execute(
            model=patcher, vae=world["vae"], clip_vision=world["clip_vision"], ipadapter=ip, positive=cond,
            t_min=200, t_max=600, mode=mode, ip_scale=scale, weight=1.0).args
    return objs


def _rms(t):
    return float(t.float().pow(2).mean().sqrt())


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("family,kind", [("sd15", "plain"), ("sd15", "plus"), ("sd15", "full-face"),
                                         ("sdxl", "plain"), ("sdxl", "plus")])
def test_loader_detects_kind_and_shapes(world, family, kind):
    from immunize.kernels.ipadapter import IPAdapter
    from immunize.nodes.ipadapter import unet_attn2_layers

    layers = unet_attn2_layers(world[family][0])
    assert len(layers) == (4 if family == "sd15" else 7)
    name = _write_ipadapter(world, family, kind)
    ip = _load(name)
    assert isinstance(ip, IPAdapter) and ip.config.kind == kind
    assert ip.config.cross_dim == (64 if family == "sd15" else 96)
    assert ip.config.layer_ids == [2 * i + 1 for i in range(len(layers))]
    assert ip.config.clip_dim == (24 if kind == "plain" else 32)
    feats = torch.randn(2, 24) if kind == "plain" else torch.randn(2, 17, 32)
    assert ip.tokens(feats).shape == (2, 17 if kind == "full-face" else 4, ip.config.cross_dim)
    assert ip.config.features == ("image_embeds" if kind == "plain" else "penultimate")
    src = IPAdapter(_ip_config(layers, kind))
    _init_(src, seed=0)  # the file holds exactly these weights
    assert all(torch.equal(a, b) for a, b in zip(ip.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match="width"):  # wrong CLIP features: a clear error, not a matmul crash
        ip.tokens(torch.randn(2, 17, 24) if kind == "plain" else torch.randn(2, 17, 48))


def test_loader_reads_official_bin_layout_and_face_names(world, tmp_path):
    from immunize.kernels.ipadapter import load_ipadapter

    name = _write_ipadapter(world, "sd15", "plus", name="ip-adapter-plus-face_sd15.safetensors", seed=3)
    face = load_ipadapter(world["folder"] / name)
    assert face.config.kind == "plus-face" and face.config.features == "penultimate"
    sd = face.state_dict()
    nested = {"image_proj": {k[11:]: v for k, v in sd.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in sd.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "ip-adapter-plus_sd15.bin")
    plus = load_ipadapter(tmp_path / "ip-adapter-plus_sd15.bin")
    assert plus.config.kind == "plus"
    assert all(torch.equal(a, b) for a, b in zip(plus.state_dict().values(), sd.values()))


@pytest.mark.parametrize("cross,layers,family", [(768, 16, "SD1.5"), (2048, 70, "SDXL")])
def test_family_detected_from_real_shapes(cross, layers, family):
    """Real IP-Adapter widths (tiny inner dims keep the tensors small)."""
    from immunize.kernels.ipadapter import detect_config

    sd = {"image_proj.proj.weight": torch.zeros(4 * cross, 16), "image_proj.proj.bias": torch.zeros(4 * cross),
          "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for i in range(layers):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = torch.zeros(2, cross)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = torch.zeros(2, cross)
    cfg = detect_config(sd, "x.safetensors")
    assert cfg.family == family and cfg.kind == "plain" and len(cfg.layer_ids) == layers
    assert f"for {family}" in cfg.describe()


def test_loader_errors(world, tmp_path):
    from safetensors.torch import save_file

    from immunize.kernels.ipadapter import build_ipadapter, load_ipadapter

    with pytest.raises(ValueError, match="not found in models/ipadapter"):
        _load("missing.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_ipadapter(tmp_path / "nope.safetensors")
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not an IP-Adapter"):
        load_ipadapter(tmp_path / "lora.safetensors")
    good = {"image_proj.proj.weight": torch.zeros(8, 3), "image_proj.proj.bias": torch.zeros(8),
            "image_proj.norm.weight": torch.ones(4), "image_proj.norm.bias": torch.zeros(4),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(6, 4), "ip_adapter.1.to_v_ip.weight": torch.zeros(6, 4)}
    assert build_ipadapter(good).config.num_tokens == 2
    with pytest.raises(ValueError, match="FaceID"):
        build_ipadapter({**good, "ip_adapter.1.to_q_lora.down.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="lacks"):
        build_ipadapter({k: v for k, v in good.items() if "to_v_ip" not in k})
    with pytest.raises(ValueError, match="unknown image projection"):
        build_ipadapter({k.replace("image_proj.", "image_proj.mystery_"): v for k, v in good.items()})
    with pytest.raises(ValueError, match="width"):
        build_ipadapter({**good, "image_proj.norm.weight": torch.ones(5)})


def test_model_mismatch_is_a_clear_error(world):
    from immunize.kernels.ipadapter import build_ipadapter

    sd15_ip = _load(_write_ipadapter(world, "sd15", "plain"))
    sdxl_ip = _load(_write_ipadapter(world, "sdxl", "plus"))
    with pytest.raises(ValueError, match=r"MODEL is SDXL .*cross_attention_dim 96, 7 cross-attention layers"):
        _objective(world, "sdxl", sd15_ip, "paper")
    with pytest.raises(ValueError, match=r"MODEL is SD15 .*cross_attention_dim 64, 4 cross-attention layers"):
        _objective(world, "sd15", sdxl_ip, "paper")
    # a real-width SD1.5 adapter on the SDXL-shaped model names both families
    sd = {"image_proj.proj.weight": torch.zeros(4 * 768, 24), "image_proj.proj.bias": torch.zeros(4 * 768),
          "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768)}
    for i in range(16):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = torch.zeros(64, 768)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = torch.zeros(64, 768)
    with pytest.raises(ValueError, match=r"for SD1\.5 .*MODEL is SDXL"):
        _objective(world, "sdxl", build_ipadapter(sd, "ip-adapter_sd15.safetensors"), "vae")
    # a CLIP vision of the wrong width is refused before any work
    with pytest.raises(ValueError, match="clip_vision"):
        from immunize.nodes.ipadapter import ComfyIdentityBridgeObjective

        wide = build_ipadapter({**{k: v for k, v in sdxl_ip.state_dict().items()},
                                "image_proj.proj_in.weight": torch.zeros(64, 48)}, "wide.safetensors")
        ComfyIdentityBridgeObjective(world["sdxl"][0], world["vae"], world["clip_vision"], wide, world["sdxl"][1],
                                     0, 999)


# --------------------------------------------------------------------------- the IP branch


def test_ip_attention_matches_definition():
    from immunize.kernels.ipadapter import ip_attention

    g = torch.Generator().manual_seed(0)
    q, kt, vt = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    ki, vi = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)

    def ref(q, k, v, h):  # softmax(QKᵀ/√d)V per head
        b, l, c = q.shape
        split = lambda t: t.view(t.shape[0], t.shape[1], h, c // h).transpose(1, 2)
        w = (split(q) @ split(k).transpose(-1, -2) / (c // h) ** 0.5).softmax(-1)
        return (w @ split(v)).transpose(1, 2).reshape(b, l, c)

    out = ip_attention(q, kt, vt, ki, vi, heads=2, scale=0.7)
    want = ref(q, kt, vt, 2) + 0.7 * ref(q, ki.expand(2, -1, -1), vi.expand(2, -1, -1), 2)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("family,kind", [("sd15", "plain"), ("sdxl", "plus")])
def test_ip_branch_changes_eps(world, family, kind):
    (obj,) = _objective(world, family, _load(_write_ipadapter(world, family, kind)), "paper")
    clean, other = _bchw(_image()), _bchw(_image(seed=4))
    with torch.inference_mode(False):
        kernel = obj.build()
        den = kernel.denoiser
        x_t = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([400])
        with torch.no_grad():
            y, y_other = kernel.image_tokens(clean), kernel.image_tokens(other)
            e_ip = den.eps(x_t, t, y)
            e_other = den.eps(x_t, t, y_other)
            den.scale = 0.0
            e_zero = den.eps(x_t, t, y)
            e_plain = den.access.eps(x_t, t, world[family][1])  # no patches at all
    assert y.shape == (1, 4, 64 if family == "sd15" else 96)
    # λ = 0 through our patch reproduces ComfyUI's own attention
    assert torch.allclose(e_zero, e_plain, atol=1e-4), _rms(e_zero - e_plain)
    # the image branch moves ε̂, and a different image moves it differently
    # (measured: ≈0.26 and ≈0.33 of ‖ε̂‖ for λ = 1; image swap ≈0.05–0.1)
    assert _rms(e_ip - e_zero) > 0.05 * _rms(e_zero), (_rms(e_ip - e_zero), _rms(e_zero))
    assert _rms(e_ip - e_other) > 0.005 * _rms(e_zero), (_rms(e_ip - e_other), _rms(e_zero))


# --------------------------------------------------------------------------- bridge kernel


class _LinearToyDenoiser:
    """ε̂ = x_t + mean(tokens)·P: the condition shifts ε̂ by a known pattern, so S* is known."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)

    def eps(self, x_t, t, tokens):
        return x_t + tokens.mean(dim=(1, 2)).view(-1, 1, 1, 1) * self.pattern


def _toy_bridge(mode, **kw):
    import torch.nn.functional as F

    from immunize.kernels.bridge import IdentityBridge

    pattern = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(0))
    return IdentityBridge(
        encoder=lambda x: F.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4] * 3.0,  # 3 ch → 4 latent ch
        image_tokens=lambda x: x.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, 2, 5),  # brightness
        denoiser=_LinearToyDenoiser(pattern), mode=mode, t_min=500, t_max=500, **kw), pattern


def test_paper_mode_follows_the_score_shift_with_the_documented_sign():
    from immunize.kernels.bridge import latent_direction_to_pixels

    kernel, pattern = _toy_bridge("paper")
    clean = torch.rand(1, 3, 20, 16, generator=torch.Generator().manual_seed(1)) * 0.9
    x = (clean + 0.01).requires_grad_(True)  # brightness +0.01 → tokens +0.01
    out = kernel.bind(clean)(x)
    out.loss.sum().backward()
    a = kernel.denoiser.alphas_cumprod[500]
    s_star = -(0.01 * pattern) / (1 - a).sqrt()  # eq. (1): −(ε_adv − ε_clean)/√(1−ᾱ_t)
    d = latent_direction_to_pixels(s_star, (20, 16))  # 24x16 latent cover, cropped to 20x16
    assert d.shape == (1, 3, 20, 16) and abs(float(d.norm()) - 1) < 1e-5
    # PGD minimises: ∇L = −d, so the step goes along +d = +S* in pixels
    assert torch.allclose(x.grad, -d, atol=1e-5)
    assert abs(float(out.logs["score_shift"][0]) - _rms(s_star)) < 1e-3 * _rms(s_star)
    assert abs(float(out.logs["eps_shift"][0]) - _rms(0.01 * pattern)) < 1e-3 * _rms(0.01 * pattern)
    # channel mixing by the latent→RGB matrix: a direction only in latent channel 2 gives M[2]
    m = torch.randn(4, 3)
    one = torch.zeros(1, 4, 2, 2)
    one[:, 2] = 1.0
    rgb = latent_direction_to_pixels(one, (16, 16), latent_rgb=m)
    assert torch.allclose(rgb[0, :, 5, 5] / rgb[0, :, 5, 5].norm(), m[2] / m[2].norm(), atol=1e-5)


def test_vae_mode_loss_and_exact_form():
    kernel, pattern = _toy_bridge("vae")
    clean = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(2)) * 0.9
    x = (clean + 0.02).requires_grad_(True)
    out = kernel.bind(clean)(x)
    assert torch.allclose(out.loss, -(0.02 * pattern).pow(2).mean().view(1), rtol=1e-3)
    grads = {}
    for clean_grad, detach_latent in ((False, False), (True, False), (True, True)):
        kernel.clean_grad = clean_grad
        enc = kernel.encoder
        if detach_latent:
            kernel.encoder = lambda z, enc=enc: enc(z).detach()
        x2 = x.detach().clone().requires_grad_(True)
        kernel.bind(clean)(x2).loss.sum().backward()
        kernel.encoder = enc
        grads[(clean_grad, detach_latent)] = x2.grad
    # here ε_adv − ε_clean does not depend on x_t: the exact form has no x_t gradient, the
    # stop-gradient form has one
    assert torch.allclose(grads[(True, False)], grads[(True, True)], atol=1e-7)
    assert (grads[(False, False)] - grads[(True, True)]).abs().max() > 1e-4


# --------------------------------------------------------------------------- objective


@pytest.mark.parametrize("family,kind,mode", [("sd15", "plain", "paper"), ("sd15", "plain", "vae"),
                                              ("sdxl", "plus", "paper"), ("sdxl", "plus", "vae")])
def test_gradients_reach_pixels(world, family, kind, mode):
    ip = _load(_write_ipadapter(world, family, kind))
    patcher = world[family][0]
    before_state, before_out = _state(patcher), _apply(patcher, world[family][1])
    cv_before = {k: v.clone() for k, v in world["clip_vision"].get_sd().items()}
    ip_before = {k: v.clone() for k, v in ip.state_dict().items()}
    objs = _objective(world, family, ip, mode)
    assert isinstance(objs, tuple) and len(objs) == 1
    clean = _bchw(_image())
    with torch.inference_mode(False):
        x = (clean + 0.01 * torch.randn_like(clean)).clamp(0, 1).requires_grad_(True)
        out = objs[0].bind(clean)(x)
        out.loss.sum().backward()
        assert out.loss.shape == (1,) and {"eps_shift", "score_shift", "t"} <= set(out.logs)
        assert float(out.logs["eps_shift"][0]) > 0
        g = x.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        if mode == "paper":  # the gradient is the unit pixel direction −d
            assert abs(float(g.norm()) - 1.0) < 1e-4
        else:  # both paths carry gradient: the IP image path alone and the VAE path alone
            kernel = objs[0].build()
            enc, tok = kernel.encoder, kernel.image_tokens
            for which in ("ip_only", "vae_only"):
                kernel.encoder = (lambda z: enc(z).detach()) if which == "ip_only" else enc
                kernel.image_tokens = (lambda z: tok(z).detach()) if which == "vae_only" else tok
                x2 = x.detach().clone().requires_grad_(True)
                kernel.bind(clean)(x2).loss.sum().backward()
                assert x2.grad is not None and x2.grad.abs().sum() > 0, which
    assert _state(patcher) == before_state
    assert torch.equal(_apply(patcher, world[family][1]), before_out)
    assert all(torch.equal(v, cv_before[k]) for k, v in world["clip_vision"].get_sd().items())
    assert all(torch.equal(v, ip_before[k]) for k, v in ip.state_dict().items())


@pytest.mark.parametrize("family,kind,mode", [("sd15", "plain", "vae"), ("sdxl", "plus", "paper")])
def test_pgd_widens_the_bridge(world, family, kind, mode):
    from immunize.kernels.bridge import mean_shift
    from immunize.kernels.pgd import PGDConfig, protect

    (obj,) = _objective(world, family, _load(_write_ipadapter(world, family, kind)), mode)
    clean = _bchw(_image())
    with torch.inference_mode(False):
        res = protect(clean, [obj], PGDConfig(eps=EPS, step=2 / 255, iterations=8))
        kernel = obj.build()
        y_clean = kernel.bind(clean).clean_tokens
        gen = torch.Generator().manual_seed(9)
        noise = ((torch.randint(0, 2, clean.shape, generator=gen) * 2 - 1) * EPS + clean).clamp(0, 1)
        start = mean_shift(kernel, clean, y_clean)
        prot = mean_shift(kernel, res.protected, y_clean)
        rand = mean_shift(kernel, noise, y_clean)
    first = float(res.history[0].logs["bridge/eps_shift"][0])
    last = float(res.final_logs["bridge/eps_shift"][0])
    print(f"{family}/{kind}/{mode}: PGD log {first:.4g} → {last:.4g}; fixed draws clean {float(start[0]):.4g}, "
          f"random ±8/255 {float(rand[0]):.4g}, protected {float(prot[0]):.4g}")
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    assert float(start[0]) < 1e-6  # the clean image gives the clean tokens: no bridge at all
    # the bridge PGD measures at its start (seeded jitter) grows by an order of magnitude
    # (measured: ×90 vae / SD1.5-plain, ×16 paper / SDXL-plus)
    assert last > 5 * first, (first, last)
    if mode == "vae":
        # and beats a random ±8/255 perturbation on fixed draws (measured ×18). The paper mode
        # steps along S*, which on random weights has no structure to exploit: there it stays
        # below random noise (0.0033 vs 0.0060); its value needs real weights and the identity loss.
        assert float(prot[0]) > 3 * float(rand[0]), (float(prot[0]), float(rand[0]))


def test_schemas(comfy):
    from immunize.nodes import ipadapter

    for node in ipadapter.NODES:
        schema = node.define_schema()
        assert schema.category.startswith("Immunize")
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
    info = ipadapter.ImmunizeIdentityBridge.GET_NODE_INFO_V1()
    assert info["output"] == ["PROTECT_OBJECTIVE"]
    assert "objective" in info["input"]["optional"]
    assert info["input"]["required"]["ipadapter"][0] == "IMMUNIZE_IPADAPTER"
    assert info["input"]["required"]["mode"][1]["options"] == ["paper", "vae"]
    assert ipadapter.ImmunizeLoadIPAdapter.GET_NODE_INFO_V1()["output"] == ["IMMUNIZE_IPADAPTER"]
