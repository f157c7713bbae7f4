"""Detector poisoning: make the attacker's face detector miss or misplace the face.

An attacker who wants to fine-tune a forgery model on a victim's photos first *prepares the
data*: a face detector finds and crops the face in every photo (TSDF, Zheng et al. 2025,
arXiv 2508.07795: the poisoning stage targets this data-preparation step). If the detector
finds no face, the photo is dropped; if the box is wrong, the crop is useless. This module
makes the perturbation do that to MTCNN (Zhang et al. 2016, as shipped in facenet-pytorch),
the detector of most face-swap and personalisation data pipelines.

MTCNN is a cascade. Stage 1, P-Net, is a fully convolutional 12x12 classifier run on an image
pyramid (scales s_k = (12/min_face)·f^k, f = 0.709, while min(H,W)·s_k ≥ 12); the output cell
(i, j) at scale s stands for the box [(2j+1)/s, (2i+1)/s, (2j+12)/s, (2i+12)/s] (floored) in
image pixels, with face probability p and a box regression r. Cells with p ≥ 0.6 become
candidates; R-Net (24x24 crops, p ≥ 0.7) and O-Net (48x48 crops, p ≥ 0.7) re-score and
re-regress them: box' = box + r·(w, h, w, h).

Surrogate (:class:`MTCNNSurrogate`; differentiable in the pixels; MTCNN's own P/R/O-Net
weights on private grad-ready copies whose softmax is removed, so we work on the logit margin
m = a_face − a_bg and MTCNN's threshold τ becomes logit(τ)). Every PGD step *replays the
cascade* on the current image: P-Net on the pyramid (area resampling of the 0–255 image,
(x − 127.5)/128, exactly as MTCNN), the candidates chosen from the detached outputs with
MTCNN's own rules (threshold, NMS 0.5/0.7, regression, ``rerec``), R-Net on them, its
survivors (τ, NMS 0.7, regression, ``rerec``) to O-Net — with every score keeping its graph.
Crops are cut exactly as MTCNN cuts them (integer box clamped to the image, area resize),
written as two averaging matrices (:func:`crop_resize_many`) so that a few dozen crops cost two
batched matrix products. Only candidates near a face (square IoU ≥ ``track_iou``) are
attacked; pyramid scales whose 12/s px cells are < 0.4× or > 2.5× every face are skipped.

Each stage's crop set = the live candidates + the last ``memory`` distinct candidates the real
MTCNN produced near the face at the checks (the candidates move as the image changes) + the
clean face's square + ``crops`` random squares around it (centre shifted by U(−j, j)·side, side
scaled by exp(U(−ln s, ln s)); expectation over the attacker's candidate boxes).

Losses per image (each a mean over that stage's cells or crops; κ = ``margin`` in logits):

    miss:      L = Σ_{stage ∈ P,R,O} w_stage · mean relu(m − logit(τ_stage) + κ)
               P: the P-Net cells whose box has IoU ≥ ``cell_iou`` with a face
    misplace:  L = Σ_stage w'_stage · mean ‖b̂ − b*‖₁ / side(b*) · [IoU(b̂, face) > ρ]
               b̂ = box + r·(w, h, w, h) the regressed box, b* the face box scaled by k about its
               centre (one consistent target for every candidate; k = ``misplace_scale`` = 0.5
               shrinks, k > 1 grows), ρ = ``misplace_iou``, w' = (0, 0.5, 1): P-Net's boxes
               are re-regressed twice downstream
    any:       phases (``ANY_PHASES``; :class:`DetectorPoisonObjective` switches the images the
               real MTCNN still finds at the steps ``switch_after``):
               1. misplace, k = 0.5, for 120 steps;
               2. miss, continuing from phase 1's δ (misplacing first leaves the boxes of a photo
                  that resists it tighter, which the miss loss then exploits), to step 220;
               3. misplace, k = 1.6, *started afresh* from δ₀ (PGD's restart: growing the box is
                  the opposite of phase 1, whose δ would only be in its way), to step 360;
               4. misplace, k = 2.0, afresh again (a second draw: which photos give way is
                  partly chance — the random crops, the start — and successes in a fresh phase
                  come 50–140 steps after its start).
               Targets well beyond where the boxes can go (they reach 1.1–1.2x): the L1 pull's
               gradient is a sign per box side, so k only decides which sides are pushed out;
               towards 1.25/1.35 a few sides of shifted candidates (≤ 8 % after 100 steps) had
               already passed the target and were pulled back. Measured, same code otherwise:
               all 48 photos 42 vs 39 (one thread) and 41 vs 37 (two threads); the 7 hardest
               photos after 150 steps of growth: 2 (k = 1.6 or 2.0) vs 0 (k = 1.35). Part of
               the gain may be a luckier draw (see the draws below).
               Each phase wins on photos the others do not (test's 10 photos, one draw: miss 6,
               misplace 7, phases 1+2: 8; on the 15 of 48 fixture photos that phases 1+2 leave
               found, phase 3 (k = 1.25) took 7).
               O-Net's regression is strong: from the clean face's square scaled by 0.5 … 1.4 it
               returns a box with IoU 0.85–0.97, so a misplacement must move *every* candidate's
               regression, and which direction gives way first depends on the face.

The miss loss presses on every stage although failing one is enough: P-Net and R-Net see the
face at 6–13x reduction, where ±8/255 averages out, and cannot be silenced alone, but their
pressure thins the candidates that reach O-Net (48x48 crops, the weak link); attacking O-Net
alone was measurably worse.

Success and early stop (:class:`DetectorPoisonObjective`): the attack succeeds on an image when
the *real* MTCNN, run on the 8-bit quantised image (exactly what PGD returns), finds no box with
IoU ≥ 0.7 to a face found on the clean image — a miss or a misplacement. The real check runs
every ``check_every`` steps and at once whenever the replayed cascade predicts a failure (the
O-Net scores hover at the threshold, so failures can be brief). An image that succeeded is
frozen (``freeze_reached``: its loss becomes a constant, so PGD's normalised step leaves it
where the check passed and its surrogate is not even evaluated); PGD stops when all are done.

Measured on the 256x256 fixture photos (ε = 8/255, step 1/255, perturbation limited to the face
square grown 1.3x, real MTCNN on the saved 8-bit image; ``bench/bench_detector_poison.py``):
mode "any" (≤ 500 steps) 41 of 48 (85.4 %), FDFR 25 %, P/R@0.7 0.19/0.14, PSNR ≥ 33.2 dB
(mean 34.2), 9.6 s per photo on 2 CPU threads. Three more draws (1 thread; batches of 6; seed 1):
42, 40, 40 of 48 (83–88 %). The photos at the edge flip with float rounding and the random draw;
the 6 that gave way in none of the four are clean, frontal, well-lit faces (angelina_jolie/5, /6,
katy_perry/2, /7, /8, scarlett_johansson/3). Phases 1+2 alone (≤ 250 steps) 33 of 48
(68.8 %); "miss" alone (150 steps) 28 of 48 (58 %). What did not help the photos that resist:
momentum or Adam steps, a low-resolution perturbation, O-Net-only pressure, 500 steps of one
mode, restarts with other seeds, per-candidate shrink targets, growing one side of the box (0 of
9), a fifth fresh phase (growing: nothing on 9; hiding, steps 500–650: 42 vs 41 of 48, within
the draw's noise), a mask grown 1.45x instead of 1.3x (9 of 16 both), checking the real MTCNN
every step, a ranking term for MTCNN's final "Min" NMS (press the scores of the boxes that match
the face under the best misplaced box nested in it: 2 of the 7 hardest, other ones than growth
takes, and it stopped the boxes growing). ε = 12/255
defeats the hardest in ≤ 60 steps (miss). ±ε random noise of the same budget: 0 %.

Evaluation helpers: :func:`box_iou`, :func:`detector_precision_recall` (greedy one-to-one
matching at IoU ≥ 0.7, precision = TP/#pred, recall = TP/#true), :func:`fdfr` (face detection
failure rate: share of images where no face is detected at all, as in Anti-DreamBooth) and
:func:`miss_or_misplace_rate` (share of images where no detection matches a true face).

More detectors plug in through the small :class:`Detector` protocol: ``detect`` (the real
detector, no gradient) and ``surrogate`` (a differentiable poisoning loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import grad_ready
from .pgd import BoundObjective, ObjectiveOutput, quantize_within_budget

MODES = ("miss", "misplace", "any")
# "any": the phases in turn, each a per-image mode and (misplace) the target box's scale; an image
# the real detector still finds at a switch step moves on to the next phase
ANY_PHASES = (("misplace", 0.5, False), ("miss", None, False), ("misplace", 1.6, True), ("misplace", 2.0, True))


class DetectorSurrogate(Protocol):
    """A detector's differentiable poisoning loss, bound to a clean batch and its faces.

    ``self(x [B,3,H,W], active=None)`` → (loss ``[B]`` to minimise, logs ``{name: [B]}``),
    differentiable in x; ``active`` (``[B]`` bool) may restrict the work to some images;
    ``observe(images [N,3,H,W] on the 8-bit grid, idx)`` → N ``[F,4]`` boxes from the *real*
    detector for the batch's images ``idx`` (default: all; no gradient); a surrogate may learn
    from it (MTCNN's tracks the candidates it cut). Optional ``set_mode(b, "miss" | "misplace",
    scale)`` lets mode "any" switch image b (``scale``: the misplace target, the face box scaled
    by it); a surrogate without it keeps its first mode.
    """

    def __call__(self, x: Tensor, active: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        ...

    def observe(self, images: Tensor, idx: Optional[Sequence[int]] = None) -> list[Tensor]:
        ...


class Detector(Protocol):
    """A face detector the poisoning objective can attack.

    detect(images [B,3,H,W] in [0,1]) -> B tensors of boxes [F,4] (x1,y1,x2,y2 image px),
        the real detector's output (no gradient; images are put on the 8-bit grid first).
    surrogate(clean [B,3,H,W], faces: B boxes [F,4], mode) -> :class:`DetectorSurrogate`.
    """

    name: str

    def detect(self, images: Tensor) -> list[Tensor]:
        ...

    def surrogate(self, clean: Tensor, faces: Sequence[Tensor], mode: str) -> DetectorSurrogate:
        ...


# --------------------------------------------------------------------------- boxes & metrics


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a`` ``[N,4]`` and ``b`` ``[M,4]`` (x1,y1,x2,y2, continuous area) → ``[N,M]``.

    Differentiable; empty boxes give 0. Example: ``box_iou(pred, true).amax(1)``.
    """
    a, b = a.float(), b.to(a.device).float()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


