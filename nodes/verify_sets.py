"""Purifier and attacker *sets* for Verify Matrix: each node adds one purifier (or attacker) to a
set that chains like the protect objectives do, so a whole verification matrix is one Verify
Matrix node fed by one node per purifier and per attacker.

The set nodes are generated from the existing purifier and attacker nodes (``nodes/purify.py``,
``nodes/customize.py``, ``nodes/ipadapter.py``): a set node has the same inputs and defaults as
its node minus the image input, plus a ``label`` and the chained set. It does no work itself;
it stores the settings, and Verify Matrix runs the original node's ``execute`` on each photo.
Adding a purifier to the table below is one line; the original nodes stay as they are.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any, Callable

from comfy_api.latest import io
from torch import Tensor

from .common import CATEGORY, Node
from .customize import ImmunizeEditImage, ImmunizeLoRAFineTune
from .ipadapter import ImmunizeApplyIPAdapter
from .purify import (ImmunizePurifyAdverseCleaner, ImmunizePurifyGaussianBlur, ImmunizePurifyGaussianNoise,
                     ImmunizePurifyGrIDPure, ImmunizePurifyIMPRESS, ImmunizePurifyJPEG, ImmunizePurifyNoisyUpscale,
                     ImmunizePurifyResizeDownUp, ImmunizePurifySDEdit, ImmunizePurifyVAERoundTrip)

PurifierSetType = io.Custom("PURIFIER_SET")
AttackerSetType = io.Custom("ATTACKER_SET")

SET_CATEGORY = f"{CATEGORY}/verify/sets"
NONE_LABEL = "none"


@dataclass(frozen=True)
class Purifier:
    """One purifier of a set: ``run`` maps a ComfyUI IMAGE ``[B,H,W,3]`` to one of the same size."""

    label: str
    run: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Attacker:
    """One attacker of a set. ``kind`` "model": ``run`` customises the model on the photos and
    returns the MODEL that Verify Matrix then samples; "image": ``run`` returns the attack's
    images itself (e.g. an img2img edit of the photos)."""

    label: str
    run: Callable[[Tensor], Any]
    kind: str


def no_purifier() -> Purifier:
    """The "none" purifier every matrix starts with: the photo as it is."""
    return Purifier(NONE_LABEL, lambda image: image)


def _auto_label(template: str, values: dict) -> str:
    """``"JPEG {quality}"`` with the node's own values; floats without trailing zeros."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    shown = {k: (f"{values[k]:g}" if isinstance(values.get(k), float) else values.get(k)) for k in fields}
    return template.format(**shown)


def _check_chain(items, kind, what: str) -> tuple:
    if items is None:
        return ()
    if not isinstance(items, tuple) or not all(isinstance(i, kind) for i in items):
        raise ValueError(f"'{what}' must come from another {what[:-1]} set node; got {type(items).__name__}.")
    return items


def _set_node(base: type, schema: io.Schema, image_input: str, template: str, kind: str) -> type:
    """A set node for ``base``: ``schema`` names it; inputs are ``base``'s minus ``image_input``."""
    purifier = kind == "purifier"
    chain = "purifiers" if purifier else "attackers"
    set_type = PurifierSetType if purifier else AttackerSetType
    entry_type = Purifier if purifier else Attacker
    what = "purifier" if purifier else "attacker"

    def define_schema(cls):
        inputs = [i for i in base.define_schema().inputs if i.id != image_input]
        example = "protected | JPEG 75 | LoRA" if purifier else "protected | none | LoRA"
        inputs += [
            io.String.Input("label", default="", tooltip=(
                f"Name of this {what} in the score rows (rows read e.g. '{example}'). "
                f"Empty: '{template}' with this node's values.")),
            set_type.Input(chain, optional=True, tooltip=f"More {what}s from another {what} set node: this one is "
                                                          "added after them."),
        ]
        return dataclasses.replace(schema, category=SET_CATEGORY, inputs=inputs, outputs=[
            set_type.Output(f"{chain}_out", display_name=chain,
                            tooltip=f"The {what}s so far, for more {what} set nodes or Verify Matrix.")])

    def execute(cls, label="", **kwargs) -> io.NodeOutput:
        before = _check_chain(kwargs.pop(chain, None), entry_type, chain)
        name = (label or "").strip() or _auto_label(template, kwargs)
        if kind == "purifier":
            entry = Purifier(name, lambda image: base.execute(**{image_input: image}, **kwargs).args[0])
        else:
            entry = Attacker(name, lambda image: base.execute(**{image_input: image}, **kwargs).args[0], kind)
        return io.NodeOutput(before + (entry,))

    return type(base.__name__ + "Set", (Node,), {
        "__doc__": f"{schema.display_name}: {base.__name__} as an entry of a {what} set.",
        "__module__": __name__,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    })


