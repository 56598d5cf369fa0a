# `rescomp compare`: every technique and chain against one baseline, Pareto fronts marked (issue 12).
# Wrong versions these tests must catch (each checked once by mutating the code, scripts/mutants.py):
#  1. a dominated point kept on the front (>= for >), or the front taken from the wrong end (the
#     costliest first) -> test_pareto_front_counted_by_hand
#  2. a chain misnamed: stages out of order, or int8 not seen after another stage
#       -> test_chains_are_read_from_folder_names; a stage's own command given a pruned network named by its
#     folder ("int8") instead of by its recorded input ("prune → int8") -> test_compare_end_to_end_from_a_chain
#  3. a run's step 0 (the network it started from) counted as one of its own points, the baseline not the
#     one asked for, or a network of another dataset set against it -> test_compare_end_to_end_from_a_chain
#  4. a separable network's points named as if it were the plain one -> test_a_separable_network_names_its_structure_first
#  5. --profile ignored (another profile's runs mixed in) -> test_compare_end_to_end_from_a_chain
#  6. a point keeping only its batch-1 latency, so the speed-ups and references its notes cite are in no
#     committed file (the results audit) -> test_compare_end_to_end_from_a_chain
#  7. an int8, magnitude-pruned, weight-shared or binarized network on the MACs front (each ties its input
#     network on cost, its MACs counted dense; noise picks), or a NaN cost on a front or hiding points there
#     (the plots audit) -> test_pareto_front_counted_by_hand
#  8. a committed comparison rendered again with another baseline, --profile ignored, or with the fronts of
#     the file kept rather than computed again; an int8 point drawn filled over its fp32 twin, or a NaN point
#     drawn -> test_compare_end_to_end_from_a_chain
#  9. the top-1 change taken the wrong way round (baseline minus point), or every cost's ratio taken from the
#     MACs -> test_each_point_is_set_against_the_baseline_by_hand

import json
import shutil

import pytest
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.compare import against, chain_of, pareto

from conftest import write_config


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pareto_front_counted_by_hand():
    pts = [{"top1": t, "macs": c} for c, t in [(1, 50), (2, 40), (3, 60), (4, 60), (5, 70), (None, 99)]]
    assert pareto(pts, "macs") == {0, 2, 4}  # (2, 40) and (4, 60) are beaten by cheaper points; no cost, no point
    assert pareto([{"top1": 50, "macs": 1}, {"top1": 55, "macs": 1}], "macs") == {1}  # equal cost: the better one
    # an int8 network has its fp32 network's MACs: on no MACs front (noise would pick between the twins),
    # but on the bytes front; a cost that is not a number is on no front and hides no point
    twins = [{"top1": 50.0, "macs": 10, "size_bytes": 40, "stage": "prune"},
             {"top1": 50.1, "macs": 10, "size_bytes": 10, "stage": "ptq"},
             {"top1": 60.0, "macs": float("nan"), "size_bytes": float("nan"), "stage": "prune"},
             {"top1": 55.0, "macs": 20, "size_bytes": 80, "stage": "train"}]
    assert pareto(twins, "macs") == {0, 3} and pareto(twins, "size_bytes") == {1, 3}
    # a latency that spreads over more than its value is on no latency front (as in the report's plots)
    timed = [{"top1": 50.0, "latency_ms_b1": 1.0, "latency_iqr_ms_b1": 5.0}, {"top1": 40.0, "latency_ms_b1": 2.0}]
    assert pareto(timed, "latency_ms_b1") == {1}
    # so for every network whose MACs are counted dense, as its input network's
    for stage in ("qat", "magnitude_prune", "weight_share", "binarize"):
        assert pareto([*twins, {"top1": 56.0, "macs": 20, "size_bytes": 5, "stage": stage}], "macs") == {0, 3}, stage


def test_each_point_is_set_against_the_baseline_by_hand():
    pts = [{"run": "base", "stage": "train", "dataset": "cifar10", "top1": 90.0, "macs": 100.0, "size_bytes": 400.0},
           {"run": "pruned", "stage": "prune", "dataset": "cifar10", "top1": 88.5, "macs": 50.0, "size_bytes": 100.0},
           {"run": "int8", "stage": "ptq", "dataset": "cifar10", "top1": 90.25, "macs": 100.0, "size_bytes": 120.0}]
    out = against(pts, None)
    assert [p["top1_delta"] for p in out] == [0.0, -1.5, 0.25]
    assert [(p["macs_ratio"], p["size_bytes_ratio"]) for p in out] == [(1.0, 1.0), (0.5, 0.25), (1.0, 0.3)]
    assert [p["baseline"] for p in out] == [True, False, False]


@pytest.mark.parametrize("folder, chain", [
    ("exp", "train"),
    ("exp-prune-paper-taylor-custom", "prune"),
    ("exp-prune-paper-mean_activation-custom-layerdrop-gate-k1-n1-ptq", "prune → layer-drop → int8"),
    ("exp-layerdrop-gate-k2-n10-prune-coupled-l1-custom", "layer-drop → prune"),
    ("resnet56-full-cpu-ptq-onnxruntime", "int8"),
    ("exp-prune-paper-taylor-custom-qat-pt2e", "prune → int8"),
    ("exp-prune-coupled-l1-custom-mprune-layer-60-share-8b5b", "prune → magnitude-prune → weight-share"),
])
def test_chains_are_read_from_folder_names(folder, chain):
    assert chain_of(folder) == chain


