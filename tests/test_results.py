"""Committed results say where they came from without naming the machine that made them, and each
table says what its own table.json (a comparison, its compare.json) holds, with the notes its report target
gives it.

Wrong versions these catch: a data source, checkpoint or output path written as an absolute path
of the machine (a home folder, a checkout under /work, a temp folder) into a table or benchmark; a
table's notes (or the renderer) changed without the table rendered again, so its table.md says what
the notes no longer do; a committed table left out of `make rerender`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
ABSOLUTE = re.compile(r'(?:^|[:"\s(])(/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+/)')


def test_no_committed_result_holds_an_absolute_path() -> None:
    offenders = []
    for f in sorted(RESULTS.rglob("*")):
        if f.suffix in (".json", ".csv", ".md"):
            for m in ABSOLUTE.finditer(f.read_text()):
                offenders.append(f"{f.relative_to(RESULTS)}: {m.group(1)}")
    assert not offenders, offenders[:5]


ROOT = RESULTS.parent


def _rerender_commands() -> list[list[str]]:
    """The `rescomp report results/<table> ...` lines of the Makefile's rerender target."""
    text = (ROOT / "Makefile").read_text()
    recipe = text[text.index("\nrerender:"):].split("\n\n")[0]
    return [shlex.split(line.split("$(BIN)/rescomp ", 1)[1]) for line in recipe.splitlines() if "$(BIN)/rescomp " in line]


def test_every_committed_table_is_rendered_again_by_make_rerender() -> None:
    tables = {p.parent.name for p in [*RESULTS.glob("*/table.json"), *RESULTS.glob("*/compare.json")]}
    assert tables == {cmd[1].removeprefix("results/") for cmd in _rerender_commands()}


@pytest.mark.parametrize("command", _rerender_commands(), ids=lambda c: c[1])
def test_a_committed_table_is_what_its_json_and_notes_render(command, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from rescomp.cli import app

    monkeypatch.chdir(ROOT)  # the notes' paths are the Makefile's, relative to the project
    res = CliRunner().invoke(app, [*command, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    table = command[1].removeprefix("results/")
    for name in [f"{command[0] if command[0] == 'compare' else 'table'}.{x}" for x in ("md", "csv", "json")]:
        assert (tmp_path / table / name).read_text() == (RESULTS / table / name).read_text(), \
            f"results/{table}/{name} is not what `make rerender` makes of it: run `make rerender` and commit"
