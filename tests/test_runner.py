# `rescomp run`: chains of stages from one config (issue 12).
# Wrong versions these tests must catch (each checked once by mutating the code, scripts/mutants.py):
#  1. a stage starting from the config's trained network instead of the network the previous stage left
#       -> test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage
#  2. an interrupted chain redoing a finished step or stage -> same test
#  3. a stage entry's keys leaking into the stages after it -> same test
#  4. a chain that cannot work running its first stages before it fails (folders left behind)
#       -> test_a_chain_that_cannot_work_is_refused_before_anything_runs
#  5. a stage taking an input it cannot (layer_drop on an ungated network, a second quantize, train
#     after another stage), or refusing one it can
#       -> test_every_stage_composes_with_every_stage_that_takes_its_output
#  6. prune's shares counted over the config's network when the chain hands it another
#       -> test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage
# The step runner every stepped stage uses (rescomp.runner.StageRun.step, issue 12):
#  7. a finished step redone on resume -> test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage
#  8. a step not seeded from (seed, step), so what it draws depends on what ran before it in the process
#       -> test_a_step_draws_the_same_whatever_ran_before_it
#  9. a step's row written before its fine-tuning ends (a step interrupted in fine-tuning counted as done)
#       -> same test
# A network given to one stage's own command (its section's checkpoint), judged as a chain judges it:
# 10. an int8.pt of any backend given where an fp32 network is taken (a stage's checkpoint, a chain's first
#     stage, a distillation teacher) failing with a traceback (KeyError 'state_dict') or "weights do not
#     fit", or running on -> test_an_int8_network_given_where_an_fp32_one_is_taken_is_refused_in_one_line
# 11. a stage's own command taking a network its chain would refuse (prune or quantize of a weight-shared
#     one, whose codes are how it is stored; prune, binarize or layer_drop of a magnitude-pruned one, whose
#     zeros would grow back) -> test_a_stage_command_refuses_what_its_chain_refuses
# 13. a summary's `source` relative to the shell's folder, which a layer-drop that kept no deletion handed on
#     to the next stage as it was -> test_a_stage_records_the_network_it_started_from_as_the_config_names_it_...
# 12. a network of another number of classes than the data's given to a stage, a chain's first stage or
#     as a teacher: with more, scored as if its classifier fit (exit 0, a top-1 over the wrong outputs);
#     with fewer, a traceback at the first label past them; or only one of the two refused
#       -> test_a_network_of_another_number_of_classes_is_refused_in_one_line

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from rescomp.cli import app
import rescomp.stages  # noqa: F401  (registers the stages)
from rescomp.runner import STAGES

from conftest import write_config

PRUNE = "prune-paper-taylor-custom"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _chain(tiny: dict, pipeline: list) -> dict:
    tiny["model"] = {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1, 1]}}
    tiny["data"]["synthetic"] = {"train_size": 48, "test_size": 32, "num_classes": 10}
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 1, "score_batches": 1}
    tiny["layer_drop"] = {"k": 1, "retrain_epochs": 1, "max_units": 1, "score_images": 16, "tolerance": 100.0,
                          "timing": {"batch_size": 2, "runs": 1, "warmup": 0},
                          "baselines": {"scratch": False, "distill": False}}
    tiny["quantize"] = {"calibration_images": 16}
    tiny["magnitude_prune"] = {"share_per_step": 0.3, "steps": 1, "finetune_epochs": 1}
    tiny["weight_share"] = {"conv_bits": 2, "fc_bits": 2, "iterations": 5, "finetune_epochs": 1}
    tiny["pipeline"] = pipeline
    return tiny


def _summary(workdir, folder: str) -> dict:
    return json.loads((workdir / "runs" / folder / "summary.json").read_text())


