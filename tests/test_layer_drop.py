# Wrong versions of residual-block deletion (../shared/papers/residual-block-deletion.txt) that these
# tests must catch; each was checked by mutating the code that way, running this file, and reverting.
#  1. deleting a unit whose w is 0 changes the outputs, or leaves its parameters behind
#       -> test_a_unit_whose_gate_is_zero_deletes_without_changing_outputs
#  2. the first unit of a stage is gated / deletable (paper 3.1 keeps it)
#       -> test_bottleneck_resnet56_depths_match_the_paper
#  3. the criterion deletes the largest |w|, or drop() changes its input model
#       -> test_criteria_rank_and_the_drop_is_rebuilt_from_its_spec
#  4. output_norm measures F(x) instead of w * F(x) (paper, Figure 5) -> test_output_norm_scales_with_the_gate
#  5. gates start at a constant, outside the configured range, or normal (paper 4.2.6: uniform random)
#       -> test_gates_start_uniform_in_the_configured_range
#     `gates: true` (the natural way to say "gated") ended in "'bool' object has no attribute 'get'"
#  6. gates are weight-decayed by default -> test_gates_skip_weight_decay_unless_asked
#  7. no stop rule: with keep_going false the loop deletes on past the first step below the full
#     network's top-1 -> test_the_loop_stops_at_the_first_drop_and_the_table_follows_it
#  8. the table's smallest lossless network is the smallest of all rows above the floor, not the last
#     before the first drop -> test_stop_rule_is_the_last_network_before_the_first_drop,
#     test_the_loop_stops_at_the_first_drop_and_the_table_follows_it
#  8b. stop_on: val ignored by the loop's stop rule or by the answer (the chosen network and the model.pt
#     handed on), its metrics taken on another split, asked for without a split, or a given network
#     accepted that was trained on the split's images (another seed or fraction)
#       -> test_stop_on_val_judges_deletions_on_held_out_training_images
#  9. retraining at another learning rate than train.optimizer.lr (lr/100 as for single weights, or the
#     decayed end of the schedule) -> test_retraining_restarts_from_the_initial_learning_rate
# 10. `_costs` moves the network to the CPU in place (on a GPU the next step then scores a CPU network
#     with GPU batches) -> test_costs_measure_a_copy_and_leave_the_model_where_it_was
# 11. baselines that are the irregular structures the loop reached, or lose the run's width / shortcut,
#     instead of regular ResNets of the family (paper 4.2.2) -> test_regular_baselines_are_the_family_at_each_depth,
#     test_the_baselines_are_regular_networks_from_scratch_and_distilled
# 12. the distilled baseline trained without its teacher -> test_the_baselines_are_regular_networks_from_scratch_and_distilled
# 13. an epochs column that is not what the network was trained in all, or "matched" budgets that do
#     not match the layer-drop network's at that depth -> test_every_row_states_the_epochs_it_was_trained
# 14. notes that do not state the budgets and limits -> test_the_notes_state_budgets_and_what_rows_cannot_show
# 15. the distillation loss without the T^2 factor, or with teacher and student swapped
#       -> test_distillation_loss_by_hand
# 16. `gates: {}` building a plain network without a word (an empty value changes nothing)
#       -> test_gates_start_uniform_in_the_configured_range
# 17. the dry run leaving out the training run it starts from, listing one where a checkpoint is given, or
#     advising that run's --fresh -> test_the_dry_run_says_the_training_run_it_starts_from
# 18. a pruned network's epochs read from its checkpoint's config (only its last fine-tune), or an old
#     checkpoint that does not say taken anyway; its reached baselines built without its pruned shapes
#       -> test_a_pruned_network_counts_every_epoch_it_was_trained

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rescomp import checkpoint
from rescomp.cli import app
from rescomp.compress.distill import kd_loss
from rescomp.compress.layer_drop import Gated, choose, delete_units, depth, drop, gates, output_norm, residual_units
from rescomp.config import OptimizerConfig, validate
from rescomp.context import RunContext
from rescomp.errors import ConfigError
from rescomp.stages.layer_drop import regular_baselines, run_layer_drop
from rescomp.models import build_model
from rescomp.train import param_groups

from conftest import TINY, write_config

GATED = {"init": [-1.0, 1.0]}
ARCHS = [
    ({"arch": "cifar_resnet", "depth": 14, "width": 4}, 6, 3),  # basic: 3 stages x 2 units
    ({"arch": "resnet56_bottleneck", "width": 4}, 18, 15),
    ({"arch": "resnet56"}, 27, 24),
    ({"arch": "resnet18"}, 8, 4),
    ({"arch": "resnet50"}, 16, 12),
    ({"arch": "resnet50v2"}, 16, 9),  # 1+2+4+2: the first of a stack projects, the last of the first 3 strides
]


@pytest.mark.parametrize("spec, units, deletable", ARCHS, ids=lambda v: v["arch"] if isinstance(v, dict) else str(v))
def test_a_unit_whose_gate_is_zero_deletes_without_changing_outputs(spec, units, deletable):
    torch.manual_seed(0)
    model = build_model({"num_classes": 10, **spec, "gates": GATED}).eval()
    found = residual_units(model)
    assert (len(found), sum(u.deletable for u in found)) == (units, deletable)
    victim = [u for u in found if u.deletable][-1]
    with torch.no_grad():
        model.get_submodule(f"{victim.name}.{victim.residual_out}").gate.zero_()
        x = torch.randn(2, 3, 32, 32)
        before = model(x)
        params = sum(p.numel() for p in model.parameters())
        delete_units(model, [victim.name])
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < params
    assert victim.name not in {u.name for u in residual_units(model)}


