"""The reference of every config key, generated from the pydantic models so that it cannot drift.

`rescomp config --keys` prints it; docs/config-keys.md is its committed copy (a test checks that the
two agree). A key's description is its Field description, else the comment on its line in its model's
source (config.py, config_sections.py), else the comment block just above it.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

from pydantic import BaseModel

from rescomp.config import ExperimentConfig

_FIELD = re.compile(r"^    (\w+)\s*:")


def _comments(cls: type[BaseModel]) -> dict[str, str]:
    """field -> the comment on its line, or the comment lines just above it."""
    found: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            found[m.group(1)] = trailing or " ".join(above)
        above = []
    return found


def _type(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in typing.get_args(ann) if a is not type(None)) + " or null"
    if origin is not None:
        args = ", ".join(_type(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(ann, "__name__", str(ann))


def _rows(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    comments = _comments(cls)
    rows = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, key + "."))
            continue
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):  # an optional section
            rows.append((key, "section or null", "null", (field.description or comments.get(name, "")).replace("|", "\\|")))
            rows.extend(_rows(inner[0], key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        shown = ("required" if field.is_required() else "null" if default is None
                 else repr(default).replace("|", "\\|"))
        text = (field.description or comments.get(name, "")).replace("|", "\\|")
        rows.append((key, _type(ann), shown, text))
    return rows


def reference() -> str:
    """Every key of an experiment config as a Markdown table: key, type, default, what it does."""
    lines = ["# Config keys", "",
             "Generated from `rescomp/config.py` and `rescomp/config_sections.py` by `rescomp config --keys`; do not edit by hand. Keys under "
             "`model:` other than `arch` are the chosen architecture's builder arguments: `rescomp models` "
             "lists them.", "",
             "| key | type | default | what it does |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {text.replace('<', '&lt;')} |" for k, t, d, text in _rows(ExperimentConfig)]
    return "\n".join(lines) + "\n"


def set_hint(option: str) -> str:
    """For an option no command has that names config keys (`--epochs`, `--batch-size`, `--lr`: every key whose
    last part is its name, `-` read as `_`, sections excluded), how to set them; '' for any other."""
    name = option.lstrip("-").replace("-", "_")
    keys = [k for k, t, _, _ in _rows(ExperimentConfig) if k.rsplit(".", 1)[-1] == name and t != "section or null"]
    return ("config keys are set with --set: " + " or ".join(f"--set {k}=<value>" for k in keys[:3])) if keys else ""
