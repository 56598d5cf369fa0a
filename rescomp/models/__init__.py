"""Model registry. The architecture is data: a spec dict {arch, num_classes, **builder args} that is
stored in every checkpoint and rebuilds the network without pickling modules (DESIGN.md, habit 2).

A technique that changes a network's structure records the change under a spec key of its own
(separable, gates, deleted, shapes, ...) and registers the transform that replays it
(`register_transform`). build_model applies the transforms a spec names, in their registered order,
without knowing the techniques: they register themselves when the techniques package is imported,
which build_model does by name the first time a spec holds a key no builder takes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pydantic
import torch
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


# Models of installed packages: `[project.entry-points."rescomp.models"] mynet = "my_pkg.models:build"`.
PLUGIN_GROUP = "rescomp.models"


def _load_builtin() -> None:
    # Importing the modules registers their builders; done on first use, not at package import.
    from rescomp.models import cifar_resnet, lenet, resnet50v2, torchvision_models  # noqa: F401


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}


def get_entry(arch: str) -> ModelEntry:
    """The registered model `arch`, an installed plugin's, or `module.path:builder` imported as written."""
    _load_builtin()
    if arch in MODELS:
        return MODELS.get(arch)
    if ":" in arch:
        return _user_entry(arch, lambda: _import(arch))
    plugins = _plugins()
    if arch in plugins:
        return _user_entry(arch, plugins[arch].load, plugins[arch].value)
    try:
        return MODELS.get(arch)  # unknown: names the nearest and lists the valid ones
    except ConfigError as e:
        raise ConfigError(f"{e}; or your own builder as module.path:function (README, 'Your own model')") from None


def model_names() -> list[str]:
    _load_builtin()
    return sorted(set(MODELS.names()) | set(_plugins()))


_USER: dict[str, ModelEntry] = {}


def _user_entry(arch: str, load: Callable[[], Any], origin: str = "") -> ModelEntry:
    """A builder from outside rescomp: any callable taking num_classes (and its own keyword
    arguments, which become the keys of `model:`) and returning an nn.Module. It may set the
    attributes `min_input` and `family`; its docstring's first line is its summary."""
    if arch not in _USER:
        fn = load()
        where = f"'{arch}'" + (f" (plugin {origin})" if origin else "")
        if not callable(fn):
            raise ConfigError(f"model.arch {where} is a {type(fn).__name__}, not a function that builds a model")
        params = inspect.signature(fn).parameters
        if "num_classes" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"model.arch {where}: the builder must take a num_classes argument (rescomp passes the "
                              f"dataset's number of classes)")
        summary = (inspect.getdoc(fn) or "a user-defined model").splitlines()[0]
        _USER[arch] = ModelEntry(fn, int(getattr(fn, "min_input", 8)), str(getattr(fn, "family", "user")), summary)
    return _USER[arch]


def _import(arch: str) -> Any:
    """`package.module:attribute` -> the attribute. The current folder is searched too (as `python -m`
    does), so a models.py beside the config works without installing anything."""
    module, _, attr = arch.partition(":")
    if not module or not attr:
        raise ConfigError(f"model.arch '{arch}': write a builder as module.path:function, e.g. my_models:build")
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"model.arch '{arch}': cannot import '{e.name}'; run from the folder that holds "
                          f"{module.replace('.', '/')}.py, or add its folder to PYTHONPATH") from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"model.arch '{arch}': importing {module} failed: {type(e).__name__}: {e}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise ConfigError(f"model.arch '{arch}': {module} has no '{attr}'{suggest(attr, names)}") from None


@dataclass(frozen=True)
class SpecTransform:
    """How a spec key's value changes the built network: apply(network, value) -> network. Transforms run
    in ascending `order`, because what a later one records names the layers earlier ones made (pruned
    shapes of a separable network's convs)."""
    apply: Callable[[nn.Module, Any], nn.Module]
    order: int
    # For a key whose value is the user's options: how to write it, said when the value is an empty
    # mapping (`gates: {}`), which would otherwise build the network without the transform, silently.
    empty: Optional[str] = None
    # Whether the key makes another network the user chose under model: (separable convs), which a
    # checkpoint given to a stage must match (base_network); not a technique's device a stage may add or
    # drop (gates) nor a record of what a stage did (pruned shapes, deleted units).
    architecture: bool = False


TRANSFORMS: Registry[SpecTransform] = Registry("spec transform")
# The package whose modules register the transforms they own; imported by name, on first need.
TECHNIQUES = "rescomp.compress"


def register_transform(key: str, *, order: int, empty: Optional[str] = None, architecture: bool = False) -> Callable:
    """Register `fn(network, value) -> network` as what spec key `key` does to a built network. `empty`:
    for a key the user writes, how to write it, said when the value is `{}` (an empty value of a key
    rescomp records, `deleted: []`, changes nothing)."""
    def add(fn: Callable[[nn.Module, Any], nn.Module]) -> Callable[[nn.Module, Any], nn.Module]:
        TRANSFORMS.register(key)(SpecTransform(fn, order, empty, architecture))
        return fn

    return add


