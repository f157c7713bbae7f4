"""The attacker's customisation step: DreamBooth-LoRA kernel and nodes, img2img edit node.

Kernel tests use plain torch layers. Node tests use the tiny random SD1.5-/SDXL-shaped ComfyUI
models of ``test_diffusion_nodes`` (real ``ModelPatcher``, real ``comfy.sd.VAE``), run nodes
under ``torch.inference_mode()`` as ComfyUI's executor does, and load the saved LoRA back
through ComfyUI's own ``LoraLoader``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "immunize_tests_diffusion_nodes", Path(__file__).with_name("test_diffusion_nodes.py"))
_tdn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tdn)
tiny = _tdn.tiny  # the module-scoped fixture: {"sd15": (patcher, cond), "sdxl": ..., "vae": VAE}
_image, _state, _apply = _tdn._image, _tdn._state, _tdn._apply

TRAIN_STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def loras_dir(comfy, tmp_path, monkeypatch):
    """ComfyUI's ``loras`` folder pointed at a temporary directory."""
    import folder_paths

    path = tmp_path / "loras"
    path.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(path)], set(folder_paths.supported_pt_extensions)))
    return path


def _conds(tiny, family="sd15"):
    """(instance, class) CONDITIONING of the tiny model's context size, made in inference mode."""
    _, cond = tiny[family]
    gen = torch.Generator().manual_seed(11)
    with torch.inference_mode():
        cls = [[torch.randn(cond[0][0].shape, generator=gen), dict(cond[0][1])]]
    return cond, cls


@pytest.fixture(scope="module")
def trained(tiny):
    """DreamBooth-LoRA with prior preservation on the tiny SD1.5 model (the helper the node runs)."""
    from immunize.kernels.lora import FineTuneConfig
    from immunize.nodes.customize import train_lora

    patcher, _ = tiny["sd15"]
    inst, cls = _conds(tiny)
    before = _state(patcher), _apply(patcher, inst)
    cfg = FineTuneConfig(steps=TRAIN_STEPS, lr=1e-2, batch_size=2, prior_weight=0.5, seed=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = train_lora(patcher, tiny["vae"], _image(32, 32, b=2, seed=1), inst, cfg, rank=4, alpha=4.0,
                         class_images=_image(32, 32, b=2, seed=2), class_cond=cls)
    out.seconds = time.perf_counter() - start
    out.before = before
    return out


# --------------------------------------------------------------------------- kernel


def test_lora_layers_start_at_identity_and_match_delta_weight():
    from immunize.kernels.lora import LoRAConv2d, LoRALinear, inject_lora, lora_targets

    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(12, 7), torch.nn.Conv2d(5, 6, 3, stride=2, padding=1)
    x, xc = torch.randn(3, 12), torch.randn(2, 5, 9, 8)
    ll, lc = LoRALinear(lin, rank=3, alpha=6.0), LoRAConv2d(conv, rank=2, alpha=1.0)
    assert torch.equal(ll(x), lin(x)) and torch.equal(lc(xc), conv(xc))  # B = 0 at start
    with torch.no_grad():
        ll.up.normal_()
        lc.up.normal_()
    assert ll.delta_weight().shape == lin.weight.shape and lc.delta_weight().shape == conv.weight.shape
    # the forward is the merged weight W + (α/r)·B A: what a LoRA file patches into the model
    merged = torch.nn.functional.linear(x, lin.weight + ll.delta_weight(), lin.bias)
    assert torch.allclose(ll(x), merged, atol=1e-5)
    assert (ll(x) - lin(x)).abs().max() > 0.1
    merged_c = torch.nn.functional.conv2d(xc, conv.weight + lc.delta_weight(), conv.bias, 2, 1)
    assert torch.allclose(lc(xc), merged_c, atol=1e-5)
    assert torch.allclose(ll.delta_weight(), 2.0 * ll.up @ ll.down)

    block = torch.nn.Module()
    block.attn1 = torch.nn.Module()
    block.attn1.to_q, block.attn1.proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    block.attn1.to_out = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0))
    assert lora_targets(block) == ["attn1.to_q", "attn1.to_out.0"]
    layers = inject_lora(block, lora_targets(block), rank=2, alpha=2.0)
    assert isinstance(block.attn1.to_out[0], LoRALinear) and not isinstance(block.attn1.proj, LoRALinear)
    assert set(layers) == {"attn1.to_q", "attn1.to_out.0"}


