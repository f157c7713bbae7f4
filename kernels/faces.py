"""Face detection (once, on the clean image) and differentiable alignment to face chips.

Identity objectives detect faces once on the clean batch, then at every PGD step warp the
*perturbed* image onto each recogniser's landmark template, so the gradient of the identity
loss flows back to the image pixels through the warp:

    detect_faces(clean)                        -> [FaceSet] (landmarks in image pixels)
    align_faces(x_adv, faces, template, size)  -> chips [N,3,size,size], owner [N]

Coordinates are in pixels with pixel i's centre at i (x to the right, y down), both in the
image and in the chip. Landmarks are MTCNN's five points, in MTCNN's order: left eye, right
eye, nose tip, left mouth corner, right mouth corner ("left" = smaller x in a frontal photo).

Alignment is the least-squares similarity (rotation, uniform scale, translation) taking the
face's landmarks onto the template (Umeyama 1991), applied with ``F.affine_grid`` +
``F.grid_sample`` (bilinear). Bilinear sampling alone, when it shrinks a face by k ≥ 2, reads
only ~4/k² of the face's pixels, so the gradient would be sparse; we first average-pool the
image by floor(k) (anti-aliasing, as dlib's own chip extractor does with its pyramid) so that
every face pixel contributes to the chip and receives gradient.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class FaceSet:
    """The faces found in one image, largest first. All CPU float32 tensors.

    landmarks: ``[F,5,2]`` (x, y) image pixels, MTCNN order;
    boxes: ``[F,4]`` (x1, y1, x2, y2) image pixels; probs: ``[F]`` detection probabilities.
    """

    landmarks: Tensor
    boxes: Tensor
    probs: Tensor

    def __len__(self) -> int:
        return int(self.landmarks.shape[0])

    @staticmethod
    def empty() -> "FaceSet":
        return FaceSet(torch.zeros(0, 5, 2), torch.zeros(0, 4), torch.zeros(0))


_MTCNN = None
MAX_DETECT_SIDE = 2048  # detect_faces looks at a downscaled copy of larger images
_MTCNN_LOCK = threading.Lock()


def _mtcnn():
    """facenet-pytorch's MTCNN (weights ship inside its wheel), built once, CPU, frozen.

    Built outside inference mode so its parameters are ordinary tensors whichever mode the
    first caller is in. facenet-pytorch reads its bundled weights with ``torch.load``, whose
    default is ``weights_only=True`` in the torch versions this pack supports.
    """
    global _MTCNN
    with _MTCNN_LOCK:
        if _MTCNN is None:
            from facenet_pytorch import MTCNN

            with torch.inference_mode(False):
                m = MTCNN(keep_all=True, select_largest=True, device=torch.device("cpu")).eval()
                for p in m.parameters():
                    p.requires_grad_(False)
            _MTCNN = m
        return _MTCNN


def detect_faces(images: Tensor, min_prob: float = 0.9) -> list[FaceSet]:
    """Detect faces and their five landmarks with MTCNN.

    images: ``[B,3,H,W]`` RGB float in [0,1] (any device; detection runs on CPU, no grad).
    min_prob: keep faces whose MTCNN probability is ≥ this.
    Returns one :class:`FaceSet` per image (possibly empty), faces sorted largest first.
    Works inside ``torch.inference_mode()`` and ``torch.no_grad()``.

    Example:
        >>> faces = detect_faces(img)            # img [1,3,256,256]
        >>> faces[0].landmarks.shape             # torch.Size([1, 5, 2])
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    mtcnn = _mtcnn()
    with torch.no_grad():
        x = images.detach().to("cpu", torch.float32).clamp(0, 1)
        # MTCNN's pyramid starts at 0.6x the image: an 8k photo took ~35 s on 2 cores (measured).
        # Above MAX_DETECT_SIDE it looks at an area-downscaled copy (faces smaller than
        # 20 px there, i.e. under 1 % of an 8k photo's side, are not found) and the boxes and
        # landmarks are scaled back to image pixels.
        scale = min(1.0, MAX_DETECT_SIDE / max(x.shape[-2:]))
        if scale < 1.0:
            size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="area")
        # MTCNN was trained on 8-bit images: give it [B,H,W,3] in [0,255] on the 8-bit grid.
        x = (x * 255.0).round().permute(0, 2, 3, 1).contiguous()
        boxes, probs, points = mtcnn.detect(x, landmarks=True)
        sx = images.shape[-1] / x.shape[2]
        sy = images.shape[-2] / x.shape[1]
    out = []
    for b in range(images.shape[0]):
        if boxes[b] is None:
            out.append(FaceSet.empty())
            continue
        bx = torch.as_tensor(boxes[b].astype("float32")).reshape(-1, 4)
        pr = torch.as_tensor(probs[b].astype("float32")).reshape(-1)
        lm = torch.as_tensor(points[b].astype("float32")).reshape(-1, 5, 2)
        if scale < 1.0:  # pixel centres at integers: x_image = (x_small + 0.5)·s − 0.5
            f = torch.tensor([sx, sy])
            lm = (lm + 0.5) * f - 0.5
            bx = bx * torch.cat([f, f])
        keep = pr >= min_prob
        out.append(FaceSet(landmarks=lm[keep].clone(), boxes=bx[keep].clone(), probs=pr[keep].clone()))
    return out


