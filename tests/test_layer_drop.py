import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.compress.distill import kd_loss
from rescomp.compress.layer_drop import Gated, choose, delete_units, depth, drop, gates, output_norm, residual_units
from rescomp.config import OptimizerConfig, validate
from rescomp.errors import ConfigError
from rescomp.layer_drop_run import run_layer_drop
from rescomp.models import build_model
from rescomp.train import param_groups

from conftest import write_config

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
    s, t, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
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
    import rescomp.layer_drop_run as runner

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
    method = [r for r in s["rows"] if r["method"] == "layer-drop"]
    assert [r["layers"] for r in method] == [20, 17, 14, 11]  # 3 deletable units, 3 convs each
    assert {r["method"] for r in s["rows"]} == {"layer-drop", "scratch", "distill"}
    assert len([r for r in s["rows"] if r["method"] == "scratch"]) == 3
    assert method[0]["params"] > method[-1]["params"] and "forward_ms_b4" in method[0]
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    table = workdir / "results" / "ld"
    assert {"accuracy_vs_layers.png", "gates.png", "table.md"} <= {p.name for p in table.iterdir()}
    assert "Cost of the smallest lossless network" in (table / "table.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"layer_drop.k": 0}, "layer_drop.k: Input should be greater than or equal to 1"),
    ({"layer_drop.k": 4}, "layer_drop.k=4, but cifar_resnet has only 3 deletable units"),
    ({"layer_drop.max_units": 9}, "has only 3 deletable units"),
    ({"model.gates": None}, "layer-drop needs gated residual units"),
    ({"layer_drop.criterion": "gates"}, "unknown layer-drop criterion 'gates' (did you mean 'gate'?)"),
    ({"model": {"arch": "vgg16", "gates": GATED}}, "no residual units that could be deleted"),
])
def test_layer_drop_bad_input(workdir, tiny, change, message):
    path = write_config(workdir, _layer_drop_cfg(tiny))
    args = [a for k, v in change.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    res = CliRunner().invoke(app, ["layer-drop", str(path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert not (workdir / "runs").exists()


def test_distillation_is_a_training_option(workdir, tiny):
    from rescomp.pipeline import run_train

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
    from rescomp.layer_drop_run import smallest_lossless

    rows = [{"layers": n, "top1": t} for n, t in ((56, 90.0), (50, 90.2), (44, 89.1), (38, 90.05))]
    assert smallest_lossless(rows, floor=90.0)["layers"] == 50
    assert smallest_lossless(rows, floor=89.0)["layers"] == 38  # with a tolerance of 1 point, no drop
    assert smallest_lossless(rows[:1] + [{"layers": 50, "top1": 80.0}], floor=90.0)["layers"] == 56