def test_dreambooth_loss_uses_the_class_prompt_for_the_prior_term():
    from immunize.kernels.lora import dreambooth_loss

    alphas = torch.linspace(0.99, 0.01, 1000)
    seen = []

    def eps_fn(x_t, t, cond):
        seen.append(cond)
        return torch.zeros_like(x_t) + (0.5 if cond == "class" else 0.0)

    z, n, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 500])
    loss, logs = dreambooth_loss(eps_fn, alphas, z, "inst", t, n)
    assert seen == ["inst"] and set(logs) == {"instance", "total"}
    assert logs["instance"] == pytest.approx(n.pow(2).mean().item(), rel=1e-5)
    nc = torch.randn(2, 4, 3, 3)
    loss, logs = dreambooth_loss(eps_fn, alphas, z, "inst", t, n, z, "class", t, nc, prior_weight=0.25)
    assert seen[1:] == ["inst", "class"]
    assert logs["prior"] == pytest.approx((0.5 - nc).pow(2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["instance"] + 0.25 * logs["prior"], rel=1e-5)


def test_fine_tune_kernel_on_a_toy_denoiser():
    """Pure torch: LoRA on a frozen toy ε-predictor learns; loss scaling is exact; overflow skips."""
    from immunize.kernels.lora import FineTuneConfig, fine_tune, inject_lora, lora_parameters

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(),
                                  torch.nn.Conv2d(16, 4, 3, padding=1)).requires_grad_(False)
        layers = inject_lora(net, ["0", "2"], rank=2, alpha=2.0, seed=0)
        return net, lora_parameters(layers)

    alphas = torch.linspace(0.999, 0.01, 1000)
    z = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    histories = []
    for scale in (1.0, 1024.0):
        net, params = make()
        cfg = FineTuneConfig(steps=60, lr=2e-2, batch_size=2, loss_scale=scale)
        histories.append([h["total"] for h in fine_tune(lambda x, t, c: net(x), alphas, params, z, None, cfg)])
    h = histories[0]
    assert sum(h[-15:]) < 0.8 * sum(h[:15]), (sum(h[:15]) / 15, sum(h[-15:]) / 15)
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)

    net, params = make()
    start = [p.detach().clone() for p in params]
    hist = fine_tune(lambda x, t, c: net(x), alphas, params, z * 1e3, None, FineTuneConfig(steps=2, loss_scale=3e38))
    assert hist[0]["total"] * 3e38 > torch.finfo(torch.float32).max
    assert all(torch.equal(a, b) for a, b in zip(start, params))  # overflow: both steps skipped


# --------------------------------------------------------------------------- LoRA fine-tune node


def test_fine_tune_loss_decreases_with_prior_logged(trained):
    hist = trained.history
    assert len(hist) == TRAIN_STEPS
    assert all(set(h) == {"instance", "prior", "total"} for h in hist)
    for h in hist:  # the total is the DreamBooth sum with λ = 0.5
        assert h["total"] == pytest.approx(h["instance"] + 0.5 * h["prior"], rel=1e-5)
    q = TRAIN_STEPS // 4
    first = sum(h["total"] for h in hist[:q]) / q
    last = sum(h["total"] for h in hist[-q:]) / q
    first_i = sum(h["instance"] for h in hist[:q]) / q
    last_i = sum(h["instance"] for h in hist[-q:]) / q
    print(f"\nLoRA fine-tune {TRAIN_STEPS} steps in {trained.seconds:.1f}s: total {first:.3f} -> "
          f"{last:.3f}, instance {first_i:.3f} -> {last_i:.3f}")
    # measured: total 1.87 -> 1.61 (-14 %), instance 1.24 -> 1.08 (-13 %)
    assert last < 0.95 * first, (first, last)
    assert last_i < 0.95 * first_i, (first_i, last_i)


