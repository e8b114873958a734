"""A user error in a torchrun job: printed once, seen by the job's other ranks, and not
retried when torchrun restarts the job.

The ranks share the first user error any of them stopped on, and the lines already printed,
through the store torchrun's agent keeps for the whole job, restarts included. A restart
only helps when a machine failed; the same data or config fails the same way again, so a
restarted attempt that finds a recorded user error stops at once with it. Outside torchrun
(one process, or ranks started without its agent) nothing is shared and every rank prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from facescale.errors import UserError, is_user_error

log = logging.getLogger("facescale")

USER_ERROR_KEY = "facescale/user_error"
PRINTED_PREFIX = "facescale/printed/"

_T = TypeVar("_T")


def _with_job_store(action: Callable[[Any], _T], otherwise: _T) -> _T:
    """``action(store)`` with the job's store; ``otherwise`` without torchrun's agent, or when
    the store cannot be reached (reporting a failure must never fail itself)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return otherwise  # not under torchrun's agent: no torch import on this path
    from facescale.distributed import job_store

    try:
        store = job_store()
        return otherwise if store is None else action(store)
    except Exception as err:  # the agent is gone or unreachable: report locally
        log.debug("torchrun's store is out of reach: %s", err)
        return otherwise


def record_user_error(message: str) -> None:
    """Keep ``message`` as the job's user error, unless a rank recorded one before."""
    _with_job_store(lambda store: store.compare_set(USER_ERROR_KEY, "", message), None)


def recorded_user_error() -> str | None:
    """The user error a rank of this job stopped on, in this attempt or an earlier one."""

    def read(store: Any) -> str | None:
        return store.get(USER_ERROR_KEY).decode() if store.check([USER_ERROR_KEY]) else None

    return _with_job_store(read, None)


def first_to_print(line: str) -> bool:
    """True for the first rank of the job to print ``line``; the others stay quiet."""
    key = PRINTED_PREFIX + hashlib.sha256(line.encode()).hexdigest()
    return _with_job_store(lambda store: store.add(key, 1) == 1, True)


def tell_torchrun(summary: str) -> None:
    """Give torchrun the one line its failure summary shows for this rank (its error file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": summary, "extraInfo": {"timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError), open(path, "w") as out:
        json.dump(data, out)


@contextlib.contextmanager
def user_errors_stop_the_job() -> Iterator[None]:
    """Share this rank's user error with the job, and stop on one shared before.

    On entry: a user error recorded by an earlier attempt is raised again. In the block: a
    user error is recorded before it leaves the rank (before the rank's connections close),
    and any other failure that follows a recorded one (a peer that stopped mid-collective)
    becomes that user error, so the job reports the cause instead of its consequences.
    """
    earlier = recorded_user_error()
    if earlier is not None:
        raise UserError(earlier)
    try:
        yield
    except Exception as err:
        if is_user_error(err):
            record_user_error(str(err))
            raise
        cause = recorded_user_error()
        if cause is None:
            raise
        raise UserError(cause) from err
