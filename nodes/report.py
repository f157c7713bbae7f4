"""Protection Report: chart + CSV/JSON of what PGD Protect did."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from comfy_api.latest import io, ui

import folder_paths

from ..kernels.identity import IdentityObjective
from ..kernels.verdict import UNKNOWN, judge_role
from .common import Node, CATEGORY, FaceRecognizerType, ReportType
from .loaders import as_image_encoder


class ProtectionReportNode(Node):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmunizeProtectionReport",
            display_name="Protection Report",
            category=f"{CATEGORY}/report",
            description=(
                "Renders the loss curve, the identity similarity clean ↔ protected per encoder, PSNR, SSIM and "
                "L∞ (/255), and writes the numbers as JSON and CSV into the output folder. The attacked networks' "
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
                                tooltip="Where the JSON/CSV go, relative to the output folder."),
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

        out_dir = folder_paths.get_output_directory()
        full_dir, stem, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        jpath, cpath = report.write(Path(full_dir), f"{stem}_{counter:05}")
        chart = report.render()
        return io.NodeOutput(chart, ui=ui.PreviewImage(chart, cls=cls))


NODES = [ProtectionReportNode]