def test_bottleneck_resnet56_depths_match_the_paper():
    model = build_model({"arch": "resnet56_bottleneck", "num_classes": 10, "gates": GATED})
    assert depth(model) == 56
    names = [u.name for u in residual_units(model) if u.deletable]
    assert len(names) == 15 and "layer1.0" not in names and "layer2.0" not in names
    delete_units(model, names)
    assert depth(model) == 11  # the paper's smallest network
    spec = {"arch": "resnet56_bottleneck", "num_classes": 10, "gates": GATED, "deleted": names}
    assert depth(build_model(spec)) == 11


def test_gates_skip_weight_decay_unless_asked():
    model = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 14, "width": 4, "gates": GATED})
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=1e-4))
    assert len(no_decay["params"]) == 3 and all(p.ndim == 0 for p in no_decay["params"])
    assert len(param_groups(model, OptimizerConfig(weight_decay=1e-4, gate_weight_decay=True))) == 1
    # with no_decay_bn_bias too, the gates (0-d) still decay when asked: BatchNorm and biases do not
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=1e-4, gate_weight_decay=True, no_decay_bn_bias=True))
    assert sum(p.ndim == 0 for p in decay["params"]) == 3 and all(p.ndim == 1 for p in no_decay["params"])


def test_criteria_rank_and_the_drop_is_rebuilt_from_its_spec():
    torch.manual_seed(0)
    spec = {"arch": "cifar_resnet", "num_classes": 10, "depth": 14, "width": 4, "gates": GATED}
    model = build_model(spec).eval()
    for name, w in zip(["layer1.1", "layer2.1", "layer3.1"], [0.9, -0.05, 0.3]):
        model.get_submodule(f"{name}.bn2").gate.data.fill_(w)
    assert choose({"a": 0.3, "b": 0.1, "c": 0.2}, 2) == ["b", "c"]
    x = torch.randn(4, 3, 32, 32)
    dropped, new_spec, info = drop(model, spec, 2, "gate", [x], 0)
    assert info["deleted"] == ["layer2.1", "layer3.1"] and new_spec["deleted"] == ["layer2.1", "layer3.1"]
    assert "layer2.1" in gates(model)  # the input model is untouched
    rebuilt = build_model(new_spec)
    rebuilt.load_state_dict(dropped.state_dict())
    assert torch.equal(rebuilt.eval()(x), dropped.eval()(x))
    with pytest.raises(ConfigError, match="only 3 deletable units"):
        drop(model, spec, 4, "gate", [x], 0)


def test_output_norm_scales_with_the_gate():
    torch.manual_seed(0)
    model = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 14, "width": 4, "gates": GATED}).eval()
    x = [torch.randn(8, 3, 32, 32)]
    g = model.layer3[1].bn2
    before = output_norm(model, x, 0)["layer3.1"]
    g.gate.data *= -2
    assert output_norm(model, x, 0)["layer3.1"] == pytest.approx(2 * before, rel=1e-5)
    seen = {}
    model.layer3[1].register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    model(x[0])
    block = model.layer3[1]
    with torch.no_grad():
        inner = g.inner(block.conv2(F.relu(block.bn1(block.conv1(seen["x"])))))  # F(x) before the gate
    assert isinstance(g, Gated)
    assert output_norm(model, x, 0)["layer3.1"] == pytest.approx(float((inner * g.gate.detach()).flatten(1).norm(dim=1).mean()), rel=1e-4)


def test_distillation_loss_by_hand():
    s, t, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([0])  # KL(p||q) != KL(q||p)
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    kl = float((p * (p.log() - q.log())).sum())
    assert float(kd_loss(s, t, y, temperature=2.0, alpha=1.0)) == pytest.approx(4 * kl, rel=1e-6)
    assert float(kd_loss(s, t, y, temperature=2.0, alpha=0.0)) == pytest.approx(float(F.cross_entropy(s, y)))


def _layer_drop_cfg(tiny, **ld):
    tiny["model"] = {"arch": "cifar_resnet", "depth": 20, "block": "bottleneck", "width": 4, "gates": GATED}
    tiny["data"]["synthetic"]["num_classes"] = 100  # CIFAR-100's shape
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"batch_sizes": [1], "warmup": 1, "repeats": 1}
    tiny["layer_drop"] = {"k": 1, "retrain_epochs": 1, "keep_going": True, "score_images": 32,
                          "timing": {"batch_size": 4, "runs": 2, "warmup": 1}, "baselines": {"epochs": 1}, **ld}
    tiny["report"] = {"table": "ld"}
    return tiny


