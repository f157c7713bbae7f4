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
                "Minimises Σ similarity(f(x), f(x+δ)) over the connected encoders: face recognisers on every "
                "face MTCNN finds (aligned differentiably), and/or a CLIP vision encoder on the whole image. "
                "Each connected network becomes its own objective, so PGD balances them by gradient "
                "normalisation (as it does chained objectives); each recogniser's term saturates past its "
                "margin. For protection that holds against recognisers it never saw, connect several recogniser "
                "families and keep input diversity on; judge the result with a recogniser you did NOT connect here."
            ),
            inputs=[
                FaceRecognizerType.Input("recognizer", optional=True,
                                         tooltip="A face recogniser (Load Face Recognizer)."),
                FaceRecognizerType.Input("recognizer_2", optional=True,
                                         tooltip="Another face recogniser, ideally of another family (ensemble)."),
                FaceRecognizerType.Input("recognizer_3", optional=True,
                                         tooltip="A third face recogniser (ensemble)."),
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
                io.Float.Input("input_diversity", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Strength of the random view each step: crop scale 0.72–1.4, shift ±8 %, "
                                       "rotation ±8°, down-up resize 0.5–1 at 1.0 (ranges shrink towards none "
                                       "below). Makes the protection hold on other crops and other recognisers; 0 "
                                       "attacks one fixed crop only. 0.5 (measured): the attacked networks are "
                                       "fooled and a held-out one as much as at 1.0."),
                io.Int.Input("stop_patience", default=10, min=1, max=1000, optional=True,
                             tooltip="Early stop only after every recogniser has been past its margin on this many "
                                     "consecutive random views."),
                ObjectiveType.Input("objective", optional=True,
                                    tooltip="Objectives to chain before this one."),
            ],
            outputs=[ObjectiveType.Output("objective_out", display_name="objective")],
        )

    @classmethod
    def execute(cls, weight, stop_margin, min_face_confidence, align_jitter=2.0, input_diversity=0.5,
                stop_patience=10, recognizer=None, recognizer_2=None, recognizer_3=None, clip_vision=None,
                objective=None) -> io.NodeOutput:
        recs = [r for r in (recognizer, recognizer_2, recognizer_3) if r is not None]
        if not recs and clip_vision is None:
            raise ValueError("Identity Loss: connect a 'recognizer' (Load Face Recognizer) and/or a "
                             "'clip_vision' (Load CLIP Vision / Load OpenCLIP Vision).")
        if len({id(r) for r in recs}) < len(recs):
            raise ValueError(f"Identity Loss: the same recogniser is connected twice ({[r.name for r in recs]}); "
                             "connect different ones, or only one.")
        obj = IdentityObjective(
            recognizers=recs,
            image_encoders=[as_image_encoder(clip_vision)] if clip_vision is not None else [],
            weight=weight, stop_margin=stop_margin, min_face_prob=min_face_confidence, align_jitter=align_jitter,
            diversity=float(input_diversity), stop_patience=int(stop_patience),
        )
        # one objective per network: PGD L2-normalises each one's gradient (an even ensemble)
        return io.NodeOutput(tuple(objective or ()) + tuple(obj.split()))


NODES = [IdentityLoss]
