"""Files the nodes write into the output folder: a fresh number per run (never an overwrite),
names ComfyUI's own counter recognises, each chart saved once under its report's name (and
shown from there, not from a temp copy), and every number labelled with its direction and what
it is measured against. No models: synthetic reports and scores."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch


@pytest.fixture
def out_dir(comfy, tmp_path, monkeypatch):
    import folder_paths

    root = tmp_path / "output"
    root.mkdir()
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(root))
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    return root


def _report():
    from immunize.kernels.pgd import PGDConfig, PGDResult, StepRecord
    from immunize.kernels.report import ProtectionReport

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 40, 40, generator=g)
    protected = (clean + (torch.rand(clean.shape, generator=g) - 0.5) * 8 / 255).clamp(0, 1)
    logs = {"identity/dlib-resnet (face-api)/similarity": torch.tensor([-0.51, -0.4]),
            "identity/dlib-resnet (face-api)/distance": torch.tensor([0.906, 0.84])}
    hist = [StepRecord(i, torch.tensor([1.0 - i / 4] * 2), {"identity": torch.tensor([1.0 - i / 4] * 2)}, logs)
            for i in range(3)]
    res = PGDResult(protected=protected, history=hist, steps_run=3, stopped_early=False,
                    config=PGDConfig(eps=8 / 255, step=1 / 255, iterations=3), final_logs=logs,
                    final_losses={"identity": torch.tensor([0.5, 0.5])})
    return ProtectionReport(clean=clean, protected=protected, result=res, attacked=("dlib-resnet (face-api)",))


def _scores():
    from immunize.kernels.scores import ScoreRow, Scores

    row = ScoreRow("protected")
    judge = "dlib-resnet (face-api) [held out]/"
    row.set(judge + "ism_cosine", 0.82)
    row.set(judge + "ism_rule", -0.51)
    row.set(judge + "distance", 0.906)
    row.set("fdfr", 0.0)
    row.set("faces_detected", 1)
    row.set("psnr_db", 38.2)
    row.set("lpips", None, "no weights")
    row.notes["judge: dlib-resnet (face-api)"] = "held out"
    return Scores([row])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _comfy_counter(root: Path, prefix: str) -> int:
    """The counter ComfyUI's SaveImage would use next for ``prefix`` in this folder."""
    import folder_paths

    return folder_paths.get_save_image_path(prefix, str(root))[2]


def test_next_output_stem_counts_every_extension_and_old_names(out_dir):
    from immunize.nodes.common import next_output_stem

    d, stem, sub = next_output_stem("immunize/report")
    assert (Path(d), stem, sub) == (out_dir / "immunize", "report_00001_", "immunize")
    # names written before (report_00007.json, not counted by ComfyUI) and other extensions count
    (out_dir / "immunize" / "report_00007.json").write_text("{}")
    assert next_output_stem("immunize/report")[1] == "report_00008_"
    (out_dir / "immunize" / "report_00008_.csv").write_text("x")
    assert next_output_stem("immunize/report")[1] == "report_00009_"
    # another prefix sharing the start does not count; ComfyUI's counter agrees with ours
    (out_dir / "immunize" / "reports_00042_.json").write_text("{}")
    assert next_output_stem("immunize/report")[1] == "report_00009_"
    assert _comfy_counter(out_dir, "immunize/report") == 9
    with pytest.raises(Exception):
        next_output_stem("../outside")


def test_protection_report_twice_two_sets_chart_saved_once(out_dir):
    from immunize.nodes.report import ProtectionReportNode

    rep = _report()
    uis = []
    for run in range(2):
        before = _files(out_dir)
        with torch.inference_mode():
            out = ProtectionReportNode.execute(report=rep, filename_prefix="immunize/report")
        after = _files(out_dir)
        assert all(after[k] == v for k, v in before.items()), "a file of an earlier run changed"
        new = sorted(set(after) - set(before))
        n = run + 1
        assert new == [f"immunize/report_{n:05}_{s}" for s in (".csv", ".json", ".png", "legend.csv")], new
        uis.append(out.ui)
        # ComfyUI's own counter sees the files (SaveImage with this prefix would not overwrite them)
        assert _comfy_counter(out_dir, "immunize/report") == n + 1
    assert not (out_dir.parent / "temp").exists() or not any((out_dir.parent / "temp").rglob("*.png"))
    for n, u in enumerate(uis, 1):
        assert u.as_dict()["images"] == [{"filename": f"report_{n:05}_.png", "subfolder": "immunize",
                                         "type": "output"}]
    pngs = sorted(out_dir.rglob("*.png"))
    assert len(pngs) == 2  # one chart per run, nothing else
    from PIL import Image

    chart = out.result[0]
    with Image.open(pngs[-1]) as im:
        assert im.size == (chart.shape[2], chart.shape[1])


