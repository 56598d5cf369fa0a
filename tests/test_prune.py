import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.compress.prune import channel_groups, prune, select, shapes, taylor
from rescomp.config import PruneConfig, validate
from rescomp.measure import count_params
from rescomp.models import build_model, model_names
from rescomp.prune_run import run_prune

from conftest import write_config

X = torch.zeros(1, 3, 32, 32)


def _batches(n=2, classes=10, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def test_taylor_score_of_a_hand_built_case():
    # conv (1 -> 2 channels, 1x1, weights 1 and 2) -> global average -> fixed linear; loss = CE.
    conv = nn.Conv2d(1, 2, 1, bias=False)
    conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    head = nn.Linear(2, 2, bias=False)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    # a = [0.5, 1.0] everywhere; logits = [0.5, -1.0]; dL/dlogits = softmax - onehot = [p0 - 1, p1]
    p = torch.softmax(torch.tensor([0.5, -1.0]), 0)
    g = torch.tensor([p[0] - 1, -p[1]]) / 4  # through the head and the 4-position average
    raw = (torch.tensor([0.5, 1.0]) * g).abs()  # mean over positions of a * dL/da
    scores = taylor(model, [(x, y)], 0)["0"]
    assert torch.allclose(scores, raw / raw.norm(), atol=1e-6)


def test_taylor_takes_the_absolute_value_per_example_before_the_batch_mean():
    """Molchanov et al. 2017, eq. 8: |mean over positions of a * dL/da| per example, then the mean
    over examples. With BatchNorm and 16 examples, the batch-first order ranks the channels otherwise:
    the wrong version (|.| after the batch mean) fails here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4)).eval()
    model[1].running_mean.normal_(0, 0.5)
    model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    saved = {}

    def keep(_m, _i, out):  # returns None: a hook's return value would replace the output
        out.retain_grad()
        saved["a"] = out

    model[1].register_forward_hook(keep)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ag = saved["a"].detach() * saved["a"].grad
    paper = ag.mean(dim=(2, 3)).abs().mean(0)
    batch_first = ag.mean(dim=(0, 2, 3)).abs()
    assert paper.argsort().tolist() != batch_first.argsort().tolist()  # the case tells the orders apart
    model.zero_grad()
    scores = taylor(model, [(x, y)], 0)["0"]
    assert torch.allclose(scores, paper / paper.norm(), atol=1e-6)


def test_a_dead_channel_prunes_without_changing_outputs():
    torch.manual_seed(0)
    spec = {"arch": "vgg16_bn", "num_classes": 10}
    model = build_model(spec).eval()
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():  # channel 5 is dead: zero filter, zero BN shift, so ReLU outputs 0
        conv.weight[5] = 0
        conv.bias[5] = 0
        bn.bias[5], bn.running_mean[5] = 0, 0
    scores = taylor(model, _batches(), 0)
    assert float(scores["features.0"][5]) == 0.0
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    pruned, new_spec, info = prune(model, spec, share=1 / 4224, criterion="taylor", policy="paper", exclude=[],
                                   batches=_batches(), seed=0, image_size=32)
    assert info["removed"] == 1 and info["per_layer"] == {"features.0": 1}
    assert torch.allclose(pruned.eval()(x), before, atol=1e-5)
    rebuilt = build_model(new_spec)  # a plain network from its spec: no pruning code replayed
    rebuilt.load_state_dict(pruned.state_dict())
    assert torch.equal(rebuilt.eval()(x), pruned(x))


def test_paper_policy_never_touches_channels_that_meet_an_addition():
    model = build_model({"arch": "resnet18", "num_classes": 10})
    groups = channel_groups(model, X, [], "paper")
    roots = {g.root for g in groups}
    assert roots == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}  # conv2 and downsample meet adds
    assert "conv1" not in roots and sum(g.size for g in groups) == 2 * (64 + 128 + 256 + 512)
    coupled = channel_groups(model, X, [], "coupled")
    assert len(coupled) > len(groups) and any(g.coupled for g in coupled)


def test_coupled_policy_keeps_residual_shapes_consistent():
    spec = {"arch": "resnet56", "num_classes": 10, "shortcut": "B"}
    model = build_model(spec)
    pruned, new_spec, info = prune(model, spec, share=0.3, criterion="l1", policy="coupled", exclude=[],
                                   batches=[], seed=0, image_size=32, allocation="uniform")
    assert info["coupled_groups"] >= 3
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    s = shapes(pruned)
    assert s["layer1.0.conv2"][1] == s["layer1.1.conv2"][1] == s["conv1"][1] < 16  # tied through the additions
    paper, _, _ = prune(model, spec, share=0.3, criterion="l1", policy="paper", exclude=[], batches=[], seed=0,
                        image_size=32, allocation="uniform")
    assert count_params(pruned) < count_params(paper) < count_params(model)


@pytest.mark.parametrize("arch", model_names())
def test_every_registry_model_prunes_runs_and_shrinks(arch):
    from rescomp.models import get_entry

    size = max(32, get_entry(arch).min_input)
    spec = {"arch": arch, "num_classes": 10}
    model = build_model(spec)
    for policy in ("paper", "coupled"):
        try:
            pruned, new_spec, _ = prune(model, spec, share=0.2, criterion="l1", policy=policy, exclude=[], batches=[],
                                        seed=0, image_size=size)
        except Exception as e:  # a policy may leave nothing prunable; that must be the clear error
            assert "leaves nothing prunable" in str(e), e
            continue
        assert pruned.eval()(torch.randn(1, 3, size, size)).shape == (1, 10)
        assert count_params(pruned) < count_params(model)
        rebuilt = build_model(new_spec)
        rebuilt.load_state_dict(pruned.state_dict())


def test_selection_global_and_uniform():
    from rescomp.compress.prune import Group

    groups = [Group("a", 4, [], False), Group("b", 4, [], False)]
    scores = [torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0.05, 0.5, 0.6, 0.7])]
    assert select(groups, scores, 3) == {"b": [0], "a": [0, 1]}
    assert select(groups, scores, 2, allocation="uniform") == {"a": [0], "b": [0]}
    assert select(groups, scores, 8) == {"b": [0, 1, 2], "a": [0, 1, 3]}  # at least one channel stays


def test_schedules():
    assert PruneConfig().cumulative() == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert PruneConfig(schedule="fast").cumulative() == [0.1, 0.3, 0.5, 0.75]
    slow = PruneConfig(schedule="slow").cumulative()
    assert len(slow) == 15 and {0.1, 0.3, 0.5, 0.75} <= set(slow)


def _prune_cfg(tiny, **pc):
    tiny["model"] = {"arch": "resnet20", "shortcut": "B", "width": 4}
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"batch_sizes": [1], "warmup": 1, "repeats": 1}
    tiny["prune"] = {"share_per_step": 0.1, "steps": 2, "finetune_epochs": 1, "score_batches": 2, **pc}
    tiny["report"] = {"table": "pr"}
    return tiny


def test_prune_end_to_end_and_report(workdir, tiny):
    cfg = validate(_prune_cfg(tiny), "t")
    out, s = run_prune(cfg)
    assert [r["share"] for r in s["rows"]] == [0.0, 0.1, 0.2]
    assert s["rows"][0]["params"] > s["rows"][1]["params"] > s["rows"][2]["params"]
    assert s["rows"][1]["removed"] == round(0.1 * s["prunable_filters"]) and s["rows"][1]["scoring_seconds"] > 0
    again_dir, again = run_prune(cfg)
    assert again == s
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert {"accuracy_vs_share.png", "accuracy_vs_macs.png"} <= {p.name for p in (workdir / "results/pr").iterdir()}


@pytest.mark.parametrize("override, message", [
    ("prune.share_per_step=1.5", "prune.share_per_step: Input should be less than 1"),
    ("prune.share_per_step=0", "prune.share_per_step: Input should be greater than 0"),
    ("prune.exclude=[layer9.*]", "prune.exclude: no conv layer is named like 'layer9.*'"),
    ("prune.exclude=['layer*.conv1']", "leaves nothing prunable"),
    ("prune.criterion=taylr", "unknown pruning criterion 'taylr' (did you mean 'taylor'?)"),
])
def test_prune_bad_input(workdir, tiny, override, message):
    path = write_config(workdir, _prune_cfg(tiny))
    res = CliRunner().invoke(app, ["prune", str(path), "--set", override])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert not (workdir / "runs").exists()


def test_excluded_layers_are_left_alone():
    model = build_model({"arch": "resnet18", "num_classes": 10})
    roots = {g.root for g in channel_groups(model, X, ["layer4.*"], "paper")}
    assert roots == {f"layer{i}.{j}.conv1" for i in range(1, 4) for j in range(2)}


def test_stop_at_a_share_of_the_parameters(workdir, tiny):
    cfg = validate(_prune_cfg(tiny, steps=5, stop_at={"params": 0.95}), "t")
    _, s = run_prune(cfg)
    assert [r["step"] for r in s["rows"]] == [0, 1]  # one 10 % step already leaves < 95 % of the parameters
    assert s["rows"][1]["params"] <= 0.95 * s["rows"][0]["params"]