def test_saved_lora_loads_through_core_lora_loader_and_reproduces(tiny, trained, loras_dir):
    import comfy.model_management
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's own nodes.py
    from immunize.nodes.customize import write_lora
    from immunize.nodes.diffusion_access import DenoiserAccess

    patcher, cond = tiny["sd15"]
    assert _state(patcher) == trained.before[0]  # training left the user's patcher alone
    assert torch.equal(_apply(patcher, cond), trained.before[1])

    sd = trained.state_dict
    assert len(sd) == 3 * 32  # attn1/attn2 × q, k, v, out × 4 transformer blocks; down, up, alpha
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in sd
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in sd
    name = write_lora(sd, "immunize/test", {"k": "v"})
    assert name in folder_paths.get_filename_list("loras")

    loaded, clip = comfy_nodes.LoraLoader().load_lora(patcher, None, name, 1.0, 0.0)
    assert clip is None and loaded is not patcher
    assert len([k for k, v in loaded.patches.items() if v]) == 32

    gen = torch.Generator().manual_seed(5)
    x_t, t = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([150, 700])
    with torch.inference_mode(False), torch.no_grad():
        eps_trained = trained.denoiser.eps(x_t, t, cond)
        eps_loaded = DenoiserAccess(loaded).eps(x_t, t, cond)
        eps_base = DenoiserAccess(patcher).eps(x_t, t, cond)
    assert torch.allclose(eps_loaded, eps_trained, rtol=1e-4, atol=1e-5)
    change = (eps_trained - eps_base).abs().mean() / eps_base.abs().mean()
    assert change > 0.2, change  # measured: 0.91 (mean |Δε̂| / mean |ε̂|)

    # ComfyUI's real weight patching (what sampling does) gives the same model output
    trained_out = _apply(SimpleNamespace(model=trained.denoiser.model), cond)
    loaded.patch_model(device_to=comfy.model_management.intermediate_device())
    try:
        core_out = _apply(loaded, cond)
    finally:
        loaded.unpatch_model()
    assert torch.allclose(core_out, trained_out, rtol=1e-4, atol=1e-5)
    assert torch.equal(_apply(patcher, cond), trained.before[1])


def test_fine_tune_node(tiny, loras_dir):
    import comfy.utils
    import nodes as comfy_nodes
    from immunize.nodes.customize import ImmunizeLoRAFineTune
    from immunize.nodes.diffusion_access import DenoiserAccess

    patcher, _ = tiny["sd15"]
    inst, cls = _conds(tiny)
    before_state, before_out = _state(patcher), _apply(patcher, inst)
    kw = dict(model=patcher, vae=tiny["vae"], images=_image(40, 24, b=3, seed=3), instance_conditioning=inst,
              rank=2, alpha=1.0, steps=3, learning_rate=1e-2, batch_size=2, t_min=0, t_max=999, seed=1,
              prior_weight=1.0, save_lora=True, lora_prefix="immunize/node")
    with torch.inference_mode():
        model, name, log = ImmunizeLoRAFineTune.execute(
            **kw, class_images=_image(32, 32, b=1, seed=4), class_conditioning=cls).args
    assert _state(patcher) == before_state
    assert torch.equal(_apply(patcher, inst), before_out)
    assert model is not patcher and model.model is patcher.model  # a clone with patches
    assert len([k for k, v in model.patches.items() if v]) == 32
    log = json.loads(log)
    assert set(log) == {"instance", "prior", "total"} and len(log["prior"]) == 3

    path = loras_dir / name
    assert path.is_file() and name.startswith("immunize/node_") and name.endswith(".safetensors")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"].shape[0] == 2
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"

    # the returned MODEL is what Load LoRA makes of the saved file
    loaded, _ = comfy_nodes.LoraLoader().load_lora(patcher, None, name, 1.0, 0.0)
    gen = torch.Generator().manual_seed(6)
    x_t, t = torch.randn(1, 4, 5, 3, generator=gen), torch.tensor([400])
    with torch.inference_mode(False), torch.no_grad():
        assert torch.allclose(DenoiserAccess(model).eps(x_t, t, inst), DenoiserAccess(loaded).eps(x_t, t, inst),
                              atol=1e-6)

    # without class images: no prior term; not saved
    with torch.inference_mode():
        _, name2, log2 = ImmunizeLoRAFineTune.execute(**{**kw, "steps": 2, "save_lora": False}).args
    assert name2 == "" and set(json.loads(log2)) == {"instance", "total"}


