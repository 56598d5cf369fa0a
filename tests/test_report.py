import csv
import io
import json
import re

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
    assert "| top-1 % |" in md and "| ResNet-20 | top-1 % | 88.50 | 91.25 | -2.75 |" in md
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
    # a run named on its own that has not finished is refused, not left out of the table without a word
    unfinished = tmp_path / "runs" / "r56"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: r56\n")
    with pytest.raises(ConfigError, match="'.*r56' is a run that has not finished .* run its command again"):
        find_runs(str(unfinished), tmp_path / "runs")
    assert find_runs(str(tmp_path / "runs"), tmp_path / "runs") == [run]  # a folder of runs: its finished ones
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
    assert "| ResNet-20 | MACs (M) at paper's input | 1,819.00 | 1,800.00 | +19.00 |" in md
    assert "| ResNet-20 | MACs (M) |" not in md and "## What these rows can and cannot show\n\nRows cannot show X." in md
    run = tmp_path / "runs" / "r20"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(ROW))
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "results"), "--notes", "missing.md"])
    assert res.exit_code == 2 and "--notes 'missing.md' not found; pass a Markdown file" in res.stderr
    assert not (tmp_path / "results").exists()


# Wrong versions: a run made from edited code stamped with the bare commit (the change hidden); a run
# stamped "-dirty" because a regenerated table or a table's notes (Markdown, read by no run) changed.
def test_the_commit_stamp_is_dirty_for_code_and_config_changes_only(tmp_path, monkeypatch):
    import subprocess

    from rescomp import provenance

    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,  # noqa: E731
                                    check=True, capture_output=True)
    for f in ("rescomp/x.py", "configs/a.yaml", "configs/notes.md", "results/t/table.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    monkeypatch.setattr(provenance, "REPO", tmp_path)

    def stamp() -> str:
        provenance.git_commit.cache_clear()
        return provenance.git_commit()

    clean = stamp()
    assert len(clean) == 12 and not clean.endswith("-dirty")
    for harmless in ("configs/notes.md", "results/t/table.md"):
        (tmp_path / harmless).write_text("1\n")
        assert stamp() == clean, harmless
    for code in ("rescomp/x.py", "configs/a.yaml"):
        (tmp_path / code).write_text("1\n")
        assert stamp() == clean + "-dirty", code
        git("checkout", "--", code)
    provenance.git_commit.cache_clear()


# -- tables and plots that stand alone (issue 15, point 6) --------------------------------------------
# Wrong versions: one table of every column (wider than a screen, mostly "–"); a column shown for rows
# it does not belong to (an int8 row's "ptq" in the epochs column, a prune column in the fp32 table);
# a plot without a title or without its data and budget; point labels that overprint; a legend entry
# for a series with no point; one line drawn through the points of several architectures; curves
# reordered by x (a latency that rises at a step hidden); a stale plot left from an earlier report.

def _prune_rows(arch: str, tops: list[float], lat: list[float | None]) -> list[dict]:
    return [{**ROW, "stage": "prune", "name": f"{arch}-prune", "arch": arch, "series": "taylor, paper",
             "row": f"{arch} taylor {5 * i}%", "share": 0.05 * i, "removed": 10 * i, "finetune_epochs_total": i or None,
             "top1": t, "macs": 4e7 - 1e6 * i, "latency_ms_cpu_b1": l, "paper": {}}
            for i, (t, l) in enumerate(zip(tops, lat))]


def _tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table: its header and body rows as lists of cells."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables, current = tables + [current], []
    return tables


def test_each_table_fits_a_screen_and_its_columns_belong_to_its_rows():
    from rescomp.report import MAX_COLUMNS

    int8 = {**ROW, "stage": "ptq", "row": "ResNet-20 int8", "epochs": None, "fp32_top1": 88.5, "top1": 88.0,
            "top1_drop": 0.5, "speedup_cpu_b1": 2.0, "paper": {"top1": 90.0}}
    rows = [ROW, int8, *_prune_rows("resnet20", [88.5, 88.0, 87.0], [1.5, 1.4, 1.3])]
    md = markdown("t", rows)
    tables = _tables(md)
    assert all(len(t[0]) <= MAX_COLUMNS for t in tables) and len(tables) >= 4
    for t in tables[:-1]:  # every column but the paper table's has a value in one of its rows at least
        assert t[0][0] == "row"
        for j, name in enumerate(t[0]):
            assert any(r[j] != "–" for r in t[1:]), name
    assert md.index("## Trained networks") < md.index("## int8 networks") < md.index("## Pruned networks")
    fp32 = md[md.index("## Trained networks"):md.index("## int8 networks")]
    assert "ptq" not in fp32 and "pruned %" not in fp32 and "speed-up" not in fp32
    int8_part = md[md.index("## int8 networks"):md.index("## Pruned networks")]
    assert "| method |" in int8_part and "| ResNet-20 int8 | ptq |" in int8_part and "| epochs |" not in int8_part
    assert "| ResNet-20 int8 | top-1 % | 88.00 | 90.00 | -2.00 |" in md
    assert "| fp32 top-1 % | top-1 drop |" in int8_part


def test_split_columns_packs_whole_groups_and_splits_only_an_oversized_one():
    from rescomp.report import split_columns

    keys = ["row", "epochs", "top1", "loss", "params", "macs", "size_bytes", "latency_ms_cpu_b1"]
    assert split_columns(keys, limit=11) == [keys]
    assert split_columns(keys, limit=5) == [["row", "epochs", "top1", "loss"],
                                            ["row", "params", "macs", "size_bytes", "latency_ms_cpu_b1"]]
    assert split_columns(keys, limit=4) == [["row", "epochs", "top1", "loss"], ["row", "params", "macs", "size_bytes"],
                                            ["row", "latency_ms_cpu_b1"]]
    wide = ["row"] + [f"latency_ms_cpu_b{b}" for b in range(7)]
    assert split_columns(wide, limit=4) == [["row", *wide[1:4]], ["row", *wide[4:7]], ["row", wide[7]]]


def test_a_plot_has_a_title_its_data_and_budget_and_one_legend_entry_per_curve_with_points():
    from rescomp.plots import COST_PANELS, curves_figure

    rows = [*_prune_rows("alexnet", [17.0, 18.0, 19.0], [9.0, 9.5, 8.0]),
            *_prune_rows("resnet18", [30.0, 31.0, 32.0], [None, None, None]),
            {**ROW, "row": "no points", "macs": None, "latency_ms_cpu_b1": None},
            {**ROW, "row": "ResNet-20", "train_images": 8000, "test_images": 2000, "profile": "cpu"}]
    for r in rows:
        r.setdefault("train_images", 8000), r.setdefault("test_images", 2000)
    fig = curves_figure(rows, COST_PANELS, "t: top-1 against MACs and CPU latency", latency=True)
    title = fig._suptitle.get_text()
    assert title.startswith("t: top-1 against MACs and CPU latency\n")
    assert "cifar10 (8,000 training / 2,000 test images), profile cpu" in title
    assert "epochs 3" in title and "fine-tune epochs 1–2" in title and "seed 0" in title and "latency on cpu:x" in title
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["alexnet: taylor, paper", "resnet18: taylor, paper", "ResNet-20"]  # "no points": none
    macs_ax, lat_ax = fig.axes
    lines = {line.get_label(): line for line in macs_ax.get_lines()}
    assert len(macs_ax.get_lines()) == 3 and not macs_ax.texts and not lat_ax.texts  # no labels on points
    alex = [line for line in lat_ax.get_lines() if list(line.get_ydata()) == [17.0, 18.0, 19.0]]
    assert len(alex) == 1 and list(alex[0].get_xdata()) == [9.0, 9.5, 8.0]  # the rows' order: the rise shows
    assert len(lat_ax.get_lines()) == 2  # resnet18 has no latency: no line there
    assert lines  # the MACs panel has every curve
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.legends[0].get_texts()] + [fig._suptitle.get_window_extent()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


# Wrong versions (the plots audit): one latency panel of PyTorch eager labelled "CPU latency" that drops
# the rows timed on another runtime without a word; a latency whose spread exceeds it setting the axis;
# latency points joined into a trend; two runs that share a series name (or a row label) drawn as one
# line, or their rows averaged as if they were seeds of one experiment; the separate prunes of a target
# plan drawn as a path without saying so; a NaN drawn; latencies of separate processes set side by side
# in a plot without the caveat its table.md gives.
def test_latency_panels_are_per_runtime_and_say_which_rows_they_leave_out():
    from rescomp.plots import COST_PANELS, curves_figure

    rows = [*_prune_rows("alexnet", [17.0, 18.0, 19.0], [9.0, 9.5, 8.0]),
            {**ROW, "row": "noisy", "latency_ms_cpu_b1": 7.0, "latency_iqr_ms_cpu_b1": 20.0},
            {**ROW, "row": "int8 ONNX Runtime", "stage": "ptq", "latency_ms_cpu_b1": None, "latency_ms_ort_b1": 3.0},
            {**ROW, "row": "int8 PT2E", "stage": "ptq", "latency_ms_cpu_b1": None, "latency_ms_ind_b1": 4.0},
            {**ROW, "row": "nan", "top1": float("nan"), "macs": 1e6}]
    fig = curves_figure(rows, COST_PANELS, "t", latency=True)
    macs_ax, eager_ax, ort_ax, ind_ax = fig.axes
    assert macs_ax.get_xlabel() == "MACs (M)\n6 of 7 rows"  # the NaN top-1 is on no panel, and counted
    assert eager_ax.get_xlabel() == "PyTorch CPU latency, batch 1 (ms)\n3 of 7 rows; 1 left out: spread > latency"
    assert ort_ax.get_xlabel() == "ONNX Runtime CPU latency, batch 1 (ms)\n1 of 7 rows"
    assert ind_ax.get_xlabel() == "Inductor CPU latency, batch 1 (ms)\n1 of 7 rows"
    assert sorted(x for line in eager_ax.get_lines() for x in line.get_xdata()) == [8.0, 9.0, 9.5]
    assert [list(line.get_xdata()) for line in ort_ax.get_lines()] == [[3.0]]
    assert all(line.get_linestyle() == "None" for ax in (eager_ax, ort_ax) for line in ax.get_lines())
    assert any(line.get_linestyle() == "-" for line in macs_ax.get_lines())  # a path of steps is a path
    assert "a curve joins" not in fig._suptitle.get_text()
    caveat = "each run timed in its own process, minutes apart: two runs' latencies differ by the machine's drift too"
    assert caveat in fig._suptitle.get_text()
    one_run = [{**r, "name": "exp"} for r in rows]
    assert "own process" not in curves_figure(one_run, COST_PANELS, "t", latency=True)._suptitle.get_text()
    # every latency of a runtime left out: its panel stays, empty, and says why
    fig = curves_figure([{**r, "latency_iqr_ms_cpu_b1": 50.0} for r in rows[:4]], COST_PANELS, "t", latency=True)
    assert fig.axes[1].get_xlabel() == "PyTorch CPU latency, batch 1 (ms)\n0 of 4 rows; 4 left out: spread > latency"
    # runs timed in two sessions: latencies of two sessions do not compare, and those of one are separate processes too
    other = [{**r, "device": "cpu:y"} for r in rows[3:5]]
    text = curves_figure(rows[:3] + other, COST_PANELS, "t", latency=True)._suptitle.get_text()
    assert "timed in 2 sessions (marked in table.md): latencies of two do not compare, and " + caveat in text
    plan = [{"target": 0.1, "shares": [0.05, 0.1]}, {"target": 0.3, "shares": [0.15, 0.3]}]
    fig = curves_figure([{**r, "plan": plan} for r in rows[:3]], COST_PANELS, "t")
    assert "each target share is pruned on its own from the network the run starts from" in fig._suptitle.get_text()
    fig = curves_figure([{**r, "plan": plan[:1]} for r in rows[:3]], COST_PANELS, "t")  # one target: one path
    assert "on its own" not in fig._suptitle.get_text()


def test_two_runs_that_share_a_label_are_never_one_row_or_one_curve():
    from rescomp.plots import curves_of
    from rescomp.report import aggregate_seeds

    a = _prune_rows("alexnet", [17.0, 18.0], [None, None])
    a1 = [{**r, "name": "alexnet-seed1-prune", "seed": 1, "top1": r["top1"] + 2} for r in a]  # seed 1 of that run
    b = [{**r, "name": "alexnet-shortcut-a-prune", "top1": r["top1"] - 10} for r in a]  # another run, same labels
    b1 = [{**r, "name": "alexnet-shortcut-a-seed1-prune", "seed": 1} for r in b]
    rows = aggregate_seeds(a + a1 + b + b1)
    assert [(r["row"], r["top1"], r.get("seeds")) for r in rows] == [
        ("alexnet taylor 0%", 18.0, 2), ("alexnet taylor 5%", 19.0, 2), ("alexnet taylor 0%", 7.0, 2),
        ("alexnet taylor 5%", 8.0, 2)]
    curves = curves_of(rows)
    assert {k: [r["top1"] for r in v] for k, v in curves.items()} == {
        "taylor, paper (alexnet-prune)": [18.0, 19.0], "taylor, paper (alexnet-shortcut-a-prune)": [7.0, 8.0]}
    assert list(curves_of(aggregate_seeds(a + a1))) == ["taylor, paper"]  # one run: its series' name alone
    # ... nor two rows of one name in the table: each says its run (seeds of one run keep one label)
    from rescomp.report import expand

    labels = [r["row"] for r in expand([{"name": r["name"], "stage": "prune", "rows": [r]} for r in a + a1 + b])]
    assert labels == ["alexnet taylor 0% (alexnet-prune)", "alexnet taylor 5% (alexnet-prune)"] * 2 + [
        "alexnet taylor 0% (alexnet-shortcut-a-prune)", "alexnet taylor 5% (alexnet-shortcut-a-prune)"]
    assert [r["row"] for r in expand([{"name": r["name"], "stage": "prune", "rows": [r]} for r in a + a1])] == [
        "alexnet taylor 0%", "alexnet taylor 5%"] * 2


def test_a_plot_these_rows_do_not_make_is_removed(tmp_path):
    rows = _prune_rows("alexnet", [17.0, 18.0], [9.0, 8.0])
    out = write_table("t", rows, tmp_path)
    assert (out / "accuracy_vs_share.png").is_file()
    out = write_table("t", [{**ROW, "latency_ms_cpu_b1": None, "macs": None}], tmp_path)
    assert not list(out.glob("*.png"))


# Wrong versions: the population standard deviation instead of the sample's; rows of different
# experiments (other label or stage) averaged together; a one-seed row given a spread; speed-ups and
# latencies of separate processes averaged arithmetically (2x and 0.5x make 1.25x), the first seed's
# noise flag and fastest runtime kept.
def test_seeds_of_one_row_become_its_mean_and_sample_sd():
    from rescomp.report import aggregate_seeds

    runs = [{**ROW, "seed": s, "top1": t, "params": 100} for s, t in ((0, 80.0), (1, 82.0), (2, 84.0))]
    other = {**ROW, "row": "other", "seed": 0, "top1": 50.0}
    int8 = {**ROW, "stage": "ptq", "seed": 0, "top1": 70.0}
    out = aggregate_seeds([*runs, other, int8])
    assert len(out) == 3
    row = out[0]
    assert row["top1"] == pytest.approx(82.0) and row["top1_std"] == pytest.approx(2.0) and row["seeds"] == 3
    assert row["params"] == 100 and row["seed"] == "0, 1, 2"
    assert out[1] == other and out[2] == int8 and "top1_std" not in other
    # timings and speed-ups, taken in separate processes, meet on their ratio scale: the geometric mean;
    # a speed-up within the noise in any seed is; the fastest runtime is read again from the merged times
    timed = [{**int8, "seed": s, "speedup_cpu_b1": x, "speedup_within_noise_cpu_b1": n, "latency_ms_cpu_b1": c,
              "latency_ms_ort_b1": o, "latency_iqr_ms_cpu_b1": q, "fastest_runtime_b1": f}
             for s, x, n, c, o, q, f in ((0, 2.0, False, 1.0, 2.0, 0.1, "eager"), (1, 0.5, True, 4.0, 1.5, 0.3, "onnxruntime"))]
    row = aggregate_seeds(timed)[0]
    assert row["speedup_cpu_b1"] == pytest.approx(1.0) and row["speedup_within_noise_cpu_b1"] is True
    assert row["latency_ms_cpu_b1"] == pytest.approx(2.0) and row["latency_ms_ort_b1"] == pytest.approx(3 ** 0.5)
    assert row["fastest_runtime_b1"] == "onnxruntime" and row["latency_iqr_ms_cpu_b1"] == 0.3
    timed[1].pop("latency_ms_ort_b1")  # ONNX Runtime timed in one seed only: no merged figure, not the fastest
    row = aggregate_seeds(timed)[0]
    assert row["latency_ms_ort_b1"] is None and row["fastest_runtime_b1"] == "eager"


def test_onnxruntime_latency_is_a_column_beside_eager_with_the_fastest_named():
    row = {**ROW, "latency_ms_ort_b1": 0.5, "latency_iqr_ms_ort_b1": 0.2, "latency_iqr_ms_cpu_b1": 0.4,
           "fastest_runtime_b1": "onnxruntime"}
    md = markdown("t", [row])
    speed = next(t for t in _tables(md) if "PyTorch ms b1" in t[0])
    cells = dict(zip(speed[0], speed[1]))
    assert cells["PyTorch ms b1"] == "1.50 ±0.20" and cells["ONNX Runtime ms b1"] == "0.50 ±0.10"
    assert cells["fastest b1"] == "onnxruntime"
    assert "latency_ms_ort_b1" in to_csv([row]).splitlines()[0]


def test_storage_curves_follow_each_chain_in_order_on_a_log_axis():
    from rescomp.plots import curves_figure, storage_curves

    rows = [{"row": f"net {k}% ({c})", "storage_curve": f"net ({c})", "stored_bytes": b, "top1": t}
            for c, steps in (("std", [(0, 4000, 70), (50, 2000, 69), (90, 400, 60)]), ("global", [(90, 450, 66)]))
            for k, b, t in steps]
    rows.append({"row": "another network", "stored_bytes": 100, "top1": 50})  # not in a storage chain
    curves = storage_curves(rows)
    assert {k: [r["stored_bytes"] for r in v] for k, v in curves.items()} == {"net (std)": [4000, 2000, 400],
                                                                             "net (global)": [450]}
    fig = curves_figure(rows, [("stored_bytes", "kB", 1e-3, True)], "t", curves=curves, log_x=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()
    assert [list(line.get_xdata()) for line in ax.lines] == [[4.0, 2.0, 0.4], [0.45]]


def test_an_int8_rows_layer_count_reads_k_of_n_and_both_stay_in_the_csv():
    row = {**ROW, "stage": "ptq", "int8_layers": 7, "weight_layers": 8}
    table = next(t for t in _tables(markdown("t", [row])) if "int8 layers" in t[0])
    assert dict(zip(table[0], table[1]))["int8 layers"] == "7 of 8"
    assert not any("weight_layers" in h for t in _tables(markdown("t", [row])) for h in t[0])
    csv_row = next(csv.DictReader(io.StringIO(to_csv([row]))))
    assert (csv_row["int8_layers"], csv_row["weight_layers"]) == ("7", "8")


# Committed tables say what they hold (the results audit). Wrong versions these tests catch:
#  - latencies timed in different runs (another thread count, another session's machine) in one column
#    with nothing to tell them apart -> test_latencies_timed_in_several_runs_are_marked_by_run
#  - a footnote describing columns the table does not have (compression, speed-ups), or a latency
#    footnote missing where it has them -> test_the_footnote_speaks_only_of_the_columns_there
#  - the arch column dropping the model's arguments (resnet56 option A and B alike)
#       -> test_the_arch_column_names_the_models_arguments
#  - a comparison with the paper printed where ours was not measured -> same test
#  - a committed table rendered again from its table.json losing a run's section, a gates plot, or a row's
#    provenance; a table.json that is not one ending in a traceback
#       -> test_a_committed_table_renders_again_from_its_json_alone
def test_latencies_timed_in_several_runs_are_marked_by_run():
    from rescomp.plots import caption

    a = {**ROW, "row": "fp32", "device": "cpu:x (1 threads)", "commit": "111"}
    b = {**ROW, "row": "int8", "stage": "ptq", "device": "cpu:x (2 threads)", "commit": "222", "speedup_cpu_b1": 1.2}
    c = {**b, "row": "int8 again"}
    md = markdown("t", [a, b, c])
    cells = {t[1][0]: dict(zip(t[0], t[1])) for t in _tables(md) if "PyTorch ms b1" in t[0]}
    assert cells["fp32"]["PyTorch ms b1"] == "1.50 [a]" and cells["int8"]["PyTorch ms b1"] == "1.50 [b]"
    assert cells["int8"]["speed-up b1"] == "1.20"  # timed side by side: no mark
    assert "marked [a] to [b] by the device (threads included) and commit" in " ".join(md.split())
    assert "- [a] cpu:x (1 threads), commit 111" in md and "- [b] cpu:x (2 threads), commit 222" in md
    assert "timed in 2 sessions" in caption([a, b, c], latency=True)
    one = markdown("t", [b, c])
    assert "[a]" not in one and "marked [a]" not in " ".join(one.split())
    assert "[a]" not in markdown("t", [a, {**ROW, "row": "no latency", "latency_ms_cpu_b1": None,
                                          "latency_ms_cpu_b64": None, "commit": "999"}])
    # the threads a row's latencies were pinned to (latency_device), not those it trained with, name its run
    d = {**a, "row": "trained on 1, timed on 2", "latency_device": "cpu:x (2 threads)", "commit": "222"}
    g = {**a, "row": "trained on a GPU", "device": "cuda:H100", "latency_device": "cpu:x (1 threads)"}
    md = markdown("t", [a, b, d, g])
    marked = {line.split(" | ")[0][2:]: re.search(r"\[[a-z]\]", line)[0] for line in md.splitlines()
              if line.startswith("| ") and re.search(r"\[[a-z]\] \|", line)}
    assert marked == {"fp32": "[a]", "int8": "[b]", "trained on 1, timed on 2": "[b]", "trained on a GPU": "[a]"}
    assert [line for line in md.splitlines() if line.startswith("- [")] == [
        "- [a] cpu:x (1 threads), commit 111", "- [b] cpu:x (2 threads), commit 222"]  # the GPU timed none of them
    assert "latency on cpu:x (1 threads); cpu:x (2 threads); timed in 2 sessions" in caption([a, d, g], True)


def test_the_footnote_speaks_only_of_the_columns_there():
    md = markdown("t", [{**ROW, "latency_ms_cpu_b1": None, "latency_ms_cpu_b64": None}])
    assert "MACs are multiply-accumulates" in md and "plus two per element for BatchNorm" in " ".join(md.split())
    assert "latencies" not in md and "compression is" not in md and "speed-up is" not in md
    assert "int8 row's params and MACs" not in " ".join(md.split())
    md = " ".join(markdown("t", [{**ROW, "stage": "ptq", "speedup_cpu_b1": 1.2, "compression": 0.3}]).split())
    assert "ms are CPU latencies" in md and "compression is size" in md and "(median ± half the interquartile range) overlap" in md
    # the (noise) flag compares with the reference timed in the same process, which the table does not show
    assert "the reference's latency from that process is in table.json, not in this table" in md
    assert "an int8 row's params and MACs are those of the fp32 network it quantizes" in md
    assert "separate processes" not in md  # one run's rows
    two = " ".join(markdown("t", [ROW, {**ROW, "name": "other", "row": "other"}]).split())
    assert "[a]" not in two and "timed on one device at one commit, but in separate processes" in two


def test_the_arch_column_names_the_models_arguments():
    from rescomp.report import arch_label

    assert arch_label({"arch": {"arch": "resnet56", "num_classes": 10, "shortcut": "B"}}) == "resnet56 (shortcut B)"
    assert arch_label({"arch": "resnet56_bottleneck", "start_arch": {
        "arch": "resnet56_bottleneck", "num_classes": 10, "width": 8, "gates": {"init": [-1, 1]}, "deleted": [3]}}) \
        == "resnet56_bottleneck (width 8, gates(init=[-1, 1]))"  # a later stage's row: the spec it started from, not its surgery
    assert arch_label({"arch": {"arch": "resnet56", "separable": {"mode": "depthwise"}, "depth": 0}}) \
        == "resnet56 (separable(mode=depthwise), depth 0)"  # Spatial and Depthwise told apart; a 0 is an argument
    assert arch_label({"arch": {"arch": "resnet20", "num_classes": 10, "pretrained": None}}) == "resnet20"
    assert arch_label({"arch": "alexnet"}) == "alexnet"
    md = markdown("t", [{**ROW, "paper": {"top1": 91.25, "compression": 0.26}}])
    assert "| ResNet-20 | top-1 % |" in md and "| compression |" not in md  # ours not measured: no comparison


def test_a_committed_table_renders_again_from_its_json_alone(tmp_path):
    from typer.testing import CliRunner

    from rescomp.cli import app

    layer_drop = {**ROW, "name": "ld", "stage": "layerdrop", "rows": [{"row": "k=1: 56 layers", "top1": 80.0, "step": 0}],
                  "sections": [{"title": "Cost of the smallest lossless network", "markdown": "| a |\n|---|\n| 1 |"}],
                  "full_stats": {"gates": {"u1": 0.5, "u2": -0.7}, "output_norm": {"u1": 1.0, "u2": 2.0}}}
    from rescomp.report import expand

    summaries = [ROW, layer_drop]
    out = write_table("t", expand(summaries), tmp_path / "results", summaries=summaries, notes="Notes.")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "gates.png" in before and "## Cost of the smallest lossless network" in before["table.md"].decode()
    cli = lambda *a: CliRunner().invoke(app, ["report", *map(str, a)])  # noqa: E731
    res = cli(out, "--out", tmp_path / "results", "--notes", _notes(tmp_path))
    assert res.exit_code == 0, res.output
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["table.md"] == before["table.md"] and after["table.json"] == before["table.json"]
    assert after["table.csv"] == before["table.csv"] and "gates.png" in after
    # a table.json from before sections were kept in it: its table.md's sections and its gates plot stay
    data = json.loads(after["table.json"])
    (out / "table.json").write_text(json.dumps({"table": data["table"], "rows": data["rows"]}))
    assert cli(out / "table.json", "--out", tmp_path / "results", "--notes", _notes(tmp_path)).exit_code == 0
    assert (out / "table.md").read_bytes() == before["table.md"] and (out / "gates.png").is_file()
    assert json.loads((out / "table.json").read_text())["sections"] == data["sections"]
    assert cli(out, "--out", tmp_path / "results", "--notes", _notes(tmp_path)).exit_code == 0  # and again
    assert (out / "gates.png").is_file() and (out / "table.md").read_bytes() == before["table.md"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as m:  # from another folder, without --out: in place
        m.chdir(elsewhere)
        assert cli(out, "--notes", _notes(tmp_path)).exit_code == 0
    assert not (elsewhere / "results").exists() and (out / "table.md").read_bytes() == before["table.md"]
    import shutil  # a renamed copy renders in place, as itself, and leaves the table it was copied from alone

    copy = tmp_path / "copies" / "old-t"
    shutil.copytree(out, copy)
    stamp = (out / "table.md").stat().st_mtime_ns
    assert cli(copy, "--notes", _notes(tmp_path)).exit_code == 0
    assert (copy / "table.md").read_text().startswith("# old-t") and (out / "table.md").stat().st_mtime_ns == stamp
    (out / "table.json").write_text("[1, 2]")
    res = cli(out)
    assert res.exit_code == 2 and "is not a table.json that `rescomp report` wrote" in res.stderr
    res = cli(out, tmp_path / "runs")
    assert res.exit_code == 2 and "render it again alone" in res.stderr


def _notes(tmp_path):
    (tmp_path / "notes.md").write_text("Notes.")
    return tmp_path / "notes.md"


@pytest.mark.parametrize("content", ["[]", "{}", json.dumps({**ROW, "top1": "abc"}), json.dumps({**ROW, "rows": [3]}),
                                     b"\xff\xfe\x00binary"], ids=["list", "empty", "text-top1", "bad-rows", "binary"])
def test_a_summary_that_is_not_one_is_one_line_and_writes_nothing(workdir, content):
    """A summary.json that is valid JSON of another shape, or not UTF-8: report and compare crashed
    (AttributeError, KeyError 'name', UnicodeDecodeError) or wrote a table of dashes. Now one line naming
    the file, exit 2, no table; `rescomp runs` lists it as broken beside the others."""
    from typer.testing import CliRunner

    from rescomp.cli import app

    good, bad = workdir / "runs" / "r20", workdir / "runs" / "bad"
    good.mkdir(parents=True), bad.mkdir()
    (good / "summary.json").write_text(json.dumps(ROW))
    (bad / "summary.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    for args in (["report", "runs", "--table", "t"], ["report", "demo"], ["compare", "runs", "--table", "c"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
        assert re.search(r"runs/bad/summary\.json (is unreadable|is not a rescomp run summary)", res.stderr), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (workdir / "results").exists()
    res = CliRunner().invoke(app, ["runs", "runs"])
    assert res.exit_code == 0 and "broken:" in res.stdout and "r20" in res.stdout, res.output


def test_a_table_file_in_the_way_leaves_the_old_table_whole(workdir):
    """results/t/table.csv made a folder: report wrote table.md anew, then failed on the CSV naming a
    temporary file, leaving a table half new, half old. Now every file is checked before the first is
    written: one line naming the path, exit 2, the old table.md untouched. An export onto a folder names
    the folder, not a temporary file."""
    from typer.testing import CliRunner

    from rescomp.cli import app

    run = workdir / "runs" / "r20"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(ROW))
    table = workdir / "results" / "t"
    (table / "table.csv").mkdir(parents=True)
    (table / "table.md").write_text("old")
    res = CliRunner().invoke(app, ["report", "runs/r20", "--table", "t"])
    assert res.exit_code == 2 and "'results/t/table.csv' is in the way: it is a folder" in res.stderr, res.output
    assert (table / "table.md").read_text() == "old" and not (table / "table.json").exists()
    assert not [p for p in table.iterdir() if p.name.startswith(".")]  # no temporary file left
    from rescomp.checkpoint import atomic_write_text

    (workdir / "isdir.onnx").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(workdir / "isdir.onnx", "x")
    assert e.value.filename == str(workdir / "isdir.onnx") and not list(workdir.glob(".isdir.onnx.*"))