def similarity_transform(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity taking ``src`` points onto ``dst`` (Umeyama 1991).

    src, dst: ``[..., K, 2]`` point sets (K ≥ 2) in pixels. Returns ``M`` ``[..., 2, 3]`` with
    ``dst ≈ M[..., :2] @ p + M[..., 2]`` (rotation·scale, translation), minimising
    Σ‖dst_i − M·[src_i; 1]‖². Reflections are excluded. Computed in float64, returned in
    ``src``'s dtype.

    Example:
        >>> M = similarity_transform(landmarks[0], template)   # [2,3], image px -> chip px
    """
    s, d = src.double(), dst.to(src.device).double()
    mu_s, mu_d = s.mean(-2, keepdim=True), d.mean(-2, keepdim=True)
    sc, dc = s - mu_s, d - mu_d
    cov = dc.transpose(-1, -2) @ sc / s.shape[-2]  # [...,2,2]
    u, sig, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    e = torch.ones_like(sig)
    e[..., -1] = sign
    rot = u @ torch.diag_embed(e) @ vh
    var_s = sc.pow(2).sum(-1).mean(-1)
    scale = (sig * e).sum(-1) / var_s.clamp_min(1e-12)
    a = scale[..., None, None] * rot
    t = mu_d.squeeze(-2) - (a @ mu_s.transpose(-1, -2)).squeeze(-1)
    return torch.cat([a, t[..., None]], dim=-1).to(src.dtype)


def _h(m: Tensor) -> Tensor:
    """[2,3] -> homogeneous [3,3]."""
    bottom = torch.tensor([[0.0, 0.0, 1.0]], dtype=m.dtype, device=m.device)
    return torch.cat([m, bottom], dim=0)


def _pixel_to_norm(size_w: int, size_h: int, dtype, device) -> Tensor:
    """[3,3] pixel coords (centre of pixel i at i) -> grid coords in [-1,1] (align_corners=False)."""
    return torch.tensor([[2.0 / size_w, 0.0, 1.0 / size_w - 1.0],
                         [0.0, 2.0 / size_h, 1.0 / size_h - 1.0],
                         [0.0, 0.0, 1.0]], dtype=dtype, device=device)


def align_faces(
    images: Tensor, faces: list[FaceSet], template: Tensor, size: int, antialias: bool = True
) -> tuple[Tensor, Tensor]:
    """Warp every detected face onto a recogniser's landmark template.

    images: ``[B,C,H,W]`` float in [0,1]; faces: ``B`` :class:`FaceSet` (from
    :func:`detect_faces` on the clean image); template: ``[5,2]`` landmark positions in chip
    pixels, or ``[N,5,2]``, one per face (image order, then face order); size: chip side in pixels.
    Returns ``chips`` ``[N,C,size,size]`` (N = total faces, image order then face order) and
    ``owner`` ``[N]`` long, the image index of each chip. Differentiable w.r.t. ``images``;
    device and dtype follow ``images``. Outside the image the chip is black (zeros padding).

    With ``antialias`` (the default), when the face is shrunk by k ≥ 2 (image px per chip px)
    the image is first average-pooled by floor(k), so that the gradient reaches every pixel of
    the face; ``antialias=False`` is plain bilinear sampling (for comparison).

    Example:
        >>> chips, owner = align_faces(x_adv, faces, rec.template, rec.chip_size)
        >>> desc = rec(chips)                       # [N,D]
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B,C,H,W], got shape {tuple(images.shape)}")
    if len(faces) != images.shape[0]:
        raise ValueError(f"got {len(faces)} face sets for a batch of {images.shape[0]} images")
    B, C, H, W = images.shape
    dev, dt = images.device, images.dtype
    work = torch.float64  # transforms composed in float64, cast for the grid
    tmpl = torch.as_tensor(template).to(torch.float64).cpu()
    per_face = tmpl.dim() == 3
    if not per_face:
        tmpl = tmpl.reshape(5, 2)
    elif tmpl.shape[0] != sum(len(fs) for fs in faces):
        raise ValueError(f"got {tmpl.shape[0]} templates for {sum(len(fs) for fs in faces)} faces")
    chip_to_norm_inv = torch.linalg.inv(_pixel_to_norm(size, size, work, "cpu"))

    chips, owner = [], []
    pooled_cache: dict[tuple[int, int], Tensor] = {}
    for b, fs in enumerate(faces):
        for f in range(len(fs)):
            dst = tmpl[len(chips)] if per_face else tmpl
            m = similarity_transform(fs.landmarks[f].to(torch.float64).cpu(), dst)  # image -> chip
            k = 1.0 / math.sqrt(abs(float(torch.linalg.det(m[:, :2]))))  # image px per chip px
            p = int(math.floor(k)) if (antialias and k >= 2.0) else 1
            if p > 1:
                key = (b, p)
                if key not in pooled_cache:
                    # ceil_mode keeps the last partial block (averaged over its real pixels)
                    pooled_cache[key] = F.avg_pool2d(images[b:b + 1], p, p, ceil_mode=True)
                src = pooled_cache[key]
                # pooled pixel j covers image pixels [p·j, p·j + p): centre p·j + (p − 1)/2
                up = torch.tensor([[p, 0.0, (p - 1) / 2], [0.0, p, (p - 1) / 2], [0.0, 0.0, 1.0]],
                                  dtype=work)
                m_h = _h(m) @ up  # pooled px -> chip px
            else:
                src = images[b:b + 1]
                m_h = _h(m)
            h, w = src.shape[-2:]
            # grid: chip normalised -> chip px -> source px -> source normalised
            theta = _pixel_to_norm(w, h, work, "cpu") @ torch.linalg.inv(m_h) @ chip_to_norm_inv
            grid = F.affine_grid(theta[:2].unsqueeze(0).to(device=dev, dtype=dt), [1, C, size, size],
                                 align_corners=False)
            chips.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=False))
            owner.append(b)
    if not chips:
        return images.new_zeros(0, C, size, size), torch.zeros(0, dtype=torch.long, device=dev)
    return torch.cat(chips, 0), torch.tensor(owner, dtype=torch.long, device=dev)
