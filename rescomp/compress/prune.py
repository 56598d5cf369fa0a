"""Filter pruning by the first-order Taylor criterion on any CNN (Martineau, after Molchanov et al. 2017).

../shared/papers/taylor-filter-pruning-complex-nets.txt. rescomp contributes the criteria, the
policy and the schedule; torch-pruning's DependencyGraph finds coupled channels and does the
surgery (convs, BN with its running statistics, linear layers after a flatten, concatenations).

Criteria (per output channel of every conv, larger = more important):
- taylor: |mean over batch and positions of activation x gradient| (Molchanov et al. 2017, eq. 8),
  averaged over batches and L2-normalised per layer. The activation is the output of the BN that
  follows the conv (or of the conv itself): with the ReLU after it, a x dL/da is the same as on the
  ReLU's output, which is what removing the channel zeroes.
- mean_activation: the mean of that activation after ReLU (the paper's second criterion);
- l1: the L1 norm of the filter's weights; random: a seeded control.
Policies: `paper` leaves alone convs whose channels meet an addition or a concatenation, convs
called more than once, the layer that sets the number of outputs, and any excluded by name; each
other conv's filters are scored alone. `coupled` also prunes channels tied by additions and
concatenations, all members together. Groups of different sizes are made comparable by what one
removal costs: a channel of a group removes one filter from each member conv, so its score is the
mean of its members' (per-layer normalised) scores, the importance per filter removed, and it uses
that many filters of the step's budget, counted in filters like the paper's "5 % of the filters that
can be reduced". The `random` control draws one score per removable channel, whatever its group.

Surgery after the removal (Martineau, section 0.3): each BatchNorm whose channels changed has its
running statistics reset (`bn_stats: reset`; `slice` keeps torch-pruning's sliced statistics), and a
fully connected layer whose inputs shrank has its remaining weights multiplied by
inputs before / inputs after (`fc_scaling`), the dropout weight-scaling rule read for removed inputs
(the expected pre-activation is kept if removed inputs carried as much as kept ones).
A pruned network is stored as its spec plus `shapes` (the new sizes of every resized module), so it
rebuilds without torch-pruning replaying anything.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from rescomp import distributed
from rescomp.errors import ConfigError
from rescomp.models import build_model, register_transform
from rescomp.hardware import memory_format_of
from rescomp.registry import Registry


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("pruning needs torch-pruning: pip install 'torch-pruning==1.6.*'") from None
    return tp


# ---------------------------------------------------------------------------------------------
# Structure: which convs the policy may prune, and how channels are grouped


def execution_order(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """Conv/linear module names in the order they run, and how often each runs."""
    calls: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(names[m]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    counts: dict[str, int] = {}
    for c in calls:
        counts[c] = counts.get(c, 0) + 1
    return list(dict.fromkeys(calls)), counts


@dataclass
class Group:
    """Channels removed together: the root conv's out-channels and every conv out-channel tied to them."""
    root: str
    size: int
    members: list[tuple[str, list[int], list[int]]]  # (conv name, its channel idxs, the root idxs they map to)
    coupled: bool  # meets an addition (several convs' outputs) or a concatenation

    @functools.cached_property  # members are fixed once the group is built
    def cost(self) -> torch.Tensor:
        """Filters removed with each of the root's channels: one per member conv the channel maps to."""
        c = torch.zeros(self.size)
        for _, _, root_idxs in self.members:
            c.index_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), torch.ones(len(root_idxs)))
        return c.clamp(min=1)


def refuse_unprunable(model: nn.Module, policy: str) -> None:
    """ConfigError for a network whose filters neither policy can remove correctly: a grouped or depthwise
    conv ties its output channels to its input channels group by group (a depthwise stem's are the image's
    colours), and torch-pruning reads an option-A shortcut's zero padding as a channel-for-channel map,
    so the coupled policy would tie the padded channels to the wrong ones."""
    from rescomp.models.cifar_resnet import PadShortcut

    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    if grouped:
        raise ConfigError(f"prune cannot remove filters of a network with grouped or depthwise convs ({grouped[0]}"
                          f"{f' and {len(grouped) - 1} more' if len(grouped) > 1 else ''}): their channels are tied "
                          f"to their inputs' group by group; prune the network without separable convs (separable: "
                          f"spatial prunes)")
    if policy == "coupled" and any(isinstance(m, PadShortcut) for m in model.modules()):
        raise ConfigError("prune.policy=coupled cannot prune a network with zero-padding (option A) shortcuts: the "
                          "padded channels would be tied to the wrong ones; use model.shortcut=B, or prune.policy=paper")


