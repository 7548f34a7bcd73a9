"""The one path layer and the one atomic write.

Paths: every file the project reads or writes goes through :func:`path` (an ``etils.epath``
path), so a ``gs://`` workdir, data dir or weight file works wherever a local one does. Why one
helper: ``os.path.abspath``/``os.makedirs``/``open`` turn ``gs://bucket/run`` into a local
``./gs:/bucket/run`` tree without any error. Local paths are made absolute, as before.

Writes: a kill, a full disk or a second reader must never see half a checkpoint manifest,
shard, PNG or results table. Local files go through a temporary file in the same directory,
``fsync`` and ``os.replace`` (atomic on POSIX); other paths (``gs://``) are written to a
temporary object and renamed, which object stores make visible in one step (the bytes are
staged in a local spooled file first, so writers that seek — zip, PNG — work unchanged). A full
disk becomes :class:`DiskFullError`, one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike
TMP_PREFIX = ".tmp-"
_SPOOL_BYTES = 64 << 20  # remote writes are staged in memory up to this, then in a temp file


class DiskFullError(OSError):
    """No space left where the project writes; the message names the file."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_local(path: PathLike) -> bool:
    """True for a local filesystem path, False for a URL (``gs://``, ``s3://``, ...)."""
    return "://" not in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """``p`` as the project's one path type: local paths made absolute, URLs kept as given."""
    text = os.fspath(p)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)


def absolute(p: PathLike) -> str:
    """:func:`path` as a string (for configs, manifests and messages): never ``./gs:/...``."""
    return os.fspath(path(p))


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string, for local paths and URLs alike (not made absolute)."""
    text = os.fspath(base)
    return os.path.join(text, *parts) if is_local(text) else str(epath.Path(text).joinpath(*parts))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    """True for an existing file (an object, on object stores), False for a directory."""
    target = path(p)
    return target.is_file() if is_local(p) else target.exists() and not target.is_dir()


def makedirs(p: PathLike) -> None:
    """Creates directory ``p`` and its parents if missing (on object stores: a marker object)."""
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
    """Sorted entry names of directory ``p`` (no trailing '/' on object-store sub-directories)."""
    return sorted(child.name for child in path(p).iterdir())


def remove(p: PathLike) -> None:
    """Deletes file ``p``; a file already gone is not an error."""
    with contextlib.suppress(FileNotFoundError):
        path(p).unlink()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def open_read(p: PathLike) -> IO[bytes]:
    """A seekable binary reader of ``p``: the file itself when local, else its bytes in memory.

    Why in memory for URLs: readers such as PIL, zipfile, torch pickles and safetensors seek and
    read small pieces, which against an object store would be one request each.
    """
    if is_local(p):
        return open(os.fspath(p), "rb")  # the caller closes it
    return io.BytesIO(read_bytes(p))


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
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as staged:
                write(staged)  # complete before anything is uploaded: a failure uploads nothing
                staged.seek(0)
                try:
                    with tmp_path.open("wb") as f:
                        shutil.copyfileobj(staged, f, 8 << 20)
                    tmp_path.replace(target)  # rename() refuses to overwrite on gfile
                except BaseException:
                    with contextlib.suppress(Exception):
                        tmp_path.unlink()
                    raise
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
