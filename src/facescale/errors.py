"""The exception types for a mistake the user can fix; ``cli.main`` reports them."""

from __future__ import annotations


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
