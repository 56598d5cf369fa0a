# A researcher's workflow as a user hits it (issue 15): the command, its exit code, what is left on disk.
# Wrong versions these tests must catch; each was checked by mutating the code that way, running this
# file, and reverting.
#  1. a later stage compares configs without its own section (the old `cfg.hash("prune-...")`, which
#     left `prune` out), so a changed setting returns the old result with exit 0
#       -> test_a_changed_stage_setting_is_refused_naming_the_key
#  2. the refusal does not say which keys differ -> every test that matches "(old -> new)"
#  3. a finished run whose measure or report settings changed is returned as it was
#       -> test_a_changed_stage_setting_is_refused_naming_the_key[measure]
#  4. --fresh deletes the finished run before the model's arguments are checked
#       -> test_fresh_with_a_bad_model_argument_keeps_the_finished_run
#  5. model arguments the builder accepts but the network cannot run with (width 0) end in a traceback
#       -> test_a_model_that_cannot_run_is_one_line_and_leaves_nothing
#  6. a run that fails before its first checkpoint leaves a folder holding only its config, which the
#     corrected command then refuses as "other settings"
#       -> test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder,
#          test_a_folder_with_nothing_to_resume_is_taken_over
#     ... also when SIGTERM (kill, timeout, a scheduler) ends it, which ran no cleanup at all
#  7. a failed run removes a folder that holds checkpoints to resume from
#       -> test_a_run_that_fails_after_a_checkpoint_keeps_it
#  8. a run name or table that is a path ('.', '..', 'a/b'): with name '.' a run wrote into runs/ itself
#     and --fresh then emptied every run there; '--table ../x' wrote outside results/
#       -> test_a_name_or_table_that_is_not_one_folder_is_refused_and_writes_nothing,
#          test_a_folder_that_holds_other_runs_is_never_a_run_folder
# 10. a file that is not UTF-8 text (a model.pt given as the config, Latin-1 notes, a binary jobs file)
#     ends in a UnicodeDecodeError traceback; an empty config runs every default (hours of ResNet-20)
#       -> test_a_file_that_is_not_a_text_config_is_one_line
# 11. --dry-run ("a dry run that passes means the command will start") passing what the command refuses:
#     a stage checkpoint or distillation teacher that is missing or corrupt, quantize without a trained
#     model, a folder of other settings, --nproc beyond the machine
#       -> test_dry_run_refuses_what_the_command_would, test_dry_run_checks_everything_...
# 12. an output path that cannot be written (a file where a folder should be, a read-only folder, a full
#     disk) ends in a traceback, after the work, or (export) blames the network
#       -> test_an_output_that_cannot_be_written_is_one_line_before_any_work,
#          test_a_full_disk_mid_run_is_one_line_and_other_os_errors_stay_tracebacks
# 13. a result made from a file that has been re-made since (the same path, other bytes: a model.pt
#     retrained with --fresh, a teacher replaced) returned as complete, resumed, or reported; a finished
#     run whose input is gone refused (it stands), an unfinished one resumed without it
#     ... or refused where the network is the same (saved again with other metrics), or looked up from the
#     shell's folder instead of the run's (report run elsewhere passed stale rows), or a folder with
#     nothing to resume refused instead of taken over; a run made under a stage's earlier rules returned
#       -> test_a_run_made_from_a_file_since_re_made_is_not_reused_resumed_or_reported,
#          test_a_resumed_run_whose_input_is_gone_or_re_made_is_refused, test_a_re_made_teacher_...,
#          test_a_folder_with_nothing_to_resume_is_taken_over_..., test_a_run_made_under_earlier_rules_...;
#     coupled-policy activation scores of a network that adds in place (torchvision's ResNets, a user's model)
#     made before they were taken at the BatchNorm's output returned as current, or every coupled run (the
#     CIFAR ResNets', whose numbers did not change) made stale -> test_coupled_scores_of_networks_that_add_...;
#     prune's rules decided by the config's model.gates instead of the network scored (a gated checkpoint
#     given to a config without gates), or an old folder judged by its config instead of the networks it
#     keeps -> test_prune_rules_follow_the_network_scored_not_the_config
# 14. `rescomp run --dry-run` passing a chain folder the chain would refuse, or --nproc 0; `rescomp run`
#     advising --fresh, which it did not have
#       -> test_a_chain_dry_run_judges_each_folder_as_the_chain_would (a later folder of other settings, behind a
#          stage not complete, read before that stage runs)
# 15. a later stage (or a chain) run with --fresh told that the finished training run it starts from and
#     keeps "--fresh redoes it", in its log and in its dry run, where only `rescomp train --fresh` does; or
#     advised to "re-run with --fresh" where that training run holds other settings; or its --fresh emptying
#     its own finished folder before that training run refuses (a finished result lost, nothing made); or
#     that advice leaving out the config, --profile, --set or --seed the training run needs (a bare
#     `rescomp train --fresh` names no config; without the --set it re-makes the run the stage refused)
#       -> test_dry_run_checks_everything_says_what_would_run_and_writes_nothing,
#          test_a_chain_dry_run_judges_each_folder_as_the_chain_would
# 17. report averaging as seeds of one row runs that differ in another setting (a 3-epoch run beside 2-epoch
#     seeds), the same seed twice (a copied folder), or one run named twice (a folder and a run in it)
#       -> test_seeds_run_in_their_own_folders_and_the_report_gives_mean_and_sd
# 18. a folder that is no run (the user's files, no config.yaml) taken over by a plain run, which writes
#     there, so that --fresh, which its refusals then advise, deletes the user's files
#       -> test_dry_run_checks_everything_says_what_would_run_and_writes_nothing
# 19. report and compare leaving an unfinished run out of a folder of runs, or of a table, without a word
#       -> test_runs_lists_every_run_with_its_state
# 20. a chain's stage folder refused by the stage's own command (and the reverse) as "other settings",
#     where one names the network it starts from and the other leaves it unset, meaning the same one
#       -> test_a_chains_stage_and_the_stages_own_command_share_their_folder
# 16. train.epochs: 0 taken for a training run (a random network reported as trained), by train, by a later
#     stage that trains first, or by a chain -> test_a_training_run_of_no_epochs_is_refused
#  9. a stage checkpoint given with --set from another folder left relative to the project, not to the
#     shell's folder, for the sections added after quantize / prune / layer_drop
#       -> test_every_stage_checkpoint_set_from_a_subfolder_is_taken_from_there

import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rescomp.cli import app

from conftest import write_config

runner = CliRunner()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _quick(tiny: dict) -> dict:
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    return tiny


STAGES = {
    "prune": ({"prune": {"share_per_step": 0.1, "steps": 2, "finetune_epochs": 0, "score_batches": 1}},
              "prune.share_per_step=0.05", "prune.share_per_step (0.1 -> 0.05)", "runs/exp-prune-paper-taylor-custom"),
    "quantize": ({"quantize": {"calibration_images": 16}}, "quantize.calibration_images=32",
                 "quantize.calibration_images (16 -> 32)", "runs/exp-ptq"),
    "checkpoint": ({"quantize": {"calibration_images": 16}}, "quantize.checkpoint=other.pt",
                   "quantize.checkpoint ('runs/exp/model.pt' -> 'other.pt')", "runs/exp-ptq"),  # unset: this one
    "layer-drop": ({"model": {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1, 1]}},
                    "layer_drop": {"k": 1, "retrain_epochs": 0, "max_units": 1, "score_images": 16,
                                   "timing": {"batch_size": 2, "runs": 1, "warmup": 0},
                                   "baselines": {"scratch": False, "distill": False}}},
                   "layer_drop.max_units=2", "layer_drop.max_units (1 -> 2)", "runs/exp-layerdrop-gate-k1-n0"),
    "measure": ({"quantize": {"calibration_images": 16}}, "measure.batch_sizes=[2]",
                "measure.batch_sizes ([1, 64] -> [2])", "runs/exp-ptq"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_changed_stage_setting_is_refused_naming_the_key(workdir, tiny, stage):
    extra, override, named, folder = STAGES[stage]
    command = {"prune": "prune", "layer-drop": "layer-drop"}.get(stage, "quantize")
    path = write_config(workdir, {**_quick(tiny), **extra})
    if command == "quantize":
        assert cli("train", path).exit_code == 0
        (workdir / "other.pt").write_bytes((workdir / "runs/exp/model.pt").read_bytes())
    first = cli(command, path)
    assert first.exit_code == 0, first.output
    before = (workdir / folder / "summary.json").read_text()

    res = cli(command, path, "--set", override)
    assert res.exit_code == 2, res.output
    assert f"holds a run with other settings: {named}" in res.stderr
    assert "--fresh" in res.stderr and "Traceback" not in res.output
    if command != "train":  # a new name alone would train anew: the hint keeps the trained network
        assert "checkpoint=runs/exp/model.pt" in res.stderr or stage == "checkpoint"
    assert (workdir / folder / "summary.json").read_text() == before


def test_the_training_keys_that_differ_are_named(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    res = cli("train", path, "--set", "data.augment.flip=false", "--set", "train.optimizer.lr=0.2")
    assert res.exit_code == 2
    assert "other settings: data.augment.flip (True -> False), train.optimizer.lr (0.05 -> 0.2)" in res.stderr
    assert "--set name=<new name> to keep both" in res.stderr


def test_fresh_with_a_bad_model_argument_keeps_the_finished_run(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    run = workdir / "runs/exp"
    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = cli("train", path, "--fresh", "--set", "model.block=bottlenek")
    assert res.exit_code == 2 and "model.block: 'bottlenek' is not one of 'basic', 'bottleneck'" in res.stderr
    assert "Traceback" not in res.output
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    assert cli("train", path).exit_code == 0  # and the unchanged command still finds its finished run


def test_a_model_that_cannot_run_is_one_line_and_leaves_nothing(workdir, tiny):
    res = cli("train", write_config(workdir, tiny), "--set", "model.width=0")
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [
        "error: model 'cifar_resnet' with depth=8, width=0 cannot run on a 32x32 image: Given groups=1, expected "
        "weight to be at least 1 at dimension 0, but got weight of size [0, 3, 3, 3] instead"]
    assert not (workdir / "runs").exists()


def _fail_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, error: BaseException | str) -> None:
    """Make training fail at the start of `epoch` (1-based), after the checkpoints of the epochs before."""
    import rescomp.train as train

    real = train.Trainer.train_epoch

    def train_epoch(self, *a, **kw):
        if self.state.epoch + 1 == epoch:
            if error == "SIGTERM":  # as `kill` or `timeout` sends it, to this process
                import os
                import signal
                import time

                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here
                raise AssertionError("SIGTERM did not end the run")
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(train.Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (RuntimeError("boom"), 1), ("SIGTERM", 143)])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(workdir, tiny, monkeypatch, error, code):
    path = write_config(workdir, _quick(tiny))
    with monkeypatch.context() as m:
        _fail_in_epoch(m, 1, error)
        res = cli("train", path)
    assert res.exit_code == code, res.output
    assert not (workdir / "runs/exp").exists()
    if code != 1:  # stopped: it says there is nothing to resume from (it promised a resume)
        assert "saved its first checkpoint, so that folder is removed: run the same command again to start it " \
               "anew" in " ".join(res.stderr.split()) and "resume" not in res.stderr, res.stderr
    assert cli("train", path, "--set", "train.epochs=2").exit_code == 0


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), ("SIGTERM", 143)])
def test_a_run_that_fails_after_a_checkpoint_keeps_it(workdir, tiny, monkeypatch, error, code):
    path = write_config(workdir, {**_quick(tiny), "train": {**tiny["train"], "epochs": 2}})
    with monkeypatch.context() as m:
        _fail_in_epoch(m, 2, error)
        res = cli("train", path)
        assert res.exit_code == code and "resume from the last checkpoint" in res.stderr, res.output
    assert list((workdir / "runs/exp/checkpoints").iterdir())
    res = cli("train", path)
    assert res.exit_code == 0 and "resum" in res.stderr.lower()