def transform_keys() -> list[str]:
    """Every registered spec transform, in the order build_model applies them."""
    importlib.import_module(TECHNIQUES)
    return sorted(TRANSFORMS, key=lambda k: TRANSFORMS.get(k).order)


def check_spec(spec: dict[str, Any]) -> None:
    """Raise ConfigError for builder arguments the architecture does not take, and for a transform's
    options given as `{}`."""
    entry = get_entry(spec["arch"])
    params = inspect.signature(entry.builder).parameters
    unknown = [k for k in spec if k not in ("arch", "num_classes") and k not in params]
    if unknown:
        keys = transform_keys()
        for key in unknown:
            hint = TRANSFORMS.get(key).empty if key in keys else None
            if hint and isinstance(spec[key], dict) and not spec[key]:
                raise ConfigError(f"model.{key}: {{}} is empty and would change nothing; {hint}")
        valid = [p for p in params if p != "num_classes"] + keys
        for key in unknown:
            if key not in keys:
                raise ConfigError(
                    f"unknown key 'model.{key}' for arch '{spec['arch']}'{suggest(key, valid)}; "
                    f"valid: arch, {', '.join(valid) or '(none)'}"
                )
    for key, value in spec.items():
        if key in params and key != "num_classes" and (wanted := _wrong_type(entry.builder, key, value)):
            given = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)  # as YAML says it
            raise ConfigError(f"model.{key}: {given} is not {wanted}; set it to {wanted}, or leave it out for the "
                              f"default (arch '{spec['arch']}')")


def _wrong_type(builder: Callable[..., nn.Module], key: str, value: Any) -> Optional[str]:
    """The type the builder's signature gives `key`, said in words, if `value` is not of it (strictly: not
    True for an int, nor '3'; a list passes for a tuple and 3 for a float); None if it is, or if the builder
    does not annotate the argument (a user's model may not)."""
    try:
        hint = typing.get_type_hints(builder).get(key)
    except Exception:  # annotations a user's module cannot resolve: left to the builder
        return None
    if hint is None:
        return None
    forms = [value] + ([tuple(value)] if isinstance(value, list) else [list(value)] if isinstance(value, tuple) else [])
    for form in forms:
        try:
            _adapter(hint).validate_python(form, strict=True)
            return None
        except pydantic.ValidationError:
            pass
    return _said(hint)


def _said(hint: Any) -> str:
    """A type annotation in words: `an integer`, `one of 'A', 'B'`, `a list of integers or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _said(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_said(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, f"a {hint}")


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(hint)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The network a spec describes: the builder's network, then the spec's structural transforms."""
    check_spec(spec)
    entry = get_entry(spec["arch"])
    params = inspect.signature(entry.builder).parameters
    kwargs = {k: v for k, v in spec.items() if k == "num_classes" or k in params}
    named = [k for k in spec if k not in kwargs and k != "arch"]  # transforms (check_spec registered them)
    try:
        model = entry.builder(**kwargs)
        for key in sorted(named, key=lambda k: TRANSFORMS.get(k).order):
            if spec[key]:  # an empty value changes nothing
                model = TRANSFORMS.get(key).apply(model, spec[key])
    except ConfigError:
        raise
    except Exception as e:  # a builder rejecting its arguments: the user's model section, not a rescomp bug
        raise ConfigError(f"model '{spec['arch']}' with {_args(spec)}: {e}") from None
    return model


def probe(spec: dict[str, Any], image_size: int) -> None:
    """Build the spec's network and run one image through it, so that arguments a builder accepts but
    the network cannot run with (a width of 0) fail as a ConfigError before any run folder is touched."""
    shape_only = {k: v for k, v in spec.items() if k != "pretrained"}  # the same network, no weight download
    with warnings.catch_warnings():  # torch warns of zero-size layers; the forward below says what is wrong
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(shape_only).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        raise ConfigError(f"model '{spec['arch']}' with {_args(spec)} cannot run on a {image_size}x{image_size} "
                          f"image: {str(e).splitlines()[0]}") from None


def base_network(spec: dict[str, Any]) -> dict[str, Any]:
    """The network a user's `model:` section names: its arch, every builder argument (defaults filled in)
    and the transforms that make another architecture (separable); without a technique's devices and what
    stages record (gates, shapes, deleted units, masks, codes), num_classes, or `pretrained` (how the
    weights began, not which network they are). Values in JSON's terms, so a tuple default equals the list
    a config gives."""
    params = inspect.signature(get_entry(spec["arch"]).builder).parameters
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update({k: v for k, v in spec.items() if k in params})
    written = {k: spec[k] for k in transform_keys() if TRANSFORMS.get(k).architecture and spec.get(k)}
    base = {"arch": spec["arch"], **{k: v for k, v in args.items() if k not in ("num_classes", "pretrained")}, **written}
    return json.loads(json.dumps(base, default=repr))


def _args(spec: dict[str, Any]) -> str:
    args = {k: v for k, v in spec.items() if k not in ("arch", "num_classes", "shapes", "deleted")}
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "default arguments"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