def test_layer_drop_end_to_end_resumes_and_reports(workdir, tiny, monkeypatch):
    cfg = validate(_layer_drop_cfg(tiny), "t")
    import rescomp.stages.layer_drop as runner

    real = runner._costs
    calls = {"n": 0}

    def die_after_step_2(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # full network, step 1, then interrupted in step 2
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "_costs", die_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_layer_drop(cfg)
    monkeypatch.setattr(runner, "_costs", real)
    out, s = run_layer_drop(cfg)
    assert out.name.endswith("-layerdrop-gate-k1-n1")
    # a shortened network is timed interleaved with the full one; its relative costs divide by the full
    # network's times taken beside it
    steps = [r for r in s["rows"] if r["method"] == "layer-drop"]
    assert "reference_forward_ms_b4" not in steps[0]
    assert all(r["reference_forward_ms_b4"] > 0 and "speedup_cpu_b1" in r for r in steps[1:])
    small = next(r for r in steps if r["layers"] == s["smallest_lossless"]["layers"])
    if small["step"]:
        assert s["relative_smallest_lossless"]["forward"] == pytest.approx(
            100 * small["forward_ms_b4"] / small["reference_forward_ms_b4"])
    method = [r for r in s["rows"] if r["method"] == "layer-drop"]
    assert [r["layers"] for r in method] == [20, 17, 14, 11]  # 3 deletable units, 3 convs each
    assert {r["method"] for r in s["rows"]} == {"layer-drop", "scratch", "distill"}
    assert [r["layers"] for r in s["rows"] if r["method"] == "scratch"] == [20, 11]  # regular: 2 and 1 units per stage
    assert method[0]["params"] > method[-1]["params"] and "forward_ms_b4" in method[0]
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    table = workdir / "results" / "ld"
    assert {"accuracy_vs_layers.png", "gates.png", "table.md"} <= {p.name for p in table.iterdir()}
    md = (table / "table.md").read_text()
    assert "Cost of the smallest lossless network" in md and "What these rows can and cannot show" in md
    assert "| epochs |" in md


@pytest.mark.parametrize("change, message", [
    ({"layer_drop.k": 0}, "layer_drop.k: Input should be greater than or equal to 1"),
    ({"layer_drop.k": 4}, "layer_drop.k=4, but cifar_resnet has only 3 deletable units"),
    ({"layer_drop.max_units": 9}, "has only 3 deletable units"),
    ({"model.gates": None}, "layer-drop needs gated residual units"),
    ({"layer_drop.criterion": "gates"}, "unknown layer-drop criterion 'gates' (did you mean 'gate'?)"),
    ({"model": {"arch": "vgg16", "gates": GATED}}, "model.gates: this model has no residual unit a gate could go on"),
    ({"layer_drop.baselines.depths": [17]}, "layer_drop.baselines.depths: 17 is no depth of the regular cifar_resnet "
                                            "family; valid: 20, 11"),
    ({"layer_drop.baselines.structure": "reached", "layer_drop.baselines.depths": [11]},
     "layer_drop.baselines.depths applies to regular baselines only"),
    ({"model": {"arch": "resnet18", "gates": GATED}}, "layer_drop.baselines.structure=regular: no regular family for "
                                                      "model 'resnet18'"),
    ({"layer_drop.baselines.epochs": "matchd"}, "layer_drop.baselines.epochs: must be a number of epochs"),
])
def test_layer_drop_bad_input(workdir, tiny, change, message):
    path = write_config(workdir, _layer_drop_cfg(tiny))
    args = [a for k, v in change.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    res = CliRunner().invoke(app, ["layer-drop", str(path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert not (workdir / "runs").exists()


def test_distillation_is_a_training_option(workdir, tiny):
    from rescomp.stages.train import run_train

    tiny["measure"] = {"latency": False}
    teacher_dir, _ = run_train(validate({**tiny, "name": "teacher"}, "t"))
    student = {**tiny, "name": "student",
               "train": {**tiny["train"], "distill": {"teacher": str(teacher_dir / "model.pt"), "temperature": 2.0}}}
    _, s = run_train(validate(student, "t"))
    plain = run_train(validate({**tiny, "name": "plain"}, "t"))[1]
    assert s["loss"] != plain["loss"]  # same seed and data: only the distillation term differs
    path = write_config(workdir, {**student, "name": "orphan",
                                  "train": {**student["train"], "distill": {"teacher": "nowhere.pt"}}})
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 2 and "checkpoint 'nowhere.pt' not found" in res.stderr
    assert not (workdir / "runs" / "orphan").exists()


def test_stop_rule_is_the_last_network_before_the_first_drop():
    """The paper stops at the first deletion that falls below the full network's accuracy: rows of
    56 / 50 / 44 / 38 layers at 90.0 / 90.2 / 89.1 / 90.05 % answer 50 layers, not 38 (a later row
    back above the floor does not count). Wrong versions: the smallest of all rows above the floor
    (38), or the floor ignored (38)."""
    from rescomp.stages.layer_drop import smallest_lossless

    rows = [{"layers": n, "top1": t} for n, t in ((56, 90.0), (50, 90.2), (44, 89.1), (38, 90.05))]
    assert smallest_lossless(rows, tolerance=0.0)["layers"] == 50
    assert smallest_lossless(rows, tolerance=1.0)["layers"] == 38  # with a tolerance of 1 point, no drop
    assert smallest_lossless(rows[:1] + [{"layers": 50, "top1": 80.0}], tolerance=0.0)["layers"] == 56
    # judged on another key (the validation split's top-1), the test top-1 no longer decides
    val = [{**r, "val_top1": v} for r, v in zip(rows, (80.0, 80.5, 81.0, 79.0))]
    assert smallest_lossless(val, tolerance=0.0, key="val_top1")["layers"] == 44


def test_gates_start_uniform_in_the_configured_range():
    """Paper 4.2.6: w is initialised with uniform random numbers; the range is the config's."""
    torch.manual_seed(0)
    w = torch.stack([Gated(torch.nn.Identity(), (0.2, 0.6)).gate.detach() for _ in range(4000)])
    assert 0.2 <= float(w.min()) and float(w.max()) <= 0.6
    assert float(w.min()) < 0.21 and float(w.max()) > 0.59  # it reaches both ends
    assert len(set(w.tolist())) > 3990
    assert float(w.mean()) == pytest.approx(0.4, abs=0.01)
    assert float(w.std()) == pytest.approx(0.4 / 12**0.5, rel=0.05)  # the uniform distribution's
    assert all(850 < c < 1150 for c in torch.histc(w, bins=4, min=0.2, max=0.6).tolist())  # flat, not bell-shaped
    model = build_model({"arch": "resnet56_bottleneck", "num_classes": 10, "width": 4, "gates": {"init": [-0.5, 0.25]}})
    g = list(gates(model).values())
    assert len(g) == len(set(g)) == 15 and all(-0.5 <= v <= 0.25 for v in g)
    spec = {"arch": "resnet56_bottleneck", "num_classes": 10, "width": 4}
    g = list(gates(build_model({**spec, "gates": True})).values())  # `gates: true`: the default range
    assert len(g) == 15 and all(-1.0 <= v <= 1.0 for v in g) and min(g) < 0 < max(g)
    assert gates(build_model({**spec, "gates": False})) == {}
    for bad in (7, {"init": 3}, {"int": [-1, 1]}, {"init": [-1, 0, 1]}):
        with pytest.raises(ConfigError, match=r"model.gates: .* is neither true nor \{init: \[low, high\]\}"):
            build_model({**spec, "gates": bad})
    with pytest.raises(ConfigError, match=r"model.gates: \{\} is empty .* write `gates: true`"):  # not a plain network
        build_model({**spec, "gates": {}})
    assert build_model({**spec, "deleted": []})  # an empty value of a key rescomp records changes nothing


def test_regular_baselines_are_the_family_at_each_depth():
    """Paper 4.2.2: the comparison networks are ResNets of 56 to 11 layers, 18, 15, ..., 3 layers per
    stage: the same family with 6, 5, ..., 1 units in every stage, at the run's width."""
    spec = {"arch": "resnet56_bottleneck", "num_classes": 10, "width": 8, "gates": GATED}
    family = regular_baselines(spec)
    assert list(family) == [56, 47, 38, 29, 20, 11]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for layers, s in family.items():
        model = build_model(s)
        assert depth(model) == layers and not gates(model)
        assert list(Counter(u.stage for u in residual_units(model)).values()) == [(layers - 2) // 9] * 3
        assert model.conv1.out_channels == 8
    plain = {k: v for k, v in spec.items() if k != "gates"}
    assert params(build_model(family[56])) == params(build_model(plain))  # the same network, ungated
    shortest = build_model(spec)
    delete_units(shortest, [u.name for u in residual_units(shortest) if u.deletable])
    assert params(build_model(family[11])) == params(shortest)  # one unit per stage either way
    basic = regular_baselines({"arch": "cifar_resnet", "num_classes": 10, "depth": 14, "shortcut": "B", "width": 4})
    assert list(basic) == [14, 8] and isinstance(build_model(basic[8]).layer2[0].shortcut, torch.nn.Sequential)  # B: 1x1 conv


def test_costs_measure_a_copy_and_leave_the_model_where_it_was(tiny, monkeypatch):
    """`_costs` measures on the CPU; the network it is given must stay on its device, since the next
    step scores it there with batches on the run's device (output_norm on a GPU). Without a GPU, a spy
    on Module._apply sees any in-place move of that network (model.cpu(), model.to(...))."""
    from rescomp.stages.layer_drop import _costs

    cfg = validate(_layer_drop_cfg(tiny), "t")
    spec = {"num_classes": 100, **tiny["model"]}
    model = build_model(spec)
    moved = []
    real = torch.nn.Module._apply

    def spy(self, fn, *args, **kwargs):
        if self is model:
            moved.append(fn)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "_apply", spy)
    row = _costs(model, spec, cfg, RunContext(torch.device("cpu")), timing=True)
    assert not moved, "_costs moved the network it was given"
    assert row["params"] == sum(p.numel() for p in model.parameters()) and "forward_ms_b4" in row


def test_the_loop_stops_at_the_first_drop_and_the_table_follows_it(workdir, tiny, monkeypatch):
    """Scripted accuracies: full 50 %, then 60 / 40 / 70 % after steps 1-3. With keep_going false the
    loop ends after step 2; traced on, it runs all 3, and in both the answer is step 1's network."""
    import rescomp.runner as runner
    import rescomp.stages.layer_drop as layer_drop

    real = runner.train_and_eval
    script = {"step01": 60.0, "step02": 40.0, "step03": 70.0}

    def scripted(*args, **kwargs):
        ev = real(*args, **kwargs)
        return {**ev, "top1": script[args[5].name]}

    monkeypatch.setattr(runner, "train_and_eval", scripted)
    monkeypatch.setattr(layer_drop, "evaluate", lambda *a, **kw: {"top1": 50.0, "loss": 1.0})
    off = {"scratch": False, "distill": False}
    _, stop = run_layer_drop(validate({**_layer_drop_cfg(tiny, keep_going=False, baselines=off), "name": "stop"}, "t"))
    assert [r["top1"] for r in stop["rows"]] == [50.0, 60.0, 40.0]
    assert stop["smallest_lossless"]["layers"] == stop["rows"][1]["layers"] == 17
    traced = {**_layer_drop_cfg(tiny, keep_going=True, baselines=off, checkpoint="runs/stop/model.pt"), "name": "trace"}
    _, trace = run_layer_drop(validate(traced, "t"))
    assert [r["top1"] for r in trace["rows"]] == [50.0, 60.0, 40.0, 70.0]
    assert trace["smallest_lossless"] == {"layers": 17, "top1": 60.0}  # 11 layers at 70 % came after the drop
    assert "**17 layers**" in trace["sections"][0]["markdown"]
    assert ("training steps were timed (the paper: 100)" in trace["sections"][0]["markdown"]) == \
        (validate(traced, "t").layer_drop.timing.runs < 100)  # fewer steps than the paper's: said where compared


def test_stop_on_val_judges_deletions_on_held_out_training_images(workdir, tiny, monkeypatch):
    """stop_on: val. Scripted test top-1: full 50 %, then 60 / 40 / 70 % after steps 1-3 (as above);
    validation top-1: full 50 %, then 55 / 52 / 45 %. Judged on validation the loop goes on past step 2's
    test drop and stops after step 3, answering step 2's network (test 40 %); judged on test it would
    have stopped at step 2 and answered step 1's. The validation split is 16 of the 64 training images,
    and no image of it is trained on. Wrong versions: the stop rule or the answer still read test
    top-1; the validation metrics taken on the test or training images; stop_on val with no split."""
    import rescomp.runner as runner
    import rescomp.stages.layer_drop as layer_drop

    real = runner.train_and_eval
    script = {"step01": 60.0, "step02": 40.0, "step03": 70.0}
    val_script = iter([50.0, 55.0, 52.0, 45.0])
    seen = []

    def scripted(*args, **kwargs):
        seen.append(len(args[4]["train"].y))
        return {**real(*args, **kwargs), "top1": script[args[5].name]}

    def evaluate(model, loader, ctx, **kw):
        if len(loader.y) == 16:  # the validation split: a quarter of the 64 training images
            return {"top1": next(val_script), "loss": 1.0, "n": 16}
        assert len(loader.y) == 32  # else the test set
        return {"top1": 50.0, "loss": 1.0, "n": 32}

    monkeypatch.setattr(runner, "train_and_eval", scripted)
    monkeypatch.setattr(layer_drop, "evaluate", evaluate)
    off = {"scratch": False, "distill": False}
    raw = {**_layer_drop_cfg(tiny, keep_going=False, baselines=off, stop_on="val"), "name": "val"}
    raw["data"] = {**raw["data"], "val_fraction": 0.25}
    out, s = run_layer_drop(validate(raw, "t"))
    assert seen == [48, 48, 48]  # 64 - 16 held out, in every retraining
    assert [r["top1"] for r in s["rows"]] == [50.0, 60.0, 40.0, 70.0]
    assert [r["val_top1"] for r in s["rows"]] == [50.0, 55.0, 52.0, 45.0]
    assert s["smallest_lossless"] == {"layers": 14, "top1": 40.0, "val_top1": 52.0} and s["val_images"] == 16
    assert layer_drop.LAYER_DROP.output(validate(raw, "t"), out, s).parent.name == "step02"
    md = s["sections"][0]["markdown"]
    assert "validation top-1 (on 16 held-out training images) >= the full network's (50.00%)" in md
    assert "**14 layers**" in md and "validation top-1 52.00%, test top-1 40.00%" in md
    # runs made before stop_on existed (the paper's test rule) keep their hash; val is another run
    assert "stop_on" not in validate(_layer_drop_cfg(tiny), "t").identity("layer_drop")["layer_drop"]
    assert validate(raw, "t").identity("layer_drop")["layer_drop"]["stop_on"] == "val"
    path = write_config(workdir, {**_layer_drop_cfg(tiny, stop_on="val"), "name": "noval"})
    res = CliRunner().invoke(app, ["layer-drop", str(path)])
    assert res.exit_code == 2 and "layer_drop.stop_on=val needs a validation split" in res.stderr, res.output
    assert not (workdir / "runs" / "noval").exists()
    # a given network trained under another seed held out other images: they may be ones it learned
    other = {**raw, "seed": 1, "name": "other",
             "layer_drop": {**raw["layer_drop"], "checkpoint": str(out.parent / "val" / "model.pt")}}
    res = CliRunner().invoke(app, ["layer-drop", str(write_config(workdir, other))])
    assert res.exit_code == 2, res.output
    assert "was not trained with this run's validation split held out (dataset, seed, data.val_fraction: " \
           "synthetic, 0, 0.25; this run: synthetic, 1, 0.25)" in res.stderr
    assert not any(p.name.startswith("other") for p in (workdir / "runs").iterdir())
    # ... or one made from such a network: trained on every training image, then pruned under the split
    plain = {**raw, "name": "plain", "data": {**raw["data"], "val_fraction": 0.0}}
    assert CliRunner().invoke(app, ["train", str(write_config(workdir, plain, "plain.yaml"))]).exit_code == 0
    res = CliRunner().invoke(app, ["prune", str(write_config(workdir, {**raw, "name": "pruned"}, "pruned.yaml")),
                                   "--set", "prune.checkpoint=runs/plain/model.pt", "--set", "prune.steps=1",
                                   "--set", "prune.finetune_epochs=1", "--set", "prune.score_batches=1"])
    assert res.exit_code == 0, res.output
    pruned = next((workdir / "runs").glob("pruned-prune-*/step01/model.pt"))
    assert checkpoint.load(pruned)["config"]["data"]["val_fraction"] == 0.25  # its own record says held out
    for given, why in ((pruned, "'runs/plain/model.pt', which it was made from, was not trained with this run's "
                                "validation split held out (dataset, seed, data.val_fraction: synthetic, 0, 0.0;"),
                       (workdir / "copied.pt", "cannot trace how")):
        if not given.exists():
            given.write_bytes(pruned.read_bytes())  # a copy keeps no record of what it was made from
        ok = {**raw, "name": "late", "layer_drop": {**raw["layer_drop"], "checkpoint": str(given)}}
        res = CliRunner().invoke(app, ["layer-drop", str(write_config(workdir, ok, "late.yaml"))])
        assert res.exit_code == 2 and why in " ".join(res.stderr.split()), res.output
    assert not any(p.name.startswith("late") for p in (workdir / "runs").iterdir())
    ok = {**raw, "name": "late", "layer_drop": {**raw["layer_drop"], "checkpoint": "runs/val/model.pt"}}
    res = CliRunner().invoke(app, ["layer-drop", str(write_config(workdir, ok, "late.yaml")), "--dry-run"])
    assert res.exit_code == 0, res.output  # trained under this very split: taken
    (workdir / "runs/plain/model.pt").unlink()  # an ancestor gone: nothing to judge it by
    late = {**raw, "name": "late", "layer_drop": {**raw["layer_drop"], "checkpoint": str(pruned)}}
    res = CliRunner().invoke(app, ["layer-drop", str(write_config(workdir, late, "late.yaml"))])
    assert res.exit_code == 2 and "cannot read 'runs/plain/model.pt', which" in " ".join(res.stderr.split()), res.output



def test_the_dry_run_says_the_training_run_it_starts_from(workdir, tiny):
    """Wrong versions (17): layer-drop's dry run leaving out the training run it starts from, listing one
    where layer_drop.checkpoint is given, or advising that run's own --fresh (the command's keeps it)."""
    raw = {**_layer_drop_cfg(tiny, baselines={"scratch": False, "distill": False}), "name": "exp"}
    path = write_config(workdir, raw)
    cli = lambda *a: CliRunner().invoke(app, ["layer-drop", str(path), "--dry-run", *a])  # noqa: E731
    res = cli()
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and lines[0] == "train   runs/exp: new run", res.output
    assert lines[2].strip() == "1 epochs at batch 16, sgd lr 0.05, cosine schedule", res.output
    assert lines[3] == "layer-drop runs/exp-layerdrop-gate-k1-n1: new run", res.output
    assert lines[4].strip().startswith("from the training run above; gate criterion"), res.output
    assert not (workdir / "runs").exists()
    assert CliRunner().invoke(app, ["train", str(path)]).exit_code == 0
    res = cli()
    assert res.stdout.splitlines()[0] == (f"train   runs/exp: complete: nothing to run (`rescomp train {path} --fresh` "
                                          f"redoes it)"), res.output
    res = cli("--set", "train.epochs=2", "--fresh")  # the stage's --fresh keeps the training run: refused
    assert res.exit_code == 2 and res.stdout.splitlines()[0] == "train   runs/exp: refused (below)", res.output
    assert (f"run `rescomp train {path} --set train.epochs=2 --fresh` to replace it") in " ".join(res.stderr.split())
    res = cli("--set", "layer_drop.checkpoint=runs/exp/model.pt")  # a network given: no training run
    assert res.exit_code == 0 and res.stdout.startswith("layer-drop runs/exp-layerdrop-gate-k1-n1: new run"), res.output
    assert "from runs/exp/model.pt; gate criterion" in res.stdout, res.output


def test_a_pruned_network_counts_every_epoch_it_was_trained(workdir, tiny):
    """Wrong versions (18): the epochs of a network layer-drop starts from read from its checkpoint's config,
    which for a pruned step says only that step's fine-tune (a 2 + 1 + 1-epoch network called a 1-epoch one,
    and matched baselines given 1 + n x steps); an old such checkpoint, which does not say, taken anyway."""
    raw = {**_layer_drop_cfg(tiny, baselines={"scratch": False, "distill": False}, max_units=1), "name": "exp"}
    raw["train"]["epochs"] = 2
    raw["prune"] = {"policy": "coupled", "share_per_step": 0.1, "steps": 2, "finetune_epochs": 1, "score_batches": 1}
    path = write_config(workdir, raw)
    for command in ("train", "prune"):
        res = CliRunner().invoke(app, [command, str(path)])
        assert res.exit_code == 0, res.output
    assert checkpoint.load(workdir / "runs/exp/model.pt")["epochs_total"] == 2
    steps = sorted((workdir / "runs").glob("exp-prune-*/step0*/model.pt"))
    assert [checkpoint.load(p)["epochs_total"] for p in steps] == [3, 4]
    given = ["--set", f"layer_drop.checkpoint={steps[1].relative_to(workdir)}", "--set", "name=late",
             "--set", "layer_drop.baselines={structure: reached, scratch: true, distill: false, epochs: matched}"]
    res = CliRunner().invoke(app, ["layer-drop", str(path), *given])
    assert res.exit_code == 0, res.output
    summary = json.loads(next((workdir / "runs").glob("late-layerdrop-*/summary.json")).read_text())
    rows = summary["rows"]
    assert [r["epochs"] for r in rows] == [4, 5, 5] and summary["full_epochs"] == 4
    # the reached structure of the pruned network, without its gates (2 left after one deletion), from scratch
    # (it failed after the whole loop: the pruned BN recorded inside its gate, as <unit>.bn3.inner)
    assert rows[2]["method"] == "scratch" and (rows[2]["params"], rows[2]["macs"]) == (rows[1]["params"] - 2, rows[1]["macs"])
    # a pruned step saved before checkpoints said it: refused, by the dry run too, not called a 1-epoch network
    old = checkpoint.load(steps[1])
    del old["epochs_total"]
    checkpoint.save(workdir / "step01/model.pt", old)
    for dry in (["--dry-run"], []):
        res = CliRunner().invoke(app, ["layer-drop", str(path), "--set", "layer_drop.checkpoint=step01/model.pt",
                                       "--set", "name=older", *dry])
        assert res.exit_code == 2 and "does not say how many epochs it was trained in all" in res.stderr, res.output

@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One small run shared by the tests below: a trained 20-layer network (2 epochs), 3 steps of k=1,
    n=1, and regular baselines (20 and 11 layers) at matched budgets."""
    root = tmp_path_factory.mktemp("traced")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("RESCOMP_CACHE", str(root / "cache"))
        raw = _layer_drop_cfg(copy.deepcopy(TINY), baselines={"epochs": "matched"})
        raw["train"]["epochs"] = 2
        cfg = validate(raw, "t")
        out, summary = run_layer_drop(cfg)
    return cfg, root / "runs", root / out, summary


def _epochs_trained(run_dir):
    return len((run_dir / "metrics.jsonl").read_text().splitlines())


def test_retraining_restarts_from_the_initial_learning_rate(traced):
    """Paper 3.2 and Algorithm 1, line 9: each retraining starts at the first training's initial lr.
    metrics.jsonl holds the optimizer's lr at the start of every epoch."""
    cfg, _, out, s = traced
    steps = sorted(out.glob("step*/metrics.jsonl"))
    assert len(steps) == 3
    for path in steps:
        epochs = [json.loads(line) for line in path.read_text().splitlines()]
        assert epochs[0]["lr"] == pytest.approx(cfg.train.optimizer.lr), path.parent.name
        assert len(epochs) == cfg.layer_drop.retrain_epochs


def test_every_row_states_the_epochs_it_was_trained(traced):
    """The epochs column is what each network was trained in all, counted from the training logs: the
    full network's, + n per step for layer-drop rows; matched baselines the layer-drop row's at their depth."""
    cfg, runs, out, s = traced
    full = _epochs_trained(runs / cfg.run_name)
    assert full == 2
    method = [r for r in s["rows"] if r["method"] == "layer-drop"]
    for r in method:
        assert r["epochs"] == full + sum(_epochs_trained(out / f"step{i:02d}") for i in range(1, r["step"] + 1))
    by_depth = {r["layers"]: r["epochs"] for r in method}
    base = [r for r in s["rows"] if r["method"] != "layer-drop"]
    assert len(base) == 4
    for r in base:
        assert r["epochs"] == _epochs_trained(out / f"{r['method']}-regular-{r['layers']}") == by_depth[r["layers"]]
    assert s["full_epochs"] == 2 and sorted({r["epochs"] for r in base}) == [2, 5]


def test_the_baselines_are_regular_networks_from_scratch_and_distilled(traced):
    _, _, out, s = traced
    method = {r["layers"]: r for r in s["rows"] if r["method"] == "layer-drop"}
    assert len(set(method[17]["units_per_stage"])) == 2  # the loop's networks are irregular: one unit gone from one stage
    base = {(r["method"], r["layers"]): r for r in s["rows"] if r["method"] != "layer-drop"}
    assert sorted(base) == [("distill", 11), ("distill", 20), ("scratch", 11), ("scratch", 20)]
    for (method_name, layers), r in base.items():
        assert r["units_per_stage"] == [(layers - 2) // 9] * 3 and r["structure"] == "regular"
        spec = checkpoint.load(out / f"{method_name}-regular-{layers}" / "model.pt")["arch"]
        assert spec["units_per_stage"] == r["units_per_stage"] and "gates" not in spec and spec["width"] == 4
        assert r["series"] == f"regular ResNet, {'from scratch' if method_name == 'scratch' else 'distilled'}"
    for layers in (20, 11):  # the same initial weights and batches: only the teacher's term differs
        assert base[("scratch", layers)]["loss"] != base[("distill", layers)]["loss"]


def test_the_notes_state_budgets_and_what_rows_cannot_show(traced):
    _, _, _, s = traced
    titles = [sec["title"] for sec in s["sections"]]
    assert len(titles) == 2 and "Figure 3" in titles[1]
    notes = s["sections"][1]["markdown"]
    for text in ("| layers | gate, k=1, n=1 | regular ResNet, from scratch | regular ResNet, distilled |",
                 "(5) | ", "the network after step s had 2 + s x 1 epochs in all",
                 "2 + 1 x ceil(units removed / 1)", "Budgets are equal at each depth",
                 "**What these rows can and cannot show.**", "32 test images", "error of up to 8.8 points", "can be noise",
                 "chosen on the test set"):
        assert text in notes, text
    row11 = [line for line in notes.splitlines() if line.startswith("| 11 |")][0]
    assert row11.count("(5)") == 3  # every series at 11 layers had 5 epochs


# Wrong versions found by a mutation survey (each checked by mutating the code; scripts/mutants.py):
# 16. a bottleneck unit gates bn2 instead of bn3 (w scaling an inner tensor); depth() counting projection
#     convs of torchvision ResNets -> test_bottlenecks_gate_their_last_bn_and_depth_counts_the_main_path
# 17. the gate criterion ranking w, not |w| (a strongly negative gate deleted first); a first or projecting
#     unit deletable through a spec -> test_the_gate_criterion_ranks_by_magnitude_and_only_deletable_units_go
# 18. output_norm keeping only its last batch, scoring in train mode (moving BN statistics), leaving the
#     network in eval mode or its hooks on; the random criterion ignoring its seed; bn_gamma scoring
#     anything but the mean |gamma| of the unit's last BN, or a conv's weights on a pre-activation network
#       -> test_output_norm_random_and_bn_gamma_by_hand
# 19. the distillation loss summed over the batch, the closure swapping student and teacher or ignoring
#     its temperature and alpha, or a teacher left in train mode -> test_the_distillation_closure_is_kd_loss
def test_bottlenecks_gate_their_last_bn_and_depth_counts_the_main_path():
    model = build_model({"arch": "resnet56_bottleneck", "width": 4, "num_classes": 10, "gates": True})
    assert {u.residual_out for u in residual_units(model) if u.deletable} == {"bn3"}
    assert isinstance(model.get_submodule("layer1.1.bn3"), Gated) and not isinstance(model.get_submodule("layer1.1.bn2"), Gated)
    assert depth(build_model({"arch": "resnet18", "num_classes": 10})) == 18
    assert depth(build_model({"arch": "resnet50", "num_classes": 10})) == 50


def _gated14(values: dict[str, float]):
    model = build_model({"arch": "cifar_resnet", "depth": 14, "width": 4, "num_classes": 10, "gates": True})
    for name, w in values.items():
        model.get_submodule(f"{name}.bn2").gate.data.fill_(w)
    return model


def test_the_gate_criterion_ranks_by_magnitude_and_only_deletable_units_go():
    model = _gated14({"layer1.1": 0.1, "layer2.1": -0.9, "layer3.1": 0.5})
    _, spec, info = drop(model, {"arch": "cifar_resnet"}, 1, "gate", [], 0)
    assert info["deleted"] == ["layer1.1"] and spec["deleted"] == ["layer1.1"]
    assert drop(model, {}, 2, "gate", [], 0)[2]["deleted"] == ["layer1.1", "layer3.1"]
    for first in ("layer1.0", "layer2.0"):
        with pytest.raises(ConfigError, match="cannot be deleted"):
            delete_units(copy.deepcopy(model), [first])


def test_output_norm_random_and_bn_gamma_by_hand():
    from rescomp.compress.layer_drop import CRITERIA

    torch.manual_seed(0)
    model = _gated14({"layer1.1": 0.5, "layer2.1": 1.0, "layer3.1": -2.0})
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.bias.data.uniform_(-1, 1)
    x = torch.randn(6, 3, 32, 32)
    model.train()
    before = [b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")]
    whole, halves = output_norm(model, [x], 0), output_norm(model, [x[:4], x[4:]], 0)
    assert halves == pytest.approx(whole, rel=1e-5)  # every batch counts, each image once
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, [
        b for n, b in model.named_buffers() if n.endswith("running_mean")]))  # scored in eval, mode given back
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()
    assert output_norm(model, [x], 0) == pytest.approx(whole, rel=1e-5)
    # by hand: mean over images of ||w * F(x)||, F(x) the unit's last BN output
    seen = {}
    h = model.get_submodule("layer3.1.bn2.inner").register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    with torch.no_grad():
        model(x)
    h.remove()
    assert whole["layer3.1"] == pytest.approx(float((-2.0 * seen["f"]).flatten(1).norm(dim=1).mean()), rel=1e-5)
    rnd = CRITERIA.get("random")
    assert rnd(model, [], 3) == rnd(model, [], 3) and rnd(model, [], 3) != rnd(model, [], 4)
    model.get_submodule("layer1.1.bn2.inner").weight.data = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    model.get_submodule("layer2.1.bn2.inner").weight.data.fill_(0.5)
    scores = CRITERIA.get("bn_gamma")(model, [], 0)
    assert scores["layer1.1"] == pytest.approx(1.0) and scores["layer2.1"] == pytest.approx(0.5)
    pre = build_model({"arch": "resnet50v2", "num_classes": 10, "gates": True})  # its units end in a conv
    with pytest.raises(ConfigError, match="bn_gamma"):
        CRITERIA.get("bn_gamma")(pre, [], 0)


def test_the_distillation_closure_is_kd_loss():
    from rescomp.compress.distill import distillation

    torch.manual_seed(0)
    s, t, y = torch.randn(2, 10), torch.randn(2, 10), torch.tensor([3, 7])
    one = kd_loss(s[:1], t[:1], y[:1], 4.0, 1.0)
    assert kd_loss(s[:1].repeat(2, 1), t[:1].repeat(2, 1), y[:1].repeat(2), 4.0, 1.0) == pytest.approx(float(one))
    teacher = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}).train()
    x = torch.randn(2, 3, 32, 32)
    loss_fn = distillation(teacher, 2.0, 0.3)
    stats = teacher.bn1.running_mean.clone()
    assert not teacher.training
    with torch.no_grad():
        want = kd_loss(s, teacher(x), y, 2.0, 0.3)
    assert float(loss_fn(s, x, y)) == pytest.approx(float(want), rel=1e-6)
    assert torch.equal(teacher.bn1.running_mean, stats)
