"""Replace k x k convolutions (k > 1) with spatially or depthwise separable ones.

Kastanos 2020 (../shared/papers/separable-convs-and-int8-resnet50v2.txt, section 3.2):
- spatial:   a k x 1 conv then a 1 x k conv, same channels, no bias, nothing between them;
- depthwise: a depthwise k x k conv then a pointwise 1 x 1 conv, no bias, nothing between them;
- group:     the same conv in `groups` channel groups (sep-net-slides.txt, "group-wise convolution"):
             k*k*Ci*Co / groups parameters.
Stride and padding are carried by the first half in the height direction and the second in width
(spatial), or by the depthwise half (depthwise), so output shapes are unchanged. Parameters per
C_in x C_out conv: k*k*Ci*Co -> k*Ci*Co + k*Co*Co (spatial), k*k*Ci + Ci*Co (depthwise).

The replacement is part of the architecture spec (`separable: {mode, include, exclude}`), so a
separable network rebuilds from its checkpoint like any other.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, Literal, Optional

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rescomp.errors import ConfigError
from rescomp.models import register_transform


class SeparableConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["spatial", "depthwise", "group"]
    # group: the conv split into `groups` groups of channels (sep-net-slides.txt, "group-wise
    # convolution": k groups divide a conv's parameters by k); convs whose channels `groups` does not
    # divide (a 3-channel stem) are left as they are
    groups: int = Field(2, ge=2, description="mode group: channel groups per conv")
    include: list[str] = Field(["*"], description="fnmatch patterns of conv names to replace")
    exclude: list[str] = []


class SpatialSeparable(nn.Sequential):
    def __init__(self, conv: nn.Conv2d) -> None:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        super().__init__(
            nn.Conv2d(conv.in_channels, conv.out_channels, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False),
            nn.Conv2d(conv.out_channels, conv.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=conv.bias is not None),
        )


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(
            nn.Conv2d(conv.in_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      groups=conv.in_channels, bias=False),
            nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None),
        )


def grouped(conv: nn.Conv2d, groups: int) -> nn.Conv2d:
    """The same conv in `groups` groups: each output channel sees in_channels / groups inputs."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups=groups, bias=conv.bias is not None)


REPLACEMENTS = {"spatial": SpatialSeparable, "depthwise": DepthwiseSeparable}


def replaceable(name: str, m: nn.Module, cfg: SeparableConfig) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and max(m.kernel_size) > 1
        and m.groups == 1
        and isinstance(m.padding, tuple)  # 'same'/'valid' string padding is not split here
        and (cfg.mode != "group" or (m.in_channels % cfg.groups == 0 and m.out_channels % cfg.groups == 0))
        and any(fnmatch.fnmatchcase(name, p) for p in cfg.include)
        and not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)
    )


def separate(model: nn.Module, cfg: SeparableConfig | dict[str, Any], ctx: Optional[object] = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with every matching k x k conv replaced; info lists what was replaced."""
    try:
        cfg = cfg if isinstance(cfg, SeparableConfig) else SeparableConfig.model_validate(cfg)
    except ValidationError as e:  # one line, as a config key's: pydantic's own is four, with a URL
        raise ConfigError("; ".join(f"separable.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})"
                                    for err in e.errors())) from None
    model = copy.deepcopy(model)
    targets = [(n, m) for n, m in model.named_modules() if replaceable(n, m, cfg)]
    if not targets:
        if cfg.mode == "group" and [n for n, m in model.named_modules() if replaceable(n, m, cfg.model_copy(update={"mode": "depthwise"}))]:
            raise ConfigError(f"separable: mode group with groups={cfg.groups} divides no matching conv's in and out "
                              f"channels; choose a group count that divides them (e.g. 2)")
        raise ConfigError(
            f"separable: no k x k conv (k > 1, groups 1) matches include={cfg.include} exclude={cfg.exclude}; "
            f"conv names look like: {', '.join(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))[:200]}"
        )
    before = sum(p.numel() for p in model.parameters())
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, grouped(conv, cfg.groups) if cfg.mode == "group" else REPLACEMENTS[cfg.mode](conv))
    after = sum(p.numel() for p in model.parameters())
    return model, {"mode": cfg.mode, **({"groups": cfg.groups} if cfg.mode == "group" else {}), "replaced": [n for n, _ in targets], "params_before": before, "params_after": after}


@register_transform("separable", order=10, architecture=True, empty="give its mode, e.g. `separable: {mode: depthwise}` (spatial, "
                   "depthwise or group), or leave separable out")
def _rebuild(model: nn.Module, value: dict[str, Any]) -> nn.Module:
    return separate(model, value)[0]