def test_protection_report_labels_every_number(out_dir):
    from immunize.kernels.report import describe
    from immunize.nodes.report import ProtectionReportNode

    with torch.inference_mode():
        ProtectionReportNode.execute(report=_report(), filename_prefix="lab/report")
    data = json.loads((out_dir / "lab" / "report_00001_.json").read_text(encoding="utf-8"))
    cols = data["legend"]["columns"]
    row = data["images"][0]
    assert set(cols) == set(row)  # every column described; the keys themselves are unchanged
    for k, v in row.items():
        e = cols[k]
        assert e["direction"] and e["measured_against"] and e["meaning"], k
        if isinstance(v, float) and k not in ("epsilon_255",):
            assert re.search(r"[↑↓]|count|setting|pixels|index|flag", e["direction"]), (k, e)
    sim = cols["identity/dlib-resnet (face-api)/similarity"]
    assert sim["direction"].startswith("↓") and "clean photo" in sim["measured_against"]
    assert "1 − d/τ" in sim["meaning"] and "different person" in sim["meaning"]
    assert cols["identity/dlib-resnet (face-api)/distance"]["direction"].startswith("↑")
    assert cols["psnr_db"]["direction"].startswith("↑") and cols["linf_255"]["direction"].startswith("↓")
    assert "ism_cosine" in data["legend"]["note"] and "0.8" in data["legend"]["note"]
    with (out_dir / "lab" / "report_00001_legend.csv").open(encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["metric", "direction", "measured_against", "meaning"]
    assert {r[0] for r in lines[1:]} == set(row) and all(c.strip() for r in lines for c in r)
    assert describe("unknown_objective/whatever")["direction"]


def test_score_report_twice_labels_and_chart_once(out_dir):
    from immunize.nodes.scores import ScoreReport

    s = _scores()
    tables = []
    for run in range(2):
        before = _files(out_dir)
        with torch.inference_mode():
            out = ScoreReport.execute(scores=s, filename_prefix="immunize/verify")
        after = _files(out_dir)
        assert all(after[k] == v for k, v in before.items()), "a file of an earlier run changed"
        n = run + 1
        assert sorted(set(after) - set(before)) == [f"immunize/verify_{n:05}_{x}" for x in
                                                    (".csv", ".json", ".png", "legend.csv")]
        assert out.ui.as_dict()["images"] == [{"filename": f"verify_{n:05}_.png", "subfolder": "immunize",
                                              "type": "output"}]
        tables.append(out.result[1])
    assert len(list(out_dir.rglob("*.png"))) == 2
    # the CSV keeps its metric keys as column names (workflows and tests read them)
    header = tables[0].splitlines()[0].split(",")
    assert "dlib-resnet (face-api) [held out]/ism_cosine" in header and header[0] == "name"
    data = json.loads((out_dir / "immunize" / "verify_00002_.json").read_text(encoding="utf-8"))
    lg = data["legend"]["metrics"]
    assert set(lg) == set(s.metrics())
    cos, rule = lg["dlib-resnet (face-api) [held out]/ism_cosine"], lg["dlib-resnet (face-api) [held out]/ism_rule"]
    assert cos["direction"] == "↓ better" and "mean embedding of the reference photos" in cos["measured_against"]
    assert "uncentred" in cos["meaning"] and "held out" in cos["meaning"]
    assert rule["direction"] == "↓ better" and "1 − d/τ" in rule["meaning"] and "< 0" in rule["meaning"]
    assert lg["faces_detected"]["direction"] == "count"
    assert lg["psnr_db"]["direction"] == "↑ better" and lg["psnr_db"]["measured_against"] == "the clean image"
    assert "ism_rule" in data["legend"]["note"]
    with (out_dir / "immunize" / "verify_00001_legend.csv").open(encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert [r[0] for r in lines[1:]] == s.metrics() and all(c.strip() for r in lines for c in r)


def test_edit_and_region_metrics_are_described(comfy):
    from immunize.kernels.scores import describe_metric

    e = describe_metric("edit_psnr_db_in_mask")
    assert e["direction"] == "↓ better" and e["measured_against"].endswith("inside the mask")
    assert describe_metric("tsdf/l2_mask")["direction"] == "↑ better"
    assert describe_metric("detector/fdfr_clean")["direction"] == "reference"


def test_tsdf_json_twice_never_overwrites(out_dir):
    from immunize.nodes.tsdf import _save_json

    p1 = _save_json({"run": 1}, "tsdf/scores")
    p2 = _save_json({"run": 2}, "tsdf/scores")
    assert (p1.name, p2.name) == ("scores_00001_.json", "scores_00002_.json")
    assert json.loads(p1.read_text()) == {"run": 1} and json.loads(p2.read_text()) == {"run": 2}
    assert _comfy_counter(out_dir, "tsdf/scores") == 3
