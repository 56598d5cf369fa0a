"""Taylor filter pruning (Martineau; Molchanov et al. 2017). The wrong versions these tests catch
(each checked once by mutating the code by hand):

- |.| taken after the batch mean instead of per example (taylor_takes_the_absolute_value_...);
- positions or examples averaged in the wrong place, the L2 normalisation missing (hand_built_case);
- a coupled group scored by the sum of its members (never chosen), a group never selected
  (coupled_group_is_chosen_...); the random control drawing per member, not per channel
  (random_control_reaches_coupled_groups); a coupled channel's filters not counted against the
  step's budget (budget_counts_every_filter_...);
- BN statistics kept (sliced) instead of reset, an unpruned BN reset, the FC not scaled or scaled
  the wrong way, the paper surgery off by default (paper_surgery_..., applies_the_paper_surgery_...);
- channels that meet an addition pruned under the paper policy, excluded layers touched; a conv that
  several layers read (SqueezeNet's squeeze convs) pruned under it (paper_policy_leaves_a_conv_...);
- Table 1's targets chained into one run, the fine-tuning budget ignored, costs counted at our input
  size or with our head where the paper used 224 px / 1000 classes (a_run_per_target_...);
- the stop rule ignored (stop_at_a_share_of_the_parameters); a dead channel's removal changing outputs;
- the fast schedule's two reductions one fine-tuning epoch apart instead of Figure 3's three (epochs 4
  and 7), or the gap not counted against the budget; targets or iterations given beside a fast / slow
  schedule replaced by the preset's without a word (test_schedules);
- a row recording the scoring batches asked for where fewer training images made fewer
  (prune_end_to_end_and_report);
- a gated unit's last conv (layer-drop's gate wraps its BN) scored at the conv's output, not after its BN
  as every other conv is (a_gated_units_last_conv_is_scored_after_its_batchnorm_...);
- a conv whose BN output an in-place op overwrites (torchvision's `out += identity`) scored on the block's
  output and its gradient (a_conv_is_scored_at_its_batchnorms_output_whatever_in_place_op_follows);
- a network no policy prunes correctly (coupled with option-A shortcuts, grouped or depthwise convs) pruned
  into one that cannot run, a traceback (a_network_no_policy_prunes_correctly_is_refused_...);
- a schedule whose shares reach 100 % (share_per_step x steps >= 1) run until the step that finds nothing
  left, leaving its first steps' folders behind (prune_bad_input).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from rescomp import checkpoint
from rescomp.cli import app
from rescomp.compress.prune import channel_groups, prune, select, shapes, taylor
from rescomp.config import validate
from rescomp.config_sections import PruneConfig
from rescomp.measure import count_params
from rescomp.models import build_model, model_names
from rescomp.stages.prune import run_prune

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


@pytest.mark.parametrize("criterion", ["taylor", "mean_activation"])
def test_a_gated_units_last_conv_is_scored_after_its_batchnorm_as_the_ungated_ones(criterion):
    """Layer-drop's gate wraps a unit's last BN (x + w * bn2(conv2(.))): with w = 1 the gated network computes
    what the plain one does, so every conv must score the same. The wrong version scored conv2 of a gated
    unit at the conv's output, since the module after it is the gate, not a BN."""
    from rescomp.compress.prune import CRITERIA
    from rescomp.models import build_model

    torch.manual_seed(0)
    spec = {"arch": "cifar_resnet", "depth": 14, "width": 4, "num_classes": 10}
    plain, gated = build_model(spec).eval(), build_model({**spec, "gates": {"init": [1.0, 1.0]}}).eval()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that differ from a fresh BN's
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
    weights = plain.state_dict()
    gated.load_state_dict({k: v if k.endswith(".gate") else weights[k.replace(".bn2.inner.", ".bn2.")]
                           for k, v in gated.state_dict().items()})  # the gates stay 1
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    with torch.no_grad():
        assert torch.allclose(plain(batches[0][0]), gated(batches[0][0]), atol=1e-6)
    a, b = (CRITERIA.get(criterion)(m, batches, 0) for m in (plain, gated))
    assert set(a) == set(b) and "layer3.1.conv2" in a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


