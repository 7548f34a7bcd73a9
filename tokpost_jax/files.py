"""The one atomic write: every file the project produces appears whole or not at all.

Why one helper: a kill, a full disk or a second reader must never see half a checkpoint manifest,
shard, PNG or results table. Local files go through a temporary file in the same directory,
``fsync`` and ``os.replace`` (atomic on POSIX); other ``etils.epath`` paths (``gs://``) are
written to a temporary name and renamed, which object stores make visible in one step. A full
disk becomes :class:`DiskFullError`, one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike
TMP_PREFIX = ".tmp-"


class DiskFullError(OSError):
    """No space left where the project writes; the message names the file."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_local(path: PathLike) -> bool:
    return "://" not in os.fspath(path)


def disk_full_message(path: PathLike, error: BaseException) -> str | None:
    """The one-line explanation when ``error`` is a full disk (ENOSPC/EDQUOT), else None."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {os.fspath(path)} ({error.strerror})"
    return None


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    The file gets the usual permissions (0666 minus the umask), not ``mkstemp``'s 0600, so other
    users of a shared run directory can read it.
    """
    text = os.fspath(path)
    try:
        if is_local(text):
            directory = os.path.dirname(text) or "."
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX + os.path.basename(text))
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, _umask_mode())
                os.replace(tmp, text)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
        else:
            target = epath.Path(text)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp_path = target.parent / f"{TMP_PREFIX}{target.name}.{os.getpid()}"
            with tmp_path.open("wb") as f:
                write(f)
            tmp_path.rename(target)
    except OSError as e:
        message = disk_full_message(text, e)
        if message:
            raise DiskFullError(message) from e
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
