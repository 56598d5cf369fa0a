"""A config as files: reading YAML (a key given twice is an error), `extends:` bases, `--set dotted.key=value`
overrides, the project a config belongs to, and the checks on files and folders a user names.
rescomp.config validates what these read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rescomp.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or any(not k for k in key.strip().split(".")):  # no '=', or an empty key or part ('=3', 'a..b=3')
        raise ConfigError(f"--set '{item}': expected dotted.key=value, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def read_text(path: Path, what: str, hint: str) -> str:
    """A text file the user named (a config, notes, a jobs file), or one line saying why it is not one and
    `hint`, how to fix it ("pass a Markdown file such as ...")."""
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder, not a file; {hint}")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found; {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not text (byte {e.start} is not UTF-8); {hint}") from None


def check_writable(folder: Path, what: str) -> None:
    """That files can be made in `folder` (made if missing), checked before any work and leaving nothing
    behind: the nearest existing folder on its path must be a folder this process can write in."""
    here = Path(os.path.abspath(folder))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ConfigError(f"{what} '{folder}': '{here}' is a file, not a folder; choose another {what}")
    try:  # a file made and gone at once: os.access says yes to root on read-only /sys and /proc
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        raise ConfigError(f"{what} '{folder}': cannot write in '{here}' ({e.strerror}); choose another {what}, or make "
                          f"it writable") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, but a key written twice in one mapping is an error: PyYAML keeps the last
    one silently, so `epochs: 200` above a forgotten `epochs: 2` ran 2. Checked on the composed nodes,
    before construction, where merges (<<) and aliases have not yet rewritten any mapping."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._unique(node, set())
        return super().construct_document(node)

    def _unique(self, node: yaml.Node, done: set[int]) -> None:
        if id(node) in done:  # an alias: the anchored node is checked once
            return
        done.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in lines:
                        raise yaml.constructor.ConstructorError(
                            problem=f"key '{key.value}' is given twice (lines {lines[key.tag, key.value]} and "
                                    f"{key.start_mark.line + 1}); keep one", problem_mark=key.start_mark)
                    lines[key.tag, key.value] = key.start_mark.line + 1
                self._unique(key, done)
                self._unique(value, done)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._unique(item, done)


def read_yaml(path: Path) -> dict[str, Any]:
    hint = "pass a YAML config such as configs/demo/resnet20.yaml"
    if path.is_dir() and (path / "config.yaml").is_file():
        hint = f"pass {path / 'config.yaml'}, the config this run folder keeps"
        steps = sorted(path.glob("step*/model.pt"))
        made = (f"the network it made is {path / 'int8.pt'}" if (path / "int8.pt").is_file() else
                f"the network it made is {path / 'model.pt'}" if steps and (path / "model.pt").is_file() else
                f"the networks it made are its steps' model.pt (the last: {steps[-1]})" if steps else "")
        if made:  # a later stage's folder: its config describes the network it started from
            hint += f" (which describes the network it started from); {made}, which `rescomp measure` takes"
    elif path.suffix in (".pt", ".onnx", ".pth"):
        hint += f"; `rescomp measure {path}` measures a saved network"
    text = read_text(path, "config file", hint)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:  # an empty file would run every default: ResNet-20 on all of CIFAR-10, for hours
        raise ConfigError(f"{path} is empty; a config names its settings (model:, data:, train:, ...), e.g. "
                          f"configs/demo/resnet20.yaml; write {{}} to run every default")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (data:, model:, train:, ...)")
    return raw


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML at `path`, merged over the file(s) its `extends:` names (relative to it)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    raw = read_yaml(path)
    bases = raw.pop("extends", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: extends must name a base config file, or a list of them (e.g. extends: "
                          f"_base.yaml), relative to this file; it is {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        if not (path.parent / base).is_file():  # named from the file that extends it, where the fix is
            raise ConfigError(f"{path}: extends '{base}', which is not a file (looked for {path.parent / base}); "
                              f"a base is named relative to the config that extends it")
        merged = deep_merge(merged, read_with_extends(path.parent / base, (*seen, path.resolve())))
    return deep_merge(merged, raw)


def project_root(config_file: Path) -> Path:
    """The project a config file belongs to: the nearest folder above it (itself included) holding
    pyproject.toml or .git, else the config file's own folder."""
    here = config_file.resolve().parent
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() or (d / ".git").exists():
            return d
    return here