def test_fine_tune_sdxl_key_format(tiny, loras_dir):
    """SDXL LoRAs use the original (sgm) layer names, as kohya writes them; core loads them."""
    import nodes as comfy_nodes
    from immunize.kernels.lora import FineTuneConfig
    from immunize.nodes.customize import train_lora, write_lora

    patcher, cond = tiny["sdxl"]
    with torch.inference_mode():
        out = train_lora(patcher, tiny["vae"], _image(32, 32, seed=5), cond,
                         FineTuneConfig(steps=2, lr=1e-2), rank=2, alpha=2.0)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_v.lora_up.weight" in out.state_dict
    loaded, _ = comfy_nodes.LoraLoader().load_lora(patcher, None, write_lora(out.state_dict, "x", {}), 1.0, 0.0)
    assert len([k for k, v in loaded.patches.items() if v]) == 32


def test_fine_tune_bad_inputs(tiny, loras_dir):
    from immunize.nodes.customize import ImmunizeLoRAFineTune

    patcher, cond = tiny["sd15"]
    kw = dict(model=patcher, vae=tiny["vae"], images=_image(32, 32), instance_conditioning=cond, rank=2,
              alpha=2.0, steps=1, learning_rate=1e-3, batch_size=1, t_min=0, t_max=999, seed=0,
              prior_weight=1.0, save_lora=True, lora_prefix="x")
    with torch.inference_mode():
        with pytest.raises(ValueError, match="class_conditioning"):
            ImmunizeLoRAFineTune.execute(**kw, class_images=_image(32, 32))
        with pytest.raises(ValueError, match="lora_prefix"):
            ImmunizeLoRAFineTune.execute(**{**kw, "lora_prefix": "  "})
        with pytest.raises(ValueError, match="t_min"):
            ImmunizeLoRAFineTune.execute(**{**kw, "t_min": 600, "t_max": 100})
        with pytest.raises(ValueError, match="alpha channel"):
            ImmunizeLoRAFineTune.execute(**{**kw, "images": torch.rand(1, 32, 32, 4)})


# --------------------------------------------------------------------------- edit node


def test_edit_node(tiny):
    from immunize.nodes.customize import ImmunizeEditImage

    patcher, pos = tiny["sd15"]
    _, neg = _conds(tiny)
    vae = tiny["vae"]
    image = _image(42, 37, b=2, seed=7)  # not multiples of 8: padded inside, never resized
    kw = dict(model=patcher, vae=vae, image=image, positive=pos, negative=neg, steps=3, cfg=4.0, seed=3,
              sampler_name="euler", scheduler="normal")
    with torch.inference_mode():
        padded = torch.nn.functional.pad(image.movedim(-1, 1), (0, 3, 0, 6), mode="reflect").movedim(1, -1)
        round_trip = vae.decode(vae.encode(padded))[:, :42, :37]
        (same,) = ImmunizeEditImage.execute(**kw, strength=0.0).args
        (edited,) = ImmunizeEditImage.execute(**kw, strength=0.7).args
        (masked,) = ImmunizeEditImage.execute(**kw, strength=0.7, mask=torch.zeros(42, 37)).args
    assert same.shape == edited.shape == image.shape
    assert (same - round_trip).abs().max() < 1e-4  # measured: 0
    assert (masked - round_trip).abs().max() < 1e-4  # nothing selected: nothing edited
    assert (edited - round_trip).abs().mean() > 0.1, (edited - round_trip).abs().mean()  # measured: 0.30
    with pytest.raises(ValueError, match="strength"):
        with torch.inference_mode():
            ImmunizeEditImage.execute(**kw, strength=1.5)


def test_schemas(comfy):
    from immunize.nodes import customize

    for node in customize.NODES:
        schema = node.define_schema()
        assert schema.category == "Immunize/attacker"
        assert all(getattr(i, "tooltip", None) for i in schema.inputs), node.__name__
        node.VALIDATE_CLASS()
        info = node.GET_NODE_INFO_V1()
        assert info["output"][0] in ("MODEL", "IMAGE")