class _Residual(nn.Module):
    """stem conv-BN-ReLU, then conv-BN whose output meets the input in an addition: in place, as
    torchvision's BasicBlock writes it (`out += identity; relu(inplace)`), or not, as rescomp's ResNets do."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)), inplace=self.in_place)
        out = self.bn(self.conv(x))
        if self.in_place:
            out += x
            out = F.relu_(out)
        else:
            out = F.relu(out + x)
        return self.fc(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("criterion", ["taylor", "mean_activation"])
def test_a_conv_is_scored_at_its_batchnorms_output_whatever_in_place_op_follows(criterion):
    """torchvision's ResNets add the shortcut to bn2's output in place: the wrong version kept that tensor and
    its gradient, so bn2's convs were scored on the block's output (relu(bn2 + x)) under the coupled policy,
    and ranked their channels otherwise. The in-place network must score as the same network without."""
    from rescomp.compress.prune import CRITERIA

    torch.manual_seed(0)
    a, b = _Residual(in_place=True).eval(), _Residual(in_place=False).eval()
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.bias.data.normal_(0, 0.3)
    b.load_state_dict(a.state_dict())
    batches = _batches(n=2, size=8)
    with torch.no_grad():
        assert torch.equal(a(batches[0][0]), b(batches[0][0]))
    sa, sb = (CRITERIA.get(criterion)(m, batches, 0) for m in (a, b))
    assert set(sa) == set(sb) == {"stem", "conv"}
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=1e-6), (name, sa[name], sb[name])


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
                                   batches=_batches(), seed=0, image_size=32, bn_stats="slice")
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


def test_paper_policy_leaves_a_conv_that_several_layers_read():
    # Martineau: "in SqueezeNet, only the first convolution layer can be reduced": a squeeze conv is read by
    # both expand convs, and those meet a concatenation. 30 % of the first conv's 64 filters in SqueezeNet 1.1
    # with a 1000-class head: 1,235,496 -> 1,234,660 parameters, the paper's 1.24 M -> 1.23 M.
    model = build_model({"arch": "squeezenet1_1", "num_classes": 1000})
    groups = channel_groups(model, torch.randn(1, 3, 64, 64), [], "paper")
    assert [(g.root, g.size) for g in groups] == [("features.0", 64)]
    assert count_params(model) == 1_235_496
    assert count_params(model) - 19 * (3 * 3 * 3 + 1) - 19 * 16 == 1_234_660  # 19 filters and their readers' inputs
    assert len(channel_groups(model, torch.randn(1, 3, 64, 64), [], "coupled")) > 1
    # the same rule leaves ResNet-50's stem, read by the first block's conv1 and its projection shortcut
    r50 = build_model({"arch": "resnet50", "num_classes": 10})
    roots = {g.root for g in channel_groups(r50, torch.randn(1, 3, 64, 64), [], "paper")}
    assert "conv1" not in roots and "layer1.0.conv1" in roots and "layer1.0.conv2" in roots


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
        except Exception as e:  # a policy may leave nothing prunable, or refuse: that must be the clear error
            assert "leaves nothing prunable" in str(e) or (policy == "coupled" and "option A" in str(e)), e
            continue
        assert pruned.eval()(torch.randn(1, 3, size, size)).shape == (1, 10)
        assert count_params(pruned) < count_params(model)
        rebuilt = build_model(new_spec)
        rebuilt.load_state_dict(pruned.state_dict())


def _scores(model, value=1.0):
    return {n: torch.full((m.out_channels,), value) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_a_coupled_group_is_chosen_when_its_channels_are_least_important_whatever_its_size():
    """A channel of a coupled group scores the mean of its members' scores (importance per filter).
    Wrong versions caught: the sum (a ten-conv group then never competes), a group never selected."""
    from rescomp.compress.prune import group_scores

    model = build_model({"arch": "resnet20", "num_classes": 10, "shortcut": "B"})
    groups = channel_groups(model, X, [], "coupled")
    big = max((g for g in groups if g.coupled), key=lambda g: len(g.members))
    assert len(big.members) >= 4  # the stem and every unit's second conv of stage 1
    scores = _scores(model, 0.5)
    for name, idxs, _ in big.members:
        scores[name][idxs[0]] = 0.2  # every member's channel 0 is the least important filter of the net
    chosen = select(groups, group_scores(groups, scores), count=len(big.members))
    assert chosen == {big.root: [0]}  # one channel of the group uses the whole budget of len(members) filters
    summed = [torch.zeros(g.size).index_add_(0, torch.tensor([r for _, _, rs in g.members for r in rs]),
                                              torch.cat([scores[n][i] for n, i, _ in g.members])) for g in groups]
    assert big.root not in select(groups, summed, count=len(big.members))  # what the sum did


def test_random_control_reaches_coupled_groups():
    """One uniform draw per removable channel: coupled channels go about as often as any other.
    The wrong version (a group's draw = the mean or sum of its members' draws) never picks them."""
    spec = {"arch": "resnet56", "num_classes": 10, "shortcut": "B"}
    model = build_model(spec)
    groups = channel_groups(model, X, [], "coupled")
    coupled, channels = sum(g.size for g in groups if g.coupled), sum(g.size for g in groups)  # 112 of 1,120
    _, _, info = prune(model, spec, share=0.3, criterion="random", policy="coupled", exclude=[], batches=[], seed=0,
                       image_size=32)
    in_coupled = info["removed_coupled_channels"] / coupled
    in_single = (info["removed_channels"] - info["removed_coupled_channels"]) / (channels - coupled)
    assert 0.7 < in_coupled / in_single < 1.4  # 0.91 here; a mean of ten draws per group gives 0.43


def test_budget_counts_every_filter_a_coupled_channel_removes():
    from rescomp.compress.prune import Group

    pair = Group("a", 3, [("a", [0, 1, 2], [0, 1, 2]), ("b", [0, 1, 2], [0, 1, 2])], True)  # 2 filters a channel
    single = Group("c", 3, [("c", [0, 1, 2], [0, 1, 2])], False)
    scores = [torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.15, 0.8, 0.9])]
    assert pair.cost.tolist() == [2, 2, 2]
    assert select([pair, single], scores, 3) == {"a": [0], "c": [0]}  # 2 + 1 filters; 0.2 would overshoot
    assert select([pair, single], scores, 4) == {"a": [0], "c": [0, 1]}  # a1 would need 2 of the 1 left


def test_paper_surgery_resets_pruned_batchnorm_statistics_and_scales_the_first_linear_layer():
    """Martineau 0.3: a pruned BN's running statistics reset; the linear layer after the pruned conv
    scaled by inputs before / after. Wrong versions caught: statistics sliced (kept), the FC not
    scaled or scaled by after / before, an untouched BN reset."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(1, 2)
        bn.running_var.uniform_(2, 3)
    from rescomp.compress.prune import prune_step, surgery

    pruned, sliced = copy.deepcopy(model), copy.deepcopy(model)
    for m, how in ((pruned, ("reset", True)), (sliced, ("slice", False))):
        before = shapes(m)
        prune_step(m, {"3": [1]}, torch.zeros(1, 3, 8, 8))  # the second conv loses filter 1
        done = surgery(m, before, *how)
        if m is pruned:
            info = done
    keep = [0, 2, 3]
    assert info["bn_reset"] == ["4"] and info["fc_scaled"] == ["8"]
    assert torch.equal(pruned[4].running_mean, torch.zeros(3)) and torch.equal(pruned[4].running_var, torch.ones(3))
    assert torch.equal(pruned[1].running_mean, model[1].running_mean)  # the BN of an unpruned conv keeps its own
    assert torch.allclose(pruned[8].weight, model[8].weight[:, keep] * 4 / 3)
    assert torch.equal(pruned[8].bias, model[8].bias)  # inputs before / after scales what the inputs feed, not the bias
    assert torch.equal(sliced[4].running_mean, model[4].running_mean[keep])
    assert torch.equal(sliced[8].weight, model[8].weight[:, keep])


