"""Where a number came from: git commit, torch version, device with its instruction sets, command line
(DESIGN.md, habit 5)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from rescomp.hardware import device_name, device_record

REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the rescomp checkout, with '-dirty' when tracked code differs from it.

    Tracked results/ files are outputs, not code: regenerating a table must not mark the next run dirty.
    Markdown (README, a table's notes) is prose that no run reads, so editing a table's notes while its
    runs go on does not mark them dirty either.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results", ":!*.md"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def command_line() -> str:
    """The command as a user would type it again: `rescomp ...` or `python scripts/x.py ...`."""
    prog = Path(sys.argv[0])
    if prog.name == "__main__.py" and prog.parent.name == "rescomp":  # python -m rescomp (torchrun, rescomp jobs)
        shown = ["python", "-m", "rescomp"]
    elif prog.suffix == ".py":
        try:
            shown = ["python", str(prog.resolve().relative_to(Path.cwd()))]
        except ValueError:
            shown = ["python", str(prog)]
    else:
        shown = [prog.name]
    return " ".join(shlex.quote(a) for a in [*shown, *sys.argv[1:]])


def stamp(device: torch.device | str) -> dict[str, Any]:
    """Provenance of a row: commit, versions, device, command; with several processes (torchrun) how many
    trained it, and under `rescomp jobs` how many jobs ran side by side on the machine while it ran."""
    from rescomp.distributed import world_size

    jobs = int(os.environ.get("RESCOMP_JOBS", "1") or 1)
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "hardware": device_record(device),
        "command": command_line(),
        **({"processes": world_size()} if world_size() > 1 else {}),
        **({"concurrent_jobs": jobs} if jobs > 1 else {}),
    }
