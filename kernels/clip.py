"""Differentiable CLIP-style image encoders.

ComfyUI's ``clip_preprocess`` rounds pixels to 8 bits, which makes the gradient with respect
to the image exactly zero. This module repeats the same preprocessing without rounding:

    resize the shorter side to ``size`` (bicubic, antialiased) → centre crop ``size²`` →
    (x − mean) / std

and wraps any vision backbone (open_clip's ``model.visual`` or ComfyUI's
``CLIPVisionModelProjection``) as an :class:`ImageEncoder`: images ``[B,3,H,W]`` in [0, 1] →
embeddings ``[B,D]``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: Tensor, size: int = 224, mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD, crop: bool = True,
) -> Tensor:
    """``[B,3,H,W]`` in [0, 1] → normalised ``[B,3,size,size]``, differentiable (no rounding)."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        if crop:
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
        else:
            new = (size, size)
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


class ImageEncoder(nn.Module):
    """A differentiable image embedder with its own preprocessing.

    backbone: the torch module (use :func:`kernels.modules.grad_ready` on shared weights);
    embed(backbone, pixels) → ``[B,D]`` maps preprocessed pixels to the embedding.
    ``centred`` is True: CLIP image embeddings are compared by cosine similarity.
    """

    centred = True

    def __init__(self, name: str, backbone: nn.Module, embed: Callable[[nn.Module, Tensor], Tensor],
                 size: int = 224, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self._embed = embed
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    def forward(self, images: Tensor) -> Tensor:
        dtype = next(self.backbone.parameters()).dtype
        pixels = clip_preprocess(images.float(), self.size, self.mean, self.std).to(dtype)
        return self._embed(self.backbone, pixels).float()
