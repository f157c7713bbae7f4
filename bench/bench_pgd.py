"""Benchmark: one PGD step of the identity objective against a bare forward+backward of the
same recogniser, and peak memory. Prints ratios measured in one run (not a timed test).

    .venv/bin/python bench/bench_pgd.py [--size 512] [--batch 1] [--steps 20] [--device cpu]

Uses the real dlib ResNet (face-api port) from the shared fixtures and a real face photo
(upscaled to --size), or $IMMUNIZE_FIXTURES.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import fixtures, import_pack


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import_pack()
    from immunize.kernels.faces import align_faces, detect_faces
    from immunize.kernels.identity import IdentityObjective
    from immunize.kernels.modules import grad_ready
    from immunize.kernels.pgd import PGDConfig, protect
    from immunize.kernels.recognizers import load_face_recognizer

    fx = fixtures()
    rec_path = fx / "models" / "faceapi" / "face_recognition_model.bin"
    photos = sorted((fx / "faces").glob("*/*.png"))
    if not rec_path.is_file() or not photos:
        sys.exit(f"fixtures not found under {fx} (set IMMUNIZE_FIXTURES)")
    dev = torch.device(args.device)
    rec = load_face_recognizer(rec_path)
    imgs = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
            for p in photos[: args.batch]]
    x = F.interpolate(torch.stack(imgs), size=(args.size, args.size), mode="bicubic",
                      antialias=True).clamp(0, 1).to(dev)
    rss0 = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # bare: the recogniser alone on pre-aligned chips, forward + backward to the chips
    faces = detect_faces(x)
    r = grad_ready(rec).to(dev)
    chips0, _ = align_faces(x, faces, r.template.to(dev), r.chip_size)
    ref = r(chips0).detach()
    bare = []
    for _ in range(args.steps + 2):
        c = chips0.clone().requires_grad_(True)
        _sync(dev)
        t = time.perf_counter()
        r.distance(r(c), ref).sum().backward()
        _sync(dev)
        bare.append(time.perf_counter() - t)
    bare = statistics.median(bare[2:])

    # PGD: whole steps (alignment from full-resolution pixels, jitter, combine, project)
    stamps = []
    obj = IdentityObjective([rec], stop_margin=0.0)
    t0 = time.perf_counter()
    protect(x, [obj], PGDConfig(iterations=args.steps + 2, early_stop=False),
            callback=lambda *a: (_sync(dev), stamps.append(time.perf_counter())))
    total = time.perf_counter() - t0
    steps = np.diff(stamps)[1:]
    step = float(np.median(steps))
    print(f"device {dev}, image {args.batch}x3x{args.size}x{args.size}, {len(faces[0])} face(s), "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare recogniser forward+backward: {bare * 1e3:8.1f} ms")
    print(f"one PGD step (identity objective): {step * 1e3:8.1f} ms")
    print(f"ratio PGD step / bare:             {step / bare:8.2f}x")
    print(f"bind (detect + clean embed) + {args.steps + 2} steps: {total:.2f} s")
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak process RSS: {_rss_mib():.0f} MiB (before the runs: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
