import csv
import io
import json

import pytest

from rescomp.errors import ConfigError
from rescomp.report import find_runs, flatten, markdown, to_csv, write_table

ROW = {"name": "r20", "row": "ResNet-20", "table": "demo", "arch": {"arch": "resnet20"}, "dataset": "cifar10",
       "epochs": 3, "top1": 88.5, "loss": 0.4, "params": 269722, "macs": 40931968, "size_bytes": 1120663,
       "latency_ms_cpu_b1": 1.5, "latency_ms_cpu_b64": 30.0, "paper": {"top1": 91.25}, "seed": 0,
       "config_hash": "abc", "commit": "123", "torch": "2.14.1", "device": "cpu:x", "wall_seconds": 12.0,
       "command": "rescomp train c.yaml", "data_source": "synthetic"}


def test_paper_values_sit_beside_ours_with_the_difference():
    flat = flatten(ROW)
    assert flat["top1 (paper)"] == 91.25
    assert flat["Δ top1"] == pytest.approx(-2.75)
    md = markdown("demo", [ROW])
    assert "| top-1 % |" in md and "| 91.25 | -2.75 |" in md
    assert "MACs (M)" in md and "| 40.93 |" in md
    assert "`rescomp train c.yaml` — config abc, seed 0, commit 123, torch 2.14.1, device cpu:x" in md


def test_csv_keeps_raw_units_and_provenance():
    rows = list(csv.DictReader(io.StringIO(to_csv([ROW]))))
    assert rows[0]["macs"] == "40931968" and rows[0]["commit"] == "123" and rows[0]["command"] == "rescomp train c.yaml"


def test_write_table_and_find_runs(tmp_path):
    run = tmp_path / "runs" / "r20"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(ROW))
    assert find_runs("demo", tmp_path / "runs") == [run]
    assert find_runs(str(tmp_path / "runs"), tmp_path / "runs") == [run]
    with pytest.raises(ConfigError, match="neither a run folder nor a table"):
        find_runs("nope", tmp_path / "runs")
    out = write_table("demo", [ROW], tmp_path / "results")
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_cost.png", "table.csv", "table.json", "table.md"]
    assert json.loads((out / "table.json").read_text())["rows"][0]["top1"] == 88.5
    assert (out / "accuracy_vs_cost.png").read_bytes()[:4] == b"\x89PNG"


def test_notes_and_a_difference_only_between_like_quantities(tmp_path):
    """A prune row counted at 224 px with the paper's head is compared with the paper there, and
    its costs at our input size get no paper column. --notes must name an existing file."""
    from typer.testing import CliRunner

    from rescomp.cli import app

    row = {**ROW, "paper": {"macs_paper_input": 1.8e9, "top1": 94.8}, "macs_paper_input": 1.819e9, "paper_input": 224}
    md = markdown("t", [row], notes="Rows cannot show X.")
    assert "MACs (M) at paper's input, paper" in md and "Δ MACs (M) at paper's input" in md
    assert "MACs (M), paper" not in md and "## What these rows can and cannot show\n\nRows cannot show X." in md
    run = tmp_path / "runs" / "r20"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(ROW))
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "results"), "--notes", "missing.md"])
    assert res.exit_code == 2 and "--notes 'missing.md' is not a file" in res.stderr
    assert not (tmp_path / "results").exists()
