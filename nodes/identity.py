"""Identity Loss (IDGuardian): the objective that pushes a face's identity embeddings away."""

from __future__ import annotations

from comfy_api.latest import io

from ..kernels.identity import IdentityObjective
from .common import Node, CATEGORY, FaceRecognizerType, ObjectiveType
from .loaders import as_image_encoder


class IdentityLoss(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeIdentityLoss",
            display_name="Identity Loss (IDGuardian)",
            category=f"{CATEGORY}/objectives",
            description=(
                "Minimises Σ similarity(f(x), f(x+δ)) over the connected encoders: a face recogniser on every "
                "face MTCNN finds (aligned differentiably), and/or a CLIP vision encoder on the whole image. "
                "Encoders in one node are summed; chained objectives are balanced by gradient normalisation."
            ),
            inputs=[
                FaceRecognizerType.Input("recognizer", optional=True,
                                         tooltip="A face recogniser (Load Face Recognizer)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision encoder (Load CLIP Vision or Load OpenCLIP Vision)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of this objective when chained with others."),
                io.Float.Input("stop_margin", default=1.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Early-stop target: every face's distance ≥ margin × the recogniser's "
                                       "same-person threshold (1.5 → 0.9 for dlib). 0 disables the target."),
                io.Float.Input("min_face_confidence", default=0.9, min=0.1, max=1.0, step=0.01,
                               tooltip="MTCNN confidence a face needs to be protected."),
                io.Float.Input("align_jitter", default=2.0, min=0.0, max=10.0, step=0.5,
                               tooltip="Random landmark jitter (face-chip pixels) at every step, so the protection "
                                       "survives the attacker's own, slightly different face crop. 0 disables it."),
                ObjectiveType.Input("objective", optional=True,
                                    tooltip="Objectives to chain before this one."),
            ],
            outputs=[ObjectiveType.Output("objective_out", display_name="objective")],
        )

    @classmethod
    def execute(cls, weight, stop_margin, min_face_confidence, align_jitter=2.0, recognizer=None,
                clip_vision=None, objective=None) -> io.NodeOutput:
        if recognizer is None and clip_vision is None:
            raise ValueError("Identity Loss: connect a 'recognizer' (Load Face Recognizer) and/or a "
                             "'clip_vision' (Load CLIP Vision / Load OpenCLIP Vision).")
        obj = IdentityObjective(
            recognizers=[recognizer] if recognizer is not None else [],
            image_encoders=[as_image_encoder(clip_vision)] if clip_vision is not None else [],
            weight=weight, stop_margin=stop_margin, min_face_prob=min_face_confidence, align_jitter=align_jitter,
        )
        return io.NodeOutput(tuple(objective or ()) + (obj,))


NODES = [IdentityLoss]
