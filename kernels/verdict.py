"""The honest verdict: who judged the protection, and what their numbers can claim.

A protected photo is "protected" only against a recogniser that was *not* used to make the
perturbation. A recogniser the attack optimised against (white-box) is fooled by construction;
its numbers show that the optimisation worked, not that the photo is safe from anyone else.
Every identity number is therefore labelled with its judge's role:

- ``white-box``: the judge was one of the recognisers the protection attacked;
- ``held out``: the judge was left out of the attack, so its numbers measure transfer;
- ``attack unknown``: nothing tells which recognisers were attacked (no protection report).

Two questions an attacker asks of a protected photo p of a person with other photos R:

- *verification*: is p the same person as R? Same person iff d(e(p), ē_R) < τ, with ē_R the
  mean embedding of R (the person's *other* photos: a clean copy of p itself only measures
  how much p changed) and τ the judge's own threshold;
- *identification*: among a gallery of other people G, is R still the closest identity?
  rank(p) = 1 + #{g ∈ G : d(e(p), e(g)) < d(e(p), ē_R)}; identified iff rank = 1.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

WHITE_BOX = "white-box"
HELD_OUT = "held out"
UNKNOWN = "attack unknown"


def judge_role(judge: str, attacked: Optional[Iterable[str]]) -> str:
    """The role of recogniser ``judge`` given the names of the attacked models (None: unknown)."""
    if attacked is None:
        return UNKNOWN
    return WHITE_BOX if judge in set(attacked) else HELD_OUT


def labelled(judge: str, role: str) -> str:
    """The prefix of a judge's metrics, e.g. ``"faceres [held out]"``."""
    return f"{judge} [{role}]"


def gallery_ranks(probe: Tensor, centroid: Tensor, gallery: Tensor, distance) -> Tensor:
    """Rank of the true identity for each probe embedding.

    probe ``[N,D]``; centroid ``[D]`` (the true identity); gallery ``[G,D]`` (other people);
    distance(a, b) → ``[...]`` the judge's distance. Returns ``[N]`` long, 1 = identified first.
    """
    d_true = distance(probe, centroid.to(probe)[None])  # [N]
    if gallery.shape[0] == 0:
        return torch.ones(probe.shape[0], dtype=torch.long)
    d_gal = distance(probe[:, None, :], gallery.to(probe)[None, :, :])  # [N,G]
    return 1 + (d_gal < d_true[:, None]).sum(1)


def verdict_lines(roles: dict[str, str]) -> list[str]:
    """Plain sentences about what the identity numbers of a report can claim.

    roles: judge name → role, for every recogniser that scored something.
    """
    if not roles:
        return []
    held = sorted(j for j, r in roles.items() if r == HELD_OUT)
    white = sorted(j for j, r in roles.items() if r == WHITE_BOX)
    unknown = sorted(j for j, r in roles.items() if r == UNKNOWN)
    lines = []
    if white:
        lines.append(f"White-box: {', '.join(white)} {'was' if len(white) == 1 else 'were'} attacked; "
                     f"{'its' if len(white) == 1 else 'their'} numbers show the optimisation worked on "
                     f"{'that network' if len(white) == 1 else 'those networks'}, not that the photo is "
                     "protected from others.")
    if held:
        lines.append(f"Held out: {', '.join(held)} {'was' if len(held) == 1 else 'were'} not used by the attack; "
                     "these numbers measure how the protection transfers to a recogniser it never saw.")
    if unknown:
        lines.append(f"Unknown: for {', '.join(unknown)} it is not known whether the attack used it (connect the "
                     "protection report to the score node).")
    if not held:
        lines.append("No held-out recogniser judged these images: nothing is known about recognisers the attack "
                     "did not use. Do not read these numbers as 'protected'.")
    return lines


def held_out_outcomes(rows: Sequence) -> list[str]:
    """One sentence per score row and held-out judge: does the judge still see the person?
    Read from the rows' ``"<judge> [held out]/same_person_rate"`` (and ``rank1_rate``) values."""
    tag = f" [{HELD_OUT}]/"
    lines = []
    for r in rows:
        for key, v in r.values.items():
            if tag not in key or not key.endswith("/same_person_rate") or v is None:
                continue
            judge = key.split(tag)[0]
            rank = r.values.get(f"{judge}{tag}rank1_rate")
            still = v > 0 or (rank is not None and rank > 0)  # verified, or still found first in a gallery
            verdict = "NOT protected against it" if still else "no longer matched"
            lines.append(f"'{r.name}': {judge} (held out) still takes {v:.0%} of the images for the same person"
                         + (f", identifies {rank:.0%} first in the gallery" if rank is not None else "")
                         + f" — {verdict}.")
    return lines


def roles_from_notes(rows: Sequence) -> dict[str, str]:
    """Collect ``judge → role`` from score rows' notes (key ``"judge: <name>"``, value the role)."""
    roles: dict[str, str] = {}
    for r in rows:
        for k, v in r.notes.items():
            if k.startswith("judge: ") and v in (WHITE_BOX, HELD_OUT, UNKNOWN):
                roles[k[len("judge: "):].split(" #")[0]] = v
    return roles


def attacked_models(objectives: Iterable) -> tuple[str, ...]:
    """Names of the networks (recognisers, image encoders) the objectives optimise against:
    every ``torch.nn.Module`` with a ``name`` held by an objective — directly, in a list, or
    inside an objective it wraps (anything with a ``bind`` method)."""
    names: list[str] = []
    seen: set[int] = set()

    def visit(v) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            n = getattr(v, "name", None)
            if isinstance(n, str) and n not in names:
                names.append(n)
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)
        elif callable(getattr(v, "bind", None)) and hasattr(v, "__dict__"):
            for item in vars(v).values():
                visit(item)

    for obj in objectives:
        visit(obj)
    return tuple(names)
