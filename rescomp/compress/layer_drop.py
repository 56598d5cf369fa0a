"""Residual-unit deletion with learned importance (../shared/papers/residual-block-deletion.txt).

Each residual unit computes x + w * F(x) with a learnable scalar w (section 3.1): here the unit's
last module before the addition (its last BN, or conv for pre-activation blocks) is wrapped in
`Gated`, which multiplies its output by w. The first unit of every stage keeps plain x + F(x) and is
never deleted, as in the paper; a unit can only be deleted where its shortcut is the identity, so
that deleting it leaves x (through the unit's final ReLU, which is the identity on the
non-negative output of the unit before it).

Deleting a unit replaces it with nn.Identity: its modules and parameters are gone and nothing of it
runs, and the names of the other units (and their state_dict keys) stay as they were, so a
shortened network is rebuilt from its spec: {..., gates: {...}, deleted: [unit names]}.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from rescomp.errors import ConfigError
from rescomp.models import register_transform
from rescomp.registry import Registry

STAGE = re.compile(r"^(layer\d+|stacks\.\d+)$")


class Gated(nn.Module):
    """inner(x) * gate: the learnable importance w of a residual unit."""

    def __init__(self, inner: nn.Module, init: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.empty(()).uniform_(*init))  # paper: uniform random initial values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gate


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "layer2.3"
    stage: str
    index: int
    residual_out: str  # the module whose output is the residual branch's last step
    deletable: bool  # gated: not first in its stage and an identity shortcut
    convs: int  # conv layers the unit executes (the paper counts layers as convs + the classifier)


def _last_module(block: nn.Module) -> Optional[str]:
    """The module whose output the residual branch adds: conv3 of a pre-activation block (ResNet50V2),
    else the last BN of a bottleneck (bn3) or basic block (bn2), ours and torchvision's alike."""
    if hasattr(block, "preact_bn"):
        return "conv3"
    for name in ("bn3", "bn2"):
        if isinstance(getattr(block, name, None), (nn.BatchNorm2d, Gated)):
            return name
    return None


def _identity_shortcut(block: nn.Module) -> bool:
    if hasattr(block, "downsample"):  # torchvision
        return block.downsample is None
    return isinstance(getattr(block, "shortcut", None), nn.Identity)


def residual_units(model: nn.Module) -> list[Unit]:
    """Every residual unit of a ResNet-like model (stages named layerN or stacks.N), in order."""
    units = []
    for stage_name, stage in model.named_modules():
        if not (STAGE.match(stage_name) and isinstance(stage, nn.Sequential)):
            continue
        for i, block in enumerate(stage):
            if isinstance(block, nn.Identity):
                continue  # a deleted unit
            last = _last_module(block)
            if last is None:
                continue
            convs = sum(isinstance(m, nn.Conv2d) for n, m in block.named_modules()
                        if not n.startswith(("shortcut", "downsample")))
            units.append(Unit(f"{stage_name}.{i}", stage_name, i, last, i > 0 and _identity_shortcut(block), convs))
    return units


def add_gates(model: nn.Module, init: tuple[float, float] = (-1.0, 1.0)) -> nn.Module:
    """Gate every deletable unit (in place; used while building a spec)."""
    units = [u for u in residual_units(model) if u.deletable]
    if not units:
        raise ConfigError("model.gates: this model has no residual unit a gate could go on (a stage's later units, "
                          "with identity shortcuts: two or more a stage); leave gates out, or gate a deeper ResNet "
                          "such as resnet56, resnet56_bottleneck or resnet50, as layer-drop needs")
    for u in units:
        block = model.get_submodule(u.name)
        setattr(block, u.residual_out, Gated(getattr(block, u.residual_out), tuple(init)))
    return model


@register_transform("gates", order=20, empty="write `gates: true` (each gate's w drawn from [-1, 1]) or "
                   "`gates: {init: [low, high]}`, or leave gates out")
