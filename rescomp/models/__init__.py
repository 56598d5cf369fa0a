"""Model registry. The architecture is data: a spec dict {arch, num_classes, **builder args} that is
stored in every checkpoint and rebuilds the network without pickling modules (DESIGN.md, habit 2).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from rescomp.errors import ConfigError
from rescomp.registry import Registry, suggest


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[..., nn.Module]
    min_input: int  # smallest square input the network accepts
    family: str  # cifar-resnet | torchvision | ...
    summary: str


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, *, min_input: int = 8, family: str, summary: str) -> Callable:
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name)(ModelEntry(fn, min_input, family, summary))
        return fn

    return add


def _load_builtin() -> None:
    # Importing the modules registers their builders; done on first use, not at package import.
    from rescomp.models import cifar_resnet, resnet50v2, torchvision_models  # noqa: F401


def get_entry(arch: str) -> ModelEntry:
    _load_builtin()
    return MODELS.get(arch)


def model_names() -> list[str]:
    _load_builtin()
    return MODELS.names()


# Spec keys every architecture takes: structural transforms applied after the builder.
TRANSFORM_KEYS = ("separable", "gates", "deleted", "shapes")


def check_spec(spec: dict[str, Any]) -> None:
    """Raise ConfigError for builder arguments the architecture does not take."""
    entry = get_entry(spec["arch"])
    params = inspect.signature(entry.builder).parameters
    valid = [p for p in params if p != "num_classes"] + list(TRANSFORM_KEYS)
    for key in spec:
        if key not in ("arch", "num_classes", *TRANSFORM_KEYS) and key not in params:
            raise ConfigError(
                f"unknown key 'model.{key}' for arch '{spec['arch']}'{suggest(key, valid)}; "
                f"valid: arch, {', '.join(valid) or '(none)'}"
            )


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The network a spec describes: the builder's network, then the spec's structural transforms."""
    check_spec(spec)
    entry = get_entry(spec["arch"])
    kwargs = {k: v for k, v in spec.items() if k not in ("arch", *TRANSFORM_KEYS)}
    try:
        model = entry.builder(**kwargs)
        if spec.get("separable"):
            from rescomp.compress.separable import separate

            model = separate(model, spec["separable"])[0]
        if spec.get("gates") or spec.get("deleted"):
            from rescomp.compress.layer_drop import add_gates, delete_units

            if spec.get("gates"):
                add_gates(model, tuple(spec["gates"].get("init", (-1.0, 1.0))))
            delete_units(model, spec.get("deleted") or [])
        if spec.get("shapes"):  # a pruned network: its layers at their recorded sizes
            from rescomp.compress.prune import resize

            resize(model, spec["shapes"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model '{spec['arch']}': {e}") from None
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
