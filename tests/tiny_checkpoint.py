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
