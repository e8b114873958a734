"""Converter outputs that appear whole or not at all.

A converter writes into a sibling of its destination (``DST.partial-XXXXXXXX``) and renames it
into place only once complete, so a bad source, a corrupt record, a full disk or Ctrl-C leaves
the destination exactly as it was, with nothing beside it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from facescale.errors import UserError


class ConvertError(UserError, ValueError):
    """A conversion refused (the paths overlap, the destination exists and replacing it was
    not asked for, or cannot be written) or stopped by a full disk; the destination is kept."""


# write errors that the environment, not the input, causes
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def staged_folder(
    src: str | Path, dst: str | Path, overwrite: bool = False, dst_inside_src_ok: bool = True
) -> Iterator[Path]:
    """An empty folder beside ``dst`` to write into; it becomes ``dst`` when the block completes.

    ``dst_inside_src_ok=False`` also refuses a destination inside the source folder (where the
    next read of the source would take the output for part of it).
    """
    with _staged(Path(src), Path(dst), overwrite, True, dst_inside_src_ok) as path:
        yield path


@contextmanager
def staged_file(src: str | Path, dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A new empty file beside ``dst`` to write; it replaces ``dst`` when the block completes."""
    with _staged(Path(src), Path(dst), overwrite, False, True) as path:
        yield path


def _check_separate(src: Path, dst: Path, dst_inside_src_ok: bool) -> None:
    """Refuse a destination that is the source (through links too) or would swallow it."""
    source, target = src.resolve(), dst.resolve()
    if source == target or (
        source.exists() and target.exists() and os.path.samefile(source, target)
    ):
        raise ConvertError(f"{dst} is the source {src} itself; write to a new destination")
    if source.is_relative_to(target):
        raise ConvertError(
            f"{dst} holds the source {src}; replacing it would destroy the source, so write to "
            f"a new destination"
        )
    if not dst_inside_src_ok and target.is_relative_to(source):
        raise ConvertError(
            f"{dst} lies inside the source folder {src} and would be read as part of it; "
            f"write to a destination outside {src}"
        )


@contextmanager
def _staged(
    src: Path, dst: Path, overwrite: bool, folder: bool, dst_inside_src_ok: bool
) -> Iterator[Path]:
    _check_separate(src, dst, dst_inside_src_ok)
    target = dst.resolve()
    if not overwrite and _holds_data(target, folder):
        raise ConvertError(
            f"{dst} already exists; pass --overwrite to replace it (the old one stays until the "
            f"new one is complete)"
        )
    created = _outermost_missing(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = _make_staging(target, folder)
    except OSError as err:
        _remove_created(created)
        raise ConvertError(
            f"{dst}: cannot write in {target.parent} ({err.strerror}); choose a writable "
            f"destination"
        ) from None
    try:
        yield staged
        _move_into_place(staged, target)
    except BaseException as err:
        _remove(staged)
        _remove_created(created)
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            raise ConvertError(
                f"{dst}: writing stopped: {err.strerror}; free space (or raise the limit) and "
                f"run again; {dst} is as it was"
            ) from err
        raise


def _holds_data(path: Path, folder: bool) -> bool:
    """Whether replacing ``path`` would lose something (an empty folder holds nothing)."""
    if not os.path.lexists(path):
        return False
    return not (folder and path.is_dir() and next(path.iterdir(), None) is None)


def _outermost_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet, if any."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _make_staging(target: Path, folder: bool) -> Path:
    """A new ``TARGET.partial-XXXXXXXX`` beside ``target``, with the usual (umask) permissions."""
    staged = target.with_name(f"{target.name}.partial-{secrets.token_hex(4)}")
    if folder:
        staged.mkdir()
    else:
        staged.touch(exist_ok=False)
    return staged


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing target is moved aside first, then deleted."""
    if not os.path.lexists(target) or (staged.is_file() and target.is_file()):
        os.replace(staged, target)
        return
    aside = staged.with_name(staged.name.replace(".partial-", ".replaced-", 1))
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_created(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
