"""Input diversity: random geometry of the recogniser's view at every attack step.

A perturbation optimised against one network *and one crop* overfits both: the attacker (or
an unseen recogniser) aligns the face differently — another landmark template, a plain box
crop, another scale, a re-detected face a few pixels off, a downscaled upload — and the
perturbation's effect is gone. Expectation over transformations (Athalye et al., ICML 2018)
and input diversity (DI-FGSM, Xie et al., CVPR 2019) optimise the expected loss over random
transformations T instead:

    min_δ  E_{T ~ 𝒯} [ L( f( T(A(x + δ)) ) ) ]     (one draw of T per step and recogniser)

Here T acts on the aligned chip as a random similarity of the landmark template about the
chip centre (scale s, rotation θ, shift t: the face fills more or less of the crop, tilted,
off-centre) followed by a down-up resize by r (a smaller upload, or the recogniser's own
resizing). Because the template moves, the gradient still goes to the photo's own pixels
through one differentiable warp.

Units: shift as a fraction of the chip side, rotation in degrees, scale and resize as factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Diversity:
    """Ranges of the random view, at strength 1. ``strength`` scales every range (0 = off).

    scale: the face's size in the crop, s ~ U(scale) (crop scale 1/s: 0.7–1.4 at strength 1);
    shift: the face's centre moves by U(−shift, shift)·chip side in x and y;
    rotate_deg: rotation U(−r, r) degrees;
    resize: the chip is downscaled by U(resize) and scaled back up (bilinear, antialiased).
    """

    strength: float = 1.0
    scale: tuple[float, float] = (0.72, 1.4)
    shift: float = 0.08
    rotate_deg: float = 8.0
    resize: tuple[float, float] = (0.5, 1.0)

    @property
    def active(self) -> bool:
        return self.strength > 0

    def _range(self, lo: float, hi: float, centre: float) -> tuple[float, float]:
        """``[lo, hi]`` shrunk towards ``centre`` by the strength (in log space for factors)."""
        k = min(self.strength, 1.0)
        return (centre * (lo / centre) ** k, centre * (hi / centre) ** k)

    def templates(self, template: Tensor, size: int, n: int, gen: torch.Generator) -> Tensor:
        """``n`` random templates ``[n,5,2]`` (chip pixels) from ``template [5,2]``."""
        t = template.detach().float().cpu().reshape(1, 5, 2)
        if not self.active:
            return t.expand(n, 5, 2).clone()
        lo, hi = self._range(*self.scale, 1.0)
        u = torch.rand(n, 4, generator=gen)
        s = torch.exp(math.log(lo) + u[:, 0] * (math.log(hi) - math.log(lo)))
        theta = (u[:, 1] * 2 - 1) * math.radians(self.rotate_deg) * min(self.strength, 1.0)
        shift = (u[:, 2:] * 2 - 1) * self.shift * min(self.strength, 1.0) * size
        c = torch.full((1, 1, 2), (size - 1) / 2.0)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n,2,2]
        out = (s.view(n, 1, 1) * ((t - c) @ rot.transpose(1, 2))) + c + shift.view(n, 1, 2)
        return out

    def resize_chips(self, chips: Tensor, gen: torch.Generator) -> Tensor:
        """Down-up resize of ``chips [N,C,S,S]`` by one random factor r (differentiable)."""
        if not self.active or chips.shape[0] == 0:
            return chips
        lo, hi = self._range(*self.resize, 1.0)
        r = lo + float(torch.rand((), generator=gen)) * (hi - lo)
        size = chips.shape[-1]
        small = max(8, int(round(size * r)))
        if small >= size:
            return chips
        down = F.interpolate(chips, size=(small, small), mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(down, size=(size, size), mode="bilinear", align_corners=False)