def channel_groups(model: nn.Module, example: torch.Tensor, exclude: list[str], policy: str) -> list[Group]:
    refuse_unprunable(model, policy)
    tp = _tp()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    order, counts = execution_order(model, example)
    output_layer = order[-1]  # sets the number of outputs: never pruned
    excluded = {n for n in names.values() if any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    excluded |= {output_layer} | {n for n, c in counts.items() if c > 1}
    ignored = [m for m, n in names.items() if n in excluded]
    groups = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        members, concat, readers = [], False, set()
        for item in g.items:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if type(module).__name__ == "_ConcatOp":
                concat = True
            if isinstance(module, nn.Conv2d) and dg.is_out_channel_pruning_fn(dep.handler):
                members.append((names[module], list(idxs), list(item.root_idxs)))
            if isinstance(module, (nn.Conv2d, nn.Linear)) and dg.is_in_channel_pruning_fn(dep.handler):
                readers.add(module)
        root = names[g[0].dep.target.module]
        coupled = concat or len({m[0] for m in members}) > 1
        if any(m[0] in excluded for m in members) or members[0][0] != root:
            continue
        # The paper's policy also leaves a conv whose output several layers read (a SqueezeNet squeeze conv,
        # read by both expand convs): Martineau's "reused" layer, whose readers would all have to change.
        # It is why "in SqueezeNet, only the first convolution layer can be reduced" (Table 2). It also
        # leaves a stem that a first block's conv and its projection shortcut both read (ResNet-50,
        # ResNet50V2, the bottleneck ResNet-56): 64 and 16 filters, not in any committed table's policy rows.
        if policy == "paper" and (coupled or len(readers) > 1):
            continue
        groups.append(Group(root, len(g[0].idxs), members, coupled))
    return groups


# ---------------------------------------------------------------------------------------------
# Criteria: conv name -> score per output channel

CRITERIA: Registry[Callable[..., dict[str, torch.Tensor]]] = Registry("pruning criterion")


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """For each conv, the module whose output is its channels' activation: the BN right after it (also where
    layer-drop's gate wraps that BN: a gated unit's last BN), else itself."""
    from rescomp.compress.layer_drop import Gated

    mods = list(model.named_modules())
    out = {}
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            nxt = nxt.inner if isinstance(nxt, Gated) else nxt
            out[name] = nxt if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels else m
    return out


def _activation_scores(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       per_batch: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], needs_grad: bool) -> dict[str, torch.Tensor]:
    acts = activation_modules(model)
    sums: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in acts.items():
        def hook(_m, _i, out, name=name):
            if needs_grad and out.requires_grad:
                out.retain_grad()
            saved[name] = out
            # the network goes on with a copy: an in-place op after the module (torchvision's residual
            # `out += identity`, an in-place ReLU) would otherwise turn the kept activation and its
            # gradient into the block's output and its gradient
            return out.clone()
        hooks.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()  # BN in inference mode: scores must not move its running statistics
    n = 0
    fmt = memory_format_of(model)  # the layout the caller chose (RunContext.layout): batches follow it
    rank, world = distributed.rank(), distributed.world_size()
    try:
        for i, (x, y) in enumerate(batches):
            if i % world != rank:  # under several processes each rank scores its share of the batches
                continue
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(needs_grad):
                loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
                if needs_grad:
                    loss.backward()
            for name, a in saved.items():
                s = per_batch(a.detach(), a.grad if needs_grad else None)
                sums[name] = sums.get(name, 0) + s
            saved.clear()
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was)
    if world > 1:  # every rank gets the sums over all batches, bitwise the same, so all rank alike
        names, device = list(acts), next(model.parameters()).device
        part = lambda k: (sums[k].flatten().to(device, torch.float64) if k in sums  # noqa: E731
                          else torch.zeros(_channels(acts[k]), device=device, dtype=torch.float64))
        flat = distributed.all_reduce_sum(torch.cat([part(k) for k in names]
                                                    + [torch.tensor([float(n)], device=device, dtype=torch.float64)]))
        n, parts = int(flat[-1]), flat[:-1].split([_channels(acts[k]) for k in names])
        sums = {k: p.float() for k, p in zip(names, parts)}
    return {k: v / max(n, 1) for k, v in sums.items()}


def _channels(mod: nn.Module) -> int:
    return mod.num_features if isinstance(mod, nn.BatchNorm2d) else mod.out_channels