def test_a_dry_run_says_the_epoch_a_run_resumes_after_as_its_last_checkpoint_saved_it(workdir, tiny, monkeypatch):
    # wrong version: the epochs counted in metrics.jsonl, which logs every epoch while train.checkpoint_every
    # saves every 2nd: "resumes after epoch 3" for a run that goes on from epoch 2; and, the checkpoint gone
    # (killed before its first one), "resumes after epoch 3" for a run that trains from the start
    path = write_config(workdir, {**_quick(tiny), "train": {**tiny["train"], "epochs": 4, "checkpoint_every": 2}})
    with monkeypatch.context() as m:
        _fail_in_epoch(m, 4, KeyboardInterrupt())
        assert cli("train", path).exit_code == 130
    assert len((workdir / "runs/exp/metrics.jsonl").read_text().splitlines()) == 3
    assert "runs/exp: resumes after epoch 2\n" in cli("train", path, "--dry-run").stdout
    (workdir / "runs/exp/checkpoints/last.pt").unlink()
    said = cli("train", path, "--dry-run").stdout
    assert "runs/exp: starts over: its epochs so far saved no checkpoint" in said and "resumes" not in said
    res = cli("train", path)
    assert res.exit_code == 0 and "resumed" not in res.output, res.output
    assert len((workdir / "runs/exp/metrics.jsonl").read_text().splitlines()) == 4


