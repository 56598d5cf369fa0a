"""scripts/gpu_check.sh, the prepared GPU lease (issue 10), checked where no GPU is: a lease is 15
minutes, so what the script runs must be right before it is spent.

Wrong versions these tests must catch:
- a step's pytest selection that matches no test (a test renamed, an id changed): that step would
  spend its minutes reporting exit 5 -> test_each_test_step_selects_the_cuda_tests_it_names
- a misspelt step run as nothing, or half the steps run before the mistake shows
  -> test_an_unknown_step_is_one_line_and_runs_nothing
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts/gpu_check.sh"


COLLECT = """
import json, sys, pytest
class Items:
    def pytest_collection_finish(self, session):
        self.ids = [i.nodeid for i in session.items]
found = []
for expression in json.loads(sys.argv[1]):
    items = Items()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k", expression], plugins=[items])
    found.append(items.ids)
print(json.dumps(found))
"""


def _selected(*expressions: str) -> list[list[str]]:
    """The test ids pytest selects with each -k expression (one process: test_cuda is imported once)."""
    res = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(expressions)], cwd=REPO, capture_output=True, text=True)
    return json.loads(res.stdout.splitlines()[-1])


def test_each_test_step_selects_the_cuda_tests_it_names():
    steps = dict(re.findall(r'^\s+(tests|compiled)\) step \w+ \d+ .*? -k "?([^"\n;]+?)"? ;;', SCRIPT.read_text(), re.M))
    assert set(steps) == {"tests", "compiled"}, steps
    everything, tests, compiled = _selected("", steps["tests"], steps["compiled"])
    assert compiled == ["tests/test_cuda.py::test_a_gpu_run_goes_through_every_stage_and_says_how_it_was_made[compiled]"]
    assert sorted(tests + compiled) == sorted(everything) and len(everything) >= 9  # every test, once


def test_an_unknown_step_is_one_line_and_runs_nothing(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "tests", "benhc"], cwd=tmp_path, capture_output=True, text=True,
                         env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == ("unknown step 'benhc': give any of tests bench accuracy compiled compile-bench suite")
    assert not (tmp_path / "out").exists()
