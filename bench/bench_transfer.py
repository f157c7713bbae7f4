"""Transfer benchmark: does identity protection hold against a recogniser it never saw?

Leave one recogniser out, attack with the others (Identity Loss, PGD), judge with the held-out
one — as an attacker would: re-detect the face on the protected photo with MTCNN, align it to the
judge's own template, embed. On the fixture photos (8 people), for each held-out judge:

- verified: the protected photo is the same person as the centroid of that person's OTHER clean
  photos, by the judge's own threshold (lower = better protection);
- rank-1: among the 8 identities' centroids (the person's own without this photo), the true one
  is the nearest (lower = better; chance 1/8);
- after none / JPEG 75 / resize 0.5× (down and up again);
- next to the clean photos and ±ε random-sign noise of the same budget on the same pixels;
- PSNR / SSIM of the protected photo; photos with no face found on the protected image count as
  not verified and not identified (the attacker has nothing to match), and are counted apart.

    .venv/bin/python bench/bench_transfer.py                       # all 48 photos, every held-out judge
    .venv/bin/python bench/bench_transfer.py --photos 16 --iterations 100 --judges faceres
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import fixtures, import_pack

import_pack()

from immunize.kernels import metrics  # noqa: E402
from immunize.kernels.faces import align_faces, detect_faces  # noqa: E402
from immunize.kernels.identity import IdentityObjective  # noqa: E402
from immunize.kernels.pgd import PGDConfig, protect  # noqa: E402
from immunize.kernels.purify import jpeg, resize_down_up  # noqa: E402
from immunize.kernels.recognizers import load_face_recognizer  # noqa: E402
from immunize.kernels.scores import largest_faces  # noqa: E402


def load_recognizers(fx: Path, names: list[str]) -> dict:
    from immunize.kernels.tfjs_graph import load_tfjs_recognizer

    out = {}
    for n in names:
        if n == "dlib":
            out[n] = load_face_recognizer(fx / "models" / "faceapi" / "face_recognition_model.bin")
        else:
            out[n] = load_tfjs_recognizer(fx / "models" / "human-models" / f"{n}.json")
    return out


def load_photos(fx: Path, limit: int):
    paths = sorted((fx / "faces").glob("*/*.png"))
    if limit:  # an even spread over the identities
        by_id: dict[str, list[Path]] = {}
        for p in paths:
            by_id.setdefault(p.parent.name, []).append(p)
        picked, k = [], 0
        while len(picked) < limit and any(len(v) > k for v in by_id.values()):
            picked += [v[k] for v in by_id.values() if len(v) > k][: limit - len(picked)]
            k += 1
        paths = sorted(picked)
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths]).float() / 255.0
    return imgs, [p.parent.name for p in paths], paths


@torch.no_grad()
def embed(images: torch.Tensor, rec) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-detect (the attacker's MTCNN) and embed the largest face: ``[B,D]`` and found ``[B]``."""
    faces = largest_faces(detect_faces(images))
    found = torch.tensor([len(f) > 0 for f in faces])
    chips, owner = align_faces(images, faces, rec.template, rec.chip_size)
    emb = torch.zeros(images.shape[0], rec(chips[:1]).shape[-1] if len(chips) else 1)
    if len(chips):
        emb[owner] = rec(chips).float()
    return emb, found


def judge(rec, emb: torch.Tensor, found: torch.Tensor, probe_paths: list[Path], gallery_emb: torch.Tensor,
          gallery_paths: list[Path]):
    """verified [B], rank1 [B] of probe embeddings ``emb`` against the clean photos of all 8
    people (the probe's own photo left out of its person's centroid)."""
    people = sorted({p.parent.name for p in gallery_paths})
    ver, r1 = [], []
    for i in range(emb.shape[0]):
        if not bool(found[i]):
            ver.append(False)
            r1.append(False)
            continue
        truth = people.index(probe_paths[i].parent.name)
        cents = []
        for p in people:
            members = [j for j, g in enumerate(gallery_paths) if g.parent.name == p and g != probe_paths[i]]
            cents.append(gallery_emb[members].mean(0))
        cents = torch.stack(cents)
        d = rec.distance(emb[i:i + 1], cents)
        ver.append(bool(d[truth] < rec.threshold))
        r1.append(int(d.argmin()) == truth)
    return torch.tensor(ver), torch.tensor(r1)