def test_prune_applies_the_paper_surgery_by_default():
    spec = {"arch": "alexnet", "num_classes": 10}
    model = build_model(spec)
    _, _, info = prune(model, spec, share=0.3, criterion="l1", policy="paper", exclude=["features.[0-8]"],
                       batches=[], seed=0, image_size=64)
    assert info["fc_scaled"] == ["classifier.1"]  # the last conv's filters went: its FC is scaled


def test_selection_global_and_uniform():
    from rescomp.compress.prune import Group

    groups = [Group("a", 4, [], False), Group("b", 4, [], False)]
    scores = [torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0.05, 0.5, 0.6, 0.7])]
    assert select(groups, scores, 3) == {"b": [0], "a": [0, 1]}
    assert select(groups, scores, 2, allocation="uniform") == {"a": [0], "b": [0]}
    assert select(groups, scores, 8) == {"b": [0, 1, 2], "a": [0, 1, 3]}  # at least one channel stays


def test_schedules():
    assert PruneConfig().plan() == [(None, [0.05, 0.1, 0.15, 0.2, 0.25, 0.3])]
    # Martineau, Table 1 / Figure 3: each share in its own run, fast in 2 iterations, slow in 10
    fast = PruneConfig(schedule="fast").plan()
    assert fast == [(0.1, [0.05, 0.1]), (0.3, [0.15, 0.3]), (0.5, [0.25, 0.5]), (0.75, [0.375, 0.75])]
    slow = dict(PruneConfig(schedule="slow").plan())
    assert list(slow) == [0.1, 0.3, 0.5, 0.75] and slow[0.3] == [round(0.03 * i, 6) for i in range(1, 11)]
    assert PruneConfig(targets=[0.1, 0.2], share_per_step=0.05).plan() == [(None, [0.05, 0.1, 0.15, 0.2])]
    budget = PruneConfig(schedule="fast", finetune_epochs=2, finetune_budget=10)
    assert [budget.epochs_at(s, 2) for s in (1, 2)] == [6, 4]  # the last step gets what is left
    # fast reduces at epochs 4 and 7 (Figure 3): 3 fine-tuning epochs apart, then the rest of the budget
    fast, slow = PruneConfig(schedule="fast", finetune_epochs=2), PruneConfig(schedule="slow", finetune_epochs=2)
    assert [fast.epochs_at(s, 2) for s in (1, 2)] == [6, 14] and [slow.epochs_at(s, 10) for s in range(1, 11)] == [2] * 10
    assert [PruneConfig(schedule="fast").epochs_at(s, 2) for s in (1, 2)] == [3, 7]
    with pytest.raises(ValueError, match="finetune_budget"):
        PruneConfig(schedule="fast", finetune_epochs=2, finetune_budget=5)  # 1 step x 3 x 2 > 5
    assert PruneConfig().epochs_at(6, 6) == 1  # a gradual run has no budget unless given one
    with pytest.raises(ValueError, match="finetune_budget"):
        PruneConfig(schedule="slow", finetune_epochs=2, finetune_budget=10)  # 9 steps x 2 > 10
    for key, value in (("targets", [0.2]), ("iterations", 3)):  # the preset would replace them: refused
        with pytest.raises(ValueError, match=rf"{key} is given, but schedule: slow sets its own \({key} "):
            PruneConfig(schedule="slow", **{key: value})
        assert PruneConfig(schedule="custom", **{"targets": [0.2], key: value}).plan()  # custom takes them
    assert PruneConfig(schedule="fast", share_per_step=0.05, steps=6).plan() == fast.plan()  # a base's defaults


