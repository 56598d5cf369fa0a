"""Errors a user can act on.

Every exception here carries a message written for the person at the terminal; the CLI prints it
on one line and exits with `exit_code` instead of showing a traceback.
"""

from __future__ import annotations


class RescompError(Exception):
    """Base class: a failure the user can understand and fix."""

    exit_code = 2


class ConfigError(RescompError):
    """A config file or override is wrong (unknown key, wrong type, bad value)."""


class DataError(RescompError):
    """A dataset is missing, unreadable or of the wrong shape."""


class CheckpointError(RescompError):
    """A checkpoint is missing, truncated, corrupt or belongs to another run."""


class DeviceError(RescompError):
    """The config asks for a device this machine does not have."""


class TrainingDiverged(RescompError):
    """The loss became NaN or infinite; the run stopped with its last good checkpoint intact."""

    exit_code = 1


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, a scheduler ending a job), raised by the CLI's handler where the run is,
    so that it ends as after Ctrl-C: a run folder with nothing to resume removed, its lock released,
    `rescomp jobs`' children ended. A BaseException, as KeyboardInterrupt is: no `except Exception` eats it."""

    exit_code = 128 + 15  # as a shell reports a process that SIGTERM (15) ended


def parser_error() -> type[Exception]:
    """What the CLI's parser raises for words it refuses: typer's own click's error (typer 0.26 and later
    vendor click), else click's."""
    try:
        from typer import TyperException
        return TyperException
    except ImportError:
        from click import ClickException
        return ClickException
