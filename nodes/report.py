"""Protection Report: chart + CSV/JSON of what PGD Protect did."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from comfy_api.latest import io, ui


from ..kernels.identity import IdentityObjective
from ..kernels.verdict import UNKNOWN, judge_role
from .common import Node, CATEGORY, FaceRecognizerType, ReportType, next_output_stem
from .loaders import as_image_encoder


def save_chart(chart: torch.Tensor, directory: str, stem: str, subfolder: str, cls=None) -> ui.SavedImages:
    """Save a chart ``[1,H,W,3]`` once, as ``directory/stem.png`` next to the node's JSON/CSV, and
    return the UI record that shows that saved file (type "output"), not a temp preview copy."""
    filename = f"{stem}.png"
    img = ui.ImageSaveHelper._convert_tensor_to_pil(chart[0])
    meta = ui.ImageSaveHelper._create_png_metadata(cls) if getattr(cls, "hidden", None) else None
    img.save(os.path.join(directory, filename), pnginfo=meta, compress_level=4)
    return ui.SavedImages([ui.SavedResult(filename, subfolder, io.FolderType.output)])


class ProtectionReportNode(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeProtectionReport",
            display_name="Protection Report",
            category=f"{CATEGORY}/report",
            description=(
                "Renders the loss curve, the identity similarity clean ↔ protected per encoder, PSNR, SSIM and "
                "L∞ (/255), and saves the chart (PNG), the numbers (JSON, CSV) and a legend CSV (each number's "
                "direction and what it is compared with) into the output folder under one new number per run. "
                "The attacked networks' "
                "numbers are white-box (they show the optimisation worked, not that others are fooled): connect a "
                "recogniser the protection did not attack to check how it transfers ('held out')."
            ),
            inputs=[
                ReportType.Input("report", tooltip="The report output of PGD Protect."),
                FaceRecognizerType.Input("recognizer", optional=True,
                                         tooltip="Also score clean ↔ protected with this face recogniser."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Also score clean ↔ protected with this CLIP vision encoder."),
                io.String.Input("filename_prefix", default="immunize/report",
                                tooltip="Where the JSON/CSV/PNG go, relative to the output folder (a new "
                                        "number each run, e.g. report_00001_.json)."),
            ],
            outputs=[io.Image.Output("chart", display_name="chart", tooltip="The report as an image.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, filename_prefix, recognizer=None, clip_vision=None) -> io.NodeOutput:
        extra = {}
        if recognizer is not None or clip_vision is not None:
            check = IdentityObjective(
                recognizers=[recognizer] if recognizer is not None else [],
                image_encoders=[as_image_encoder(clip_vision)] if clip_vision is not None else [],
                name="check",
            )
            with torch.inference_mode(False), torch.no_grad():
                out = check.bind(report.clean.clone())(report.protected.clone())
            roles = {m.name: judge_role(m.name, report.attacked) for m in check.recognizers}
            roles.update({e.name: judge_role(e.name, report.attacked) for e in check.image_encoders})
            extra = {f"check [{roles.get(k.split('/')[0], UNKNOWN)}]/{k}": v.detach().float().cpu()
                     for k, v in out.logs.items()}
            report = dataclasses.replace(report, extra_logs={**report.extra_logs, **extra},
                                         judges={**report.judges, **roles})

        directory, stem, subfolder = next_output_stem(filename_prefix)
        report.write(Path(directory), stem)
        chart = report.render()
        return io.NodeOutput(chart, ui=save_chart(chart, directory, stem, subfolder, cls))


NODES = [ProtectionReportNode]
