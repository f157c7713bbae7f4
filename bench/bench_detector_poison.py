"""Benchmark: detector poisoning against the real MTCNN on every fixture face photo.

Prints, from one run: the share of photos whose face MTCNN misses or misplaces (IoU < 0.7) after
protection, the same share for ±ε random-sign noise of the same budget (the unprotected
baseline), FDFR and precision/recall at IoU 0.7, PSNR, steps and seconds. Not a timed test.

    .venv/bin/python bench/bench_detector_poison.py [--mode any] [--eps 8] [--iterations 500]

The perturbation is limited to each face's square grown by 1.3 (what MTCNN's candidates read),
as in tests/test_tsdf.py. Photos come from ../shared/fixtures/faces or $IMMUNIZE_FIXTURES.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from common import fixtures, import_pack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="any", choices=["miss", "misplace", "any"])
    ap.add_argument("--eps", type=float, default=8.0, help="budget in /255")
    ap.add_argument("--step", type=float, default=1.0, help="PGD step in /255")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grow", type=float, default=1.3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import_pack()
    from immunize.kernels import detector as D
    from immunize.kernels.faces import _mtcnn
    from immunize.kernels.metrics import psnr
    from immunize.kernels.pgd import PGDConfig, protect
    from immunize.kernels.tsdf import random_sign_noise

    fx = fixtures()
    paths = sorted(p for d in sorted((fx / "faces").iterdir()) if d.is_dir() for p in sorted(d.glob("*.png")))
    if not paths:
        raise SystemExit(f"no face photos under {fx / 'faces'}")
    mtcnn = _mtcnn()
    eps = args.eps / 255
    truth_all, pred_all, noise_all, q_all, failed = [], [], [], [], []
    steps, start = 0, time.time()
    for i in range(0, len(paths), args.batch):
        chunk = paths[i:i + args.batch]
        x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                         for p in chunk])
        truth = D.detect_boxes(mtcnn, x)
        keep = [k for k, t in enumerate(truth) if len(t)]
        x, truth, chunk = x[keep], [truth[k] for k in keep], [chunk[k] for k in keep]
        mask = D.face_mask([D.square(t) for t in truth], *x.shape[-2:], grow=args.grow)
        obj = D.DetectorPoisonObjective(mode=args.mode)
        res = protect(x, [obj], PGDConfig(eps=eps, step=args.step / 255, iterations=args.iterations), mask=mask)
        pred = D.detect_boxes(mtcnn, res.protected)
        noise = D.detect_boxes(mtcnn, random_sign_noise(x, eps, seed=i, mask=mask))
        hit = D.missed_or_misplaced(pred, truth)
        failed += [f"{p.parent.name}/{p.name}" for p, h in zip(chunk, hit.tolist()) if not h]
        truth_all += truth
        pred_all += pred
        noise_all += noise
        q_all += psnr(res.protected, x).tolist()
        steps += res.steps_run
        print(f"  {len(truth_all)} photos: {int(D.missed_or_misplaced(pred_all, truth_all).sum())} poisoned, "
              f"{time.time() - start:.0f} s", flush=True)
    rate = D.miss_or_misplace_rate(pred_all, truth_all)
    base = D.miss_or_misplace_rate(noise_all, truth_all)
    pr = D.detector_precision_recall(pred_all, truth_all)
    print(f"\nMTCNN poisoning, mode {args.mode}, ε = {args.eps:g}/255, {args.iterations} iterations max, "
          f"{len(truth_all)} photos ({steps / max(1, -(-len(truth_all) // args.batch)):.0f} steps per batch on average)")
    print(f"  missed or misplaced (IoU < 0.7): protected {rate:.1%}  vs  ±ε noise {base:.1%}")
    print(f"  FDFR {D.fdfr(pred_all):.1%}, precision/recall@0.7 {pr.precision:.2f}/{pr.recall:.2f}")
    print(f"  PSNR min {min(q_all):.2f} / mean {sum(q_all) / len(q_all):.2f} dB")
    print(f"  {time.time() - start:.0f} s in all, {(time.time() - start) / len(truth_all):.1f} s per photo")
    if failed:
        print(f"  still found ({len(failed)}): {', '.join(failed)}")


if __name__ == "__main__":
    main()