@dataclass
class PrecisionRecall:
    """Detection quality over a set of images at one IoU threshold."""

    precision: float  # TP / #predicted boxes (1.0 when nothing is predicted)
    recall: float  # TP / #true boxes (1.0 when there is nothing to find)
    true_positives: int
    predicted: int
    true: int
    iou: float


def _match(pred: Tensor, true: Tensor, iou: float) -> int:
    """Greedy one-to-one matching by decreasing IoU; returns the number of pairs ≥ ``iou``."""
    if len(pred) == 0 or len(true) == 0:
        return 0
    m = box_iou(pred.reshape(-1, 4), true.reshape(-1, 4))
    tp = 0
    while m.numel() and float(m.max()) >= iou:
        k = int(m.argmax())
        i, j = divmod(k, m.shape[1])
        tp += 1
        m[i, :] = -1
        m[:, j] = -1
    return tp


def detector_precision_recall(pred_boxes: Sequence[Tensor], true_boxes: Sequence[Tensor],
                              iou: float = 0.7) -> PrecisionRecall:
    """Precision and recall of detections over images; a detection is correct at IoU ≥ ``iou``.

    pred_boxes, true_boxes: one ``[F,4]`` tensor per image (x1,y1,x2,y2 px). TSDF reports these at
    IoU 0.7: a protected photo "poisons" data preparation when its face is not recalled.
    """
    if len(pred_boxes) != len(true_boxes):
        raise ValueError(f"got predictions for {len(pred_boxes)} images and truths for {len(true_boxes)}")
    tp = sum(_match(p, t, iou) for p, t in zip(pred_boxes, true_boxes))
    n_pred = sum(int(len(p)) for p in pred_boxes)
    n_true = sum(int(len(t)) for t in true_boxes)
    return PrecisionRecall(
        precision=tp / n_pred if n_pred else 1.0, recall=tp / n_true if n_true else 1.0,
        true_positives=tp, predicted=n_pred, true=n_true, iou=iou,
    )