def test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage(workdir, tiny, monkeypatch):
    import rescomp.runner as pr

    path = write_config(workdir, _chain(tiny, ["train", {"prune": {"steps": 2, "share_per_step": 0.2}},
                                               "layer_drop", "quantize"]))
    real, calls = pr.train_and_eval, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second prune step's fine-tuning
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pr, "train_and_eval", interrupted)
    assert cli("run", path).exit_code == 130
    first = workdir / f"runs/exp-{PRUNE}/step01/row.json"
    made = first.stat().st_mtime_ns
    assert not (workdir / f"runs/exp-{PRUNE}/summary.json").exists()
    monkeypatch.setattr(pr, "train_and_eval", real)
    res = cli("run", path)
    assert res.exit_code == 0, res.output
    assert first.stat().st_mtime_ns == made  # the finished step was not redone
    prune = _summary(workdir, f"exp-{PRUNE}")
    ld = _summary(workdir, f"exp-{PRUNE}-layerdrop-gate-k1-n1")
    q = _summary(workdir, f"exp-{PRUNE}-layerdrop-gate-k1-n1-ptq")
    assert [r["step"] for r in prune["rows"]] == [0, 1, 2] and prune["source"].endswith("runs/exp/model.pt")
    assert ld["source"].endswith(f"runs/exp-{PRUNE}/step02/model.pt")  # the last pruned network
    assert q["source"].endswith(f"runs/exp-{PRUNE}-layerdrop-gate-k1-n1/step01/model.pt")
    assert q["arch"]["deleted"] and q["arch"]["shapes"]  # int8 of the pruned, shortened network
    saved = yaml.safe_load((workdir / f"runs/exp-{PRUNE}-layerdrop-gate-k1-n1/config.yaml").read_text())
    assert saved["prune"]["steps"] == 1 and saved["pipeline"] is None  # prune's entry stayed with prune
    again = cli("run", path)
    assert again.exit_code == 0 and again.output.count("->") == 4


def test_a_stage_records_the_network_it_started_from_as_the_config_names_it_from_any_folder(workdir, tiny, monkeypatch):
    """A summary's `source` is relative to the config's project, as a config path: the wrong version wrote it
    relative to the shell's folder ('../runs/exp/model.pt' from sub/), and layer-drop, where no deletion kept
    the top-1, handed the next stage of a chain that path, which a chain resumed from another folder
    (or a chain from sub/ read back from the project) took from its own folder: a network not there."""
    from rescomp.config import load_config
    from rescomp.stages.layer_drop import _output

    path = write_config(workdir, _chain(tiny, ["train", "quantize"]))
    (workdir / "sub").mkdir()
    monkeypatch.chdir(workdir / "sub")
    assert cli("run", "../exp.yaml").exit_code == 0
    assert _summary(workdir, "exp-ptq")["source"] == "runs/exp/model.pt"
    ld = {"rows": [{"method": "layer-drop", "step": 0, "top1": 50.0}, {"method": "layer-drop", "step": 1, "top1": 10.0}],
          "stop_on": "test", "source": "runs/exp/model.pt"}  # the first deletion lost: the start network is the answer
    for here in (workdir / "sub", workdir):
        monkeypatch.chdir(here)
        found = _output(load_config(path, ["layer_drop.tolerance=0"]), workdir / "runs/exp-ld", ld)
        assert found.is_file() and found.resolve() == (workdir / "runs/exp/model.pt").resolve()


@pytest.mark.parametrize("stage", ["prune", "layer_drop"])
def test_a_stage_resumed_at_a_step_gives_the_rows_of_one_never_interrupted(workdir, tiny, monkeypatch, stage):
    import rescomp.runner as runner

    cfg = _chain(tiny, ["train", {stage: {"steps": 2} if stage == "prune" else {"max_units": 2}}])
    cfg["prune"]["share_per_step"] = 0.2
    straight = write_config(workdir, {**cfg, "name": "straight"}, "straight.yaml")
    assert cli("run", straight).exit_code == 0
    real, calls = runner.Trainer.fit, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # training, step 1's fine-tuning, then step 2's
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runner.Trainer, "fit", interrupted)
    path = write_config(workdir, cfg)
    assert cli("run", path).exit_code == 130
    folder = next(p for p in (workdir / "runs").iterdir() if p.name.startswith("exp-"))
    assert (folder / "step01/row.json").is_file() and not (folder / "step02/row.json").exists()
    monkeypatch.setattr(runner.Trainer, "fit", real)
    assert cli("run", path).exit_code == 0  # resumed in whatever random state the interrupted run left
    keys = ("step", "top1", "loss", "params", "macs")
    rows = lambda name: [{k: r.get(k) for k in keys} for r in _summary(workdir, name)["rows"]]  # noqa: E731
    assert rows(folder.name) == rows(folder.name.replace("exp", "straight", 1))
    assert len(rows(folder.name)) == 3