@pytest.mark.parametrize("scope", ["layer", "global", "std"])
def test_every_magnitude_prune_scope_is_read_from_its_folder_name(tiny, scope):
    # the folder names the stage itself makes (table-deep-compression's configs use scope std)
    from rescomp.config import validate
    from rescomp.runner import stage

    tiny["magnitude_prune"] = {"scope": scope}
    tiny["weight_share"] = {"conv_bits": 4, "fc_bits": 3}
    cfg = validate(tiny, "t")
    pruned = f"exp-{stage('magnitude_prune').suffix(cfg)}"
    assert chain_of(pruned) == "magnitude-prune"
    assert chain_of(f"{pruned}-{stage('weight_share').suffix(cfg)}") == "magnitude-prune → weight-share"


def test_a_separable_network_names_its_structure_first():
    spec = {"arch": "resnet56", "separable": {"mode": "depthwise", "include": ["layer*"]}}
    assert chain_of("exp-depthwise-ptq-onnxruntime", spec) == "depthwise separable → int8"
    assert chain_of("exp-depthwise", spec) == "depthwise separable"
    assert chain_of("exp-prune-paper-taylor-custom", {"arch": "resnet56"}) == "prune"


def test_a_network_belongs_to_the_run_that_holds_it_as_its_own(tmp_path):
    """Wrong version: the nearest folder above with a summary taken as the run that made a network, so a
    layer-drop run's scratch baseline, pruned, read as 'layer-drop → prune'."""
    from rescomp.rundir import run_of

    run = tmp_path / "runs/x"
    for f in ("summary.json", "model.pt", "step01/model.pt", "to30/step02/model.pt", "scratch-regular-20/model.pt"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("{}")
    assert [run_of(run / f) for f in ("model.pt", "step01/model.pt", "to30/step02/model.pt")] == [run] * 3
    assert run_of(run / "scratch-regular-20/model.pt") is None and run_of(tmp_path / "model.pt") is None


def test_compare_end_to_end_from_a_chain(workdir, tiny):
    tiny["model"] = {"arch": "cifar_resnet", "depth": 8, "width": 4}
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"batch_sizes": [1], "warmup": 1, "repeats": 2, "max_spread": None, "gpu_throughput": False}
    tiny["prune"] = {"share_per_step": 0.25, "steps": 1, "finetune_epochs": 1, "score_batches": 1}
    tiny["quantize"] = {"calibration_images": 16}
    tiny["pipeline"] = ["train", "prune", "quantize"]
    path = write_config(workdir, tiny)
    assert cli("run", path).exit_code == 0
    notes = workdir / "notes.md"
    notes.write_text("Prune removes what int8 cannot.")
    assert cli("compare", "runs", "--table", "cmp", "--profile", "cpu").exit_code == 2  # no run of that profile
    res = cli("compare", "runs", "--table", "cmp", "--profile", "paper", "--notes", notes)
    assert res.exit_code == 0, res.output
    md = (workdir / "results/cmp/compare.md").read_text()
    assert "Prune removes what int8 cannot." in md and "Commands that made these runs" in md
    pts = json.loads((workdir / "results/cmp/compare.json").read_text())
    assert [p["chain"] for p in pts] == ["train", "prune", "prune → int8"]  # no step 0 of the prune run
    base = next(p for p in pts if p["baseline"])
    assert base["run"] == "exp" and base["top1_delta"] == 0 and base["macs_ratio"] == 1
    assert pts[1]["macs_ratio"] < 1 and pts[1]["step"] == 1 and pts[2]["latency_runtime"] == "eager"
    assert all(p["latency_iqr_ms_b1"] == p["latency_iqr_ms_cpu_b1"] is not None for p in pts)  # the fastest's spread
    assert all(p["commit"] and p["config_hash"] and p["torch"] for p in pts)
    # every timing a run made comes with its point: the int8 speed-up and its fp32 reference (the notes cite them)
    assert pts[2]["speedup_cpu_b1"] > 0 and pts[2]["fp32_latency_ms_cpu_b1"] > 0 and pts[0]["latency_ms_cpu_b1"] > 0
    assert any(p.get("pareto_macs") for p in pts) and (workdir / "results/cmp/pareto.png").stat().st_size > 1000
    from rescomp.compare import plot_figure

    from rescomp.compare import markdown as compare_md

    noisy = [*pts, {**pts[1], "latency_iqr_ms_b1": 10 * pts[1]["latency_ms_b1"]}]
    assert "The latencies of rows 4 spread over more than their own value" in compare_md("cmp", noisy, None)
    assert "spread over more" not in compare_md("cmp", pts, None)
    fig = plot_figure("cmp", noisy)
    assert fig.axes[2].get_xlabel().endswith("\n1 left out: spread > latency") and len(fig.axes[2].get_lines()) == 3 + 2
    fig = plot_figure("cmp", [*pts, {**pts[1], "size_bytes": float("nan")}])
    macs_points = fig.axes[0].get_lines()[:4]  # one line per point, in order, then the front's
    assert [line.get_markerfacecolor() == "none" for line in macs_points] == [False, False, True, False]  # int8 hollow
    size_points = fig.axes[1].get_lines()[:3]
    assert [line.get_xdata()[0] for line in size_points] == [p["size_bytes"] / 1e3 for p in pts]  # the NaN one: not drawn
    assert fig.axes[1].get_lines()[3].get_marker() in ("None", "", None)  # the next line is the front, not a NaN point
    md = (workdir / "results/cmp/compare.md").read_text()
    assert "| 3 | prune → int8 |" in md and "◆" in md
    # a second trained network makes the baseline a choice to state
    assert cli("train", path, "--set", "name=other").exit_code == 0
    res = cli("compare", "runs", "--table", "cmp")
    assert res.exit_code == 2 and "2 trained networks" in res.stderr and "--baseline RUN" in res.stderr
    for given in ("other", "runs/other", "runs/other/"):  # the run, or its folder as a shell completes it
        res = cli("compare", "runs", "--table", "cmp", "--baseline", given)
        assert res.exit_code == 0, res.output
        assert next(p for p in json.loads((workdir / "results/cmp/compare.json").read_text()) if p["baseline"])["run"] == "other"
    # a committed comparison renders again from its compare.json alone, as it was made: its baseline (here
    # one of two trained networks), its fronts computed again, not read from the file
    res = cli("compare", "results/cmp", "--table", "cmp", "--out", "again")
    assert res.exit_code == 0, res.output
    for name in ("compare.md", "compare.json", "compare.csv"):
        assert (workdir / "again/cmp" / name).read_text() == (workdir / "results/cmp" / name).read_text(), name
    pts = json.loads((workdir / "results/cmp/compare.json").read_text())
    off = next(i for i, p in enumerate(pts) if not p.get("pareto_size_bytes"))
    pts[off]["pareto_size_bytes"] = True
    for p in pts:  # as made before points kept the spread of their fastest latency
        p.pop("latency_iqr_ms_b1")
    (workdir / "results/cmp/compare.json").write_text(json.dumps(pts))
    assert cli("compare", "results/cmp", "--table", "cmp", "--out", "again").exit_code == 0
    again = json.loads((workdir / "again/cmp/compare.json").read_text())
    assert not again[off].get("pareto_size_bytes")
    assert [p["latency_iqr_ms_b1"] for p in again] == [p["latency_iqr_ms_cpu_b1"] for p in pts]  # from its runtime's
    res = cli("compare", "results/cmp/compare.json", "--table", "cmp", "--out", "again", "--profile", "cpu")
    assert res.exit_code == 2 and "none of these runs was made with profile 'cpu'" in res.stderr, res.output
    assert cli("compare", "results/cmp/compare.json", "--table", "cmp", "--out", "again", "--profile", "paper").exit_code == 0
    (workdir / "broken").mkdir()
    (workdir / "broken/compare.json").write_text('[{"run": "exp"}]')
    res = cli("compare", "broken", "--table", "cmp", "--out", "again")
    assert res.exit_code == 2 and "is not a compare.json that `rescomp compare` wrote" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    # a stage's own command given a pruned network: its folder is named after the config alone (given-ptq),
    # and its chain was read from that as "int8"; its recorded input says pruned, then quantized
    step = "runs/exp-prune-paper-taylor-custom/step01/model.pt"
    assert cli("quantize", path, "--set", "name=given", "--set", f"quantize.checkpoint={step}").exit_code == 0
    assert cli("compare", "runs", "--table", "given", "--baseline", "exp").exit_code == 0
    chains = {p["run"]: p["chain"] for p in json.loads((workdir / "results/given/compare.json").read_text())}
    assert chains["given-ptq"] == chains["exp-prune-paper-taylor-custom-ptq"] == "prune → int8", chains
    shutil.copytree(workdir / "runs/given-ptq", workdir / "away/given-ptq")  # its input out of reach: by its name
    assert cli("compare", "runs/exp", "away", "--table", "away").exit_code == 0
    assert {p["run"]: p["chain"] for p in json.loads((workdir / "results/away/compare.json").read_text())}["given-ptq"] == "int8"
    # a network of another dataset is no point against this baseline: its top-1 is of other images
    assert cli("train", path, "--set", "name=c100", "--set", "data.synthetic.num_classes=100").exit_code == 0
    summary = json.loads((workdir / "runs/c100/summary.json").read_text())
    (workdir / "runs/c100/summary.json").write_text(json.dumps({**summary, "dataset": "cifar100"}))
    res = cli("compare", "runs", "--table", "mixed", "--baseline", "exp")
    assert res.exit_code == 2 and "c100 trained on another dataset than the baseline exp (synthetic)" in res.stderr, res.output
