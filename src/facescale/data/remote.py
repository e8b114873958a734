"""Bytes of local paths and URLs (http(s), s3, gs, ... through fsspec), retried on failure.

A read that fails is tried ``ATTEMPTS`` times with a growing pause; then a RecordError names
the address, the byte range and the last failure. fsspec finds the filesystem for each
address per process, so worker processes open their own connections.
"""

from __future__ import annotations

import logging
import time
from typing import Any, BinaryIO

from facescale.data.recordio import RecordError
from facescale.errors import UserError

log = logging.getLogger(__name__)

ATTEMPTS = 4
FIRST_PAUSE_S = 0.25


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url``, or a UserError naming the missing package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise UserError(
            f"{url}: reading this address needs a package that is not installed ({err}); "
            f"`pip install facescale[shards]` covers local paths and http(s); s3 needs s3fs, "
            f"gs needs gcsfs"
        ) from None


def is_local(url: str) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(filesystem(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(_retried(lambda: fs.exists(path), url, "looking it up"))


def read_all(url: str) -> bytes:
    fs, path = filesystem(url)
    return _retried(lambda: fs.cat_file(path), url, "reading")


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``url``: one ranged request.

    A server that ignores ranges answers with the whole file; its slice is used, with a
    warning, since every read then downloads everything.
    """
    fs, path = filesystem(url)

    def once() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) == end - start:
            return data
        if len(data) >= end:
            _warn_no_ranges(url)
            return data[start:end]
        raise OSError(f"got {len(data)} bytes instead of {end - start}")

    return _retried(once, url, f"reading bytes {start}-{end}")


def open_file(url: str) -> BinaryIO:
    fs, path = filesystem(url)
    return _retried(lambda: fs.open(path, "rb"), url, "opening")


_WARNED: set[str] = set()


def _warn_no_ranges(url: str) -> None:
    host = url.split("/", 3)[2] if "://" in url else url
    if host not in _WARNED:
        _WARNED.add(host)
        log.warning("%s ignores ranged requests: every read downloads the whole file", host)


def _retried(read: Any, url: str, what: str) -> Any:
    """``read()``, tried ATTEMPTS times; a missing file fails at once."""
    pause, last = FIRST_PAUSE_S, None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return read()
        except (FileNotFoundError, IsADirectoryError) as err:
            raise RecordError(f"{url}: not found ({err}); check the address") from None
        except Exception as err:  # every backend raises its own kinds
            last = err
        if attempt < ATTEMPTS:
            log.warning(
                "%s: %s failed (%s); trying again (%d/%d)", url, what, last, attempt, ATTEMPTS
            )
            time.sleep(pause)
            pause *= 2
    raise RecordError(
        f"{url}: {what} failed {ATTEMPTS} times, the last with {type(last).__name__}: {last}; "
        f"check the address, the network and the credentials"
    )