def _prune_cfg(tiny, **pc):
    tiny["model"] = {"arch": "resnet20", "shortcut": "B", "width": 4}
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"batch_sizes": [1], "warmup": 1, "repeats": 1}
    tiny["prune"] = {"share_per_step": 0.1, "steps": 2, "finetune_epochs": 1, "score_batches": 2, **pc}
    tiny["report"] = {"table": "pr"}
    return tiny


@pytest.mark.parametrize("model, policy, message", [
    ({"arch": "cifar_resnet", "depth": 8, "width": 4}, "coupled", "cannot prune a network with zero-padding (option A)"),
    ({"arch": "cifar_resnet", "depth": 8, "width": 4, "shortcut": "B", "separable": {"mode": "depthwise"}}, "coupled",
     "grouped or depthwise convs (conv1.0 and"),
    ({"arch": "cifar_resnet", "depth": 8, "width": 4, "shortcut": "B", "separable": {"mode": "depthwise"}}, "paper",
     "grouped or depthwise convs"),
])
def test_a_network_no_policy_prunes_correctly_is_refused_before_any_work(workdir, tiny, model, policy, message):
    # option A's zero padding read as a channel-for-channel map (a pruned network whose classifier does not
    # fit), a depthwise stem offered as a group of the image's colours
    tiny["model"] = model
    tiny["prune"] = {"policy": policy}
    res = CliRunner().invoke(app, ["prune", str(write_config(workdir, tiny))])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (workdir / "runs").exists()


