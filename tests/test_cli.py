"""The CLI end to end: the smoke config, and every kind of bad input (exit 2, one line, nothing written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rescomp.cli import app

from conftest import write_config

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_smoke_config_trains_measures_and_reports(workdir):
    # the config's project is this checkout, so its runs would go to the checkout's runs/; a path given
    # with --set is typed from the shell's folder: this test's folder
    res = cli("train", REPO / "configs/smoke/tiny.yaml", "--set", "train.epochs=1", "--set", "out_dir=runs")
    assert res.exit_code == 0, res.output
    summary = json.loads((workdir / "runs/tiny/summary.json").read_text())
    assert summary["params"] == 5006 and summary["epochs"] == 1
    for key in ("config_hash", "seed", "commit", "torch", "device", "hardware", "wall_seconds", "command",
                "latency_ms_cpu_b1"):
        assert key in summary
    assert "isa" in summary["hardware"]["cpu"] and "threads" in summary["device"]
    assert {p.name for p in (workdir / "runs/tiny").iterdir()} == {
        ".lock", "checkpoints", "config.yaml", "metrics.jsonl", "model.pt", "summary.json"}

    res = cli("measure", workdir / "runs/tiny/model.pt", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["params"] == 5006

    res = cli("report", "smoke")
    assert res.exit_code == 0, res.output
    assert "| tiny |" in (workdir / "results/smoke/table.md").read_text()


def test_models_lists_the_registry_with_counts():
    res = cli("models")
    assert res.exit_code == 0
    assert "resnet56" in res.stdout and "853,018" in res.stdout and "densenet121" in res.stdout


def test_measure_a_config_without_training(workdir, tiny):
    res = cli("measure", write_config(workdir, tiny), "--json", "--set", "measure.latency=false")
    assert res.exit_code == 0, res.output
    # convs + fc by hand: 3*4*9*32^2 + 2*4*4*9*32^2 + (4*8 + 8*8)*9*16^2 + (8*16 + 16*16)*9*8^2 + 16*10
    convs_fc = 110_592 + 294_912 + 221_184 + 221_184 + 160
    bn_elements = 3 * 4 * 32**2 + 2 * 8 * 16**2 + 2 * 16 * 8**2  # fvcore: 2 per element at inference
    assert json.loads(res.stdout)["macs"] == convs_fc + 2 * bn_elements + 16 * 8**2  # + the average pool


def _corrupt_checkpoint(workdir: Path) -> Path:
    p = workdir / "bad.pt"
    p.write_bytes(b"\x00" * 100)
    return p


BAD_INPUTS = [
    (["--set", "train.epoch=3"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["--set", "train.batch_size=lots"], "train.batch_size: Input should be a valid integer"),
    (["--set", "model.arch=resnet57"], "unknown model 'resnet57' (did you mean 'resnet56'?)"),
    (["--set", "data.dataset=cifar10", "--set", "data.path=/nonexistent/cifar.tar.gz"], "does not exist"),
    (["--set", "device=cuda"], "has no CUDA GPU"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_train_input_exits_2_and_writes_nothing(workdir, tiny, args, message):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = cli("train", write_config(workdir, tiny), *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert not (workdir / "runs").exists()


def test_other_bad_inputs(workdir, tiny):
    res = cli("train", workdir / "missing.yaml")
    assert res.exit_code == 2 and "config file" in res.stderr and "not found" in res.stderr
    res = cli("measure", _corrupt_checkpoint(workdir))
    assert res.exit_code == 2 and "truncated or corrupt" in res.stderr
    res = cli("report", "no-such-table")
    assert res.exit_code == 2 and "neither a run folder nor a table" in res.stderr
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("args, line", [
    (["train"], "error: rescomp train: Missing argument 'config'; see 'rescomp train --help'"),
    (["train", "x.yaml", "--bogus"], "error: rescomp train: No such option: --bogus; see 'rescomp train --help'"),
    (["train", "x.yaml", "y.yaml"], "error: rescomp train: Got unexpected extra argument(s) (y.yaml); see 'rescomp "
                                    "train --help'"),
    (["nosuch"], "error: rescomp: No such command 'nosuch'; see 'rescomp --help'"),
    # a config key taken for an option: click suggested --nproc for --epochs, --help for --lr
    (["train", "x.yaml", "--epochs", "3"], "error: rescomp train: no option '--epochs'; config keys are set with --set: "
     "--set train.epochs=<value> or --set quantize.qat.epochs=<value> or --set layer_drop.baselines.epochs=<value>; "
     "see 'rescomp train --help'"),
    (["prune", "x.yaml", "--batch-size=8"], "error: rescomp prune: no option '--batch-size'; config keys are set with "
     "--set: --set train.batch_size=<value> or --set layer_drop.timing.batch_size=<value>; see 'rescomp prune --help'"),
    (["report", "runs", "--epochs", "3"], "error: rescomp report: No such option: --epochs; see 'rescomp report --help'"),
])
def test_words_the_parser_refuses_are_one_line_naming_the_command(workdir, args, line):
    # wrong versions: click's usage, hint and "Error:" lines (four for one mistake); the exit code 0 or 1
    res = cli(*args)
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [line] and not res.stdout
    res = cli()  # a bare `rescomp` still shows the help
    assert res.exit_code == 2 and res.output.startswith("Usage: ") and "\nCommands:\n" in res.output


def test_a_changed_config_does_not_clobber_a_run(workdir, tiny):
    path = write_config(workdir, {**tiny, "measure": {"latency": False}})
    assert cli("train", path).exit_code == 0
    res = cli("train", path, "--set", "train.epochs=1")
    assert res.exit_code == 2 and "holds a run with other settings: train.epochs (2 -> 1)" in res.stderr
    assert cli("train", path, "--set", "train.epochs=1", "--fresh").exit_code == 0
    assert json.loads((workdir / "runs/exp/summary.json").read_text())["epochs"] == 1


def test_real_process_prints_one_line_and_no_traceback(workdir, tiny):
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rescomp.cli", "train", str(write_config(workdir, tiny)),
                           "--set", "train.optimizer.lr=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {workdir / 'exp.yaml'}: train.optimizer.lr: Input should be greater than 0 (got -1)"]


def test_diverging_run_exits_1_and_keeps_its_checkpoint(workdir, tiny):
    res = cli("train", write_config(workdir, tiny), "--set", "train.optimizer.lr=1e12")
    assert res.exit_code == 1 and "loss became nan" in res.stderr
    assert "before its first checkpoint" in res.stderr and "checkpoint was kept" not in res.stderr  # none was made
    assert not (workdir / "runs/exp/summary.json").exists()