def test_a_step_draws_the_same_whatever_ran_before_it(workdir, tiny):
    import torch

    from rescomp.config import validate
    from rescomp.context import RunContext
    from rescomp.data import prepare
    from rescomp.models import build_model
    from rescomp.runner import StageRun

    cfg = validate(_chain(tiny, ["train"]), "t")
    spec = cfg.model.spec(cfg.data.num_classes)
    model = build_model(spec)
    run = StageRun(cfg, RunContext(torch.device("cpu"), cfg.seed), prepare(cfg.data, cfg.seed), workdir / "run", model,
                   {"arch": spec}, None)
    draws = []

    def transform():  # a technique that draws from the global generator (a k-means start, a random criterion)
        draws.append(torch.rand(1).item())
        return model, spec, {}

    for before, n, base in ((1, 1, "a"), (2, 1, "b"), (1, 2, "c")):
        torch.manual_seed(before)
        _, _, row = run.step(n, transform, lambda m, s, info, ev: {"top1": ev["top1"]}, epochs=1, base=workdir / base)
        assert (workdir / base / f"step0{n}/row.json").is_file() and "top1" in row
    assert draws[0] == draws[1] != draws[2]  # seeded from (seed, step), not from what ran before


@pytest.mark.parametrize("pipeline, message", [
    (["train", "quantize", "prune"], "stage 3 (prune) cannot follow quantize: prune takes an fp32 network"),
    (["train", "quantize", "quantize"], "a chain quantizes once"),
    (["prune", "train"], "stage 2 (train) cannot follow prune: train starts a chain"),
    (["train", "squeeze"], "unknown pipeline stage 'squeeze'"),
    (["train", {"prune": {"schedule": "fast"}}], "leaves no one network for the next stage"),
    (["train", {"prune": {"criterion": "tailor"}}], "unknown pruning criterion 'tailor' (did you mean 'taylor'?)"),
    ([{"train": {}, "prune": {}}], "write one stage per entry"),
    (["quantize"], "no trained model at"),
    (["train", "magnitude_prune", "prune"], "magnitude_prune's zeros would grow back"),
    (["train", "weight_share", "quantize"], "quantize cannot take a network made by weight_share or binarize"),
    (["train", "binarize", "weight_share"], "weight_share cannot take a network made by weight_share or binarize"),
    (["train", "magnitude_prune", "binarize"], "binarize retrains every weight without a mask"),  # a chain that starts later needs its input to exist already
])
def test_a_chain_that_cannot_work_is_refused_before_anything_runs(workdir, tiny, pipeline, message):
    path = write_config(workdir, _chain(tiny, pipeline))
    res = cli("run", path)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (workdir / "runs").exists()