def test_prune_end_to_end_and_report(workdir, tiny):
    cfg = validate(_prune_cfg(tiny, score_batches=10), "t")
    out, s = run_prune(cfg)
    assert [r["share"] for r in s["rows"]] == [0.0, 0.1, 0.2]
    # 10 batches asked, but 64 training images make 4 of 16: the row says what was scored
    assert (s["rows"][1]["scoring_batches"], s["rows"][1]["scoring_images"]) == (4, 64)
    assert s["rows"][0]["params"] > s["rows"][1]["params"] > s["rows"][2]["params"]
    assert s["rows"][1]["removed"] == round(0.1 * s["prunable_filters"]) and s["rows"][1]["scoring_seconds"] > 0
    again_dir, again = run_prune(cfg)
    assert again == s
    # each pruned row is timed interleaved with the unpruned network (issue 15): its speed-up over it,
    # and whether that is within the noise; the unpruned row has none
    assert "speedup_cpu_b1" not in s["rows"][0]
    for r in s["rows"][1:]:
        assert r["speedup_cpu_b1"] == pytest.approx(r["reference_latency_ms_cpu_b1"] / r["latency_ms_cpu_b1"])
        assert isinstance(r["speedup_within_noise_cpu_b1"], bool)
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert {"accuracy_vs_share.png", "accuracy_vs_macs.png"} <= {p.name for p in (workdir / "results/pr").iterdir()}


def test_a_run_per_target_and_costs_counted_the_papers_way(workdir, tiny):
    """Table 1's schedules: each target from the trained network in `iterations` steps, the last step
    taking what the fine-tuning budget left; Table 2's costs at the paper's input size and head.
    Wrong versions caught: targets chained into one run, the budget ignored, MACs at our input size,
    parameters with our head."""
    t = _prune_cfg(tiny, targets=[0.1, 0.2], iterations=2, finetune_budget=3)
    t["report"].update(paper_input=64, paper_head=100, paper_by_share={"0.2": {"params_paper_head": 1.0e5}})
    out, s = run_prune(validate(t, "t"))
    assert [(r["share"], r["step"]) for r in s["rows"]] == [(0.0, 0), (0.1, 2), (0.2, 2)]
    assert [r.get("finetune_epochs_total") for r in s["rows"]] == [None, 3, 3]
    assert {p.relative_to(out).as_posix() for p in out.glob("to*/step*")} == {"to10/step01", "to10/step02",
                                                                              "to20/step01", "to20/step02"}
    for r in s["rows"]:
        fan_in = checkpoint.load_model(out / f"to{round(100 * r['share'])}/step02/model.pt")[0].fc.in_features \
            if r["step"] else 16  # width 4: the unpruned head reads 4 x 4 channels
        assert r["params_paper_head"] == r["params"] + (fan_in + 1) * (100 - 10)
        assert r["macs_paper_input"] > 3.9 * r["macs"]  # 64 px: four times the positions of 32 px
    assert s["rows"][2]["paper"] == {"params_paper_head": 1.0e5}