def l2_normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer L2 normalisation (Molchanov et al. 2017, section 2.2), so layers compare on one scale."""
    return {k: v / (v.norm() + 1e-12) for k, v in scores.items()}


@CRITERIA.register("taylor")
def taylor(model: nn.Module, batches, seed: int) -> dict[str, torch.Tensor]:
    # Molchanov et al. 2017, eq. 8: for each example, the mean over a feature map's positions of
    # a * dL/da, then its absolute value; then the mean over the examples (and over batches).
    # Taking |.| after averaging over the batch would let examples cancel and make the score
    # depend on the batch size.
    raw = _activation_scores(model, batches, lambda a, g: (a * g).mean(dim=(2, 3)).abs().mean(0), needs_grad=True)
    return l2_normalise(raw)


@CRITERIA.register("mean_activation")
def mean_activation(model: nn.Module, batches, seed: int) -> dict[str, torch.Tensor]:
    return l2_normalise(_activation_scores(model, batches, lambda a, g: F.relu(a).mean(dim=(0, 2, 3)), needs_grad=False))


@CRITERIA.register("l1")
def l1(model: nn.Module, batches, seed: int) -> dict[str, torch.Tensor]:
    return l2_normalise({n: m.weight.detach().abs().flatten(1).sum(1) for n, m in model.named_modules()
                         if isinstance(m, nn.Conv2d)})


@CRITERIA.register("random")
def random_scores(model: nn.Module, batches, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.out_channels, generator=g) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------
# Pruning one step


def group_scores(groups: list[Group], scores: dict[str, torch.Tensor], per_channel_draw: bool = False) -> list[torch.Tensor]:
    """Each group's channel scores, at the root's channel index: the mean of its member convs' scores
    (importance per filter removed, so a ten-conv group competes with a single conv on one scale).
    per_channel_draw: the root's scores alone (the `random` control: one draw per removable channel)."""
    out = []
    for g in groups:
        if per_channel_draw:
            name, idxs, root_idxs = next(m for m in g.members if m[0] == g.root)
            s = torch.zeros(g.size)
            s[root_idxs] = scores[name].detach().cpu()[idxs]
            out.append(s)
            continue
        s = torch.zeros(g.size)
        for name, idxs, root_idxs in g.members:
            s.index_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), scores[name].detach().cpu()[idxs].float())
        out.append(s / g.cost)
    return out


def select(groups: list[Group], scores: list[torch.Tensor], count: int, min_channels: int = 1,
           allocation: str = "global") -> dict[str, list[int]]:
    """The lowest-scoring channels over all groups, removing at most `count` filters (a group's channel
    costs one filter per member conv), leaving each group at least min_channels.

    global: ranked across layers (scores are per-layer normalised); uniform: every group loses the
    same share of its channels, its lowest-scoring ones (structure alone decides the sizes).
    """
    costs = {g.root: g.cost for g in groups}
    if allocation == "uniform":
        total = sum(float(c.sum()) for c in costs.values())
        chosen = {}
        for g, s in zip(groups, scores):
            k = min(int(round(count * g.size / total)), g.size - min_channels)
            if k > 0:
                chosen[g.root] = sorted(range(g.size), key=lambda i: (float(s[i]), i))[:k]
        return chosen
    candidates = sorted((float(s[i]), g.root, i) for g, s in zip(groups, scores) for i in range(g.size))
    left = {g.root: g.size for g in groups}
    chosen: dict[str, list[int]] = {}
    for _, root, i in candidates:
        if count <= 0:
            break
        cost = int(costs[root][i])
        if left[root] > min_channels and cost <= count:  # never past the step's budget
            chosen.setdefault(root, []).append(i)
            left[root] -= 1
            count -= cost
    return chosen


def prune_step(model: nn.Module, chosen: dict[str, list[int]], example: torch.Tensor) -> nn.Module:
    """Remove the chosen out-channels of each root conv and everything coupled to them (in place)."""
    tp = _tp()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for root, idxs in chosen.items():
        group = dg.get_pruning_group(model.get_submodule(root), tp.prune_conv_out_channels, sorted(idxs))
        group.prune()
    return model


