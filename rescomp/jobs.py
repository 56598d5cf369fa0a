"""`rescomp jobs`: a table's independent runs side by side, one per GPU (or N at a time on the CPU).

A jobs file holds one `rescomp ...` command per line (`#` starts a comment). A line `---` ends a phase:
every command of a phase finishes before the next phase starts, so the runs that later ones start from
(each config's training run) are made once, first, instead of two runs racing for one folder. The
Makefile's table targets write their commands this way and pipe them here (`make table-taylor
GPUS=0,1,2,3,4,5,6,7`); without GPUS or JOBS they run one at a time, in order, as before.

Each job is a process of its own: with `--gpus` it sees one GPU (CUDA_VISIBLE_DEVICES), with `--jobs N`
it gets its share of the CPU threads (OMP_NUM_THREADS). Run alone, a job writes to this terminal; side
by side, each writes its log under --logs and this command says when each starts and ends. The first
failure stops new jobs from starting; those running finish (each resumable, like any run), and the
command exits with the failed job's code. CPU latency that jobs time while others run is timed by one
process at a time (rescomp.measure), and the summaries record how many jobs ran beside them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from rescomp.errors import ConfigError, Terminated

PHASE_BREAK = "---"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), which is what
    PyTorch sizes its thread pool by; all the machine's where the OS has no affinity call. os.cpu_count()
    counts the machine's, so 2 processes under `taskset -c 0,1` on a 64-core host would get 32 threads each."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Each of `processes` processes side by side gets its share of the usable cores as its threads
    (OpenMP's waits on a busy core cost more than the threads bring): jobs' slots, `--nproc` ranks."""
    return max(1, usable_cores() // processes)


@dataclass
class Job:
    number: int
    line: int  # in the jobs file
    args: list[str]  # after `rescomp`
    slot: Optional[str] = None
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None
    started: float = 0.0
    handle: Optional[TextIO] = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return "rescomp " + " ".join(shlex.quote(a) for a in self.args)


def check_nproc(nproc: int) -> None:
    """--nproc N: at least one process."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes of at least 1 (one per GPU, or up to the "
                          f"CPU cores on a CPU)")


def command_fault(commands: dict[str, Any], args: list[str], first: bool = True) -> Optional[str]:
    """What is wrong with the words of `rescomp <args>` that no run needs to find out: a command or an
    option this CLI does not have, a config it names that cannot be read with its --set and --profile;
    None if nothing. A line of a later phase (`first` false) may name a config an earlier phase writes
    (runs/<name>/config.yaml): one not there yet is left to the run. `commands`: the CLI's, by name (click's
    commands, whose parsers judge the words)."""
    import typer

    from rescomp.errors import parser_error
    from rescomp.registry import suggest

    if args[0] not in commands:
        return f"'{args[0]}' is no rescomp command{suggest(args[0], list(commands))}"
    params = {o: p for p in commands[args[0]].params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    words = iter(args[1:])
    given: dict[str, list[str]] = {"--set": [], "--profile": [], "": []}  # option values; "": the arguments
    for word in words:
        if word == "--":  # the end of options: the rest are arguments
            given[""] += list(words)
            break
        opt = word.split("=", 1)[0]
        if opt in params:
            if "=" not in word and not getattr(params[opt], "is_flag", False):
                value = next(words, None)  # its value, which may start with '-' (--seed -1, --baseline -r20)
            else:
                value = word.split("=", 1)[1] if "=" in word else None
            if opt in given and value is not None:
                given[opt].append(value)
        elif opt.startswith("-") and opt != "--help":
            from rescomp.config_doc import set_hint

            if "--set" in params and (hint := set_hint(opt)):  # a config key taken for an option
                return f"rescomp {args[0]} has no option '{opt}'; {hint}"
            return f"rescomp {args[0]} has no option '{opt}'{suggest(opt, sorted(params))}"
        else:
            given[""].append(word)
    try:  # the rest of the words as the command parses them: a value of the wrong type, an extra argument
        parsed = commands[args[0]].make_context(f"rescomp {args[0]}", list(args[1:])).params
        if parsed.get("nproc") is not None:
            check_nproc(parsed["nproc"])
    except typer.Exit:  # --help
        pass
    except parser_error() as e:
        return f"rescomp {args[0]}: {getattr(e, 'format_message', e.__str__)()}"
    except ConfigError as e:
        return str(e)
    config = next((a for a in given[""] if a.endswith((".yaml", ".yml"))), None)
    if config is not None and (first or Path(config).exists()):  # its file, keys and values, as the command reads them
        from rescomp.config import load_config

        try:
            load_config(config, given["--set"], given["--profile"][-1] if given["--profile"] else None)
        except ConfigError as e:
            return str(e)
    return None


def parse(text: str, source: str = "the jobs file",
          check: Callable[[list[str], bool], Optional[str]] = lambda args, first: None) -> list[list[Job]]:
    """Phases of jobs from a jobs file's text; each line a `rescomp` command whose words `check` finds no
    fault with (a misspelt command or option is one line now, not after the jobs before it have run);
    `check` is told whether the line is in the first phase (a later one may read what an earlier makes)."""
    phases: list[list[Job]] = [[]]
    n = 0
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line == PHASE_BREAK:
            phases.append([])
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise ConfigError(f"{source}, line {i}: {e}; quote it as a shell would") from None
        if Path(words[0]).name != "rescomp" or len(words) < 2:
            raise ConfigError(f"{source}, line {i}: '{line}' is not a rescomp command; each line is one, e.g. "
                              f"`rescomp train configs/demo/resnet20.yaml` (a line {PHASE_BREAK} ends a phase)")
        if why := check(words[1:], len(phases) == 1):
            raise ConfigError(f"{source}, line {i}: {why}; nothing was started")
        n += 1
        phases[-1].append(Job(n, i, words[1:]))
    phases = [p for p in phases if p]
    if not phases:
        raise ConfigError(f"{source} holds no command; write one `rescomp ...` command per line")
    return phases


def slots(gpus: Optional[str], jobs: Optional[int]) -> list[str]:
    """Where jobs may run at once: one slot per listed GPU ("0", "1", ...), or `jobs` slots on this
    machine ("cpu0", "cpu1", ...; default 1)."""
    if gpus is not None and jobs is not None:
        raise ConfigError("give --gpus (one job per GPU) or --jobs (that many at once), not both")
    if gpus is None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs {jobs}: give at least 1")
        return [f"cpu{i}" for i in range(jobs or 1)]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(re.fullmatch(r"\d+", g) for g in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus '{gpus}': give distinct GPU numbers separated by commas, e.g. --gpus 0,1,2,3")
    import torch

    count = torch.cuda.device_count()
    missing = [g for g in ids if int(g) >= count]
    if missing:
        raise ConfigError(f"--gpus {gpus}: this machine has {count} GPU(s) (0-{count - 1})" if count else
                          f"--gpus {gpus}: this machine has no GPU that torch can use; use --jobs N on the CPU")
    return ids


def gpu(slot: Optional[str]) -> Optional[str]:
    """The GPU a slot is, or None for a slot on the machine."""
    return None if slot is None or slot.startswith("cpu") else slot


def visible_gpu(slot: str, visible: Optional[str]) -> str:
    """What a job's CUDA_VISIBLE_DEVICES is for --gpus number `slot`: the numbers count the GPUs this
    process sees, so under CUDA_VISIBLE_DEVICES=4,5 GPU 1 is the machine's GPU 5."""
    seen = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return seen[int(slot)] if seen else slot


