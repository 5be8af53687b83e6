"""Atomic file writes: every file a stage writes appears whole or not at all.

A file is written under a temporary name in its own folder (``.<stem>.tmp<pid><suffix>``: same file
system, same suffix for writers that read it) and renamed over the target with ``os.replace``, which
POSIX makes atomic. A reader never sees half a file, and a write that fails (a full disk, a read-only
folder, a kill) leaves the previous file as it was. A failure is one line naming the path
(:class:`WriteError`, a user error: the stage exits 2 without a traceback).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # also read by pipeline.tracking
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(UserError):
    """A file could not be written (full disk, read-only or forbidden folder); the previous one is intact."""


def _reason(err: BaseException, folder: Path) -> str | None:
    """Why a write failed, if it is the file system's doing; None for anything else (a bug keeps its trace)."""
    if isinstance(err, OSError) and err.errno in (*FULL_DISK, *_REFUSED):
        return "no space left on device" if err.errno in FULL_DISK else os.strerror(err.errno).lower()
    if isinstance(err, RuntimeError):  # torch.save's C++ writer reports a full disk as a stream error
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        return "no space left on device" if free < 1 << 20 else None
    return None


@contextmanager
def replacing(path: str | Path, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    On failure the temporary file is removed and ``path`` keeps its previous content; a failure of the file
    system is :class:`WriteError` naming ``path``. ``keep_suffix=False`` names it ``.<name>.tmp<pid>``
    instead, for writers that record their file's name inside it: ``torch.save`` names its zip records
    after the file's name up to the last suffix, which then reads ``.<name>`` whatever the pid, so a
    model file's bytes do not depend on the process that wrote it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}" if keep_suffix
                         else f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        reason = _reason(err, path.parent)
        if reason is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {reason}; {kept}") from None


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj, indent: int | None = 2, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
