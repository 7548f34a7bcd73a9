"""One run per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

Why: two runs on one workdir break each other's checkpoint saves and double the logs, and both can
die with misleading errors. The kernel releases a flock when its process dies (even on SIGKILL),
so a crash never leaves a stale lock to clean up by hand. The file records who holds it (host,
pid, command, start time) so a second run fails in one line naming the holder.

The lock file is written in place (never replaced by an atomic rename like every other file of
the project): a flock belongs to one inode, and a renamed-over file would let the next run lock
a fresh inode while the holder still runs. It is never deleted for the same reason.

Only process 0 of a multi-host job takes it (the workdir is shared; the other processes run
under process 0's lock). Object-store workdirs (``gs://...``) have no file locks: that is said
in one log line and the run goes on unlocked. flock works on local disks and on NFSv4 (where
Linux maps it to a byte-range lock); on other network filesystems it may only exclude
processes on the same host.

Re-entrant within a process: a pipeline holding the lock on its workdir may call commands that
take it again on the same directory or on a sub-directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from absl import logging

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names it."""


_held: dict[str, tuple[int, int]] = {}  # real path of the lock file → (fd, nesting depth)
_guard = threading.Lock()


def _is_local(path: str) -> bool:
    return "://" not in path


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(raw)
        return (
            f"pid {info['pid']} on {info['host']}, started {info['started']}, "
            f"command: {info['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def _record(fd: int) -> None:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv) or sys.executable,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    data = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _acquire(path: str) -> None:
    with _guard:
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder_text(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(path)} is in use by another run ({holder}; lock "
                    f"{path}): wait for it to finish, stop it, or use another --workdir"
                ) from None
            raise
        try:
            _record(fd)
        except BaseException:
            os.close(fd)  # closing releases the flock
            raise
        _held[path] = (fd, 1)


def _release(path: str) -> None:
    with _guard:
        fd, depth = _held[path]
        if depth > 1:
            _held[path] = (fd, depth - 1)
            return
        del _held[path]
        os.close(fd)  # releases the flock; the file stays (see the module docstring)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, process_index: int | None = None) -> Iterator[None]:
    """Holds the exclusive lock on ``workdir`` (created if missing) for the ``with`` block.

    Raises :class:`WorkdirLockedError` at once if another process holds it. ``process_index``
    defaults to ``jax.process_index()``; only process 0 locks.
    """
    text = os.fspath(workdir)
    if process_index is None:
        import jax

        process_index = jax.process_index()
    if process_index != 0:
        yield
        return
    if not _is_local(text):
        logging.warning(
            "Workdir %s is not on a local filesystem: it cannot be locked, so make sure no "
            "other run uses it.",
            text,
        )
        yield
        return
    os.makedirs(text, exist_ok=True)
    path = os.path.join(os.path.realpath(text), LOCK_NAME)
    _acquire(path)
    try:
        yield
    finally:
        _release(path)