def fdfr(pred_boxes: Sequence[Tensor]) -> float:
    """Face detection failure rate: the share of images in which no face is detected at all."""
    if not pred_boxes:
        return float("nan")
    return sum(1 for p in pred_boxes if len(p) == 0) / len(pred_boxes)


def missed_or_misplaced(pred_boxes: Sequence[Tensor], true_boxes: Sequence[Tensor],
                        iou: float = 0.7) -> Tensor:
    """``[B]`` bool: True where no detection matches any true face at IoU ≥ ``iou``."""
    out = []
    for p, t in zip(pred_boxes, true_boxes):
        if len(t) == 0:
            out.append(False)
        elif len(p) == 0:
            out.append(True)
        else:
            out.append(bool(box_iou(p.reshape(-1, 4), t.reshape(-1, 4)).max() < iou))
    return torch.tensor(out, dtype=torch.bool)


def miss_or_misplace_rate(pred_boxes: Sequence[Tensor], true_boxes: Sequence[Tensor],
                          iou: float = 0.7) -> float:
    """Share of images (with a true face) whose face no detection matches at IoU ≥ ``iou``."""
    has = [i for i, t in enumerate(true_boxes) if len(t)]
    if not has:
        return float("nan")
    hit = missed_or_misplaced(pred_boxes, true_boxes, iou)
    return int(hit[has].sum()) / len(has)  # exact: 7 of 10 is 0.7, not float32 0.69999


def box_mask(boxes: Sequence[Tensor], height: int, width: int, device=None) -> Tensor:
    """Binary mask ``[B,1,H,W]``: 1 inside any of each image's boxes (pixel centres), else 0."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1)
    out = torch.zeros(len(boxes), 1, height, width)
    for b, bx in enumerate(boxes):
        for x1, y1, x2, y2 in bx.reshape(-1, 4).tolist():
            out[b, 0] = torch.maximum(out[b, 0], ((xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)).float())
    return out.to(device) if device is not None else out


def face_mask(boxes: Sequence[Tensor], height: int, width: int, grow: float = 1.0) -> Tensor:
    """``[B,1,H,W]`` face region: each image's boxes scaled by ``grow`` about their centres;
    an image without a box gets the whole frame (1 everywhere)."""
    grown = [_scale_boxes(b.reshape(-1, 4).float(), grow) if len(b) else b.reshape(0, 4) for b in boxes]
    m = box_mask(grown, height, width)
    for i, b in enumerate(grown):
        if len(b) == 0:
            m[i] = 1.0
    return m


# --------------------------------------------------------------------------- MTCNN


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def mtcnn_scales(height: int, width: int, min_face_size: float = 20, factor: float = 0.709) -> list[float]:
    """MTCNN's image pyramid: s_k = (12/min_face)·factor^k while min(H,W)·s_k ≥ 12."""
    m = 12.0 / min_face_size
    minl = min(height, width) * m
    scales, s = [], m
    while minl >= 12:
        scales.append(s)
        s *= factor
        minl *= factor
    return scales


def pnet_cell_boxes(out_h: int, out_w: int, scale: float) -> Tensor:
    """Image-pixel boxes ``[out_h·out_w, 4]`` of P-Net's output cells at ``scale`` (row-major),
    as facenet-pytorch's ``generateBoundingBox`` computes them (stride 2, cell 12)."""
    ii, jj = torch.meshgrid(torch.arange(out_h, dtype=torch.float32),
                            torch.arange(out_w, dtype=torch.float32), indexing="ij")
    x1 = torch.floor((2 * jj + 1) / scale)
    y1 = torch.floor((2 * ii + 1) / scale)
    x2 = torch.floor((2 * jj + 12) / scale)
    y2 = torch.floor((2 * ii + 12) / scale)
    return torch.stack([x1, y1, x2, y2], -1).reshape(-1, 4)


