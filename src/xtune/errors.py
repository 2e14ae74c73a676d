"""Errors a user can fix. The CLI prints their message (no traceback) and exits with `exit_code`."""

from __future__ import annotations

from collections.abc import Iterable


class XtuneError(Exception):
    """Base class: a problem with the user's input, reported as a clear message."""

    exit_code = 2

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems: list[str] = list(problems) or [message]
        super().__init__(message)


class ConfigError(XtuneError):
    """Configuration problems, all of them reported together before any model is built."""

    def __init__(self, problems: Iterable[str]):
        problems = list(problems)
        head = f"{len(problems)} configuration problem{'s' if len(problems) != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]), problems)


class DataError(XtuneError):
    """A bad record or file: the message names the file and line."""


class CheckpointError(XtuneError):
    """A missing, partial or corrupted checkpoint: bad input the user fixes by choosing another one."""


class CheckpointSaveError(CheckpointError):
    """A save that could not complete (e.g. a full disk): the run stops, the previous checkpoint is intact."""

    exit_code = 1
