"""`rescomp jobs`: a table's runs side by side.

Wrong versions these tests must catch:
- a phase's jobs starting before the previous phase has finished (a run racing its own training run);
- more jobs at once than slots, or a job's GPU given to a second job while it runs;
- jobs started after one failed, or the failure's exit code lost (0, or torchrun's 1 for a user mistake);
- a line that is not a rescomp command run anyway, or a bad --gpus / --jobs accepted;
- a misspelt command or option found only when its line runs, after the jobs before it (hours); so too a
  misspelt --set key, a profile the config lacks, a config file that is not there; but a config an
  earlier phase writes (runs/<name>/config.yaml) refused before that phase ran;
- SIGTERM (kill, timeout, a scheduler) ending `rescomp jobs` while its jobs train on, orphaned;
- --gpus numbers written into a job's CUDA_VISIBLE_DEVICES as they are, when this process already sees
  only some GPUs (--gpus 0,1 under CUDA_VISIBLE_DEVICES=4,5 must run on the machine's 4 and 5).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_config
from rescomp import jobs
from rescomp.cli import _command_fault, app
from rescomp.errors import ConfigError


def test_parse_phases_comments_and_bad_lines() -> None:
    phases = jobs.parse("# the trainings\nrescomp train a.yaml --set x=1  # first\n.venv/bin/rescomp train b.yaml\n"
                        "---\n\nrescomp prune 'a b.yaml'\n")
    assert [[j.args for j in p] for p in phases] == [[["train", "a.yaml", "--set", "x=1"], ["train", "b.yaml"]],
                                                     [["prune", "a b.yaml"]]]
    assert [j.number for p in phases for j in p] == [1, 2, 3] and phases[1][0].line == 6
    with pytest.raises(ConfigError, match="line 2: 'rm -rf runs' is not a rescomp command"):
        jobs.parse("rescomp train a.yaml\nrm -rf runs\n")
    with pytest.raises(ConfigError, match="holds no command"):
        jobs.parse("# nothing\n---\n")
    with pytest.raises(ConfigError, match="line 1"):
        jobs.parse("rescomp train 'a.yaml\n")


def test_slots() -> None:
    import torch

    assert jobs.slots(None, None) == ["cpu0"] and jobs.slots(None, 3) == ["cpu0", "cpu1", "cpu2"]
    for gpus, n, msg in (("0", 2, "not both"), (None, 0, "at least 1"), ("0,x", None, "distinct GPU numbers"),
                         ("1,1", None, "distinct"), (str(torch.cuda.device_count()), None, "this machine has")):
        with pytest.raises(ConfigError, match=msg):
            jobs.slots(gpus, n)


def test_gpu_numbers_count_the_gpus_this_process_sees(monkeypatch, tmp_path) -> None:
    assert [jobs.visible_gpu(s, "4,5") for s in ("0", "1")] == ["4", "5"]
    assert jobs.visible_gpu("1", "GPU-aa, GPU-bb") == "GPU-bb"  # UUIDs pass through as they are
    assert jobs.visible_gpu("1", None) == "1" and jobs.visible_gpu("1", "") == "1"
    # and _start hands the job that GPU
    seen = {}
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda args, env, **kw: seen.setdefault("env", env))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    job = jobs.parse("rescomp train a.yaml\n")[0][0]
    job.slot = "1"
    jobs._start(job, dict(jobs.os.environ), tmp_path, alone=True)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "5"


def _fake_start(trace: Path, fail: set[int], seconds: dict[int, float] | None = None):
    """_start replaced by a process that notes when it runs: 0.3 s (or `seconds`), or 0.05 s and exit 3
    where told to fail."""
    def start(job, env, logs, alone):
        job.started = time.monotonic()
        code = 3 if job.number in fail else 0
        wait = 0.05 if code else (seconds or {}).get(job.number, 0.3)
        script = (f"import time; t=time.time(); time.sleep({wait}); "
                  f"open({str(trace)!r}, 'a').write('{job.number} {job.slot} %f %f\\n' % (t, time.time())); "
                  f"raise SystemExit({code})")
        job.proc = subprocess.Popen([sys.executable, "-c", script])
    return start


def _spans(trace: Path) -> dict[int, tuple[str, float, float]]:
    rows = [line.split() for line in trace.read_text().splitlines()]
    return {int(n): (slot, float(a), float(b)) for n, slot, a, b in rows}


def test_phases_wait_and_slots_are_never_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "trace"
    monkeypatch.setattr(jobs, "_start", _fake_start(trace, set()))
    phases = jobs.parse("\n".join(["rescomp train a.yaml"] * 3 + ["---"] + ["rescomp prune a.yaml"] * 3))
    said: list[str] = []
    assert jobs.run(phases, ["0", "1"], tmp_path / "logs", said.append) == 0
    spans = _spans(trace)
    assert sorted(spans) == [1, 2, 3, 4, 5, 6]
    assert min(spans[n][1] for n in (4, 5, 6)) >= max(spans[n][2] for n in (1, 2, 3))  # phase 2 after phase 1
    for a in spans:
        for b in spans:
            overlap = a < b and spans[a][1] < spans[b][2] and spans[b][1] < spans[a][2]
            assert not (overlap and spans[a][0] == spans[b][0]), (a, b)  # one job per GPU at a time
    starts = sorted(s for _, s, _ in spans.values())
    assert all(sum(s <= t < e for _, s, e in spans.values()) <= 2 for t in starts)  # at most two at once
    assert sum("started on GPU" in line for line in said) == 6 and sum(" done in " in line for line in said) == 6


def test_a_free_slot_takes_the_next_job_while_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "trace"
    monkeypatch.setattr(jobs, "_start", _fake_start(trace, set(), {1: 1.5, 2: 0.1, 3: 0.1, 4: 0.1}))
    phases = jobs.parse("\n".join(["rescomp train a.yaml"] * 4))
    assert jobs.run(phases, jobs.slots(None, 2), tmp_path / "logs", lambda line: None) == 0
    spans = _spans(trace)
    assert max(spans[n][2] for n in (2, 3, 4)) < spans[1][2]  # 2, 3 and 4 ran one after another beside 1
    assert {spans[n][0] for n in (2, 3, 4)} == {"cpu1"} and spans[1][0] == "cpu0"


def test_the_first_failure_stops_new_jobs_and_gives_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "trace"
    monkeypatch.setattr(jobs, "_start", _fake_start(trace, {2}))
    phases = jobs.parse("\n".join(["rescomp train a.yaml"] * 2 + ["---", "rescomp prune a.yaml"]))
    said: list[str] = []
    assert jobs.run(phases, ["cpu0"], tmp_path / "logs", said.append) == 3
    assert sorted(_spans(trace)) == [1, 2]  # the next phase never started
    trace.unlink()
    monkeypatch.setattr(jobs, "_start", _fake_start(trace, {1}))
    phases = jobs.parse("\n".join(["rescomp train a.yaml"] * 3))  # 1 fails while 2 runs: 3 must not start
    assert jobs.run(phases, ["cpu0", "cpu1"], tmp_path / "logs", said.append) == 3
    assert sorted(_spans(trace)) == [1, 2]
    assert any("failed (exit 3)" in line for line in said) and any("did not start" in line for line in said)


def test_jobs_command_runs_real_commands_side_by_side(workdir: Path, tiny: dict) -> None:
    path = write_config(workdir, tiny)
    (workdir / "jobs.txt").write_text(f"rescomp config {path} --set train.epochs=3\n"
                                      f"rescomp config {path} --set train.epochs=4\n---\n"
                                      f"rescomp measure nope.pt\n"  # found only when it runs
                                      f"rescomp config {path}\n")
    res = CliRunner().invoke(app, ["jobs", "jobs.txt", "--jobs", "2", "--logs", "logs"])
    assert res.exit_code == 2, res.output  # the missing file's exit code, not 1
    logs = sorted((workdir / "logs").iterdir())
    assert len(logs) >= 3 and "epochs: 3" in logs[0].read_text() and "epochs: 4" in logs[1].read_text()
    assert logs[2].name.startswith("03-measure-nope")
    assert "not found" in logs[2].read_text() and "not found" in res.output  # the failure's last lines are shown
    res = CliRunner().invoke(app, ["jobs", "missing.txt"])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.parametrize("line, message", [
    ("rescomp trian {p}", "line 4: 'trian' is no rescomp command (did you mean 'train'?); nothing was started"),
    ("rescomp train {p} --fersh", "line 4: rescomp train has no option '--fersh' (did you mean '--fresh'?)"),
    ("rescomp report runs --tabel=t", "line 4: rescomp report has no option '--tabel' (did you mean '--table'?)"),
    ("rescomp train {p} --epochs 3", "line 4: rescomp train has no option '--epochs'; config keys are set with --set: "
                                     "--set train.epochs=<value> or"),  # as the command says it (test_cli)
    ("rescomp train {p} --set train.epoch=1", "line 4: {p}: unknown key 'train.epoch'"),  # a key, read as the run would
    ("rescomp train {p} --profile=nope", "line 4: {p}: no profile 'nope'"),
    # words the command's own parser refuses, and a --nproc it refuses: they failed once earlier jobs had run
    ("rescomp train {p} --nproc 0", "line 4: --nproc 0: give a number of processes of at least 1"),
    ("rescomp train {p} other.yaml", "line 4: rescomp train: Got unexpected extra argument(s) (other.yaml)"),
    ("rescomp train {p} --seed x", "line 4: rescomp train: Invalid value for '--seed'"),
])
def test_a_misspelt_command_or_option_stops_the_jobs_before_any_starts(workdir: Path, tiny: dict, line, message) -> None:
    path = write_config(workdir, {**tiny, "profiles": {"-x": {"train": {"epochs": 5}}}})
    (workdir / "jobs.txt").write_text(f"rescomp config {path} --set seed=-1 --set train.epochs=3 --profile -x\n"
                                      f"rescomp report runs --baseline -r20 --table=t -- -odd-run\n---\n"
                                      + line.format(p=path) + "\n")  # values and arguments that start with '-'
    phases = jobs.parse((workdir / "jobs.txt").read_text().split("---")[0], "jobs.txt", _command_fault)
    assert [j.args[0] for j in phases[0]] == ["config", "report"]
    res = CliRunner().invoke(app, ["jobs", "jobs.txt", "--jobs", "2", "--logs", "logs"])
    assert res.exit_code == 2 and message.format(p=path) in " ".join(res.output.split()), res.output
    assert not (workdir / "logs").exists()  # line 1 never ran


def test_sigterm_ends_the_running_jobs_too(workdir: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    started: list[subprocess.Popen] = []

    def start(job, env, logs, alone):
        job.started = time.monotonic()
        job.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(job.proc)
        if len(started) == 2:  # both slots busy: the scheduler ends `rescomp jobs`
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(jobs, "_start", start)
    path = write_config(workdir, tiny)
    (workdir / "jobs.txt").write_text(f"rescomp config {path}\n" * 3)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["jobs", "jobs.txt", "--jobs", "2", "--logs", "logs"])
    assert res.exit_code == 143 and "terminated: run the same command again" in res.output, res.output
    assert len(started) == 2 and all(p.poll() is not None for p in started) and time.monotonic() - t0 < 30
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone with it


def test_a_config_is_read_before_any_job_starts_unless_an_earlier_phase_may_write_it(workdir: Path, tiny: dict) -> None:
    path = write_config(workdir, tiny)
    text = f"rescomp train {path} --set name=j1\n---\nrescomp quantize runs/j1/config.yaml\n"
    phases = jobs.parse(text, "jobs.txt", _command_fault)  # runs/j1/config.yaml is the first phase's to write
    assert [[j.args[0] for j in p] for p in phases] == [["train"], ["quantize"]]
    with pytest.raises(ConfigError, match="line 1: config file 'runs/j1/config.yaml' not found; .*; nothing was started"):
        jobs.parse("rescomp quantize runs/j1/config.yaml\n", "jobs.txt", _command_fault)
