"""IDGuardian's cross-encoder identity loss ("identity field confusion").

For a clean image x and its protected version x + δ, IDGuardian minimises the summed
similarity of the two images' identity embeddings over several encoders f_k (a face
recogniser such as FaceNet, and a CLIP image encoder):

    L_id(δ) = Σ_k w_k · s_k( f_k(A(x + δ)), f_k(A(x)) )

where A aligns every detected face to the encoder's input (faces are found once, on the clean
image, with MTCNN; the alignment is a differentiable similarity warp from the 5 landmarks, so
the gradient reaches the full-resolution pixels) and A is the identity for CLIP encoders,
which see the whole image.

The similarity s_k depends on the encoder:
  * centred embeddings (FaceNet, CLIP): s = cos(f(x+δ), f(x)), as in the paper;
  * uncentred descriptors (dlib's ResNet, whose descriptors give cos ≈ 0.9 even between
    different people): cosine is nearly blind there, so we use the recogniser's own decision
    rule instead, s = 1 − d(f(x+δ), f(x)) / τ with d the Euclidean distance and τ its
    same-person threshold (0.6). s starts at 1 like a cosine, and s < 0 means "a different
    person" by the recogniser's own rule.
With several faces in one image the loss is the mean over its faces.

Robustness to the attacker's own face detection: the attacker re-detects the face on the
protected photo, and their landmarks differ from ours by a pixel or two, which changes the
aligned chip. During optimisation each step therefore aligns with the template jittered by
U(−j, j) chip pixels per landmark (expectation over transformations; j = ``align_jitter``),
so the perturbation keeps working under small shifts, scalings and rotations of the crop.
Numbers logged without gradient (the final report) use the exact template.

Transfer to recognisers left out of the attack (measured in ``bench/bench_transfer.py``):
  * an ensemble of every connected recogniser, each scored by its own rule;
  * input diversity (``diversity`` > 0, :mod:`kernels.diversity`): each step every recogniser
    sees the face through a random crop scale, shift, rotation and down-up resize, so the
    perturbation cannot lean on one crop geometry;
  * a saturating loss: each recogniser's term is s_k = 1 − min(d_k/τ_k, m), with m the early-stop
    margin, so once a recogniser is fooled beyond its margin on a view its gradient stops and
    the steps go to the recognisers (and views) that are fooled least. For centred recognisers
    d = 1 − cos, so s is an affine function of the paper's cosine below the cap;
  * early stop only when every recogniser has been past its margin on ``stop_patience``
    consecutive random views, not on one lucky view.

Early stop ("reached"): every face of the image is judged a different person by every
recogniser with a margin, d ≥ stop_margin · τ (stop_margin = 1.5 → d ≥ 0.9 for dlib, beyond
the typical different-person distance). Objectives with CLIP encoders only have no target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import NoFaceError  # noqa: F401  (re-exported: callers import it from here)
from .diversity import Diversity
from .faces import align_faces, detect_faces
from .modules import grad_ready
from .pgd import BoundObjective, ObjectiveOutput


def _per_image(values: Tensor, owner: Tensor, batch: int, reduce: str = "mean") -> Tensor:
    """Reduce per-face ``values [N]`` to per-image ``[B]`` (mean or amin over that image's faces)."""
    out = torch.zeros(batch, device=values.device, dtype=values.dtype)
    if reduce == "mean":
        counts = torch.zeros(batch, device=values.device, dtype=values.dtype)
        counts.index_add_(0, owner, torch.ones_like(values))
        return out.index_add(0, owner, values) / counts.clamp_min(1)
    out = out.fill_(float("inf"))
    return out.scatter_reduce(0, owner, values, reduce="amin", include_self=True)


@dataclass
class IdentityObjective:
    """Identity loss over face recognisers and CLIP image encoders (see module docstring).

    recognizers: :class:`kernels.recognizers.FaceRecognizer` modules (aligned face chips);
    image_encoders: :class:`kernels.clip.ImageEncoder` modules (whole image);
    weight: the objective's weight when chained with others in PGD;
    stop_margin: early-stop target in units of each recogniser's threshold (0 disables it);
    min_face_prob: MTCNN detection confidence a face needs;
    align_jitter: landmark jitter in chip pixels during optimisation (0 disables it);
    diversity: strength of the random view (:class:`kernels.diversity.Diversity`; 0 disables it);
    stop_patience: consecutive optimisation steps on which every recogniser must be past its
    margin before ``reached`` (early stop) is reported;
    target: optional photos of ANOTHER person ``[1 or B,3,H,W]`` in [0, 1] (targeted identity loss,
    as TIP-IM): each recogniser's embedding is also pulled towards the target's, by
    ``target_weight · max(d(f(x+δ), f(t))/τ, ½)``, so the face is not just "nobody" but is taken
    for someone else — which also moves it away in a gallery search.
    """

    recognizers: Sequence[nn.Module] = ()
    image_encoders: Sequence[nn.Module] = ()
    weight: float = 1.0
    stop_margin: float = 1.5
    min_face_prob: float = 0.9
    align_jitter: float = 2.0
    diversity: float = 0.0
    stop_patience: int = 1
    target: Optional[Tensor] = field(default=None, repr=False)
    target_weight: float = 1.0
    seed: int = 0
    name: str = "identity"
    faces: list = field(default=None, repr=False)  # set by bind, kept for reports

    def __post_init__(self):
        if not self.recognizers and not self.image_encoders:
            raise ValueError("Identity loss needs at least one face recogniser or CLIP vision encoder.")

    def bind(self, clean: Tensor) -> BoundObjective:
        """Detect faces and embed the clean images once. clean: ``[B,3,H,W]`` in [0, 1]."""
        batch, device = clean.shape[0], clean.device
        # half precision is slow and inexact on the CPU: differentiate in float32 there
        dtype = torch.float32 if device.type == "cpu" else None
        recs = [grad_ready(r, dtype).to(device) for r in self.recognizers]
        encs = [grad_ready(e, dtype).to(device) for e in self.image_encoders]
        faces = None
        for r in recs:
            if min(clean.shape[-2:]) < r.chip_size:
                raise ValueError(
                    f"The image is {clean.shape[-1]}x{clean.shape[-2]} px, smaller than the {r.chip_size} px "
                    f"face chip that {r.name} reads: there is too little face to protect reliably. Use a "
                    f"larger photo (at least {r.chip_size} px on the short side)."
                )
        if recs:
            faces = detect_faces(clean, min_prob=self.min_face_prob)
            missing = [i for i, f in enumerate(faces) if len(f.landmarks) == 0]
            if missing:
                raise NoFaceError(
                    f"No face found in image(s) {missing} of the batch (MTCNN confidence ≥ "
                    f"{self.min_face_prob}). Use a photo where the face is visible and at least "
                    "~40 px wide, lower 'min_face_confidence', or protect with CLIP vision only."
                )
        self.faces = faces

        with torch.no_grad():
            clean_desc = []
            for r in recs:
                chips, owner = align_faces(clean, faces, r.template.to(device), r.chip_size)
                clean_desc.append((r(chips), owner))
            clean_emb = [e(clean) for e in encs]
            targets = self._target_descriptors(recs, batch, device) if self.target is not None and recs else None

        gen = torch.Generator().manual_seed(self.seed)
        view = Diversity(strength=float(self.diversity))
        n_faces = sum(len(f) for f in faces) if faces is not None else 0
        cap = self.stop_margin if self.stop_margin > 0 else float("inf")
        streak = torch.zeros(batch, dtype=torch.long, device=device)  # consecutive steps past the margin

        def template(r) -> Tensor:
            if not torch.is_grad_enabled():
                return r.template.to(device)  # the report's numbers: the exact template
            t = r.template.detach().float().cpu()  # the random draws are made on the CPU generator
            if view.active:
                t = view.templates(t, r.chip_size, n_faces, gen)
            if self.align_jitter > 0:
                t = t + (torch.rand(t.shape, generator=gen) * 2 - 1) * self.align_jitter
            return t.to(device)

        def evaluate(x_adv: Tensor) -> ObjectiveOutput:
            nonlocal streak
            training = torch.is_grad_enabled()
            loss = torch.zeros(batch, device=device)
            logs: dict[str, Tensor] = {}
            reached = torch.ones(batch, dtype=torch.bool, device=device)
            for k, (r, (d0, owner)) in enumerate(zip(recs, clean_desc)):
                chips, _ = align_faces(x_adv, faces, template(r), r.chip_size)
                if training:
                    chips = view.resize_chips(chips, gen)
                d = r(chips)
                dist = r.distance(d, d0)
                # saturating: past the margin this recogniser's view gives no more gradient
                loss = loss + _per_image(1.0 - (dist / r.threshold).clamp(max=cap), owner, batch)
                sim = F.cosine_similarity(d, d0, dim=-1) if r.centred else 1.0 - dist / r.threshold
                logs[f"{r.name}/similarity"] = _per_image(sim.detach(), owner, batch)
                min_dist = _per_image(dist.detach(), owner, batch, reduce="amin")
                logs[f"{r.name}/distance"] = min_dist
                reached &= min_dist >= self.stop_margin * r.threshold
                if targets is not None:
                    dist_t = r.distance(d, targets[k][owner])
                    loss = loss + self.target_weight * _per_image((dist_t / r.threshold).clamp(min=0.5), owner, batch)
                    logs[f"{r.name}/target_distance"] = _per_image(dist_t.detach(), owner, batch)
            if training and recs:
                streak = torch.where(reached, streak + 1, torch.zeros_like(streak))
                reached = streak >= max(1, int(self.stop_patience))
            for e, e0 in zip(encs, clean_emb):
                sim = F.cosine_similarity(e(x_adv), e0, dim=-1)
                loss = loss + sim
                logs[f"{e.name}/similarity"] = sim.detach()
            has_target = bool(recs) and self.stop_margin > 0
            return ObjectiveOutput(loss=loss, logs=logs, reached=reached if has_target else None)

        return evaluate

    def split(self) -> list["IdentityObjective"]:
        """One objective per recogniser (and one for the CLIP encoders), same settings, distinct
        seeds, the weight shared among them: chained in PGD, each one's gradient is L2-normalised
        before the sum, so an ensemble is not led by whichever network has the largest gradients
        (measured: summed in one objective, dlib's gradient drowned MobileFace's)."""
        from dataclasses import replace

        n = len(self.recognizers) + (1 if self.image_encoders else 0)
        if n <= 1:
            return [self]
        w = self.weight / n  # the parts together weigh what the whole did against other objectives
        parts = [replace(self, recognizers=[r], image_encoders=[], name=f"{self.name}:{r.name}", seed=self.seed + k,
                         weight=w) for k, r in enumerate(self.recognizers)]
        if self.image_encoders:
            parts.append(replace(self, recognizers=[], image_encoders=list(self.image_encoders),
                                 name=f"{self.name}:clip", seed=self.seed + len(parts), weight=w))
        return parts

    def _target_descriptors(self, recs, batch: int, device) -> list[Tensor]:
        """Each recogniser's descriptor of the largest face of each target photo: ``[B, D]``."""
        t = self.target.detach().to(device=device, dtype=torch.float32)
        if t.dim() != 4 or t.shape[1] != 3 or t.shape[0] not in (1, batch):
            raise ValueError(f"target must be 1 or {batch} RGB photos [N,3,H,W], got {tuple(t.shape)}")
        found = detect_faces(t, min_prob=self.min_face_prob)
        missing = [i for i, f in enumerate(found) if len(f) == 0]
        if missing:
            raise NoFaceError(f"No face found in target photo(s) {missing}: the target must show another "
                              "person's face clearly.")
        largest = [type(f)(f.landmarks[:1], f.boxes[:1], f.probs[:1]) for f in found]
        out = []
        for r in recs:
            chips, _ = align_faces(t, largest, r.template.to(device), r.chip_size)
            out.append(r(chips).expand(batch, -1))
        return out
