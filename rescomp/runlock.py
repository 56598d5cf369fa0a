"""One process per run folder.

A process that writes a run folder holds an exclusive `flock` on its `.lock` file until the process
ends. A second process that targets the same folder stops at once (exit 2) and names the holder.
The kernel releases a flock when its process dies, `kill -9` included, so a lock file left by a
killed run holds no lock: the next process takes it over and resumes from the last checkpoint.
The lock lives in the run folder, beside what it protects, so it works wherever the folder is
visible to both processes.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from rescomp.errors import RescompError

LOCK_NAME = ".lock"

# Run folders this process holds, by lock path. Held for the life of the process on purpose: a CLI
# process writes its run folders until it exits, and the kernel frees the locks when it does.
_HELD: dict[str, int] = {}


class RunLocked(RescompError):
    """Another live process is writing this run folder."""


def claim(run_dir: Path, command: str = "") -> None:
    """Hold run_dir (creating it) for this process, or raise RunLocked naming the process that does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    key = str(lock.resolve())
    if key in _HELD:
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise RunLocked(busy(run_dir, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  f"{': ' + command if command else ''}\n".encode(), 0)
    _HELD[key] = fd


def busy(run_dir: Path, holder: str) -> str:
    return (f"'{run_dir}' is being written by another rescomp process ({holder}); wait for it to finish or stop "
            f"it, then run this command again to resume")


def holder(run_dir: Path) -> str | None:
    """Who is writing run_dir now (the lock's note), or None if no live process holds it."""
    lock = run_dir / LOCK_NAME
    if not lock.is_file() or str(lock.resolve()) in _HELD:
        return None
    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 1024, 0).decode(errors="replace").strip() or "a live process"
    finally:
        os.close(fd)


def release(run_dir: Path) -> None:
    """Stop holding run_dir (before this process deletes it)."""
    fd = _HELD.pop(str((run_dir / LOCK_NAME).resolve()), None)
    if fd is not None:
        os.close(fd)


def contents(run_dir: Path) -> list[Path]:
    """What the run folder holds, without its lock."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