# node, its image input, label template, kind, schema (literal: scripts/locales_from_nodes.py reads it)
_TABLE = [
    (ImmunizePurifyJPEG, "image", "JPEG {quality}", "purifier", io.Schema(
        node_id="ImmunizePurifyJPEGSet", display_name="Purifier Set: JPEG",
        description="Adds JPEG re-encoding (Purify: JPEG) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyGaussianBlur, "image", "Blur {sigma}", "purifier", io.Schema(
        node_id="ImmunizePurifyGaussianBlurSet", display_name="Purifier Set: Gaussian Blur",
        description="Adds a Gaussian blur (Purify: Gaussian Blur) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyResizeDownUp, "image", "Resize {factor}", "purifier", io.Schema(
        node_id="ImmunizePurifyResizeDownUpSet", display_name="Purifier Set: Resize Down-Up",
        description="Adds a downscale and upscale (Purify: Resize Down-Up) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyGaussianNoise, "image", "Noise {sigma}", "purifier", io.Schema(
        node_id="ImmunizePurifyGaussianNoiseSet", display_name="Purifier Set: Gaussian Noise",
        description="Adds seeded Gaussian noise (Purify: Gaussian Noise) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyAdverseCleaner, "image", "AdverseCleaner", "purifier", io.Schema(
        node_id="ImmunizePurifyAdverseCleanerSet", display_name="Purifier Set: AdverseCleaner",
        description="Adds AdverseCleaner (Purify: AdverseCleaner) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyVAERoundTrip, "image", "VAE round trip", "purifier", io.Schema(
        node_id="ImmunizePurifyVAERoundTripSet", display_name="Purifier Set: VAE Round Trip",
        description="Adds a VAE encode/decode (Purify: VAE Round Trip) to a purifier set for Verify Matrix.")),
    (ImmunizePurifySDEdit, "image", "SDEdit {strength}", "purifier", io.Schema(
        node_id="ImmunizePurifySDEditSet", display_name="Purifier Set: SDEdit / DiffPure",
        description="Adds SDEdit / DiffPure (Purify: SDEdit / DiffPure, ComfyUI's sampler) to a purifier set for "
                    "Verify Matrix.")),
    (ImmunizePurifyGrIDPure, "image", "GrIDPure", "purifier", io.Schema(
        node_id="ImmunizePurifyGrIDPureSet", display_name="Purifier Set: GrIDPure",
        description="Adds GrIDPure (Purify: GrIDPure, tiled DiffPure) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyNoisyUpscale, "image", "Noisy Upscale {sigma}", "purifier", io.Schema(
        node_id="ImmunizePurifyNoisyUpscaleSet", display_name="Purifier Set: Noisy Upscale",
        description="Adds noise + an upscale model (Purify: Noisy Upscale) to a purifier set for Verify Matrix.")),
    (ImmunizePurifyIMPRESS, "image", "IMPRESS", "purifier", io.Schema(
        node_id="ImmunizePurifyIMPRESSSet", display_name="Purifier Set: IMPRESS",
        description="Adds IMPRESS (Purify: IMPRESS, VAE-consistency optimisation) to a purifier set for "
                    "Verify Matrix.")),
    (ImmunizeLoRAFineTune, "images", "LoRA", "model", io.Schema(
        node_id="ImmunizeLoRAFineTuneSet", display_name="Attacker Set: LoRA Fine-Tune (DreamBooth)",
        description="Adds a DreamBooth-LoRA mimic (LoRA Fine-Tune) to an attacker set for Verify Matrix: each "
                    "(purified) photo trains a LoRA, and Verify Matrix samples the fine-tuned model with its "
                    "KSampler settings.")),
    (ImmunizeApplyIPAdapter, "image", "IP-Adapter", "model", io.Schema(
        node_id="ImmunizeApplyIPAdapterSet", display_name="Attacker Set: IP-Adapter",
        description="Adds an IP-Adapter mimic (Apply IP-Adapter (attacker)) to an attacker set for Verify Matrix: "
                    "each (purified) photo is the image prompt, and Verify Matrix samples the model with its "
                    "KSampler settings.")),
    (ImmunizeEditImage, "image", "Edit {strength}", "image", io.Schema(
        node_id="ImmunizeEditImageSet", display_name="Attacker Set: Edit Image (img2img)",
        description="Adds a malicious img2img edit (Edit Image) to an attacker set for Verify Matrix: the edits "
                    "of each (purified) photo are scored directly (its own prompt, seed and steps).")),
]

NODES = [_set_node(base, schema, image_input, template, kind) for base, image_input, template, kind, schema in _TABLE]