def square(boxes: Tensor) -> Tensor:
    """MTCNN's ``rerec``: the square of side max(w, h) with the same centre. ``[N,4]`` → ``[N,4]``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], -1)


def crop_resize(image: Tensor, box: Sequence[float], size: int) -> Tensor:
    """MTCNN's candidate crop, differentiable in the pixels: ``image`` ``[C,H,W]``, box in px.

    The box is truncated to integers and clamped to the image exactly as facenet-pytorch's
    ``pad`` does, cut, and area-resized to ``size``x``size``. Returns ``[1,C,size,size]``.
    """
    _, h, w = image.shape
    x, y, ex, ey = (int(math.trunc(v)) for v in box)
    x, y, ex, ey = max(x, 1), max(y, 1), min(ex, w), min(ey, h)
    if ex <= x - 1 or ey <= y - 1:
        return image.new_zeros(1, image.shape[0], size, size)
    crop = image[None, :, y - 1:ey, x - 1:ex]
    return F.interpolate(crop, size=(size, size), mode="area")


def _area_weights(start: int, length: int, size: int, total: int) -> Tensor:
    """``[size, total]`` rows averaging ``[start, start+length)`` the way ``interpolate(mode="area")``
    (adaptive average pooling) resizes ``length`` samples to ``size``: row i averages samples
    floor(i·L/size) … ceil((i+1)·L/size) − 1 of the window."""
    i = torch.arange(size)
    lo = torch.div(i * length, size, rounding_mode="floor")
    hi = torch.div((i + 1) * length + size - 1, size, rounding_mode="floor")
    j = torch.arange(length)
    w = ((j[None] >= lo[:, None]) & (j[None] < hi[:, None])).float()
    w = w / w.sum(1, keepdim=True)
    out = torch.zeros(size, total)
    out[:, start:start + length] = w
    return out


def crop_resize_many(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """:func:`crop_resize` for many boxes of one image at once → ``[N,C,size,size]``.

    Area resizing is separable and linear, so each crop is A_y · image · A_xᵀ with the
    ``[size, H]`` and ``[size, W]`` averaging matrices of its (truncated, clamped) window: two
    batched matrix products instead of N slices, with a cheap backward pass.
    """
    c, h, w = image.shape
    rows, cols = [], []
    for box in boxes.reshape(-1, 4).tolist():
        x, y, ex, ey = (int(math.trunc(v)) for v in box)
        x, y, ex, ey = max(x, 1), max(y, 1), min(ex, w), min(ey, h)
        if ex <= x - 1 or ey <= y - 1:  # empty window: a black crop, as crop_resize gives
            rows.append(torch.zeros(size, h))
            cols.append(torch.zeros(size, w))
            continue
        rows.append(_area_weights(y - 1, ey - y + 1, size, h))
        cols.append(_area_weights(x - 1, ex - x + 1, size, w))
    if not rows:
        return image.new_zeros(0, c, size, size)
    ay = torch.stack(rows).to(image)  # [N, size, H]
    ax = torch.stack(cols).to(image)  # [N, size, W]
    t = torch.matmul(ay[:, None], image[None])  # [N, C, size, W]
    return torch.matmul(t, ax[:, None].transpose(-1, -2))


def _normalise(x255: Tensor) -> Tensor:
    return (x255 - 127.5) * 0.0078125


def _strip_softmax(net: nn.Module) -> nn.Module:
    """A grad-ready copy of an MTCNN net that returns logits instead of probabilities."""
    net = grad_ready(net)
    for name, child in list(net.named_children()):
        if isinstance(child, nn.Softmax):
            setattr(net, name, nn.Identity())
    return net


def detect_boxes(mtcnn: nn.Module, images: Tensor, min_prob: float = 0.0) -> list[Tensor]:
    """Run a facenet-pytorch ``MTCNN`` on ``images`` ``[B,3,H,W]`` in [0,1], 8-bit grid.

    Returns one ``[F,4]`` float32 CPU tensor of boxes per image (probability ≥ ``min_prob`` on
    top of MTCNN's own thresholds). No gradient; works inside inference mode.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    with torch.no_grad():
        x = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round()
        boxes, probs = mtcnn.detect(x.permute(0, 2, 3, 1).contiguous())
    out = []
    for bx, pr in zip(boxes, probs):
        if bx is None:
            out.append(torch.zeros(0, 4))
            continue
        bx = torch.as_tensor(bx.astype("float32")).reshape(-1, 4)
        pr = torch.as_tensor(pr.astype("float32")).reshape(-1)
        out.append(bx[pr >= min_prob].clone())
    return out


@dataclass
class Cascade:
    """What MTCNN's cascade did on one image: the boxes each stage was given, and its result."""

    rnet_in: Tensor  # [N,4] candidate squares R-Net scored (after P-Net, NMS, regression, rerec)
    onet_in: Tensor  # [M,4] squares O-Net scored (after R-Net)
    boxes: Tensor  # [F,4] final detections (what ``MTCNN.detect`` returns, before sorting)
    probs: Tensor  # [F]


def mtcnn_cascade(mtcnn: nn.Module, images: Tensor) -> list[Cascade]:
    """Run facenet-pytorch's MTCNN cascade step by step and keep every stage's input boxes.

    images: ``[B,3,H,W]`` in [0,1] (put on the 8-bit grid here). The same computation as
    ``facenet_pytorch...detect_face`` (its own helper functions: pyramid, ``generateBoundingBox``,
    NMS, ``rerec``, ``pad``, ``bbreg``), so ``boxes`` are MTCNN's detections; the stage inputs are
    the candidates the attacker's run will actually crop. No gradient.
    """
    from facenet_pytorch.models.utils import detect_face as fd
    from torchvision.ops import batched_nms

    pnet, rnet, onet = mtcnn.pnet, mtcnn.rnet, mtcnn.onet
    thr = [float(t) for t in mtcnn.thresholds]
    with torch.no_grad(), torch.inference_mode(False):
        imgs = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round()
        B, _, h, w = imgs.shape
        boxes, inds = [], []
        for s in mtcnn_scales(h, w, float(mtcnn.min_face_size), float(mtcnn.factor)):
            im = _normalise(fd.imresample(imgs, (int(h * s + 1), int(w * s + 1))))
            reg, probs = pnet(im)
            bx, ix = fd.generateBoundingBox(reg, probs[:, 1], s, thr[0])
            pick = batched_nms(bx[:, :4], bx[:, 4], ix, 0.5)
            boxes.append(bx[pick])
            inds.append(ix[pick])
        bx, ix = torch.cat(boxes), torch.cat(inds)
        pick = batched_nms(bx[:, :4], bx[:, 4], ix, 0.7)
        bx, ix = bx[pick], ix[pick]
        regw, regh = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
        q = torch.stack([bx[:, 0] + bx[:, 5] * regw, bx[:, 1] + bx[:, 6] * regh,
                         bx[:, 2] + bx[:, 7] * regw, bx[:, 3] + bx[:, 8] * regh, bx[:, 4]], 1)
        bx = fd.rerec(q)
        rnet_in = [bx[ix == b, :4].clone() for b in range(B)]

        def score(net, bx, ix, size):
            patches = [crop_resize(imgs[int(i)], box[:4].tolist(), size) for box, i in zip(bx, ix)]
            if not patches:
                return None
            return net(_normalise(torch.cat(patches)))

        onet_in = [torch.zeros(0, 4) for _ in range(B)]
        final_b = [torch.zeros(0, 4) for _ in range(B)]
        final_p = [torch.zeros(0) for _ in range(B)]
        out = score(rnet, bx, ix, 24)
        if out is not None:
            mv, p = out[0], out[1][:, 1]
            keep = p > thr[1]
            bx = torch.cat([bx[keep, :4], p[keep, None]], 1)
            ix, mv = ix[keep], mv[keep]
            pick = batched_nms(bx[:, :4], bx[:, 4], ix, 0.7)
            bx, ix, mv = bx[pick], ix[pick], mv[pick]
            bx = fd.rerec(fd.bbreg(bx, mv))
            onet_in = [bx[ix == b, :4].clone() for b in range(B)]
            out = score(onet, bx, ix, 48)
            if out is not None:
                mv, p = out[0], out[2][:, 1]
                keep = p > thr[2]
                bx = torch.cat([bx[keep, :4], p[keep, None]], 1)
                ix, mv = ix[keep], mv[keep]
                bx = fd.bbreg(bx, mv)
                pick = fd.batched_nms_numpy(bx[:, :4], bx[:, 4], ix, 0.7, "Min")
                bx, ix = bx[pick], ix[pick]
                final_b = [bx[ix == b, :4].clone() for b in range(B)]
                final_p = [bx[ix == b, 4].clone() for b in range(B)]
    return [Cascade(r, o, fb, fp) for r, o, fb, fp in zip(rnet_in, onet_in, final_b, final_p)]


class _CandidateMemory:
    """Per image, the most recent distinct candidate squares near a face (rounded to pixels)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: dict[tuple, int] = {}

    def add(self, boxes: Tensor, stamp: int) -> None:
        for box in boxes.reshape(-1, 4).tolist():
            self.items[tuple(round(v) for v in box)] = stamp
        if len(self.items) > self.capacity:
            keep = sorted(self.items.items(), key=lambda kv: kv[1])[-self.capacity:]
            self.items = dict(keep)

    def boxes(self) -> Tensor:
        return torch.tensor(list(self.items), dtype=torch.float32).reshape(-1, 4)


@dataclass
class MTCNNDetector:
    """facenet-pytorch's MTCNN as a :class:`Detector` (see the module docstring).

    mtcnn: a ``facenet_pytorch.MTCNN`` (default: the pack's shared instance, with MTCNN's
    defaults: min face 20 px, factor 0.709, thresholds 0.6/0.7/0.7); the surrogate reads its
    pyramid and thresholds from it.
    cell_iou: P-Net cells whose box has IoU ≥ this with a face are attacked;
    track_iou: real R/O-Net candidates whose square has IoU ≥ this with a face's square are
    attacked (tracked from :meth:`observe`, at most ``memory`` per image and stage);
    crops, crop_shift, crop_scale: extra random squares per face and step (EOT);
    margin: κ in logits; misplace_iou: ρ; misplace_scale: the misplace target is the face box
    scaled by this about its centre; stage_weights: (P, R, O) weights of the stage terms in miss
    mode; misplace_stage_weights: the same in misplace mode (P-Net's boxes are re-regressed twice
    downstream, so pulling them is wasted work);
    scale_range: pyramid scales whose cell/face size ratio lies outside are skipped;
    seed: the random crops.
    """

    mtcnn: Optional[nn.Module] = None
    cell_iou: float = 0.3
    track_iou: float = 0.3
    memory: int = 4
    crops: int = 2
    crop_shift: float = 0.05
    crop_scale: float = 1.1
    margin: float = 1.0
    misplace_iou: float = 0.5
    misplace_scale: float = 0.5
    stage_weights: tuple = (1.0, 1.0, 1.0)
    misplace_stage_weights: tuple = (0.0, 0.5, 1.0)
    scale_range: tuple = (0.4, 2.5)
    seed: int = 0
    name: str = "mtcnn"

    def _net(self) -> nn.Module:
        if self.mtcnn is None:
            from .faces import _mtcnn

            self.mtcnn = _mtcnn()
        return self.mtcnn

    def detect(self, images: Tensor) -> list[Tensor]:
        return detect_boxes(self._net(), images)

    def surrogate(self, clean: Tensor, faces: Sequence[Tensor], mode: str) -> "MTCNNSurrogate":
        if mode not in MODES:
            raise ValueError(f"detector poisoning mode must be one of {MODES}, got {mode!r}")
        if mode == "any":
            mode, scale, _ = ANY_PHASES[0]
            return MTCNNSurrogate(self, clean, faces, mode, scale)
        return MTCNNSurrogate(self, clean, faces, mode)


class MTCNNSurrogate:
    """The differentiable MTCNN poisoning loss bound to a clean batch (see the module docstring).

    ``self(x)`` → (loss ``[B]``, logs); ``observe(images)`` runs the real cascade, remembers the
    candidates it cut near each face and returns its final boxes.
    """

    def __init__(self, cfg: MTCNNDetector, clean: Tensor, faces: Sequence[Tensor], mode: str,
                 scale: Optional[float] = None):
        m = cfg._net()
        self.cfg, self.mtcnn = cfg, m
        self.modes = [mode] * clean.shape[0]  # per image: "miss" or "misplace" (see set_mode)
        # per image: the misplace target is the face box scaled by this (see set_mode)
        self.scales = [float(cfg.misplace_scale if scale is None else scale)] * clean.shape[0]
        device = clean.device
        self.pnet, self.rnet, self.onet = (_strip_softmax(n).to(device) for n in (m.pnet, m.rnet, m.onet))
        self.th = [_logit(float(t)) for t in m.thresholds]
        self.B, _, H, W = clean.shape
        self.faces = [f.reshape(-1, 4).float().cpu() for f in faces]
        self.squares = [square(f) for f in self.faces]
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.stamp = 0
        self.memory = {k: [_CandidateMemory(cfg.memory) for _ in range(self.B)] for k in ("rnet", "onet")}
        for b, sq in enumerate(self.squares):
            for k in self.memory:
                self.memory[k][b].add(sq, stamp=1 << 30)  # the clean face's own square: kept for good

        self.probs = [float(t) for t in m.thresholds]
        # the pyramid; per scale the P-Net cells overlapping each face ([B, cells] mask, face box)
        self.pyramid = []
        for s in mtcnn_scales(H, W, float(m.min_face_size), float(m.factor)):
            size = (int(H * s + 1), int(W * s + 1))
            # P-Net: 3x3 conv, 2x2 max-pool (ceil mode), 3x3 conv, 3x3 conv
            oh, ow = (size[0] - 1) // 2 - 4, (size[1] - 1) // 2 - 4
            if oh <= 0 or ow <= 0:
                continue
            boxes = pnet_cell_boxes(oh, ow, s)
            sel, tgt = [], []
            for f in self.faces:
                if len(f) == 0:
                    sel.append(torch.zeros(len(boxes), dtype=torch.bool))
                    tgt.append(torch.zeros(len(boxes), 4))
                    continue
                best, arg = box_iou(boxes, f).max(1)
                sel.append(best >= cfg.cell_iou)
                tgt.append(f[arg])
            cells = None
            if bool(torch.stack(sel).any()):
                cells = (boxes.to(device), torch.stack(sel).to(device), torch.stack(tgt).to(device))
            # a scale whose 12/s px cells are far smaller or larger than every face can neither
            # cover a face nor propose a candidate near one (IoU of nested squares = (a/b)²)
            cell = 12.0 / s
            if cells is not None or any(
                bool(((cell / sides > cfg.scale_range[0]) & (cell / sides < cfg.scale_range[1])).any())
                for sides in self._sides()
            ):
                self.pyramid.append((s, size, cells))

    def set_mode(self, b: int, mode: str, scale: Optional[float] = None) -> None:
        """Switch image ``b`` of the batch to "miss" or "misplace" (used by the "any" schedule);
        ``scale``: a new misplace target, the face box scaled by it (< 1 shrinks, > 1 grows)."""
        if mode not in ("miss", "misplace"):
            raise ValueError(f"a surrogate's per-image mode is 'miss' or 'misplace', got {mode!r}")
        self.modes[b] = mode
        if scale is not None:
            self.scales[b] = float(scale)

    def _sides(self) -> list[Tensor]:
        return [(f[:, 2:] - f[:, :2]).amax(1) for f in self.faces if len(f)]

    # ---------------------------------------------------------------- candidates

    def observe(self, images: Tensor, idx: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Real MTCNN on ``images`` (8-bit grid; the batch's images ``idx``, default all);
        remembers the candidates it cut near each face and returns its final boxes."""
        runs = mtcnn_cascade(self.mtcnn, images)
        idx = list(range(len(runs))) if idx is None else list(idx)
        self.stamp += 1
        for b, run in zip(idx, runs):
            if len(self.squares[b]) == 0:
                continue
            for key, cand in (("rnet", run.rnet_in), ("onet", run.onet_in)):
                if len(cand):
                    near = box_iou(cand, self.squares[b]).amax(1) >= self.cfg.track_iou
                    self.memory[key][b].add(cand[near], self.stamp)
        return [run.boxes for run in runs]

    def _score(self, net: nn.Module, x255: Tensor, b: int, boxes: Tensor, size: int):
        """Run R-Net/O-Net on MTCNN crops of image ``b``: logit margins ``[N]``, regressed boxes ``[N,4]``."""
        out = net(_normalise(crop_resize_many(x255[b], boxes, size)))
        reg, logit = out[0], out[-1]
        bxd = boxes.to(x255.device)
        wh = (bxd[:, 2:] - bxd[:, :2] + 1).repeat(1, 2)  # MTCNN's bbreg uses w + 1
        return logit[:, 1] - logit[:, 0], bxd + reg * wh

    def _terms(self, b: int, margin: Tensor, pred: Tensor, thresh: float) -> Tensor:
        """Per-crop losses of image ``b``: hinge on the margin (miss) or the pull (misplace)."""
        if self.modes[b] == "miss":
            return F.relu(margin - thresh + self.cfg.margin)
        iou, face = box_iou(pred, self.faces[b].to(pred.device)).max(1)
        target = _scale_boxes(self.faces[b], self.scales[b]).to(pred.device)
        return self._pull(pred, target[face], iou)

    def _pull(self, pred: Tensor, target: Tensor, iou: Tensor) -> Tensor:
        """Misplace loss per box: L1 distance of the regressed box to the target box in units
        of the target's side, only while the box still overlaps its face with IoU > ρ."""
        side = (target[..., 2:] - target[..., :2]).mean(-1, keepdim=True).clamp_min(1.0)
        dist = ((pred - target).abs() / side).sum(-1)
        return dist * (iou.detach() > self.cfg.misplace_iou).to(dist.dtype)

    def _near(self, b: int, boxes: Tensor) -> Tensor:
        if len(boxes) == 0:
            return boxes.reshape(0, 4)
        return boxes[box_iou(boxes, self.squares[b]).amax(1) >= self.cfg.track_iou]

    def _pnet(self, x255: Tensor, idx: list[int]):
        """P-Net over the pyramid for the images ``idx`` (``x255`` holds just those): the
        face-cell loss ``[n]`` and, from the detached outputs, the candidate squares R-Net would
        receive (per image, near a face)."""
        from facenet_pytorch.models.utils import detect_face as fd
        from torchvision.ops import batched_nms

        n = len(idx)
        loss, count = x255.new_zeros(n), x255.new_zeros(n)
        pmax = torch.zeros(n)
        found, owner = [], []
        for s, size, cells in self.pyramid:
            reg, logit = self.pnet(_normalise(F.interpolate(x255, size=size, mode="area")))
            margin = logit[:, 1] - logit[:, 0]  # [n, h, w]
            with torch.no_grad():
                prob = torch.sigmoid(margin.detach()).cpu()
                bx, ix = fd.generateBoundingBox(reg.detach().cpu(), prob, s, self.probs[0])
                pick = batched_nms(bx[:, :4], bx[:, 4], ix, 0.5)
                found.append(bx[pick])
                owner.append(ix[pick])
            if cells is None:
                continue
            boxes, sel, tgt = cells
            sel, tgt = sel[idx], tgt[idx]
            margin = margin.flatten(1)  # [n, cells]
            selm = sel.to(margin.dtype)
            count = count + selm.sum(1)
            zero = torch.zeros_like(margin)
            pmax = torch.maximum(pmax, torch.where(sel, torch.sigmoid(margin.detach()), zero).amax(1).cpu())
            miss = torch.tensor([self.modes[b] == "miss" for b in idx], device=margin.device)
            if bool(miss.any()):
                hinge = (F.relu(margin - self.th[0] + self.cfg.margin) * selm).sum(1)
                loss = loss + torch.where(miss, hinge, torch.zeros_like(hinge))
            if not bool(miss.all()):
                r = reg.flatten(2).transpose(1, 2)  # [n, cells, 4]
                wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # P-Net's regression uses w (no + 1)
                pred = boxes + r * wh
                iou = _paired_iou(pred, tgt)
                sc = torch.tensor([self.scales[b] for b in idx], dtype=tgt.dtype, device=tgt.device)
                tb = _scale_boxes(tgt, sc.view(-1, 1, 1))
                pull = (self._pull(pred, tb, iou) * selm).sum(1)
                loss = loss + torch.where(miss, torch.zeros_like(pull), pull)
        with torch.no_grad():
            bx, ix = torch.cat(found), torch.cat(owner)
            pick = batched_nms(bx[:, :4], bx[:, 4], ix, 0.7)
            bx, ix = bx[pick], ix[pick]
            w, h = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
            q = torch.stack([bx[:, 0] + bx[:, 5] * w, bx[:, 1] + bx[:, 6] * h,
                             bx[:, 2] + bx[:, 7] * w, bx[:, 3] + bx[:, 8] * h], 1)
            cand = [self._near(b, square(q[ix == k])) for k, b in enumerate(idx)]
        return loss / count.clamp_min(1), pmax, cand

    def _crops(self, key: str, b: int, live: Tensor) -> Tensor:
        """This step's crops for a stage: live candidates, remembered ones, random ones."""
        boxes = [live.reshape(-1, 4), self.memory[key][b].boxes()]
        base = self.squares[b]
        if torch.is_grad_enabled() and self.cfg.crops > 0 and len(base):
            side = base[:, 2] - base[:, 0]
            cx, cy = (base[:, 0] + base[:, 2]) / 2, (base[:, 1] + base[:, 3]) / 2
            for _ in range(self.cfg.crops):
                sh = (torch.rand(len(base), 2, generator=self.gen) * 2 - 1) * self.cfg.crop_shift
                sc = torch.exp((torch.rand(len(base), generator=self.gen) * 2 - 1) * math.log(self.cfg.crop_scale))
                sd = side * sc
                x0, y0 = cx + sh[:, 0] * side - sd / 2, cy + sh[:, 1] * side - sd / 2
                boxes.append(torch.stack([x0, y0, x0 + sd, y0 + sd], -1))
        return torch.cat(boxes, 0)

    def __call__(self, x: Tensor, active: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Replays MTCNN's cascade on ``x`` ``[B,3,H,W]`` (candidates chosen on detached outputs,
        every score with its graph) and returns Σ_stage w_stage · mean loss over that stage's
        crops, ``[B]``. ``active`` (``[B]`` bool) limits the work to those images (the others get
        a constant 0 loss and empty logs)."""
        from torchvision.ops import nms

        B = self.B
        idx = [b for b in range(B) if len(self.faces[b]) and (active is None or bool(active[b]))]
        x255 = x * 255.0
        weights = torch.tensor([self.cfg.stage_weights if m == "miss" else self.cfg.misplace_stage_weights
                                for m in self.modes], dtype=x.dtype, device=x.device)  # [B, 3]
        wp, wr, wo = weights.unbind(1)
        r_loss, o_loss, p_loss = x.new_zeros(B), x.new_zeros(B), x.new_zeros(B)
        r_max, o_max, o_iou, p_max = torch.zeros(B), torch.zeros(B), torch.zeros(B), torch.zeros(B)
        fails = torch.zeros(B)
        live_r = {}
        if idx:
            sub = torch.tensor(idx, device=x.device)
            pl, pm, cand = self._pnet(x255[sub], idx)
            p_loss = p_loss.index_put((sub,), pl)
            p_max[idx] = pm
            live_r = dict(zip(idx, cand))
        for b in idx:
            crops = self._crops("rnet", b, live_r[b])
            margin, pred = self._score(self.rnet, x255, b, crops, 24)
            r_loss[b] = self._terms(b, margin, pred, self.th[1]).mean()
            r_max[b] = float(torch.sigmoid(margin.detach()).max())
            # R-Net's survivors among the live candidates become O-Net's live candidates
            n = len(live_r[b])
            with torch.no_grad():
                keep = margin[:n].detach() > self.th[1]
                live_o = pred[:n][keep].detach()
                if len(live_o):
                    live_o = live_o[nms(crops[:n][keep].to(live_o), margin[:n][keep].detach(), 0.7)]
                live_o = self._near(b, square(live_o.cpu()))
            crops = self._crops("onet", b, live_o)
            margin, pred = self._score(self.onet, x255, b, crops, 48)
            o_loss[b] = self._terms(b, margin, pred, self.th[2]).mean()
            o_max[b] = float(torch.sigmoid(margin.detach()).max())
            # does the replayed cascade already fail? (live candidates only; for the real check)
            live_m, live_p = margin[:len(live_o)].detach(), pred[:len(live_o)].detach()
            passing = live_m > self.th[2]
            if bool(passing.any()):
                hit = box_iou(live_p[passing], self.faces[b].to(live_p.device)).amax(1) >= 0.7
                fails[b] = not bool(hit.any())
            else:
                fails[b] = True
            o_iou[b] = float(box_iou(pred.detach(), self.faces[b].to(pred.device)).max())
        logs = {"onet_prob": o_max, "rnet_prob": r_max, "pnet_prob": p_max, "predicted_fail": fails,
                "pnet_loss": p_loss.detach().cpu(), "rnet_loss": r_loss.detach().cpu(),
                "onet_loss": o_loss.detach().cpu()}
        logs["onet_iou"] = o_iou
        return wp * p_loss + wr * r_loss + wo * o_loss, logs


def _scale_boxes(boxes: Tensor, factor) -> Tensor:
    """Boxes ``[..., 4]`` scaled about their centres by ``factor`` (a number, or a tensor that
    broadcasts against ``[..., 1]``, e.g. one factor per image)."""
    c = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) / 2 * factor
    return torch.cat([c - half, c + half], -1)


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of boxes ``[..., 4]`` and ``[..., 4]`` (broadcast) → ``[...]``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    return inter / (area_a + area_b - inter).clamp_min(1e-9)


# --------------------------------------------------------------------------- objective


@dataclass
class DetectorPoisonObjective:
    """PGD objective: make every detector miss (or misplace) every face found on the clean image.

    detectors: :class:`Detector` instances (default: MTCNN); mode: "miss" | "misplace" | "any"
    ("any": the phases of ``ANY_PHASES`` — shrink the box, hide the face, grow the box from a
    fresh start, twice — every image the real detectors still find moves on to the next phase at
    the steps ``switch_after``; each phase wins on other photos, see the module docstring);
    faces: optional B ``[F,4]`` boxes to protect (default: the first detector's detections on
    the clean image); check_every: run the real detectors on the 8-bit quantised image every
    this many steps, and whenever a surrogate predicts a new failure, for ``reached`` (0: never,
    no early stop); freeze_reached: leave an image alone once it has succeeded (its loss becomes
    a constant, so PGD's normalised step is 0 there); iou: the success threshold.
    Logs the surrogate's numbers per detector and ``success`` (1 when every real detector misses
    or misplaces every face, at the last check).

    Example:
        >>> obj = DetectorPoisonObjective(mode="miss")
        >>> protect(img, [obj], PGDConfig(eps=8/255, step=1/255, iterations=150))
    """

    detectors: Sequence[Detector] = field(default_factory=lambda: [MTCNNDetector()])
    mode: str = "miss"
    weight: float = 1.0
    faces: Optional[Sequence[Tensor]] = None
    check_every: int = 5
    freeze_reached: bool = True
    iou: float = 0.7
    switch_after: tuple = (120, 220, 360)
    name: str = "detector_poison"
    clean_faces: Optional[list] = field(default=None, repr=False)  # set by bind

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"detector poisoning mode must be one of {MODES}, got {self.mode!r}")
        if not self.detectors:
            raise ValueError("detector poisoning needs at least one detector")

    def bind(self, clean: Tensor) -> BoundObjective:
        B = clean.shape[0]
        faces = list(self.faces) if self.faces is not None else self.detectors[0].detect(clean)
        if len(faces) != B:
            raise ValueError(f"got face boxes for {len(faces)} images, the batch has {B}")
        missing = [i for i, f in enumerate(faces) if len(f) == 0]
        if missing:
            raise ValueError(
                f"No face found in image(s) {missing} of the batch, so there is nothing for the detector "
                "poisoning to hide. Use photos with a visible face (at least ~40 px wide), or drop the "
                "Detector Poison objective for them."
            )
        self.clean_faces = [f.detach().cpu().clone() for f in faces]
        losses = [d.surrogate(clean, self.clean_faces, self.mode) for d in self.detectors]
        state = {"step": 0, "success": torch.zeros(B, dtype=torch.bool)}
        switches = [int(v) for v in self.switch_after][:len(ANY_PHASES) - 1]
        clean_ref = clean.detach().clone()

        def evaluate(x_adv: Tensor) -> ObjectiveOutput:
            total = x_adv.new_zeros(B)
            logs: dict[str, Tensor] = {}
            logs_raw: dict[str, Tensor] = {}
            # frozen images (already a success) are not even evaluated: their loss is a constant
            active = None
            if self.freeze_reached and torch.is_grad_enabled() and self.check_every > 0:
                active = ~state["success"]
            for d, fn in zip(self.detectors, losses):
                loss, lg = fn(x_adv, active)
                total = total + loss
                logs.update({f"{d.name}/{k}": v.detach().float().cpu() for k, v in lg.items()})
                if "predicted_fail" in lg:  # every surrogate must predict a failure
                    prev = logs_raw.get("predicted_fail", torch.ones_like(lg["predicted_fail"]))
                    logs_raw["predicted_fail"] = prev * lg["predicted_fail"]
            fresh = False
            if self.mode == "any" and torch.is_grad_enabled() and state["step"] in switches:
                # this phase did not work on these images (yet): on to the next one
                mode, scale, fresh = ANY_PHASES[switches.index(state["step"]) + 1]
                for fn in losses:
                    if hasattr(fn, "set_mode"):
                        for b in torch.nonzero(~state["success"]).flatten().tolist():
                            fn.set_mode(b, mode, scale)
            reached = None
            if self.check_every > 0:
                # a surrogate that predicts a new failure triggers a real check at once (the
                # cascade's scores hover at the thresholds, so failures can be brief)
                pf = logs_raw.get("predicted_fail")
                if not torch.is_grad_enabled():  # a final verdict: every image
                    state["success"] = self._observe(losses, clean_ref, x_adv.detach())
                else:  # when due or predicted to fail; an image frozen on its success stays done
                    due = torch.full((B,), state["step"] % self.check_every == 0)
                    if pf is not None:
                        due = due | (pf > 0)
                    if self.freeze_reached:
                        due = due & ~state["success"]
                    idx = torch.nonzero(due).flatten().tolist()
                    if idx:
                        state["success"][idx] = self._observe(losses, clean_ref, x_adv.detach(), idx)
                reached = state["success"].to(x_adv.device)
                logs["success"] = state["success"].float()
            # a phase that starts afresh: PGD puts these images back to their start (after this
            # step's check, so an image that has just succeeded keeps its perturbation)
            restart = ~state["success"].to(x_adv.device) if fresh else None
            state["step"] += 1
            if reached is not None and self.freeze_reached and torch.is_grad_enabled():
                # zero loss → zero gradient → PGD's normalised step leaves this image alone
                total = torch.where(reached, total * 0.0, total)
                if x_adv.requires_grad:  # keep a (zero) graph when every image is frozen
                    total = total + 0.0 * x_adv.flatten(1).sum(1)
            return ObjectiveOutput(loss=total, logs=logs, reached=reached, restart=restart)

        return evaluate

    def _observe(self, surrogates, clean: Tensor, x_adv: Tensor, idx: Optional[list] = None) -> Tensor:
        """``[B]`` (or ``[len(idx)]``) bool: every real detector misses or misplaces every face of
        the 8-bit ``x_adv`` (images ``idx`` only, when given)."""
        if idx is not None:
            clean, x_adv = clean[idx], x_adv[idx]
        faces = self.clean_faces if idx is None else [self.clean_faces[i] for i in idx]
        # what PGD will return (exactly so for a clean image on the 8-bit grid, as loaded photos
        # are; off it a pixel may differ by one level, and PGD's final verdict is on its result)
        q = quantize_within_budget(clean.cpu(), x_adv.cpu(), 1.0, "linf")
        ok = torch.ones(clean.shape[0], dtype=torch.bool)
        for sur in surrogates:
            pred = sur.observe(q, idx)
            for k, (p, t) in enumerate(zip(pred, faces)):
                if len(p) and len(t) and bool(box_iou(p, t).max() >= self.iou):
                    ok[k] = False
        return ok


__all__ = [
    "Detector", "MTCNNDetector", "DetectorPoisonObjective", "PrecisionRecall", "MODES",
    "box_iou", "box_mask", "crop_resize", "detect_boxes", "detector_precision_recall", "fdfr",
    "miss_or_misplace_rate", "missed_or_misplaced", "mtcnn_scales", "pnet_cell_boxes",
    "square",
]
