"""The exception types for a mistake the user can fix, what else counts as one, and the
check that an output folder can be written before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad config, bad data, an unwritable path: the message names the thing and the fix.

    ``facescale`` prints it as one line (and to ``training.log`` in a run) with exit code 2;
    anything else is a bug and keeps its traceback.
    """


class InputError(UserError, ValueError):
    """A file, value or argument the user gave that cannot be used; also a ``ValueError``, the
    type Python code calling the library expects for a bad argument."""


class ConfigError(InputError):
    """A config file or value that cannot be used; the message says which and how to fix it."""


# OSErrors that mean a path the user gave is wrong, not that facescale is.
PATH_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

USER_ERRORS = (UserError, *PATH_ERRORS)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake the user can fix (reported in one line) rather than a bug."""
    return isinstance(err, USER_ERRORS)


def require_writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and write and delete a file in it, so that an output that
    cannot be written stops a command before its work rather than after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".facescale-write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = "it is a file" if folder.is_file() else err.strerror
        raise UserError(
            f"{folder}: cannot write there ({reason}); choose a writable output folder"
        ) from None
    return folder