@pytest.mark.parametrize("override, message", [
    ("prune.share_per_step=1.5", "prune.share_per_step: Input should be less than 1"),
    ("prune.share_per_step=0", "prune.share_per_step: Input should be greater than 0"),
    ("prune.steps=10", "share_per_step x steps = 1 would remove every prunable filter"),  # 0.1 x 10: found at step 10
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
    # 20 steps of 10 % would pass 100 %, which stop_at makes no matter: it ends the run long before
    cfg = validate(_prune_cfg(tiny, steps=20, stop_at={"params": 0.95}), "t")
    _, s = run_prune(cfg)
    assert [r["step"] for r in s["rows"]] == [0, 1]  # one 10 % step already leaves < 95 % of the parameters
    assert s["rows"][1]["params"] <= 0.95 * s["rows"][0]["params"]


# Wrong versions found by a mutation survey (each checked by mutating the code; scripts/mutants.py):
# - Taylor's |.| per position instead of after the mean over positions (eq. 8), scores of the last batch
#   only, scoring in train mode (moving BN statistics), hooks left on the network, its mode not given back
#     -> test_taylor_means_positions_then_takes_abs_over_every_batch_and_leaves_the_network_as_it_was
# - mean_activation without its ReLU, l1 without |w|, no per-layer normalisation, an unseeded random
#   control, an all-zero layer normalised to NaN -> test_the_other_criteria_by_hand
# - uniform allocation sharing the budget by channels where a coupled channel costs several filters,
#   flooring instead of rounding, a group emptied -> test_uniform_allocation_spends_the_budget_in_filters
# - a step's filter count truncated, or a share of the shrunken network instead of the first one
#   (base_prunable ignored) -> test_a_steps_count_rounds_a_share_of_the_networks_first_prunable_filters
# - `removed` counting channels instead of filters -> test_removed_counts_the_filters_the_convs_lose
# - the FC bias scaled with its weights; a rebuilt BN losing its eps and momentum, a bias-free linear
#   layer given a bias -> test_paper_surgery_... (bias) and test_resize_keeps_each_layers_own_settings
def test_taylor_means_positions_then_takes_abs_over_every_batch_and_leaves_the_network_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 2])), (torch.randn(3, 3, 6, 6), torch.tensor([1, 1, 0]))]
    raw, per_position = torch.zeros(4), torch.zeros(4)
    for x, y in batches:  # by hand: a = the first conv's output (no BN follows it)
        a = model[0](x).detach().requires_grad_()
        torch.nn.functional.cross_entropy(model[4](model[3](model[2](model[1](a)))), y).backward()
        raw += (a * a.grad).mean(dim=(2, 3)).abs().mean(0)
        per_position += (a * a.grad).abs().mean(dim=(2, 3)).mean(0)
    model.zero_grad()
    assert not torch.allclose(raw / raw.norm(), per_position / per_position.norm(), atol=1e-3)  # the case tells them apart
    assert torch.allclose(taylor(model, batches, 0)["0"], raw / raw.norm(), atol=1e-5)
    assert not torch.allclose(taylor(model, batches[1:], 0)["0"], raw / raw.norm(), atol=1e-3)  # both batches count
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).train()
    stats = net[1].running_mean.clone()
    taylor(net, batches, 0)
    assert net.training and torch.equal(net[1].running_mean, stats)
    assert not any(m._forward_hooks for m in net.modules())


def test_the_other_criteria_by_hand():
    from rescomp.compress.prune import CRITERIA, l2_normalise

    conv = nn.Conv2d(1, 2, 1, bias=False)
    conv.weight.data = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    scores = CRITERIA.get("mean_activation")(model, [(torch.full((1, 1, 2, 2), 0.5), torch.tensor([0]))], 0)["0"]
    assert torch.allclose(scores, torch.tensor([1.0, 0.0]))  # ReLU(0.5) and ReLU(-1.0), normalised
    conv = nn.Conv2d(2, 2, 1)
    conv.weight.data = torch.tensor([[1.0, -2.0], [0.5, 0.5]]).view(2, 2, 1, 1)
    assert torch.allclose(CRITERIA.get("l1")(nn.Sequential(conv), [], 0)["0"], torch.tensor([3.0, 1.0]) / 10 ** 0.5)
    rnd = CRITERIA.get("random")
    assert torch.equal(rnd(model, [], 3)["0"], rnd(model, [], 3)["0"])
    assert not torch.equal(rnd(model, [], 3)["0"], rnd(model, [], 4)["0"])
    assert torch.equal(l2_normalise({"a": torch.zeros(3)})["a"], torch.zeros(3))  # a dead layer: zeros, not NaN


