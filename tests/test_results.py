"""Committed results say where they came from without naming the machine that made them.

Wrong versions this catches: a data source, checkpoint or output path written as an absolute path
of the machine (a home folder, a checkout under /work, a temp folder) into a table or benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
ABSOLUTE = re.compile(r'(?:^|[:"\s(])(/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+/)')


def test_no_committed_result_holds_an_absolute_path() -> None:
    offenders = []
    for f in sorted(RESULTS.rglob("*")):
        if f.suffix in (".json", ".csv", ".md"):
            for m in ABSOLUTE.finditer(f.read_text()):
                offenders.append(f"{f.relative_to(RESULTS)}: {m.group(1)}")
    assert not offenders, offenders[:5]
