"""Committed results say where they came from without naming the machine that made them, and each
table says what its own table.json (a comparison, its compare.json) holds, with the notes its report target
gives it.

Wrong versions these catch: a data source, checkpoint or output path written as an absolute path
of the machine (a home folder, a checkout under /work, a temp folder) into a table or benchmark; a
table's notes (or the renderer) changed without the table rendered again, so its table.md says what
the notes no longer do; a committed table left out of `make rerender`; an int8 benchmark's report
not what its JSON renders, or calling int8 slower than fp32 where the two latencies are within the
noise; structure.md (taylor_structure.py) not what its JSON renders, or showing a reduction the paper
did not print.
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


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_int8():
    return _script("bench_int8")


def test_taylor_structure_is_what_its_json_renders_with_the_papers_printed_reductions() -> None:
    import json

    data = json.loads((RESULTS / "table-taylor/structure.json").read_text())
    text = _script("taylor_structure").render(data, data["rows"])
    assert text == (RESULTS / "table-taylor/structure.md").read_text(), \
        "structure.md is not what `make rerender` makes of it: run `make rerender` and commit"
    vgg = next(line for line in text.splitlines() if line.startswith("| vgg16 "))
    assert vgg.split(" | ")[3] == "-42.8 %"  # Table 2 prints -42.8 %, though 138.3 -> 80.5 is -41.8 %: the print
    assert "2 of them differ" in text and "138.3 -> 80.5 is -41.8 %" in text and "2.91 -> 2.14 is -26.5 %" in text


@pytest.mark.parametrize("path", sorted(RESULTS.glob("bench/int8_latency-*.json")), ids=lambda p: p.stem)
def test_an_int8_benchmark_report_is_what_its_json_renders(path) -> None:
    import json

    data = json.loads(path.read_text())
    assert _bench_int8().render(data, data["rows"]) == path.with_suffix(".md").read_text(), \
        f"{path.with_suffix('.md').name} is not what `make rerender` makes of it: run `make rerender` and commit"


def test_int8_slower_than_fp32_only_outside_the_noise() -> None:
    import copy
    import json

    data = json.loads((RESULTS / "bench/int8_latency-avx2.json").read_text())
    r = next(r for r in data["rows"] if r["arch"] == "resnet50v2")  # int8 ORT 5.80 ±0.57 ms, fp32 ORT 5.55 ±0.44
    line = lambda text: next(s for s in text.splitlines() if s.startswith("- resnet50v2 batch 1"))  # noqa: E731
    assert "int8 is no faster than fp32 here** (within the noise" in line(_bench_int8().render(data, [r]))
    sharp = copy.deepcopy(r)
    sharp["int8_ort_iqr_ms_b1"] = sharp["fp32_ort_iqr_ms_b1"] = 0.2  # 0.25 ms apart, ranges ±0.1: no overlap
    assert "**int8 is slower than fp32 here**; the fastest int8 path (int8 ONNX Runtime QDQ) runs at 0.96x" in \
        line(_bench_int8().render(data, [sharp]))