def test_a_renamed_run_folder_is_named_with_the_way_back(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    import shutil

    from rescomp import runlock

    # renamed (copied without the lock, which this process still holds under the old path)
    shutil.copytree(workdir / "runs/exp", workdir / "runs/mine", ignore=shutil.ignore_patterns(runlock.LOCK_NAME))
    res = cli("train", path, "--set", "name=mine")  # the advice was --set name=<new name>, which this is
    assert res.exit_code == 2, res.output
    assert "'runs/mine' holds the run named 'exp' (a renamed folder?); rename it back to 'exp' and use --set " \
           "name=exp" in " ".join(res.stderr.split())


def test_a_folder_with_nothing_to_resume_is_taken_over(workdir, tiny):
    """A run killed before its first checkpoint (kill -9: no cleanup ran) left only its config."""
    path = write_config(workdir, _quick(tiny))
    run = workdir / "runs/exp"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(Path(path).read_text().replace("seed: 0", "seed: 5"))
    (run / "checkpoints").mkdir()
    res = cli("train", path)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["seed"] == 0


@pytest.mark.parametrize("name", [".", "..", "a/b", "../elsewhere"])
def test_a_name_or_table_that_is_not_one_folder_is_refused_and_writes_nothing(workdir, tiny, name):
    path = write_config(workdir, _quick(tiny))
    for args in (("train", path, "--set", f"name={name}"), ("train", path, "--set", f"report.table={name}")):
        res = cli(*args)
        assert res.exit_code == 2 and "must be one folder name" in res.stderr, res.output
    assert not list(workdir.glob("runs*")) and not (workdir.parent / "elsewhere").exists()
    assert cli("train", path).exit_code == 0
    for command in ("report", "compare"):
        res = cli(command, "runs", "--table", name, "--out", workdir / "results")
        assert res.exit_code == 2 and f"table '{name}': must be one folder name" in res.stderr, res.output
    assert not (workdir / "results").exists() and not (workdir / "elsewhere").exists()


@pytest.mark.parametrize("fresh", [(), ("--fresh",)])
def test_a_folder_that_holds_other_runs_is_never_a_run_folder(workdir, tiny, fresh):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    before = sorted(p.relative_to(workdir) for p in (workdir / "runs").rglob("*"))
    res = cli("train", path, "--set", "out_dir=.", "--set", "name=runs", *fresh)  # runs/ as one run's folder
    assert res.exit_code == 2 and "'runs' holds other runs (exp)" in res.stderr, res.output
    assert sorted(p.relative_to(workdir) for p in (workdir / "runs").rglob("*")) == before


def test_a_file_that_is_not_a_text_config_is_one_line(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    binary = workdir / "binary.md"
    binary.write_bytes(bytes(range(256)) * 4)
    (workdir / "empty.yaml").write_text("# nothing but a comment\n")
    (workdir / "latin1.yaml").write_bytes("report: {row: 'Réseau'}\n".encode("latin-1"))
    (workdir / "summary.yaml").write_text((workdir / "runs/exp/summary.json").read_text())
    for args, message in [
        (("train", workdir / "runs/exp/model.pt"), "config file '{w}/runs/exp/model.pt' is not text (byte "),
        (("train", workdir / "runs/exp/model.pt"), "`rescomp measure {w}/runs/exp/model.pt` measures a saved network"),
        (("train", workdir / "latin1.yaml"), "config file '{w}/latin1.yaml' is not text (byte 16 is not UTF-8)"),
        (("train", workdir / "runs/exp"), "is a folder, not a file; pass {w}/runs/exp/config.yaml, the config this run"),
        (("train", workdir / "empty.yaml"), "empty.yaml is empty; a config names its settings"),
        (("train", workdir / "summary.yaml"), "more; is it a rescomp config?"),
        (("report", "runs", "--notes", binary, "--out", workdir / "results"), "--notes '{w}/binary.md' is not text"),
        (("compare", "runs", "--table", "c", "--notes", binary, "--out", workdir / "results"), "is not text (byte 128"),
        (("jobs", binary), "jobs file '{w}/binary.md' is not text (byte 128 is not UTF-8); pass a file of rescomp"),
    ]:
        res = cli(*args)
        assert res.exit_code == 2 and message.format(w=workdir) in " ".join(res.stderr.split()), (args, res.output)
        assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) <= 3  # one line, wrapped
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["exp"] and not (workdir / "results").exists()


@pytest.mark.parametrize("section", ["quantize", "prune", "layer_drop", "magnitude_prune", "weight_share", "binarize"])
def test_every_stage_checkpoint_set_from_a_subfolder_is_taken_from_there(workdir, tiny, monkeypatch, section):
    from rescomp.config import load_config

    (workdir / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    path = write_config(workdir, tiny)
    (workdir / "runs").mkdir()
    monkeypatch.chdir(workdir / "runs")
    cfg = load_config(path, [f"{section}.checkpoint=exp/model.pt"])
    assert getattr(cfg, section).checkpoint == "runs/exp/model.pt"


# -- your own model ------------------------------------------------------------------------------
# Wrong versions: the import path is not stored in the spec, so `measure` on the saved model.pt fails;
# the module is searched only on sys.path, not in the folder the command runs from; a missing module,
# attribute or num_classes argument ends in a traceback.

def test_your_own_model_trains_prunes_quantizes_and_measures(workdir, tiny):
    tiny = _quick(tiny)
    tiny["model"] = {"arch": "my_models:build", "width": 6}
    tiny["prune"] = {"share_per_step": 0.25, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    tiny["quantize"] = {"calibration_images": 16}
    path = write_config(workdir, tiny)
    for command in ("train", "prune", "quantize"):
        res = cli(command, path)
        assert res.exit_code == 0, res.output
    s = json.loads((workdir / "runs/exp/summary.json").read_text())
    # by hand: 3*6*9 + 2*6 (BN) + 6*12*9 + 2*12 + 12*10 + 10
    assert s["params"] == 162 + 12 + 648 + 24 + 130 and s["arch"]["arch"] == "my_models:build"
    ps = json.loads((workdir / "runs/exp-prune-paper-taylor-custom/summary.json").read_text())
    assert ps["prunable_filters"] == 6 + 12
    assert ps["rows"][-1]["removed"] == round(0.25 * 18) and ps["rows"][-1]["params"] < s["params"]
    for model_file in ("runs/exp/model.pt", "runs/exp-prune-paper-taylor-custom/step01/model.pt", "runs/exp-ptq/int8.pt"):
        res = cli("measure", workdir / model_file, "--json")
        assert res.exit_code == 0, (model_file, res.output)


def test_your_own_model_is_found_in_the_folder_the_command_runs_from(workdir, tiny):
    """A real process that does not put the current folder on sys.path (python -P), as an installed
    `rescomp` script does not."""
    import subprocess
    import sys

    (workdir / "lab_models.py").write_text((Path(__file__).parent / "my_models.py").read_text())
    tiny = _quick(tiny)
    tiny["model"] = {"arch": "lab_models:build"}
    path = write_config(workdir, tiny)
    proc = subprocess.run([sys.executable, "-P", "-m", "rescomp.cli", "measure", str(path), "--json"],
                          capture_output=True, text=True, cwd=workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] == 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 10 + 10


@pytest.mark.parametrize("arch, message", [
    ("no_such_module:build", "cannot import 'no_such_module'; run from the folder that holds no_such_module.py"),
    ("my_models:biuld", "my_models has no 'biuld' (did you mean 'build'?)"),
    ("my_models:NOT_A_BUILDER", "is a int, not a function that builds a model"),
    ("my_models:no_classes", "the builder must take a num_classes argument"),
    ("my_models:", "write a builder as module.path:function"),
    ("mynet", "unknown model 'mynet'"),
])
def test_your_own_model_mistakes_are_one_line(workdir, tiny, arch, message):
    tiny["model"] = {"arch": arch}
    res = cli("train", write_config(workdir, tiny))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not (workdir / "runs").exists()


# -- paper numbers only where a config names them -------------------------------------------------
# Wrong version: layer-drop compares every run with the paper's Table 2 constants, whatever it trained.

@pytest.mark.parametrize("paper", [{}, {"macs": 60.93, "params": 69.82}])
def test_layer_drop_compares_with_the_paper_only_where_the_config_says(tiny, paper):
    import torch

    from rescomp.config import validate
    from rescomp.context import RunContext
    from rescomp.stages.layer_drop import _summary

    tiny["layer_drop"] = {"k": 1, "timing": {"batch_size": 4}, "baselines": {"scratch": False, "distill": False}}
    tiny["report"] = {"table": "ld", "paper_relative": paper}
    cfg = validate(tiny, "t")
    costs = lambda layers, macs, params, ms: {"layers": layers, "macs": macs, "params": params,  # noqa: E731
                                             "forward_ms_b4": ms, "backward_ms_b4": 2 * ms}
    rows = [{"method": "layer-drop", "step": 0, "epochs": 2, "top1": 50.0, "units_deleted": 0, **costs(20, 100, 10, 2.0)},
            {"method": "layer-drop", "step": 1, "epochs": 3, "top1": 51.0, "units_deleted": 1, **costs(17, 60, 7, 1.5)}]
    s = _summary(cfg, RunContext(torch.device("cpu"), 0), rows, {}, {"top1": 50.0}, {"data_source": "x", "train_images": 64,
                 "test_images": 32}, 2, {})
    md = s["sections"][0]["markdown"]
    assert s["relative_smallest_lossless"] == {"macs": 60.0, "forward": 75.0, "backward": 75.0, "params": 70.0}
    if paper:
        assert "| macs | 60.00 | 60.93 | -0.93 |" in md and "| forward | 75.00 | – | – |" in md
    else:
        assert "paper" not in md.lower() and "| macs | 60.00 |" in md


# -- discovering keys, conventions ----------------------------------------------------------------
# Wrong versions: a config key reference written by hand (it drifts: a new key is missing); `config`
# printing the file instead of what rescomp reads; flags rendered as taking a value; a device that is
# not there measured silently on the CPU; the nearest name chosen by difflib's ratio alone
# ('resnet21' -> 'resnet32').

def test_config_prints_what_rescomp_reads_and_the_key_reference_is_current(workdir, tiny):
    from rescomp.config import ExperimentConfig, _known_keys
    from rescomp.config_doc import reference

    res = cli("config", write_config(workdir, tiny), "--set", "train.epochs=7")
    assert res.exit_code == 0, res.output
    import yaml
    printed = yaml.safe_load(res.stdout)
    assert printed["train"]["epochs"] == 7 and printed["name"] == "exp" and printed["quantize"]["backend"] == "x86"
    res = cli("config", "--keys", "--set", "train.epochs=7")  # was silently ignored
    assert res.exit_code == 2 and "--keys lists every key of every config, so it takes no CONFIG, --set" in res.stderr
    committed = (Path(__file__).resolve().parent.parent / "docs/config-keys.md").read_text()
    assert committed == reference(), "docs/config-keys.md is stale: rescomp config --keys > docs/config-keys.md"
    documented = {line.split("`")[1] for line in committed.splitlines() if line.startswith("| `")}
    leaves = {k for k in _known_keys(ExperimentConfig)
              if not any(other.startswith(k + ".") for other in _known_keys(ExperimentConfig))}
    assert leaves <= documented
    assert all(not line.endswith("|  |") for line in committed.splitlines()), "every key says what it does"


def test_conventions(workdir):
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.startswith("rescomp ") and "torch" in res.stdout
    help_text = cli("train", "--help").stdout
    assert "--fresh " in help_text and "--fresh <bool>" not in help_text and "KEY=VALUE" in help_text
    assert "--install-completion" in cli("--help").stdout
    res = cli("train", workdir / "x.yaml", "--set", "model.arch=resnet21")
    assert res.exit_code == 2  # the file is missing; the suggestion itself:
    from rescomp.registry import suggest
    assert suggest("resnet21", ["resnet110", "resnet20", "resnet32", "resnet44", "resnet56"]) == " (did you mean 'resnet20'?)"


def test_every_mutant_still_applies():
    """scripts/mutants.py's wrong versions are code that moves on: a pattern no longer found exactly once
    checks nothing (two went stale unseen), so each must match once and name tests that exist."""
    import ast

    root = Path(__file__).resolve().parent.parent
    tree = ast.parse((root / "scripts/mutants.py").read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "M")
    mutants = ast.literal_eval(table)
    assert len(mutants) > 150 and len({m[0] for m in mutants}) == len(mutants)
    for mid, file, old, new, tests in mutants:
        assert (root / file).read_text().count(old) == 1, f"mutant {mid}: its pattern is not in {file} exactly once"
        for test in tests.split():
            path, _, name = test.partition("::")
            assert f"def {name.split('[')[0]}(" in (root / path).read_text(), f"mutant {mid}: no test {test}"


def test_models_lists_builder_arguments_untruncated_when_piped():
    res = cli("models")
    assert res.exit_code == 0
    lines = {line.split("\t")[0]: line.split("\t") for line in res.stdout.splitlines()}
    assert lines["resnet56"][1] == "853,018" and "shortcut='A', width=16" in lines["resnet56"][4]
    assert "units_per_stage=None" in lines["cifar_resnet"][4]
    assert "densenet121" in lines


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_an_error_in_every_command(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    for args in (["measure", path], ["measure", workdir / "runs/exp/model.pt"], ["quantize", path],
                 ["prune", path], ["layer-drop", path]):
        res = cli(*args, "--set", "device=cuda")
        assert res.exit_code == 2, (args, res.output)
        assert "has no CUDA GPU" in res.stderr, (args, res.stderr)


# -- seeds and the list of runs ---------------------------------------------------------------------
# Wrong versions: another seed refused as "other settings" under the same name (or worse, mixed into
# it); `seeds:` running only the first seed; a report that lists seeds as unrelated rows, or averages
# rows of different experiments; a standard deviation over the population instead of the sample
# (caught by test_report.py::test_seeds_of_one_row_become_its_mean_and_sample_sd: 1-epoch tiny runs can tie);
# `runs` calling an interrupted run complete.

def test_seeds_run_in_their_own_folders_and_the_report_gives_mean_and_sd(workdir, tiny):
    path = write_config(workdir, {**_quick(tiny), "seeds": [0, 1]})
    res = cli("train", path)
    assert res.exit_code == 0, res.output
    assert cli("train", path, "--seed", "2").exit_code == 0
    assert cli("train", path, "--set", "seed=2").exit_code == 0  # the same run as --seed 2: found complete
    tops = {s: json.loads((workdir / f"runs/{d}/summary.json").read_text())["top1"]
            for s, d in ((0, "exp"), (1, "exp-seed1"), (2, "exp-seed2"))}
    assert not (workdir / "runs/exp-seed0").exists()
    res = cli("report", "runs", "--table", "seeds")
    assert res.exit_code == 0, res.output
    assert "1 row(s) from 3 run(s)" in res.stdout  # what the table holds, not the runs read
    row = json.loads((workdir / "results/seeds/table.json").read_text())["rows"]
    assert len(row) == 1 and row[0]["seeds"] == 3 and row[0]["row"] == "exp"
    mean = sum(tops.values()) / 3
    assert row[0]["top1"] == pytest.approx(mean)
    assert row[0]["top1_std"] == pytest.approx((sum((t - mean) ** 2 for t in tops.values()) / 2) ** 0.5)
    assert "| top-1 sd |" in (workdir / "results/seeds/table.md").read_text().replace("top-1 % | top-1 sd", "| top-1 sd |")
    # a folder named twice (a folder of runs and a run in it) is one run, not a fourth seed
    res = cli("report", "runs", "runs/exp-seed1", "--table", "seeds")
    assert res.exit_code == 0 and "1 row(s) from 3 run(s)" in res.stdout, res.output
    assert json.loads((workdir / "results/seeds/table.json").read_text())["rows"][0]["seeds"] == 3
    # a copied folder: seed 1 twice
    shutil.copytree(workdir / "runs/exp-seed1", workdir / "copy/exp-seed1")
    res = cli("report", "runs", "copy", "--table", "copied")
    assert res.exit_code == 2 and "are both seed 1 of row 'exp', which report would average as two seeds" in res.stderr
    # a run of another seed with other settings is not one more seed of this experiment
    assert cli("train", path, "--seed", "3", "--set", "train.epochs=2").exit_code == 0
    res = cli("report", "runs", "--table", "mixed")
    assert res.exit_code == 2 and "would be averaged as seeds of row 'exp', but they differ in train.epochs (1 -> 2)" \
        in " ".join(res.stderr.split()), res.output
    assert not (workdir / "results/copied").exists() and not (workdir / "results/mixed").exists()


def test_runs_lists_every_run_with_its_state(workdir, tiny, monkeypatch):
    path = write_config(workdir, {**_quick(tiny), "train": {**tiny["train"], "epochs": 2}})
    assert cli("train", path).exit_code == 0
    with monkeypatch.context() as m:
        _fail_in_epoch(m, 2, KeyboardInterrupt())
        assert cli("train", path, "--seed", "3").exit_code == 130
    (workdir / "runs/cut/checkpoints").mkdir(parents=True)
    (workdir / "runs/cut/checkpoints/last.pt").write_bytes(b"")  # a checkpoint cut short: nothing to resume
    res = cli("runs")
    assert res.exit_code == 0, res.output
    states = {line.split("\t")[0]: line.split("\t")[2] for line in res.stdout.splitlines()[1:]}
    assert states == {"exp": "complete", "exp-seed3": "interrupted, resumable",
                      "cut": "broken: an empty checkpoint (checkpoints/last.pt); re-run it with --fresh"}
    # report and compare leave the unfinished run out, and say so
    for res in (cli("report", "runs", "--table", "t"), cli("compare", "runs", "--table", "c"),
                cli("report", "smoke"), cli("compare", "smoke", "--table", "c")):  # a table name: the runs reporting to it
        assert res.exit_code == 0, res.output
        assert "left out 1 unfinished run(s), with no summary.json yet: runs/exp-seed3" in res.stderr, res.output
    assert "left out" not in cli("report", "runs/exp", "--table", "t").stderr
    # a run folder whose config.yaml is not YAML: one line from runs, report and the run's own command
    shutil.copytree(workdir / "runs/exp", workdir / "runs/bad")
    (workdir / "runs/bad/config.yaml").write_text("train: {epochs: [")
    said = "'runs/bad/config.yaml' cannot be read (ParserError: "
    assert said in cli("runs").stdout
    for res in (cli("report", "runs/bad", "--table", "bad"), cli("train", path, "--set", "name=bad")):
        assert res.exit_code == 2 and said in res.stderr and "Traceback" not in res.output, res.output
    assert cli("runs", workdir / "nowhere").exit_code == 2
    res = cli("runs", "runs/exp")  # a run folder: its checkpoints/ was listed as an interrupted run
    assert res.exit_code == 2 and "'runs/exp' is a run folder, not a folder of runs; list it among its neighbours: " \
        "rescomp runs runs" in " ".join(res.stderr.split()), res.output
    (workdir / "runs/afile").write_text("x")  # a file where a run's folder would go: refused by both, named
    res, real = (cli("train", path, "--set", "name=afile", *dry) for dry in (["--dry-run"], []))
    assert res.exit_code == real.exit_code == 2 and res.stderr == real.stderr, (res.output, real.output)
    assert "'runs/afile' is a file, not a run folder" in real.stderr and (workdir / "runs/afile").read_text() == "x"


# -- runs are found by the config, not by the shell's folder (issue 15, point 9) -------------------
# Wrong versions: out_dir taken from the shell's folder (a run from another folder trains again, into
# a stray runs/ there); a checkpoint path in the config read from the shell's folder; a --set path
# read from the project instead of the shell's folder; a project root found above the project
# (the first marker missed) or not at all (the config's own folder used inside a project).

def test_runs_are_located_by_out_dir_not_by_the_shells_folder(workdir, tiny, monkeypatch):
    project = workdir / "proj"
    (project / "configs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    (workdir / "pyproject.toml").write_text("[project]\nname = 'outer'\n")  # a project above: not this one
    path = write_config(project / "configs", {**_quick(tiny), "quantize": {"calibration_images": 16}})
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli("train", path).exit_code == 0
    assert (project / "runs/exp/model.pt").is_file() and not (elsewhere / "runs").exists()
    monkeypatch.chdir(project / "configs")  # another folder again: the finished run is found, not retrained
    res = cli("train", path)
    assert res.exit_code == 0 and "already complete" in res.output, res.output
    assert cli("quantize", path).exit_code == 0
    assert (project / "runs/exp-ptq/summary.json").is_file() and not (project / "configs/runs").exists()
    res = cli("runs", path)
    assert res.exit_code == 0 and {line.split("\t")[0] for line in res.stdout.splitlines()[1:]} == {"exp", "exp-ptq"}

    # a --set path is typed from the shell's folder and stored relative to the project
    monkeypatch.chdir(project / "runs")
    res = cli("quantize", path, "--set", "quantize.checkpoint=exp/model.pt", "--set", "name=again")
    assert res.exit_code == 0, res.output
    saved = (project / "runs/again-ptq/config.yaml").read_text()
    assert "checkpoint: runs/exp/model.pt" in saved and str(workdir) not in saved


def test_a_config_outside_any_project_keeps_its_runs_beside_it(workdir, tiny, monkeypatch):
    from rescomp.config import load_config
    from rescomp.config_files import project_root

    folder = workdir / "loose"
    folder.mkdir()
    path = write_config(folder, _quick(tiny))
    assert project_root(path) == folder.resolve()
    monkeypatch.chdir(workdir)
    cfg = load_config(path)
    assert cfg.runs_dir == Path("loose/runs")
    assert load_config(path, ["out_dir=/abs/runs"]).runs_dir == Path("/abs/runs")


# -- TensorBoard --------------------------------------------------------------------------------------
# Wrong versions: events written without log.tensorboard, or not at all with it; a resumed run that
# repeats the epochs it trains again (a doubled point at a step); log.tensorboard taken as a training
# setting (turning it on refuses the finished run or its checkpoint); a missing package as a traceback
# after the run folder was made; an error line whose [brackets] rich takes for markup and drops.

def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_each_epoch_once_even_across_a_resume(workdir, tiny, monkeypatch):
    pytest.importorskip("tensorboard")  # in the dev extra; a plain install has no tensorboard
    t = _quick(tiny)
    t["train"].update(epochs=4, checkpoint_every=2)
    path = write_config(workdir, t)
    with monkeypatch.context() as m:
        _fail_in_epoch(m, 4, KeyboardInterrupt())  # epoch 3 was logged, but its checkpoint is epoch 2's
        assert cli("train", path, "--set", "log.tensorboard=true").exit_code == 130
    res = cli("train", path, "--set", "log.tensorboard=true")
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    scalars = _scalars(workdir / "runs/exp/tensorboard")
    history = [json.loads(line) for line in (workdir / "runs/exp/metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["train_loss"] for h in history])
    assert {"train/top1", "train/lr", "train/images_per_s"} <= set(scalars)
    assert cli("train", path).exit_code == 0  # log is not a training setting: the run is complete

    other = write_config(workdir, {**t, "name": "quiet"})
    assert cli("train", other).exit_code == 0
    assert not (workdir / "runs/quiet/tensorboard").exists()


def test_tensorboard_without_the_package_is_one_line_and_makes_nothing(workdir, tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    path = write_config(workdir, {**_quick(tiny), "log": {"tensorboard": True}})
    res = cli("train", path)
    assert res.exit_code == 2 and "pip install 'rescomp[tensorboard]'" in res.stderr and "Traceback" not in res.output
    assert not (workdir / "runs").exists()


# -- dry runs ---------------------------------------------------------------------------------------
# Wrong versions: a dry run that writes a folder or trains; one that skips the checks (a bad model
# argument passes); a plan whose step shares or fine-tuning epochs are not the run's.

def test_dry_run_checks_everything_says_what_would_run_and_writes_nothing(workdir, tiny):
    tiny = _quick(tiny)
    tiny["prune"] = {"targets": [0.1, 0.3], "iterations": 2, "finetune_epochs": 1, "finetune_budget": 3}
    path = write_config(workdir, tiny)
    res = cli("prune", path, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "train   runs/exp: new run" in res.stdout and "1 epochs at batch 16" in res.stdout
    assert "to 10% (its own run): 2 step(s) to 5%, 10% of the filters; fine-tuning 1+2 = 3 epochs" in res.stdout
    assert "to 30% (its own run): 2 step(s) to 15%, 30% of the filters" in res.stdout
    assert not (workdir / "runs").exists()
    res = cli("prune", path, "--dry-run", "--set", "model.width=0")
    assert res.exit_code == 2 and "cannot run" in res.stderr
    res = cli("magnitude-prune", path, "--dry-run")  # a default the run resolves is said as the run will use it
    assert res.exit_code == 0 and "finetune_lr 0.005 (train lr / 10)" in res.stdout, res.output
    assert cli("train", path).exit_code == 0
    res = cli("train", path, "--dry-run", "--set", "train.epochs=3")
    assert "train   runs/exp: refused (below)" in res.stdout
    real = cli("train", path, "--set", "train.epochs=3")
    assert res.exit_code == real.exit_code == 2 and res.stderr == real.stderr, (res.output, real.output)  # its words
    assert "'runs/exp' holds a run with other settings: train.epochs (1 -> 3); re-run with --fresh" in real.stderr
    res = cli("train", path, "--dry-run", "--set", "train.epochs=3", "--fresh")
    assert res.exit_code == 0 and "runs/exp: --fresh deletes it and starts a new run" in res.stdout, res.output
    # a later stage's folder: the advice keeps the trained model (--set prune.checkpoint=...), as the command's
    assert cli("prune", path).exit_code == 0
    res, real = (cli("prune", path, "--set", "prune.finetune_epochs=2", *dry) for dry in (["--dry-run"], []))
    assert res.exit_code == real.exit_code == 2 and res.stderr == real.stderr and "--set prune.checkpoint=" in res.stderr
    # a folder that is no run is neither written into nor emptied by --fresh, by either (a plain run wrote its
    # config.yaml there, and --fresh, which that run's refusals then advised, deleted the user's files)
    (workdir / "runs/other").mkdir()
    (workdir / "runs/other/notes.txt").write_text("mine")
    for fresh, verb in (([], "a run would write into"), (["--fresh"], "--fresh would delete")):
        res, real = (cli("train", path, "--set", "name=other", *fresh, *dry) for dry in (["--dry-run"], []))
        assert res.exit_code == real.exit_code == 2 and res.stderr == real.stderr, (res.output, real.output)
        assert (f"'runs/other' is not a rescomp run folder (it holds notes.txt and no config.yaml), so {verb} it"
                in " ".join(real.stderr.split())), real.stderr
    assert [p.name for p in (workdir / "runs/other").iterdir()] == ["notes.txt"]
    assert "complete: nothing to run (--fresh redoes it)" in cli("train", path, "--dry-run").stdout
    # a later stage's --fresh leaves the training run it starts from as it is, and says what would redo that one
    # (the whole command: this config, with the --set and --seed given)
    redo = f"`rescomp train {path} --fresh`"
    res = cli("prune", path, "--dry-run", "--fresh")
    assert f"train   runs/exp: complete: nothing to run ({redo} redoes it)" in res.stdout, res.output
    assert "runs/exp-prune-paper-taylor-custom: --fresh deletes it" in res.stdout, res.output
    res = cli("magnitude-prune", path, "--dry-run", "--fresh")  # every later stage's dry run says it alike
    assert f"train   runs/exp: complete: nothing to run ({redo} redoes it)" in res.stdout, res.output
    res = cli("prune", path, "--fresh")
    assert res.exit_code == 0 and f"runs/exp is already complete; {redo} redoes it" in res.output, res.output
    res = cli("prune", path)
    assert "runs/exp-prune-paper-taylor-custom is already complete; --fresh redoes it" in res.output, res.output
    # ... and that its --fresh cannot replace that training run when it holds other settings
    changed = ("prune", path, "--set", "train.epochs=3", "--seed", "0", "--fresh")
    res, real = cli(*changed, "--dry-run"), cli(*changed)
    assert res.exit_code == real.exit_code == 2 and res.stderr == real.stderr, (res.output, real.output)
    advice = f"`rescomp train {path} --set train.epochs=3 --seed 0 --fresh`"
    assert f"'runs/exp' holds a run with other settings: train.epochs (1 -> 3); run {advice} to replace it" \
        in real.stderr, real.stderr
    assert (workdir / "runs/exp-prune-paper-taylor-custom/summary.json").is_file()  # refused before --fresh deletes
    # the advice, run as written, is what the refused command needed
    assert cli(*shlex.split(advice.strip("`"))[1:]).exit_code == 0
    res = cli(*changed)
    assert res.exit_code == 0 and "runs/exp-prune-paper-taylor-custom: --fresh" not in res.output, res.output


@pytest.mark.parametrize("key", ["prune.checkpoint", "layer_drop.checkpoint", "magnitude_prune.checkpoint",
                                 "weight_share.checkpoint", "binarize.checkpoint", "train.distill.teacher"])
def test_dry_run_refuses_what_the_command_would(workdir, tiny, key):
    tiny = _quick(tiny)
    command = {"layer_drop": "layer-drop", "magnitude_prune": "magnitude-prune", "weight_share": "weight-share",
               "train": "train"}.get(key.split(".")[0], key.split(".")[0])
    if command == "layer-drop":
        tiny["model"].update(depth=14, gates=True)  # 2 units a stage: one deletable
    path = write_config(workdir, tiny)
    (workdir / "junk.pt").write_bytes(b"garbage" * 100)
    (workdir / "runs/done").mkdir(parents=True)
    (workdir / "runs/done/model.pt").write_bytes(b"")
    for given, message in (("nope.pt", "checkpoint 'nope.pt' not found; pass a model.pt"),
                           ("junk.pt", "checkpoint 'junk.pt' is truncated or corrupt"),
                           ("runs/done", "checkpoint 'runs/done' is a folder; pass runs/done/model.pt, the network")):
        extra = ["--set", "train.distill.alpha=0.5"] if key.startswith("train") else []
        for dry in (["--dry-run"], []):
            res = cli(command, path, "--set", f"{key}={given}", *extra, *dry)
            assert res.exit_code == 2 and message in res.stderr, (dry, res.output)
    assert [p.name for p in (workdir / "runs").iterdir()] == ["done"]  # refused before any run started, the real command too
    if key.startswith("train"):  # a later stage that trains first checks the teacher too
        res = cli("prune", path, "--set", f"{key}=nope.pt", "--set", "train.distill.alpha=0.5", "--dry-run")
        assert res.exit_code == 2 and "checkpoint 'nope.pt' not found" in res.stderr, res.output


def test_a_later_stages_dry_run_refuses_a_corrupt_trained_network_as_the_stage_does(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    model = workdir / "runs/exp/model.pt"
    good = model.read_bytes()
    model.write_bytes(good[:700])
    for command in ("prune", "magnitude-prune"):  # the dry run said the training run was complete, exit 0
        res, real = (cli(command, path, *dry) for dry in (["--dry-run"], []))
        error = lambda r: [line for line in r.stderr.splitlines() if line.startswith("error:")]  # noqa: E731 (it logs too)
        assert res.exit_code == real.exit_code == 2 and error(res) == error(real), (command, res.output, real.output)
        assert "checkpoint 'runs/exp/model.pt' is truncated or corrupt" in res.stderr
        assert "train   runs/exp: refused (below)" in res.stdout
    # a complete stage whose trained network is gone since is returned as it is, by its dry run too; its
    # --fresh, which needs that network, refuses before it deletes anything
    model.write_bytes(good)
    assert cli("prune", path).exit_code == 0
    model.unlink()
    for dry in (["--dry-run"], []):
        res = cli("prune", path, *dry)
        assert res.exit_code == 0 and "complete" in res.output, (dry, res.output)
    for dry in (["--dry-run"], []):
        res = cli("prune", path, "--fresh", *dry)
        assert res.exit_code == 2 and "checkpoint 'runs/exp/model.pt' not found" in res.stderr, (dry, res.output)
    assert (workdir / "runs/exp-prune-paper-taylor-custom/summary.json").is_file()


def test_a_training_run_of_no_epochs_is_refused(workdir, tiny):
    """train.epochs: 0 made a run of the random network, reported and handed to later stages as trained. The
    schema still takes 0 (a later stage's checkpoint records a fine-tune of none, and measure reads it)."""
    path = write_config(workdir, _quick(tiny))
    for command in ("train", "prune", "layer-drop", "run"):
        for dry in (["--dry-run"], []):
            res = cli(command, path, "--set", "train.epochs=0", *(["--set", "pipeline=[train]"] if command == "run" else []),
                      *(["--set", "model.gates=true", "--set", "model.depth=14"] if command == "layer-drop" else []), *dry)
            assert res.exit_code == 2 and "train.epochs: 0 trains nothing" in res.stderr, (command, dry, res.output)
    assert not (workdir / "runs").exists()


def test_dry_run_refuses_quantize_without_a_model_and_too_many_processes(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    res = cli("quantize", path, "--dry-run")
    assert res.exit_code == 2 and "no trained model at 'runs/exp/model.pt'; run `rescomp train`" in res.stderr
    res = cli("train", path, "--dry-run", "--nproc", "1024", "--set", "train.batch_size=1024")
    assert res.exit_code == 2 and "--nproc 1024" in res.stderr and "or fewer" in res.stderr, res.output
    res = cli("train", path, "--dry-run", "--nproc", "0")
    assert res.exit_code == 2 and "at least 1" in res.stderr
    assert not (workdir / "runs").exists()


# Wrong version: quantize reading runs/<name>/model.pt whatever trained it, so an int8 row is recorded under a
# config hash, settings and seed that did not make its network.
def test_quantize_refuses_a_network_trained_with_other_settings(workdir, tiny):
    path = write_config(workdir, {**_quick(tiny), "quantize": {"calibration_images": 16}})
    assert cli("train", path).exit_code == 0
    for sets, named in ((["train.epochs=5"], "train.epochs (1 -> 5)"), (["name=exp", "seed=1"], "seed (0 -> 1)")):
        for dry in ([], ["--dry-run"]):
            res = cli("quantize", path, *[a for s in sets for a in ("--set", s)], *dry)
            assert res.exit_code == 2, res.output
            assert f"'runs/exp' holds a network trained with other settings than this config's: {named}" in res.stderr
            assert "quantize.checkpoint=runs/exp/model.pt to quantize that network as it is" in res.stderr
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["exp"]
    res = cli("quantize", path, "--set", "train.epochs=5", "--set", "quantize.checkpoint=runs/exp/model.pt", "--dry-run")
    assert res.exit_code == 0, res.output  # named explicitly: that network, as it is
    # a run folder passed where a config goes: its config, and for a later stage's folder the network it made
    assert cli("quantize", path).exit_code == 0
    res = cli("measure", "runs/exp-ptq")
    assert res.exit_code == 2 and "pass runs/exp-ptq/config.yaml" in res.stderr
    assert "the network it made is runs/exp-ptq/int8.pt, which `rescomp measure` takes" in " ".join(res.stderr.split())
    res = cli("measure", "runs/exp")
    assert res.exit_code == 2 and "pass runs/exp/config.yaml" in res.stderr and "it made" not in res.stderr


# Wrong versions: a checkpoint of another network than the config's model pruned or quantized under the
# config's name, hash and row labels; --dry-run describing the config's network where a checkpoint is given
# (its prunable filters, so the dry run and the run disagree).
def test_a_given_checkpoint_is_judged_as_the_network_it_holds(workdir, tiny):
    import re

    tiny["model"] = {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1, 1]}}
    path = write_config(workdir, {**_quick(tiny), **STAGES["prune"][0], "quantize": {"calibration_images": 16}})
    assert cli("train", path).exit_code == 0
    given = {"prune": "prune", "quantize": "quantize", "layer_drop": "layer-drop"}
    for sets, named in ((["model.width=8"], "width 4 (here 8)"), (["model.arch=resnet20", "model.depth=null"],
                                                                 "arch 'cifar_resnet' (here 'resnet20')"),
                        (["model.separable={mode: depthwise}"], "separable None (here {'mode': 'depthwise'})")):
        for section, command in given.items():
            for dry in ([], ["--dry-run"]):
                res = cli(command, path, *[a for s in sets for a in ("--set", s)],
                          "--set", f"{section}.checkpoint=runs/exp/model.pt", "--set", "name=other", *dry)
                assert res.exit_code == 2, res.output
                assert (f"{section}.checkpoint 'runs/exp/model.pt': it holds another network than this config's "
                        f"model: {named}") in " ".join(res.stderr.split()), res.stderr
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["exp"]
    # layer-drop's matched baselines get the epochs the given network was trained (1), whatever train.epochs says
    ld = ("layer-drop", path, "--set", "layer_drop.checkpoint=runs/exp/model.pt", "--set", "name=ld", "--dry-run",
          "--set", "layer_drop.baselines.scratch=true", "--set", "layer_drop.baselines.epochs=matched")
    plans = [cli(*ld, *more).stdout for more in ([], ["--set", "train.epochs=7"])]
    baselines = [[line for line in p.splitlines() if "baseline: regular" in line] for p in plans]
    assert baselines[0] and baselines[0] == baselines[1], plans
    assert cli("prune", path).exit_code == 0
    pruned = sorted((workdir / "runs/exp-prune-paper-taylor-custom").glob("step*/model.pt"))[-1]
    count = lambda text: int(re.search(r"([\d,]+) prunable filters", text).group(1).replace(",", ""))  # noqa: E731
    full = count(cli("prune", path, "--dry-run").output)
    again = ("prune", path, "--set", f"prune.checkpoint={pruned.relative_to(workdir)}", "--set", "name=again")
    dry = count(cli(*again, "--dry-run").output)
    res = cli(*again)
    assert res.exit_code == 0, res.output
    summary = json.loads((workdir / "runs/again-prune-paper-taylor-custom/summary.json").read_text())
    assert dry < full and dry == summary["prunable_filters"]  # the dry run speaks of the network it is given


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody can make files")
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    assert cli("train", path).exit_code == 0
    model = workdir / "runs/exp/model.pt"
    jobs = workdir / "jobs.txt"
    jobs.write_text("rescomp runs\n")
    before = sorted(workdir.rglob("*"))
    for args, message in [
        (("train", path, "--set", "out_dir=exp.yaml"), "out_dir 'exp.yaml': '{w}/exp.yaml' is a file, not a folder"),
        (("train", path, "--set", "out_dir=/proc/rescomp-runs", "--dry-run"),
         "out_dir '/proc/rescomp-runs': cannot write in '/proc' ("),
        (("prune", path, "--set", "out_dir=/proc/rescomp-runs", "--set", f"prune.checkpoint={model}"),
         "out_dir '/proc/rescomp-runs': cannot write in '/proc' ("),
        (("report", "runs", "--table", "t", "--out", "exp.yaml"), "--out 'exp.yaml': '{w}/exp.yaml' is a file"),
        (("compare", "runs", "--table", "t", "--out", "/proc/rescomp-results"), "cannot write in '/proc' ("),
        (("export", model, "--out", "exp.yaml/m.onnx"), "--out 'exp.yaml': '{w}/exp.yaml' is a file, not a folder"),
        (("export", model, "--out", "/proc/rescomp/m.onnx"), "--out '/proc/rescomp': cannot write in '/proc' ("),
        (("jobs", jobs, "--jobs", "2", "--logs", "exp.yaml"), "--logs 'exp.yaml': '{w}/exp.yaml' is a file"),
    ]:
        res = cli(*args)
        assert res.exit_code == 2 and message.format(w=workdir) in " ".join(res.stderr.split()), (args, res.output)
        assert "Traceback" not in res.output
    assert sorted(workdir.rglob("*")) == before


def test_a_full_disk_mid_run_is_one_line_and_other_os_errors_stay_tracebacks(workdir, tiny, monkeypatch):
    import errno

    from rescomp import checkpoint

    path = write_config(workdir, _quick(tiny))
    for error, code in ((OSError(errno.ENOSPC, "No space left on device", "runs/exp/summary.json"), 2),
                        (PermissionError(errno.EACCES, "Permission denied", "runs/exp/summary.json"), 2),
                        (OSError(errno.EIO, "Input/output error"), 1)):  # not the user's to fix: shown whole
        def fail(p, text, error=error):
            if Path(p).name == "summary.json":
                raise error
            return write(p, text)

        write = checkpoint.atomic_write_text
        with monkeypatch.context() as m:
            m.setattr(checkpoint, "atomic_write_text", fail)
            res = cli("train", path)
        assert res.exit_code == code, res.output
        if code == 2:
            assert f"error: {error.strerror}: 'runs/exp/summary.json'; check the path" in res.stderr
        else:
            assert isinstance(res.exception, OSError)


# -- inputs re-made since a run was made from them ---------------------------------------------------

def _retrained(workdir, path, into: str, seed: int) -> None:
    """Overwrite `into` with the network trained from another seed (runs/other<seed>): the same path, other bytes."""
    assert cli("train", path, "--set", f"name=other{seed}", "--set", f"seed={seed}").exit_code == 0
    (workdir / into).write_bytes((workdir / f"runs/other{seed}/model.pt").read_bytes())


def _made_then_re_made(workdir, path, into: str, command: tuple, seed: int):
    """Train, copy the network to `into`, run `command` (made from it), re-make `into` with another network
    (runs/other<seed>) and run `command` again: what that second run says."""
    assert cli("train", path).exit_code == 0
    (workdir / into).write_bytes((workdir / "runs/exp/model.pt").read_bytes())
    assert cli(*command).exit_code == 0
    _retrained(workdir, path, into, seed)
    return cli(*command)


def test_a_run_made_from_a_file_since_re_made_is_not_reused_resumed_or_reported(workdir, tiny):
    tiny = _quick(tiny)
    tiny["quantize"] = {"calibration_images": 16}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0
    given = workdir / "given.pt"
    given.write_bytes((workdir / "runs/exp/model.pt").read_bytes())
    q = ("quantize", path, "--set", "name=q", "--set", "quantize.checkpoint=given.pt")
    assert cli(*q).exit_code == 0
    made = json.loads((workdir / "runs/q-ptq/summary.json").read_text())
    assert list(made["inputs"]) == ["../../given.pt"]  # relative to the run folder, wherever report runs
    given.write_bytes(given.read_bytes())  # re-written with the same bytes: the same network, reused
    assert "already complete" in cli(*q).output
    import torch  # the same network saved again with other metrics and config: still the same input

    payload = torch.load(given, weights_only=True)
    torch.save({**payload, "metrics": {"test_top1": 1.0}, "config": {"name": "renamed"}}, given)
    assert "already complete" in cli(*q).output
    _retrained(workdir, path, "given.pt", 7)
    res, dry = cli(*q), cli(*q, "--dry-run")
    assert res.exit_code == dry.exit_code == 2 and res.stderr == dry.stderr, (res.output, dry.output)
    assert ("'runs/q-ptq' was made from 'given.pt' as it was before that file was re-made; re-run with --fresh to "
            "redo it from the file as it is now, or --set name=<new name> to keep both") in " ".join(res.stderr.split())
    assert "stale: its input was re-made since" in cli("runs").stdout
    rep = cli("report", "runs/q-ptq")
    assert rep.exit_code == 2 and "its numbers are of the old network; redo it with `" in rep.stderr
    assert "--fresh`" in rep.stderr and not (workdir / "results").exists()
    (workdir / "sub").mkdir()
    with pytest.MonkeyPatch.context() as m:  # from another folder too
        m.chdir(workdir / "sub")
        rep = cli("report", "../runs/q-ptq", "--out", "../results")
    assert rep.exit_code == 2 and "'../given.pt' as it was before" in rep.stderr, rep.output
    assert cli("compare", "runs/q-ptq", "--table", "c").exit_code == 2
    assert cli(*q, "--fresh").exit_code == 0
    redone = json.loads((workdir / "runs/q-ptq/summary.json").read_text())
    assert redone["inputs"]["../../given.pt"] != made["inputs"]["../../given.pt"]
    assert redone["fp32_top1"] == json.loads((workdir / "runs/other7/summary.json").read_text())["top1"]
    assert cli("report", "runs/q-ptq").exit_code == 0
    # the config's own training run, retrained (train --fresh of other bytes) under its later stage
    assert cli("quantize", path).exit_code == 0
    _retrained(workdir, path, "runs/exp/model.pt", 8)
    res = cli("quantize", path)
    assert res.exit_code == 2 and "'runs/exp-ptq' was made from 'runs/exp/model.pt' as it was before" in res.stderr
    given.unlink()  # a finished run whose input is gone stands: it was made from what was there
    assert cli("report", "runs/q-ptq").exit_code == 0


def test_a_resumed_run_whose_input_is_gone_or_re_made_is_refused(workdir, tiny, monkeypatch):
    import rescomp.runner as runner
    from rescomp.config import validate
    from rescomp.errors import ConfigError
    from rescomp.rundir import record_made

    tiny = _quick(tiny)
    tiny["prune"] = {"share_per_step": 0.1, "steps": 2, "finetune_epochs": 1, "score_batches": 1}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0
    real, calls = runner.train_and_eval, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second step's fine-tuning
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(runner, "train_and_eval", interrupted)
        assert cli("prune", path).exit_code == 130
    folder = workdir / "runs/exp-prune-paper-taylor-custom"
    assert (folder / "step01/row.json").is_file() and not (folder / "summary.json").exists()
    saved = (workdir / "runs/exp/model.pt").read_bytes()
    _retrained(workdir, path, "runs/exp/model.pt", 9)
    res = cli("prune", path)
    assert res.exit_code == 2 and "as it was before that file was re-made; re-run with --fresh to start it again" \
        in " ".join(res.stderr.split()), res.output
    (workdir / "runs/exp/model.pt").unlink()
    res, dry = cli("prune", path), cli("prune", path, "--dry-run")
    assert res.exit_code == dry.exit_code == 2 and res.stderr == dry.stderr
    assert "was started from 'runs/exp/model.pt', which is gone, so it cannot resume" in " ".join(res.stderr.split())
    assert (folder / "step01/row.json").is_file()  # refused, not emptied
    (workdir / "runs/exp/model.pt").write_bytes(saved)
    assert cli("prune", path).exit_code == 0  # resumed from the network it was started from
    (workdir / "runs/exp/model.pt").unlink()  # finished, its input gone: it stands (not retrained under it)
    assert "already complete" in cli("prune", path).output and not (workdir / "runs/exp/model.pt").exists()
    # a resumed start checks again once its input is there (a file re-made while the claim was made)
    cfg = validate(tiny, "exp")
    with pytest.raises(ConfigError, match="re-run with --fresh to start it again"):
        other = workdir / "runs/other9/model.pt"
        record_made(folder, [other], cfg, "prune")  # recorded under another path: nothing to compare
        (workdir / "runs/exp/model.pt").write_bytes(other.read_bytes())
        record_made(folder, [workdir / "runs/exp/model.pt"], cfg, "prune")


def test_a_re_made_input_is_found_under_a_symlinked_runs_folder_and_runs_lists_what_it_cannot_read(workdir, tiny):
    tiny = _quick(tiny)
    tiny["quantize"] = {"calibration_images": 16}
    (workdir / "store/deep").mkdir(parents=True)
    (workdir / "runs").symlink_to(workdir / "store/deep")
    path = write_config(workdir, tiny)
    q = ("quantize", path, "--set", "name=q", "--set", "quantize.checkpoint=given.pt")
    res = _made_then_re_made(workdir, path, "given.pt", q, 7)
    assert res.exit_code == 2 and "was made from 'given.pt' as it was before" in res.stderr, res.output
    (workdir / "given.pt").write_bytes(b"not a checkpoint")  # unreadable: that run is flagged, the rest listed
    listing = cli("runs")
    assert listing.exit_code == 0 and "stale: cannot be checked" in listing.stdout and "other7" in listing.stdout


def test_a_folder_with_nothing_to_resume_is_taken_over_whatever_it_was_made_from(workdir, tiny):
    # what a run killed (SIGKILL, out of memory) before its first checkpoint leaves: its config and record
    tiny = _quick(tiny)
    tiny["quantize"] = {"calibration_images": 16}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0
    assert cli("quantize", path).exit_code == 0
    folder = workdir / "runs/exp-ptq"
    for f in folder.iterdir():
        if f.name not in ("config.yaml", "made.json"):
            f.unlink()
    _retrained(workdir, path, "runs/exp/model.pt", 4)
    dry, res = cli("quantize", path, "--dry-run"), cli("quantize", path)
    assert dry.exit_code == res.exit_code == 0, res.output
    assert json.loads((folder / "made.json").read_text())["inputs"]["../exp/model.pt"] == \
        json.loads((folder / "summary.json").read_text())["inputs"]["../exp/model.pt"]


def test_a_run_made_under_earlier_rules_of_its_stage_is_not_reused(workdir, tiny):
    tiny = _quick(tiny)
    tiny["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    path = write_config(workdir, tiny)
    assert cli("prune", path).exit_code == 0
    folder = workdir / "runs/exp-prune-paper-taylor-custom"
    assert json.loads((folder / "made.json").read_text())["rules"] == 2
    assert "already complete" in cli("prune", path).output
    (folder / "made.json").unlink()  # a folder made before runs kept a record: the rules of version 1
    assert "stale: made under its stage's earlier rules" in cli("runs").stdout
    rep = cli("report", "runs/exp-prune-paper-taylor-custom")
    assert rep.exit_code == 2 and "made under rescomp's earlier rules of its stage" in rep.stderr, rep.output
    res, dry = cli("prune", path), cli("prune", path, "--dry-run")
    assert res.exit_code == dry.exit_code == 2 and res.stderr == dry.stderr, (res.output, dry.output)
    assert "was made under rescomp's earlier prune rules (since then: the fast schedule's" in " ".join(res.stderr.split())
    assert cli("prune", path, "--fresh").exit_code == 0
    assert (folder / "made.json").is_file() and "already complete" in cli("prune", path).output
    assert cli("train", path).exit_code == 0  # a stage whose rules never changed reads an old folder as it is
    (workdir / "runs/exp/made.json").unlink(missing_ok=True)
    assert "already complete" in cli("train", path).output
    # a fine-tuning stage's rules changed only where its schedule is scaled (a warm-up, milestones, a step)
    tiny["magnitude_prune"] = {"share_per_step": 0.3, "steps": 1, "finetune_epochs": 1}
    for name, schedule in (("cos", {"name": "cosine"}), ("warm", {"name": "cosine", "warmup_epochs": 1})):
        mp = write_config(workdir, {**tiny, "name": name, "train": {**tiny["train"], "schedule": schedule}}, f"{name}.yaml")
        assert cli("magnitude-prune", mp).exit_code == 0
        folder = next((workdir / "runs").glob(f"{name}-mprune-*"))
        (folder / "made.json").unlink()  # as made before the record
        res = cli("magnitude-prune", mp)
        assert (res.exit_code, "already complete" in res.output) == ((0, True) if name == "cos" else (2, False)), res.output


def test_pruning_a_gated_network_on_activations_is_under_the_rules_that_score_its_gated_bns(tiny):
    from rescomp.config import validate
    from rescomp.rundir import rules

    tiny["model"] = {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1, 1]}}
    for criterion, version in (("taylor", 3), ("mean_activation", 3), ("l1", 2), ("random", 2)):
        assert rules(validate({**tiny, "prune": {"criterion": criterion}}, "t"), "prune")[0] == version, criterion
    tiny["model"].pop("gates")
    assert rules(validate({**tiny, "prune": {"criterion": "taylor"}}, "t"), "prune")[0] == 2


def test_coupled_scores_of_networks_that_add_in_place_are_under_the_rules_that_score_the_batchnorm(tiny):
    # their prune runs made before were scored on the block's output (test_prune: ..._in_place_op_follows)
    from rescomp.config import validate
    from rescomp.rundir import rules

    def version(arch, policy, criterion="taylor"):
        cfg = validate({**tiny, "model": {"arch": arch}, "prune": {"criterion": criterion, "policy": policy}}, "t")
        return rules(cfg, "prune")[0]

    assert version("resnet18", "coupled") == version("resnet50", "coupled", "mean_activation") == 4
    assert version("tests.my_models:build", "coupled") == 4  # a user's model: rescomp cannot tell
    assert version("resnet18", "paper") == version("resnet18", "coupled", "l1") == version("resnet20", "coupled") == 2
    assert version("squeezenet1_1", "coupled") == version("alexnet", "coupled") == 2  # in-place ReLUs alone


def test_prune_rules_follow_the_network_scored_not_the_config(workdir, tiny):
    # A gated network given to a config without gates is scored at its gated BatchNorms (rules 3); a plain
    # network given to a config with gates is not (rules 2). A folder made before runs recorded which is
    # judged by the networks it keeps: an old gated run is not reused, an old plain one is.
    tiny = _quick(tiny)
    tiny["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    tiny["model"]["depth"] = 14  # two units a stage: the second of each is gated
    plain = write_config(workdir, {**tiny, "name": "plain"}, "plain.yaml")
    gated = write_config(workdir, {**tiny, "name": "gated", "model": {**tiny["model"], "gates": True}}, "gated.yaml")
    assert cli("train", plain).exit_code == 0 and cli("train", gated).exit_code == 0
    for given, config, version in (("gated", plain, 3), ("plain", gated, 2)):
        res = cli("prune", config, "--set", f"prune.checkpoint=runs/{given}/model.pt")
        assert res.exit_code == 0, res.output
        folder = next(d for d in (workdir / "runs").glob("*-prune-*") if (d / "made.json").is_file()
                      and json.loads((d / "made.json").read_text()).get("inputs", {}).get(f"../{given}/model.pt"))
        made = json.loads((folder / "made.json").read_text())
        assert (made["rules"], made["gated"]) == (version, given == "gated"), made
        made.pop("gated")
        made["rules"] = 2  # as made before the scoring fix, which recorded rules 2 whatever it scored
        (folder / "made.json").write_text(json.dumps(made))
        again = lambda: cli("prune", config, "--set", f"prune.checkpoint=runs/{given}/model.pt")  # noqa: E731
        if given == "gated":
            refused = again()
            assert refused.exit_code == 2 and "a gated unit's last conv scored after its BatchNorm" in " ".join(
                refused.stderr.split()), refused.output
            # stopped in its first step: no model.pt, a step's checkpoint (its spec gated); or a broken model.pt
            for f in folder.rglob("model.pt"):
                f.unlink()
            (folder / "summary.json").unlink()
            (folder / "step01/checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copy(workdir / "runs/gated/model.pt", folder / "step01/checkpoints/last.pt")
            (folder / "model.pt").write_bytes(b"torn")
            res = again()
            assert res.exit_code == 2 and "earlier prune rules" in res.stderr, res.output
        else:
            assert again().exit_code == 0 and "already complete" in again().output
            made["rules"] = 3  # as recorded, before, for any config with gates: a later version has every change
            (folder / "made.json").write_text(json.dumps(made))
            assert "already complete" in again().output


def test_a_re_made_teacher_makes_its_students_run_stale(workdir, tiny):
    tiny = _quick(tiny)
    path = write_config(workdir, tiny)
    student = ("train", path, "--set", "name=student", "--set", "train.distill.teacher=teacher.pt")
    res = _made_then_re_made(workdir, path, "teacher.pt", student, 3)
    assert res.exit_code == 2 and "'runs/student' was made from 'teacher.pt' as it was before" in res.stderr


def test_a_chains_stage_and_the_stages_own_command_share_their_folder(workdir, tiny):
    """A chain writes the network a stage starts from into the stage's config (prune.checkpoint
    runs/exp/model.pt); the stage's own command leaves it unset, meaning the same network. Each refused the
    other's finished folder as "other settings" and advised --fresh, which deletes a valid result."""
    tiny = _quick(tiny)
    tiny["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    tiny["pipeline"] = ["train", "prune"]
    path = write_config(workdir, tiny)
    assert cli("run", path).exit_code == 0
    for dry in (["--dry-run"], []):
        res = cli("prune", path, *dry)
        assert res.exit_code == 0 and "complete" in res.output, res.output
    res = cli("prune", path, "--set", "name=other")  # the other way round: the stage's command first
    assert res.exit_code == 0, res.output
    res = cli("run", path, "--set", "name=other")
    assert res.exit_code == 0 and res.output.count("is already complete") == 2, res.output
    res = cli("prune", path, "--set", "prune.checkpoint=runs/other/model.pt")  # another network: refused
    assert res.exit_code == 2 and "prune.checkpoint ('runs/exp/model.pt' -> 'runs/other/model.pt')" in res.stderr


def test_a_chain_dry_run_judges_each_folder_as_the_chain_would(workdir, tiny):
    tiny = _quick(tiny)
    tiny["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    tiny["quantize"] = {"calibration_images": 16}
    tiny["pipeline"] = ["prune", "quantize"]
    path = write_config(workdir, tiny)
    res = cli("run", path, "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "0. train      -> runs/exp: new run",
        "1. prune      -> runs/exp-prune-paper-taylor-custom: new run",
        "2. quantize   -> runs/exp-prune-paper-taylor-custom-ptq: judged when stage 1 (prune) is complete"]
    assert not (workdir / "runs").exists()
    assert cli("run", path).exit_code == 0
    res = cli("run", path, "--dry-run")
    assert res.exit_code == 0 and res.stdout.count("complete: nothing to run") == 2, res.output
    assert "0. train" not in res.stdout  # the first stage is complete: the training run it starts from is not needed
    # a later stage's folder of other settings: refused by the dry run in the chain's words
    changed = ("run", path, "--set", "quantize.calibration_images=32")
    res, real = cli(*changed, "--dry-run"), cli(*changed)
    error = lambda r: [line for line in r.stderr.splitlines() if line.startswith("error:")]  # noqa: E731 (the chain logs too)
    assert res.exit_code == real.exit_code == 2 and error(res) == error(real) != [], (res.output, real.output)
    assert "quantize.calibration_images (16 -> 32)" in res.stderr
    assert "2. quantize   -> runs/exp-prune-paper-taylor-custom-ptq: refused (below)" in res.stdout
    assert cli("run", path, "--dry-run", "--nproc", "0").exit_code == 2
    res = cli(*changed, "--dry-run", "--fresh")
    assert res.exit_code == 0 and res.stdout.count("--fresh deletes it") == 2, res.output  # not the training run
    assert (f"0. train      -> runs/exp: complete: nothing to run (`rescomp train {path} --set "
            f"quantize.calibration_images=32 --fresh` redoes it)") in res.stdout, res.output
    # a later folder the chain would refuse stops it before its first stage runs, not after
    (workdir / "runs/exp-prune-paper-taylor-custom-ptq/config.yaml").unlink()  # no longer a run folder
    first = (workdir / "runs/exp-prune-paper-taylor-custom/summary.json").stat().st_mtime_ns
    res, dry = cli(*changed, "--fresh"), cli(*changed, "--fresh", "--dry-run")
    assert res.exit_code == dry.exit_code == 2 and error(res) == error(dry) != [], res.output
    assert (workdir / "runs/exp-prune-paper-taylor-custom/summary.json").stat().st_mtime_ns == first
    (workdir / "runs/exp-prune-paper-taylor-custom-ptq").rename(workdir / "elsewhere")
    trained = (workdir / "runs/exp/model.pt").stat().st_mtime_ns
    assert cli(*changed, "--fresh").exit_code == 0
    assert (workdir / "runs/exp/model.pt").stat().st_mtime_ns == trained
    assert (workdir / "runs/exp-prune-paper-taylor-custom/summary.json").stat().st_mtime_ns != first  # redone
    assert "calibration_images: 32" in (workdir / "runs/exp-prune-paper-taylor-custom-ptq/config.yaml").read_text()
    # a later folder of other settings behind a stage that is not complete is read now, by the dry run and the
    # chain's checks (it said "judged when stage 1 is complete" and exited 0; the chain pruned, then refused)
    shutil.rmtree(workdir / "runs/exp-prune-paper-taylor-custom")
    dry, res = cli("run", path, "--dry-run"), cli("run", path)
    assert dry.exit_code == res.exit_code == 2 and error(dry) == error(res) != [], (dry.output, res.output)
    assert "2. quantize   -> runs/exp-prune-paper-taylor-custom-ptq: refused (below)" in dry.stdout, dry.output
    assert "quantize.calibration_images (32 -> 16); re-run with --fresh" in dry.stderr  # not the unmade input's path
    assert not (workdir / "runs/exp-prune-paper-taylor-custom").exists()  # and the chain stopped before pruning