def _rebuild_gates(model: nn.Module, value: bool | dict[str, Any]) -> nn.Module:
    """model.gates: true, or {init: [low, high]} (each gate's w drawn uniformly from it); false: none."""
    if value is True or value is False:
        return add_gates(model) if value else model
    init = value.get("init", (-1.0, 1.0)) if isinstance(value, dict) and set(value) <= {"init"} else None
    if not (isinstance(init, (list, tuple)) and len(init) == 2 and all(isinstance(v, (int, float)) for v in init)):
        raise ConfigError(f"model.gates: {value!r} is neither true nor {{init: [low, high]}}, the uniform range of each "
                          f"gate's initial w (e.g. {{init: [-1.0, 1.0]}})")
    return add_gates(model, tuple(init))


@register_transform("deleted", order=30)
def delete_units(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace the named units with nn.Identity (in place)."""
    valid = {u.name: u for u in residual_units(model)}
    for name in names:
        if name not in valid or not valid[name].deletable:
            deletable = [n for n, u in valid.items() if u.deletable]
            raise ConfigError(f"unit '{name}' cannot be deleted; deletable units: {', '.join(deletable) or '(none)'}")
        stage, _, idx = name.rpartition(".")
        model.get_submodule(stage)[int(idx)] = nn.Identity()
    return model


def gates(model: nn.Module) -> dict[str, float]:
    return {u.name: float(model.get_submodule(f"{u.name}.{u.residual_out}").gate.detach())
            for u in residual_units(model) if u.deletable and isinstance(model.get_submodule(f"{u.name}.{u.residual_out}"), Gated)}


def depth(model: nn.Module) -> int:
    """Layers as the paper counts them: convs on the main path (not projection shortcuts) + the classifier."""
    convs = sum(isinstance(m, nn.Conv2d) for n, m in model.named_modules() if "shortcut" not in n and "downsample" not in n)
    return convs + sum(isinstance(m, nn.Linear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Importance criteria: unit name -> score; the lowest scores are deleted first.

CRITERIA: Registry[Callable[..., dict[str, float]]] = Registry("layer-drop criterion")


@CRITERIA.register("gate")
def _gate(model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict[str, float]:
    return {k: abs(v) for k, v in gates(model).items()}


@CRITERIA.register("random")
def _random(model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {u: rng.random() for u in gates(model)}


@CRITERIA.register("bn_gamma")
def _bn_gamma(model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict[str, float]:
    out = {}
    for u in residual_units(model):
        if u.deletable:
            inner = model.get_submodule(f"{u.name}.{u.residual_out}").inner
            if not isinstance(inner, nn.BatchNorm2d):  # a pre-activation unit ends in its conv: no gamma to read
                raise ConfigError(f"layer_drop.criterion bn_gamma reads the gamma of each unit's last BatchNorm, but "
                                  f"unit {u.name} ends in a {type(inner).__name__} (a pre-activation network); use "
                                  f"gate, output_norm or random")
            out[u.name] = float(inner.weight.abs().mean())
    return out


@CRITERIA.register("output_norm")
@torch.no_grad()
def output_norm(model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict[str, float]:
    """Mean over images of the L2 norm of w * F(x), the unit's residual output (paper, Figure 5)."""
    sums: dict[str, float] = {}
    count = 0
    hooks = []
    for u in residual_units(model):
        if u.deletable:
            def hook(_m, _i, out, name=u.name):
                sums[name] = sums.get(name, 0.0) + float(out.flatten(1).norm(dim=1).sum())
            hooks.append(model.get_submodule(f"{u.name}.{u.residual_out}").register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
            count += len(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: v / max(count, 1) for k, v in sums.items()}


def choose(scores: dict[str, float], k: int) -> list[str]:
    """The k units with the smallest scores (ties by name, so the choice is reproducible)."""
    return [name for name, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


def drop(model: nn.Module, spec: dict[str, Any], k: int, criterion: str, batches: Iterable[torch.Tensor],
         seed: int) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The technique: a copy of `model` with its k least important units deleted, its new spec, and info."""
    scores = CRITERIA.get(criterion)(model, batches, seed)
    if k > len(scores):
        raise ConfigError(f"cannot delete {k} units: only {len(scores)} deletable units are left")
    chosen = choose(scores, k)
    model = delete_units(copy.deepcopy(model), chosen)
    spec = {**spec, "deleted": sorted([*spec.get("deleted", []), *chosen])}
    return model, spec, {"criterion": criterion, "deleted": chosen, "scores": scores}
