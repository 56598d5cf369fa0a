"""One process per run folder (rescomp.runlock).

Wrong versions these tests must catch: a second process that resumes a folder a live process is
writing (two writers of one checkpoint); a refusal that does not name the holder or exits with 1;
`--fresh` deleting what a live process writes; a lock left by a `kill -9`-ed process that blocks the
resume forever; a process that refuses its own folder when a stage claims it twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rescomp import runlock

from conftest import write_config

HOLDER = """
import sys, time
from pathlib import Path
from rescomp.runlock import claim
claim(Path(sys.argv[1]), "the test's holder")
print("ready", flush=True)
time.sleep(120)
"""


def _rescomp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rescomp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def _hold(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_process_stops_and_names_the_first_then_takes_over_after_kill_9(workdir, tiny):
    tiny["name"] = "locked"
    cfg = write_config(workdir, tiny)
    run_dir = workdir / "runs" / "locked"
    holder = _hold(run_dir)
    try:
        r = _rescomp("train", str(cfg), cwd=workdir)
        assert r.returncode == 2, r.stderr
        assert f"pid {holder.pid}" in r.stderr and "being written by another rescomp process" in r.stderr
        assert "Traceback" not in r.stderr
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # the refused process wrote nothing
        r = _rescomp("train", str(cfg), "--fresh", cwd=workdir)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there but holds no lock: the next run takes it over.
    r = _rescomp("train", str(cfg), cwd=workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "summary.json").is_file()
    assert f"pid {os.getpid()}" not in (run_dir / ".lock").read_text()  # the lock names its writer


def test_a_process_may_claim_its_own_folder_again(tmp_path):
    runlock.claim(tmp_path / "r")
    runlock.claim(tmp_path / "r")  # a later stage of the same process
    assert runlock.contents(tmp_path / "r") == []
    assert f"pid {os.getpid()}" in (tmp_path / "r" / ".lock").read_text()
