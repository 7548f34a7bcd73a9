"""One run per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

Why: two runs on one workdir break each other's checkpoint saves and double the logs, and both can
die with misleading errors. The kernel releases a flock when its process dies (even on SIGKILL),
so a crash never leaves a stale lock to clean up by hand. The file records who holds it (host,
pid, command, start time) so a second run fails in one line naming the holder.

The lock file is written in place (never replaced by an atomic rename like every other file of
the project): a flock belongs to one inode, and a renamed-over file would let the next run lock
a fresh inode while the holder still runs. It is never deleted for the same reason.

Only process 0 of a multi-host job takes it (the workdir is shared; the other processes run
under process 0's lock). flock works on local disks and on NFSv4 (where Linux maps it to a
byte-range lock); on other network filesystems it may only exclude processes on the same host.

Object-store workdirs (``gs://...``) have no file locks, so there the lock is a lease: the
``.lock`` object is created only if absent (a write conditioned on "no object", GCS's
``ifGenerationMatch=0``, through tensorstore, which Orbax already uses), a background thread
renews it every :data:`RENEW_SECONDS` (each renewal conditioned on the object being still ours),
and release deletes it. Nothing releases the lease of a killed run, so a lock not renewed for
:data:`LEASE_SECONDS`, or held by a process of this host that no longer exists, is stale and
the next run takes it over (again conditionally, so of two runs racing for a stale lock one
wins); a run resumed on another host sooner after a kill is told how long to wait, or to delete
the object. A scheme tensorstore cannot open is run unlocked, with one log line saying so.

Re-entrant within a process: a pipeline holding the lock on its workdir may call commands that
take it again on the same directory or on a sub-directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

LOCK_NAME = ".lock"
#: An object-store lock not renewed for this long belongs to a dead run and may be taken over.
LEASE_SECONDS = 120.0
#: How often the holder renews its object-store lock.
RENEW_SECONDS = 20.0


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
    data = (json.dumps(_info()) + "\n").encode("utf-8")
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


def _info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv) or sys.executable,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


@functools.cache
def _kvstore(url: str) -> Any:
    """The tensorstore key-value store of a workdir URL (cached: one per URL and process)."""
    import tensorstore as ts

    return ts.KvStore.open(url.rstrip("/") + "/").result()


def _dead_here(holder: dict) -> bool:
    """True when ``holder`` names a process of this host that has exited (a killed run)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return False


class _Lease:
    """The object-store lock: a conditionally created ``.lock`` object, renewed by a thread."""

    def __init__(self, url: str):
        self.url, self.where = url, url.rstrip("/") + "/" + LOCK_NAME
        self.kv = _kvstore(url)
        self.generation = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self, info: dict) -> bytes:
        return (json.dumps({**info, "renewed": time.time(), "lease_s": LEASE_SECONDS}) + "\n"
                ).encode("utf-8")

    def acquire(self) -> None:
        info = _info()
        for _ in range(3):  # a lost race re-reads what won
            current = self.kv.read(LOCK_NAME).result()
            if current.state == "value":
                try:
                    holder = json.loads(current.value.decode("utf-8"))
                    age = time.time() - float(holder["renewed"])
                    lease = float(holder.get("lease_s", LEASE_SECONDS))
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    holder, age, lease = {}, float("inf"), LEASE_SECONDS
                if age <= lease and not _dead_here(holder):
                    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started "
                           f"{holder.get('started')}, command: {holder.get('command')}")
                    raise WorkdirLockedError(
                        f"workdir {self.url} is in use by another run ({who}; lock {self.where}, "
                        f"renewed {age:.0f}s ago): wait for it to finish, stop it, or use another "
                        f"--workdir; if that run is dead, its lock is stale after {lease:.0f}s "
                        f"without renewal (or delete {self.where})"
                    )
                logging.warning("Taking over the stale lock %s (its run is gone or has not "
                                "renewed it for %.0fs).", self.where, age)
            stamp = self.kv.write(
                LOCK_NAME, self._payload(info), if_equal=current.stamp.generation
            ).result()
            if stamp.generation:  # empty: the condition failed, someone else wrote first
                self.generation = stamp.generation
                break
        else:
            raise WorkdirLockedError(f"workdir {self.url}: lost the race for {self.where} "
                                     "to another run; retry")
        self._thread = threading.Thread(
            target=self._renew, args=(info,), name="workdir-lease", daemon=True
        )
        self._thread.start()

    def _renew(self, info: dict) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                stamp = self.kv.write(
                    LOCK_NAME, self._payload(info), if_equal=self.generation
                ).result()
            except Exception as e:  # a network hiccup: try again next period
                logging.warning("Could not renew the lock %s: %s", self.where, e)
                continue
            if not stamp.generation:
                logging.error("The lock %s was taken over by another run: two runs now share "
                              "%s; stop one of them.", self.where, self.url)
                return
            self.generation = stamp.generation

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.kv.write(LOCK_NAME, None, if_equal=self.generation).result()
        except Exception as e:  # the lease then simply expires
            logging.warning("Could not delete the lock %s (%s); it expires in %.0fs.",
                            self.where, e, LEASE_SECONDS)


_leases: dict[str, tuple[_Lease, int]] = {}  # lock object URL → (lease, nesting depth)


@contextlib.contextmanager
def _hold_remote(url: str) -> Iterator[None]:
    where = url.rstrip("/") + "/" + LOCK_NAME
    with _guard:
        if where in _leases:
            lease, depth = _leases[where]
            _leases[where] = (lease, depth + 1)
        else:
            try:
                lease = _Lease(url)
            except Exception as e:  # a scheme tensorstore has no driver for
                logging.warning(
                    "Workdir %s cannot be locked (%s): make sure no other run uses it.", url, e
                )
                lease = None
            if lease is not None:
                lease.acquire()
                _leases[where] = (lease, 1)
    try:
        yield
    finally:
        with _guard:
            if where in _leases:
                lease, depth = _leases[where]
                if depth > 1:
                    _leases[where] = (lease, depth - 1)
                else:
                    del _leases[where]
                    lease.release()


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
        with _hold_remote(text):
            yield
        return
    os.makedirs(text, exist_ok=True)
    path = os.path.join(os.path.realpath(text), LOCK_NAME)
    _acquire(path)
    try:
        yield
    finally:
        _release(path)