def test_layer_drop_needs_a_gated_network(workdir, tiny):
    cfg = _chain(tiny, ["train", "prune", "layer_drop"])
    cfg["model"].pop("gates")
    res = cli("run", write_config(workdir, cfg))
    assert res.exit_code == 2 and "stage 3 (layer_drop) cannot follow prune: layer_drop needs gated" in res.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny gated network every composed pair starts from."""
    import copy

    from conftest import TINY

    folder = tmp_path_factory.mktemp("trained")
    cfg = _chain(copy.deepcopy(TINY), ["train"])
    path = write_config(folder, cfg)
    res = cli("run", path)
    assert res.exit_code == 0, res.output
    return folder / "runs/exp/model.pt"


@pytest.mark.parametrize("first", STAGES.names())
@pytest.mark.parametrize("second", STAGES.names())
def test_every_stage_composes_with_every_stage_that_takes_its_output(workdir, tiny, trained, first, second):
    from rescomp.runner import traits_of

    a, b = STAGES.get(first), STAGES.get(second)
    entry = first if a.first_only else {first: {"checkpoint": str(trained)}}
    path = write_config(workdir, _chain(tiny, [entry, second]))
    res = cli("run", path)
    traits = a.gives(traits_of({"arch": {"gates": {"init": [-1, 1]}}}))
    if b.first_only or b.refuses(traits):
        assert res.exit_code == 2 and "stage 2" in res.stderr and not (workdir / "runs").exists()
        return
    assert res.exit_code == 0, res.output
    folders = [p for p in (workdir / "runs").iterdir()]
    assert len(folders) == 2 and all((f / "summary.json").is_file() for f in folders)
    if (first, second) == ("layer_drop", "prune"):  # shares count the filters of the network it was given
        from rescomp.config import load_config
        from rescomp.stages.prune import check

        given = json.loads(next(f for f in folders if f.name.endswith(PRUNE)).joinpath("summary.json").read_text())
        assert given["prunable_filters"] < check(load_config(path))[1]


@pytest.fixture(scope="module")
def int8_networks(trained):
    """The trained tiny network quantized by each backend's family: FX (a state_dict), PT2E (a program's
    bytes), ONNX Runtime (a graph's bytes)."""
    config = trained.parent.parent.parent / "exp.yaml"
    out = {}
    for backend in ("x86", "pt2e", "onnxruntime"):
        res = cli("quantize", config, "--set", f"quantize.backend={backend}", "--set", "quantize.calibration_images=16",
                  "--set", "measure.latency=false")
        assert res.exit_code == 0, res.output
        out[backend] = next(trained.parent.parent.glob(f"exp-ptq{'' if backend == 'x86' else '-' + backend}/int8.pt"))
    return out


@pytest.mark.parametrize("backend", ["x86", "pt2e", "onnxruntime"])
def test_an_int8_network_given_where_an_fp32_one_is_taken_is_refused_in_one_line(workdir, tiny, int8_networks, backend):
    int8 = int8_networks[backend]
    path = write_config(workdir, _chain(tiny, None))  # gated, as layer_drop's own check needs
    sections = [s for s in STAGES.names() if not STAGES.get(s).first_only]
    assert set(sections) == {"prune", "layer_drop", "magnitude_prune", "weight_share", "binarize", "quantize"}
    for section in sections:
        res = cli(section.replace("_", "-"), path, "--set", f"{section}.checkpoint={int8}")
        assert res.exit_code == 2 and "Traceback" not in res.output, (section, res.output)
        assert f"error: {section}.checkpoint '{int8}': " in res.stderr and " int8" in res.stderr, (section, res.stderr)
        assert "model.pt it was" in res.stderr, res.stderr  # says what to give instead
    res = cli("run", write_config(workdir, _chain(tiny, [{"prune": {"checkpoint": str(int8)}}, "quantize"]), "c.yaml"))
    assert res.exit_code == 2 and "pipeline stage 1 (prune): prune takes an fp32 network, and this one is int8" in res.stderr
    tiny["train"]["distill"] = {"teacher": str(int8)}
    res = cli("train", write_config(workdir, tiny, "d.yaml"))
    assert res.exit_code == 2 and f"train.distill.teacher: '{int8}' is an int8 network" in res.stderr, res.output
    assert not (workdir / "runs").exists()  # nothing started


def test_a_network_of_another_number_of_classes_is_refused_in_one_line(workdir, tiny, trained):
    import copy

    sections = [s for s in STAGES.names() if not STAGES.get(s).first_only]
    for classes in (5, 20):  # the trained network classifies 10: more, then fewer than the data's
        cfg = _chain(copy.deepcopy(tiny), None)
        cfg["data"]["synthetic"]["num_classes"] = classes
        path = write_config(workdir, cfg, f"c{classes}.yaml")
        for section in sections:
            res = cli(section.replace("_", "-"), path, "--set", f"{section}.checkpoint={trained}")
            assert res.exit_code == 2 and "Traceback" not in res.output, (section, res.output)
            assert f"error: {section}.checkpoint '{trained}': it classifies 10 classes, but the data (synthetic) has " \
                   f"{classes}; give a network trained on this dataset" in res.stderr, (section, res.stderr)
        chain = _chain(copy.deepcopy(cfg), [{"prune": {"checkpoint": str(trained)}}, "quantize"])
        chain["data"]["synthetic"]["num_classes"] = classes
        res = cli("run", write_config(workdir, chain, f"r{classes}.yaml"))
        assert res.exit_code == 2 and "it classifies 10 classes" in res.stderr, res.output
        cfg["train"]["distill"] = {"teacher": str(trained)}
        res = cli("train", write_config(workdir, cfg, f"t{classes}.yaml"))
        assert res.exit_code == 2 and f"train.distill.teacher '{trained}': it classifies 10 classes" in res.stderr, \
            res.output
    assert not (workdir / "runs").exists()  # nothing started


def test_a_chain_with_a_broken_summary_is_refused_in_one_line(workdir, tiny):
    """A finished stage whose summary.json names no network (a JSON object without its rows): the chain
    crashed (KeyError 'rows', or TypeError for a list) in its plan, --dry-run included. Now one line
    naming the file and --fresh, exit 2."""
    path = write_config(workdir, _chain(tiny, ["train", "prune", "quantize"]))
    assert cli("run", path).exit_code == 0
    prune = next((workdir / "runs").glob("exp-prune-*"))
    for content in ({"name": prune.name, "stage": "prune"}, [1]):
        (prune / "summary.json").write_text(json.dumps(content))
        for args in ((), ("--dry-run",)):
            res = cli("run", path, *args)
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output
            assert re.search(r"summary\.json (is not a complete prune summary|is not a rescomp run summary).*--fresh",
                             " ".join(res.stderr.split())), res.stderr


def test_a_stage_command_refuses_what_its_chain_refuses(workdir, tiny, trained):
    config = trained.parent.parent.parent / "exp.yaml"
    res = cli("weight-share", config, "--set", "name=coded")
    assert res.exit_code == 0, res.output
    coded = next(trained.parent.parent.glob("coded-*/step01/model.pt"))
    path = write_config(workdir, _chain(tiny, None))
    for section in ("prune", "quantize"):
        res = cli(section, path, "--set", f"{section}.checkpoint={coded}")
        assert res.exit_code == 2 and f"{section} cannot take a network made by weight_share or binarize" in res.stderr, \
            res.output
    assert not (workdir / "runs").exists()
    res = cli("measure", coded, "--set", "measure.latency=false")  # the network itself is fine
    assert res.exit_code == 0, res.output
    # magnitude_prune's network keeps its zeros without masks: what retrains every weight would regrow them
    res = cli("magnitude-prune", config, "--set", "name=sparse")
    assert res.exit_code == 0, res.output
    sparse = next(trained.parent.parent.glob("sparse-mprune-*/model.pt"))
    for section in ("prune", "binarize", "layer_drop"):
        res = cli(section.replace("_", "-"), path, "--set", f"{section}.checkpoint={sparse}")
        assert res.exit_code == 2 and "magnitude_prune's zeros would grow back" in res.stderr, (section, res.output)
    for section in ("weight_share", "quantize"):  # they keep the zeros: what it is made for
        res = cli(section.replace("_", "-"), path, "--set", f"{section}.checkpoint={sparse}", "--dry-run")
        assert res.exit_code == 0, (section, res.output)
    assert not (workdir / "runs").exists()


# A fine-tune's schedule (rescomp.runner.retrain_config, the data audit). Wrong version: the training
# schedule's warm-up and milestones kept in epochs, so that a 1-epoch fine-tune after a 2-epoch warm-up is
# all warm-up (it ends at half its lr, never decayed) and a multistep one passes no milestone.
def test_a_fine_tune_runs_the_training_schedule_scaled_to_its_length(tiny):
    from rescomp.config import validate
    from rescomp.runner import retrain_config
    from rescomp.train import lr_lambda

    tiny["train"].update(epochs=30, schedule={"name": "cosine", "warmup_epochs": 2})
    ft = retrain_config(validate(tiny, "t"), 3, lr=0.04)
    assert ft.train.epochs == 3 and ft.train.schedule.warmup_epochs == pytest.approx(0.2)
    steps = 10
    f = lr_lambda(ft.train.schedule, 3, steps)
    lrs = [0.04 * f(i) for i in range(3 * steps)]
    assert max(lrs) == pytest.approx(0.04, rel=0.05) and lrs[-1] < 0.001  # warms up, peaks, decays
    one = retrain_config(validate(tiny, "t"), 1)
    g = lr_lambda(one.train.schedule, 1, steps)
    assert g(steps - 1) < 0.05 and max(g(i) for i in range(steps)) > 0.9  # a 1-epoch fine-tune decays too
    tiny["train"]["schedule"] = {"name": "multistep", "milestones": [10, 20], "step_size": 5}
    ms = retrain_config(validate(tiny, "t"), 3).train.schedule
    assert ms.milestones == pytest.approx([1, 2]) and ms.step_size == pytest.approx(0.5)
    assert validate(tiny, "t").train.schedule.milestones == [10, 20]  # the training config is left as it was