def test_uniform_allocation_spends_the_budget_in_filters():
    from rescomp.compress.prune import Group

    ramp = lambda n: torch.arange(n, dtype=torch.float)  # noqa: E731
    pair = Group("a", 4, [("a", [0, 1, 2, 3], [0, 1, 2, 3]), ("a2", [0, 1, 2, 3], [0, 1, 2, 3])], True)  # 2 filters a channel
    single = Group("b", 4, [("b", [0, 1, 2, 3], [0, 1, 2, 3])], False)
    assert select([pair, single], [ramp(4), ramp(4)], 6, allocation="uniform") == {"a": [0, 1], "b": [0, 1]}  # 4 + 2
    four, six = Group("c", 4, [], False), Group("d", 6, [], False)
    assert select([four, six], [ramp(4), ramp(6)], 4, allocation="uniform") == {"c": [0, 1], "d": [0, 1]}  # 1.6, 2.4
    assert select([four, six], [ramp(4), ramp(6)], 10, allocation="uniform") == {"c": [0, 1, 2], "d": [0, 1, 2, 3, 4]}


def test_a_steps_count_rounds_a_share_of_the_networks_first_prunable_filters():
    spec = {"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}
    model = build_model(spec)
    kw = dict(criterion="l1", policy="paper", exclude=[], batches=[], seed=0, image_size=32)
    prunable = prune(model, spec, share=0.01, **kw)[2]["prunable"]
    share = 3.6 / prunable  # 3.6 filters: 4, not 3
    assert prune(model, spec, share=share, **kw)[2]["removed"] == 4
    assert prune(model, spec, share=share, base_prunable=2 * prunable, **kw)[2]["removed"] == 7  # 7.2


# Wrong version: `removed` counting channels, where a coupled channel is a filter of each conv the addition
# joins (the step's share and the table's "filters removed" would undercount coupled pruning).
def test_removed_counts_the_filters_the_convs_lose():
    spec = {"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10, "shortcut": "B"}
    model = build_model(spec)
    filters = lambda m: sum(c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d))  # noqa: E731
    for policy in ("paper", "coupled"):
        net, _, info = prune(model, spec, share=0.3, criterion="l1", policy=policy, exclude=[], batches=[], seed=0,
                             image_size=32)
        assert info["removed"] == filters(model) - filters(net), policy
    # coupled: stage 1 joins conv1 and each unit's last conv (identity shortcuts), stages 2-3 a projection and
    # a last conv: two filters a coupled channel, so filters removed exceed channels removed by the coupled ones
    assert info["removed"] == info["removed_channels"] + info["removed_coupled_channels"] > info["removed_channels"]


def test_resize_keeps_each_layers_own_settings():
    from rescomp.compress.prune import resize

    net = resize(nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.01), nn.Linear(4, 2, bias=False)),
                 {"0": [2], "1": [3, 2]})
    assert (net[0].num_features, net[0].eps, net[0].momentum) == (2, 1e-3, 0.01)
    assert net[1].in_features == 3 and net[1].bias is None


# - an addition of two convs (a projection shortcut's and its block's last) not counted as coupled, so the
#   paper policy prunes it; a conv the network calls twice pruned; a conv scored at a BN defined after it
#   that normalises something else (another width) -> test_what_the_paper_policy_may_prune_and_where_a_conv_is_scored
def test_what_the_paper_policy_may_prune_and_where_a_conv_is_scored():
    from rescomp.compress.prune import activation_modules

    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10, "shortcut": "B"})
    roots = {g.root for g in channel_groups(model, torch.zeros(1, 3, 32, 32), [], "paper")}
    assert roots == {"layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"}  # each conv2 meets its shortcut's add

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shared = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            return self.head(self.shared(self.shared(self.stem(x))))

    # the shared conv maps its channels onto themselves, tied to the stem's: neither can lose one
    assert channel_groups(Twice(), torch.zeros(1, 3, 8, 8), [], "coupled") == []
    dense = build_model({"arch": "densenet121", "num_classes": 10})
    acts = activation_modules(dense)
    assert acts["features.denseblock1.denselayer1.conv1"] is dense.get_submodule("features.denseblock1.denselayer1.norm2")
    pre = nn.Module()  # a BN defined after a conv but normalising something else (here the conv's input)
    pre.conv, pre.norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3)
    assert activation_modules(pre)["conv"] is pre.conv
