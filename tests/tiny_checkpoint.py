"""A small SD1.5-family checkpoint with random weights that ComfyUI's own loader detects.

ComfyUI 0.3.75 recognises SD1.5 from ``context_dim`` 768 and ``model_channels`` 320; channel
multipliers, residual blocks and transformer depth are read from the weights. So the UNet here
has one level with one res block and one transformer block (~30 M parameters). The text encoder
is the real CLIP-L architecture (its config is fixed) with random weights, and the VAE is a
TAESD (ComfyUI detects it from the ``taesd_*`` keys), so the file stays ~300 MB in fp16 and
everything runs on a CPU in seconds. For end-to-end tests only: its outputs are noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _randomise(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if not p.is_floating_point():
            out[name] = p.clone()
        elif p.dim() > 1:
            out[name] = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
        elif name.endswith("weight") and ("norm" in name or "ln" in name):
            out[name] = torch.ones(p.shape)
        else:
            out[name] = torch.randn(p.shape, generator=gen) * 0.02
    return out


def make_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint (safetensors, fp16) to ``path``; needs ComfyUI importable."""
    import comfy.sd1_clip
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    unet = dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1, use_spatial_transformer=True, context_dim=768,
        use_linear_in_transformer=False, adm_in_channels=None, num_classes=None,
        use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
        num_heads=8, num_head_channels=-1,
    )
    sd = {}
    with torch.inference_mode(False):
        base = sm.SD15(unet).get_model({})
        sd.update({f"model.{k}": v for k, v in _randomise(base, seed).items() if k.startswith("diffusion_model.")})
        del base
        clip = comfy.sd1_clip.SD1ClipModel()
        for k, v in _randomise(clip, seed + 1).items():
            if k.startswith("clip_l.transformer."):
                sd["cond_stage_model." + k[len("clip_l."):]] = v
        del clip
        taesd = comfy.taesd.taesd.TAESD()
        for k, v in _randomise(taesd, seed + 2).items():
            sd["first_stage_model." + k] = v
        sd["first_stage_model.vae_scale"] = torch.tensor(1.0)
        sd["first_stage_model.vae_shift"] = torch.tensor(0.0)
    sd = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def make_random_clip_vision_vitl(path: Path, seed: int = 0) -> Path:
    """ComfyUI's CLIP-ViT-L/14 vision config with random weights (fp16 safetensors, ~600 MB).

    ComfyUI's CLIP Vision loader picks its architecture from the number of layers, and its
    smallest known one is ViT-L (24 layers), so an end-to-end test cannot use a smaller file.
    """
    import os

    import comfy.clip_vision
    from safetensors.torch import save_file

    config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    with torch.inference_mode(False):
        model = comfy.clip_vision.ClipVisionModel(config)
        sd = {k: v.half().contiguous() for k, v in _randomise(model.model, seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def make_tiny_ipadapter(path: Path, checkpoint: Path, kind: str = "plus", clip_hidden: int = 1024,
                        clip_embed: int = 768, seed: int = 0) -> Path:
    """A random IP-Adapter (``plus``: Resampler over CLIP penultimate states; ``plain``: linear on
    the image embedding) whose ``ip_adapter.<n>`` layers fit the checkpoint's UNet."""
    import comfy.sd
    from safetensors.torch import save_file

    from immunize.kernels.ipadapter import IPAdapter, IPAdapterConfig
    from immunize.nodes.ipadapter import unet_attn2_layers

    with torch.inference_mode():
        model, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    layers = unet_attn2_layers(model)
    common = dict(cross_dim=layers[0]["context"], layer_ids=[2 * i + 1 for i in range(len(layers))],
                  inner_dims=[layer["inner"] for layer in layers])
    if kind == "plain":
        cfg = IPAdapterConfig(kind="plain", clip_dim=clip_embed, num_tokens=4, **common)
    else:
        cfg = IPAdapterConfig(kind="plus", clip_dim=clip_hidden, num_tokens=4, dim=64, depth=1, heads=1,
                              dim_head=64, **common)
    with torch.inference_mode(False):
        sd = _randomise(IPAdapter(cfg), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