def noise_like(clean: torch.Tensor, protected: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """±ε random-sign noise on the pixels the protection changed, on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, clean.shape, generator=g).float() * 2 - 1
    changed = (protected != clean).any(1, keepdim=True)
    return (torch.round((clean + sign * eps * changed).clamp(0, 1) * 255) / 255)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recognizers", default="dlib,faceres,mobileface")
    ap.add_argument("--judges", default="", help="held-out judges to run (default: every recogniser)")
    ap.add_argument("--photos", type=int, default=0,
                    help="protect N photos spread over the identities (0 = all 48); the gallery is always all 48")
    ap.add_argument("--eps", type=float, default=8.0, help="/255")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--step", type=float, default=1.275, help="/255")
    ap.add_argument("--diversity", type=float, default=1.0)
    ap.add_argument("--stop-margin", type=float, default=1.5)
    ap.add_argument("--stop-patience", type=int, default=10)
    ap.add_argument("--no-early-stop", action="store_true")
    ap.add_argument("--target", action="store_true",
                    help="targeted loss: pull each photo towards the next person's first photo (TIP-IM)")
    ap.add_argument("--target-weight", type=float, default=1.0)
    ap.add_argument("--split", type=int, default=1, help="1: one objective per recogniser (normalised gradients)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fx = fixtures()
    names = [n for n in args.recognizers.split(",") if n]
    recs = load_recognizers(fx, names)
    imgs, ids, paths = load_photos(fx, args.photos)
    judges = [j for j in (args.judges.split(",") if args.judges else names) if j]
    eps = args.eps / 255
    purifiers = {"none": lambda x: x, "jpeg75": lambda x: jpeg(x, 75), "resize0.5": lambda x: resize_down_up(x, 0.5)}
    print(f"{len(paths)} photos, {len(set(ids))} people; ε {args.eps}/255, {args.iterations} steps, "
          f"diversity {args.diversity}, stop margin {args.stop_margin} patience {args.stop_patience}, "
          f"early stop {not args.no_early_stop}, split {args.split}, targeted {args.target} (weight {args.target_weight})")
    all_imgs, _, all_paths = load_photos(fx, 0)
    gallery = {n: embed(all_imgs, r)[0] for n, r in recs.items()}  # every clean photo, all 8 people

    rows = []
    for h in judges:
        attackers = [recs[n] for n in names if n != h]
        t0 = time.perf_counter()
        prot, steps = [], []
        for s in range(0, len(imgs), args.batch):
            x = imgs[s:s + args.batch]
            target = None
            if args.target:
                people = sorted(set(ids))
                firsts = {p: all_imgs[[q.parent.name for q in all_paths].index(p)] for p in people}
                target = torch.stack([firsts[people[(people.index(i) + 1) % len(people)]]
                                      for i in ids[s:s + args.batch]])
            obj = IdentityObjective(recognizers=attackers, stop_margin=args.stop_margin, diversity=args.diversity,
                                    stop_patience=args.stop_patience, seed=s, target=target,
                                    target_weight=args.target_weight)
            res = protect(x, obj.split() if args.split else [obj], PGDConfig(eps=eps, step=args.step / 255, iterations=args.iterations,
                                              early_stop=not args.no_early_stop, seed=s))
            prot.append(res.protected)
            steps.append(res.steps_run)
        prot = torch.cat(prot)
        secs = time.perf_counter() - t0
        psnr, ssim = metrics.psnr(prot, imgs), metrics.ssim(prot, imgs)
        noise = noise_like(imgs, prot, eps)
        for a in (n for n in names if n != h):  # the attacked networks' own view (white-box)
            emb, found = embed(prot, recs[a])
            ver, r1 = judge(recs[a], emb, found, paths, gallery[a], all_paths)
            rows.append((f"{a} (white-box)", "+".join(n for n in names if n != h), "protected", "none",
                         ver.float().mean().item(), r1.float().mean().item(), int((~found).sum())))
        rec = recs[h]
        for cond, x in (("clean", imgs), ("noise ±ε", noise), ("protected", prot)):
            for pname, pf in purifiers.items():
                if cond == "clean" and pname != "none":
                    continue
                emb, found = embed(pf(x), rec)
                ver, r1 = judge(rec, emb, found, paths, gallery[h], all_paths)
                rows.append((h, "+".join(n for n in names if n != h), cond, pname, ver.float().mean().item(),
                             r1.float().mean().item(), int((~found).sum())))
        print(f"held out {h}: attack {[r.name for r in attackers]}, {secs:.0f} s ({secs / len(imgs):.1f} s/photo), "
              f"steps {min(steps)}–{max(steps)}, PSNR min {psnr.min():.2f} / mean {psnr.mean():.2f} dB, "
              f"SSIM mean {ssim.mean():.4f}", flush=True)

    print("\n| held-out judge | attacked with | images | purification | verified | rank-1 | no face |")
    print("|---|---|---|---|---|---|---|")
    n = len(imgs)
    for h, att, cond, pname, ver, r1, nf in rows:
        print(f"| {h} | {att} | {cond} | {pname} | {round(ver * n)}/{n} = {ver:.0%} | {round(r1 * n)}/{n} = {r1:.0%} "
              f"| {nf} |")


if __name__ == "__main__":
    main()