def run(phases: list[list[Job]], where: list[str], logs: Path, say: Callable[[str], None]) -> int:
    """Run every phase's jobs, at most one per slot at a time; 0, or the first failed job's exit code."""
    total = sum(len(p) for p in phases)
    alone = len(where) == 1
    env_base = {**os.environ, "RESCOMP_JOBS": str(len(where))}
    if not alone and "OMP_NUM_THREADS" not in os.environ:
        env_base["OMP_NUM_THREADS"] = str(threads_per_process(len(where)))
    failed: Optional[Job] = None
    running: list[Job] = []
    try:
        for phase in phases:
            queue, running = list(phase), []
            while (queue and failed is None) or running:
                free = [s for s in where if s not in {j.slot for j in running}]
                while queue and free and failed is None:
                    job = queue.pop(0)
                    job.slot = free.pop(0)
                    running.append(job)  # before it starts: a signal from here on ends it with the others
                    _start(job, env_base, logs, alone)
                    say(f"[{job.number}/{total}] started{'' if gpu(job.slot) is None else f' on GPU {job.slot}'}: {job.text}"
                        + ("" if alone else f"  (log: {job.log})"))
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    code = job.proc.returncode
                    if job.handle:
                        job.handle.close()
                    took = _minutes(time.monotonic() - job.started)
                    if code == 0:
                        say(f"[{job.number}/{total}] done in {took}: {job.text}")
                        continue
                    say(f"[{job.number}/{total}] failed (exit {code}) after {took}: {job.text}"
                        + ("" if alone else f"\n{_tail(job.log)}"))
                    failed = failed or job
                time.sleep(0.2 if running else 0)
            if failed is not None:
                break
    except (KeyboardInterrupt, Terminated) as e:
        started = [j for j in running if j.proc is not None]
        for job in started:
            job.proc.terminate()
        for job in started:
            job.proc.wait()
        say(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}: run the same command again; finished "
            f"runs are kept and interrupted ones resume")
        return Terminated.exit_code if isinstance(e, Terminated) else 130
    if failed is not None:
        if failed.number < total:
            say(f"stopped after the first failure (line {failed.line}); the jobs after it did not start")
        return failed.proc.returncode if failed.proc.returncode > 0 else 1
    return 0


def _start(job: Job, env_base: dict[str, str], logs: Path, alone: bool) -> None:
    env = dict(env_base)
    if gpu(job.slot) is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu(job.slot, os.environ.get("CUDA_VISIBLE_DEVICES"))
    out = None
    if not alone:
        logs.mkdir(parents=True, exist_ok=True)
        words = [Path(a).stem if "/" in a else a for a in job.args if not a.startswith("-")]  # config names, not paths
        stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(words))[:80]
        job.log = logs / f"{job.number:02d}-{stem}.log"
        job.handle = out = job.log.open("w")
    job.started = time.monotonic()
    job.proc = subprocess.Popen([sys.executable, "-m", "rescomp", *job.args], env=env, stdout=out,
                                stderr=subprocess.STDOUT if out else None)


def _tail(log: Optional[Path], lines: int = 5) -> str:
    if log is None or not log.is_file():
        return ""
    return "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-lines:])


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