def shapes(model: nn.Module) -> dict[str, list[int]]:
    """The sizes that define a conv / BN / linear layer: what a pruned spec records."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = [m.in_channels, m.out_channels, m.groups]
        elif isinstance(m, nn.BatchNorm2d):
            out[n] = [m.num_features]
        elif isinstance(m, nn.Linear):
            out[n] = [m.in_features, m.out_features]
    return out


# A pruned network: its layers at their recorded sizes. Before `deleted`: a unit deleted after pruning
# (a chain's layer-drop of a pruned network) keeps its pruned shapes in the spec, on layers then removed.
@register_transform("shapes", order=25)
def resize(model: nn.Module, sizes: dict[str, list[int]]) -> nn.Module:
    """Replace each named layer with one of the recorded sizes (weights to be loaded after; in place)."""
    for name, dims in sizes.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            new: nn.Module = nn.Conv2d(dims[0], dims[1], m.kernel_size, m.stride, m.padding, m.dilation, dims[2],
                                       m.bias is not None, m.padding_mode)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(dims[0], m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(dims[0], dims[1], m.bias is not None)
        else:
            raise ConfigError(f"spec shapes: '{name}' is a {type(m).__name__}, not a conv, BN or linear layer")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def changed_shapes(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: v for k, v in after.items() if before.get(k) != v}


def with_head(model: nn.Module, classes: int, image_size: int) -> nn.Module:
    """A copy of `model` whose output layer (the last conv or linear layer to run) has `classes`
    outputs: to count a network's costs with another head (e.g. ImageNet's 1000 classes, as a paper did)."""
    model = copy.deepcopy(model).cpu()
    name = execution_order(model, torch.zeros(1, 3, image_size, image_size))[0][-1]
    m = model.get_submodule(name)
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(m.in_features, classes, m.bias is not None)
    else:
        new = nn.Conv2d(m.in_channels, classes, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def surgery(model: nn.Module, before: dict[str, list[int]], bn_stats: str, fc_scaling: bool) -> dict[str, list[str]]:
    """The paper's adjustments after a removal (Martineau, section 0.3), given the layer sizes before it:
    reset the running statistics of every BatchNorm whose channels changed, and multiply the kept
    weights of every linear layer whose inputs shrank by inputs before / inputs after."""
    reset, scaled = [], []
    for name, m in model.named_modules():
        if name not in before:
            continue
        if isinstance(m, nn.BatchNorm2d) and bn_stats == "reset" and before[name] != [m.num_features]:
            m.reset_running_stats()
            reset.append(name)
        elif isinstance(m, nn.Linear) and fc_scaling and before[name][0] != m.in_features:
            with torch.no_grad():
                m.weight.mul_(before[name][0] / m.in_features)
            scaled.append(name)
    return {"bn_reset": reset, "fc_scaled": scaled}


def prunable_filters(groups: list[Group]) -> int:
    """The filters the policy may remove: one per channel of each member conv of each group."""
    return int(sum(float(g.cost.sum()) for g in groups))


def prune(model: nn.Module, spec: dict[str, Any], *, share: float, criterion: str, policy: str, exclude: list[str],
          batches: Iterable, seed: int, image_size: int, base_prunable: Optional[int] = None,
          allocation: str = "global", bn_stats: str = "reset", fc_scaling: bool = True
          ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The technique: a pruned copy of `model` with `share` x (the policy's prunable filters at the start)
    fewer filters, its new spec, and what was done."""
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    model = copy.deepcopy(model)
    groups = channel_groups(model, example, exclude, policy)
    prunable = prunable_filters(groups)
    if not groups or sum(g.size for g in groups) <= len(groups):
        raise ConfigError(f"policy '{policy}' leaves nothing prunable in {spec['arch']} (excluded: {exclude or 'none'}); "
                          f"try policy: coupled, or exclude fewer layers")
    scores = CRITERIA.get(criterion)(model, batches, seed)
    count = int(round(share * (base_prunable or prunable)))
    chosen = select(groups, group_scores(groups, scores, per_channel_draw=criterion == "random"), count,
                    allocation=allocation)
    sizes = shapes(model)
    prune_step(model, chosen, example)
    done = surgery(model, sizes, bn_stats, fc_scaling)
    base = shapes(build_model({k: v for k, v in spec.items() if k != "shapes"}))
    new_spec = {**spec, "shapes": changed_shapes(base, shapes(model))}
    costs = {g.root: g.cost for g in groups}
    coupled = {g.root for g in groups if g.coupled}
    info = {"criterion": criterion, "policy": policy,
            "removed": int(sum(float(costs[r][i]) for r, idxs in chosen.items() for i in idxs)),
            "removed_channels": sum(len(v) for v in chosen.values()),
            "removed_coupled_channels": sum(len(v) for r, v in chosen.items() if r in coupled),
            "prunable": prunable, "groups": len(groups), "coupled_groups": len(coupled),
            "per_layer": {k: len(v) for k, v in chosen.items()}, **done}
    return model, new_spec, info
