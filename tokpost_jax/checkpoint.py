"""The one place that talks to Orbax: train state, data position, config and digest per step.

Each checkpoint is a composite of ``state`` (the sharded train state), ``data`` (the input iterator
state as JSON), ``config`` (the run's config as JSON) and ``digest`` (a checksum of every state
leaf, JSON). Orbax writes into a temporary directory and renames it when complete, so a kill
mid-save never leaves a half checkpoint behind (stray temporary directories of a killed save are
removed when the next run opens the directory).

Why a digest: a flipped byte in a parameter file restores without any error and surfaces as a
NaN steps later. The checksum is computed on device by one jitted function (so it works for
sharded, multi-host arrays and every host gets the same answer), stored at save time and
recomputed after every restore; a mismatch names the leaf. A state that holds a NaN/Inf is
never saved, so every checkpoint this module writes is known finite.

A checkpoint that cannot be restored (truncated file, failed checksum) is skipped with a warning
and the previous one is used, by both :meth:`Checkpointer.restore_latest` and
:func:`load_params`; the trainer also moves it aside to ``<dir>/corrupt/<step>``, so the run can
write that step again and ``max_to_keep`` never deletes good steps to keep a bad one. A newest
checkpoint whose state tree does not fit the current config is not corruption: that is one error
naming the config keys that differ.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging as pylogging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tokpost_jax import files
from tokpost_jax.files import DiskFullError

ITEMS = ("state", "data", "config", "digest")
DIGEST_FORMAT = "fmix32-position-sum/1"
CORRUPT_DIR = "corrupt"
_TMP_MARKER = ".orbax-checkpoint-tmp"


def _absolute(directory: str | os.PathLike) -> epath.Path:
    """Orbax needs absolute paths; a relative ``--workdir`` (as in the README) is made absolute."""
    return files.path(directory)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class ConfigMismatchError(CheckpointError):
    """The newest checkpoint's state tree does not fit the one the current config builds."""


class NonFiniteStateError(CheckpointError):
    """A state holding NaN/Inf was about to be saved; it was not."""

    def __init__(self, step: int, leaf: str, count: int):
        super().__init__(f"the state at step {step} holds {count} non-finite value(s) in {leaf}")
        self.step, self.leaf, self.count = step, leaf, count


class CheckpointDiskFullError(DiskFullError, CheckpointError):
    """A checkpoint save hit a full disk; the message names the step, the directory and the last
    complete checkpoint."""


class _Unreadable(Exception):
    """Internal: this step cannot be used (its message says why)."""


class _TreeMismatch(Exception):
    """Internal: the stored state tree differs from the restore target."""

    def __init__(self, differences: list[str]):
        super().__init__("; ".join(differences))
        self.differences = differences


# ---- full disks ---------------------------------------------------------------------------------

# How a full disk reads when it arrives through tensorstore (Orbax) or TensorFlow (clu's writer),
# which report it as text rather than as an OSError.
_DISK_FULL_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'"
)


def is_disk_full(error: BaseException | None) -> bool:
    """True if ``error`` or anything it was raised from is a full disk or an exceeded quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DropDiskFullTracebacks(pylogging.Filter):
    """Background writer threads (Orbax, clu) each log a full traceback for one full disk;
    the caller reports it once, in one line."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.exc_info and is_disk_full(record.exc_info[1]):
            return False
        return not (record.levelno >= pylogging.ERROR and _DISK_FULL_TEXT.search(
            record.getMessage()
        ))


_closed_loop_filter_installed = False


def _ignore_closed_loop_callbacks() -> None:
    """After one write of a save fails, Orbax's event loop closes while tensorstore still
    completes the other writes; each completion then reports an unraisable "Event loop is
    closed" traceback (dozens per failed save, even after the error was reported). Only that
    exact error is dropped, process-wide, from then on; every other unraisable error is kept."""
    global _closed_loop_filter_installed
    if _closed_loop_filter_installed:
        return
    _closed_loop_filter_installed = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_disk_full_logs() -> Iterator[None]:
    """Drops the per-thread disk-full tracebacks that Orbax and clu log, for the block."""
    flt = _DropDiskFullTracebacks()
    logger = pylogging.getLogger("absl")
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


# ---- the digest ---------------------------------------------------------------------------------


def leaf_name(path: tuple) -> str:
    """``params.encoder.kernel``: the dotted name Orbax gives a leaf, for every tree flavour
    (dataclass fields, dict keys, tuple indices), so saved and restored trees name leaves alike."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bytes as uint32 words (8-byte types gain a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _checksum(x: jax.Array) -> jax.Array:
    """Wrap-around sum over positions i of fmix32(word_i + i * golden ratio).

    For a fixed position the hash is a bijection of the word, so any single changed word changes
    the sum for certain; more changes go unnoticed with probability ~2^-32. Integer addition
    mod 2^32 is associative, so the result is bit-identical for any sharding or reduction order.
    The position comes from iotas in the leaf's own shape, so no reshape moves sharded data.
    """
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
        position = position + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= w.shape[axis]
    return jnp.sum(_fmix32(w + position * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)


def _nonfinite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32)
    return jnp.zeros((), jnp.uint32)


def _digest_arrays(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.stack([_checksum(x), _nonfinite(x)]) for x in leaves])


@functools.lru_cache(maxsize=8)
def _jitted_digest(out_sharding: jax.sharding.Sharding | None) -> Any:
    """One compiled digest per output placement (jit caches per tree structure inside)."""
    return jax.jit(_digest_arrays, out_shardings=out_sharding)


def state_digest(state: Any) -> dict[str, tuple[int, int]]:
    """Leaf name → (checksum, number of NaN/Inf values), computed on device in one jitted call."""
    named = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(x, "dtype"):  # a Python number; anything else Orbax stores is not hashed
            x = np.asarray(x)
            if x.dtype.kind not in "biuf":
                continue
        named.append((leaf_name(path), x))
    if not named:
        return {}
    leaves = [x for _, x in named]
    sharding = getattr(leaves[0], "sharding", None)
    replicated = None  # replicated output: every host can read every leaf's result
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        # On the leaves' own mesh: a caller's context mesh may span other devices (a job on
        # part of the machine reading a checkpoint restored over all of it).
        with jax.set_mesh(sharding.mesh):
            out = _jitted_digest(replicated)(leaves)
    else:
        out = _jitted_digest(replicated)(leaves)
    values = np.asarray(jax.device_get(out))
    return {name: (int(v[0]), int(v[1])) for (name, _), v in zip(named, values, strict=True)}


def verify_digest(state: Any, stored: Mapping | None) -> None:
    """Raises ``_Unreadable`` naming the first leaf that fails its checksum or is not finite
    (``stored`` None: a checkpoint from before digests, only checked for finiteness)."""
    got = state_digest(state)
    if stored is not None:
        if stored.get("format") != DIGEST_FORMAT:
            raise _Unreadable(f"digest format {stored.get('format')!r} is not {DIGEST_FORMAT!r}")
        expected = stored.get("checksums", {})
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        if missing or extra:
            raise _Unreadable(
                f"restored leaves differ from the digest (missing {missing[:3]}, extra {extra[:3]})"
            )
        for name, (checksum, _) in got.items():
            if checksum != int(expected[name]):
                raise _Unreadable(
                    f"leaf {name} fails its checksum (stored {int(expected[name]):#010x}, "
                    f"read {checksum:#010x})"
                )
    for name, (_, count) in got.items():
        if count:
            raise _Unreadable(f"leaf {name} holds {count} non-finite value(s)")


# ---- config comparison --------------------------------------------------------------------------


def _flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """``model.width: 64 → 128`` for every dotted key whose value differs (JSON-normalised)."""
    absent = "(absent)"
    a = _flatten_config(json.loads(json.dumps(old, default=str)))
    b = _flatten_config(json.loads(json.dumps(new, default=str)))
    return [
        f"{k}: {a.get(k, absent)!r} → {b.get(k, absent)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    ]


def _tree_differences(stored: Any, abstract: Any) -> list[str]:
    def spec(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            leaf_name(p): (tuple(x.shape), jnp.dtype(x.dtype).name)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    a, b = spec(stored), spec(abstract)
    out = [f"{k} missing from the checkpoint" for k in sorted(set(b) - set(a))]
    out += [f"{k} only in the checkpoint" for k in sorted(set(a) - set(b))]
    out += [
        f"{k} {a[k][1]}{list(a[k][0])} → {b[k][1]}{list(b[k][0])}"
        for k in sorted(set(a) & set(b))
        if a[k] != b[k]
    ]
    return out


# ---- reading one step ---------------------------------------------------------------------------


def _manager(directory: epath.Path, **options: Any) -> ocp.CheckpointManager:
    """Handlers named up front, so a fresh manager can read item metadata before any restore."""
    handlers = {name: ocp.JsonCheckpointHandler() for name in ITEMS if name != "state"}
    return ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), **handlers},
        options=ocp.CheckpointManagerOptions(**options),
    )


def _replicated_target(stored: Any) -> Any:
    """The stored tree's shapes and dtypes, replicated over this job's devices.

    Without a target Orbax reuses the shardings recorded at save time, which name the saving
    job's devices: a 2-process checkpoint then cannot be read by 1 process ("topology
    mismatch"). Readers of another run's parameters want whole arrays that any jitted
    computation over this job's mesh accepts, so every leaf is fully replicated over all of
    this job's devices (what a data-parallel run holds anyway).
    """
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), stored
    )


def _everywhere(ok: bool) -> bool:
    """True only if ``ok`` on every host, so all hosts take the same fallback path."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _read(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any | None, *, with_data: bool
) -> tuple[Any, dict]:
    """Restores and verifies one step; raises ``_TreeMismatch`` before reading any array if
    the stored tree does not fit ``abstract_state``, anything else if the step is unreadable."""
    items = manager.item_metadata(step)
    if abstract_state is None:
        abstract_state = _replicated_target(items["state"])
    else:
        differences = _tree_differences(items["state"], abstract_state)
        if differences:
            raise _TreeMismatch(differences)
    args: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
        args["data"] = ocp.args.JsonRestore()
    has_digest = "digest" in items
    if has_digest:
        args["digest"] = ocp.args.JsonRestore()
    else:
        logging.warning(
            "Checkpoint step %d in %s has no digest (written before digests existed); only its "
            "finiteness is checked.",
            step,
            manager.directory,
        )
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    verify_digest(restored["state"], restored["digest"] if has_digest else None)
    data = dict(restored["data"] or {}) if with_data else {}
    return restored["state"], data


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    text = text if len(text) <= 300 else text[:300] + "…"
    return text if isinstance(e, _Unreadable) else f"{type(e).__name__}: {text}"


def _stored_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"] or {})
    except Exception:  # a config we cannot read only weakens the message
        return None


def _mismatch_error(
    manager: ocp.CheckpointManager,
    directory: epath.Path,
    step: int,
    mismatch: _TreeMismatch,
    config_json: Mapping | None,
) -> ConfigMismatchError:
    leaves = mismatch.differences
    shown = "; ".join(leaves[:3]) + (f"; +{len(leaves) - 3} more" if len(leaves) > 3 else "")
    stored = _stored_config(manager, step)
    if config_json is None:
        why = "no current config was given to compare"
    elif stored is None:
        why = "its stored config is unreadable"
    else:
        keys = config_differences(stored, config_json)
        why = (
            "config keys that differ (checkpoint → now): " + "; ".join(keys)
            if keys
            else "its stored config equals the current one, so the code that builds the state "
            "changed"
        )
    return ConfigMismatchError(
        f"Checkpoint step {step} in {directory} holds a different state tree than the current "
        f"run builds ({len(leaves)} leaves differ: {shown}); {why}. Resume with the checkpoint's "
        "config, or start in a new --workdir."
    )


# ---- the trainer's checkpointer -----------------------------------------------------------------


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` (so a later Orbax V1 switch stays local)."""

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 3, asynchronous: bool = True
    ) -> None:
        self.directory = _absolute(directory)
        self._log_stray_temporaries()
        self._manager = _manager(
            self.directory,
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        _ignore_closed_loop_callbacks()
        self._pending: int | None = None  # step of the save that may still be running
        self._failed = self._closed = False

    def _log_stray_temporaries(self) -> None:
        if jax.process_index() != 0 or not self.directory.exists():
            return
        stray = sorted(p.name for p in self.directory.iterdir() if _TMP_MARKER in p.name)
        if stray:
            logging.warning(
                "Removing %d unfinished checkpoint(s) left by an interrupted save in %s: %s.",
                len(stray),
                self.directory,
                ", ".join(stray),
            )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- writing --

    def last_complete(self, exclude: int | None = None) -> str:
        """'the last complete checkpoint is step N' (read from disk), for error messages."""
        try:
            self._manager.reload()
            steps = [s for s in self._manager.all_steps() if s != exclude]
        except Exception:  # only the message suffers
            steps = []
        if not steps:
            return f"there is no complete checkpoint in {self.directory} yet"
        return f"the last complete checkpoint is step {max(steps)} in {self.directory}"

    def _write_failed(self, step: int | None, error: BaseException) -> None:
        """Re-raises a failed write; a full disk becomes one line naming step and directory."""
        self._failed = True
        if is_disk_full(error):
            what = (
                f"checkpoint step {step} to {self.directory / str(step)}"
                if step is not None
                else f"a checkpoint to {self.directory}"
            )
            raise CheckpointDiskFullError(
                f"no space left on device while saving {what}; "
                f"{self.last_complete(exclude=step)}. Free space and rerun to resume."
            ) from None
        raise error

    def _finish_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            pending, self._pending = self._pending, None
            self._write_failed(pending, e)
        self._pending = None

    def check_for_errors(self) -> None:
        """Raises now, without waiting, if the background save has already failed."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            pending, self._pending = self._pending, None
            self._write_failed(pending, e)

    def save(self, step: int, state: Any, data_state: dict, config_json: dict) -> None:
        """Saves ``state`` after checking every value is finite (raises NonFiniteStateError)."""
        digest = state_digest(state)
        for name, (_, count) in digest.items():
            if count:
                raise NonFiniteStateError(step, name, count)
        self._finish_pending()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config_json),
                    digest=ocp.args.JsonSave(
                        {
                            "format": DIGEST_FORMAT,
                            "checksums": {k: c for k, (c, _) in digest.items()},
                        }
                    ),
                ),
                force=True,
            )
        except Exception as e:
            self._write_failed(step, e)
        self._pending = step

    # -- reading --

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores and verifies one step onto ``abstract_state`` (ShapeDtypeStructs with target
        shardings)."""
        try:
            return _read(self._manager, step, abstract_state, with_data=True)
        except _TreeMismatch as e:
            raise _mismatch_error(self._manager, self.directory, step, e, None) from None
        except _Unreadable as e:
            raise CheckpointError(f"Checkpoint step {step} in {self.directory}: {e}") from None

    def _move_aside(self, step: int, reason: str) -> None:
        source = self.directory / str(step)
        target = self.directory / CORRUPT_DIR / str(step)
        n = 1
        while target.exists():
            n += 1
            target = self.directory / CORRUPT_DIR / f"{step}.{n}"
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
            except OSError as e:
                raise CheckpointError(
                    f"Checkpoint step {step} in {self.directory} is unreadable ({reason}) and "
                    f"could not be moved to {target} ({e}); move or delete it by hand."
                ) from None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tokpost_checkpoint_move_aside_{step}")
        logging.warning(
            "Checkpoint step %d in %s is unreadable (%s); moved it to %s.",
            step,
            self.directory,
            reason,
            target,
        )

    def restore_latest(
        self, abstract_state: Any, config_json: Mapping | None = None
    ) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint as (step, state, data_state); None if there is none at all.

        Unreadable newer checkpoints are moved aside once an older one restores (so an error of
        the machine, such as running out of memory, never moves good checkpoints); if every
        checkpoint is unreadable that is an error, because silently starting from scratch would
        overwrite the user's work. A newest checkpoint whose tree does not fit
        ``abstract_state`` raises :class:`ConfigMismatchError` naming the config keys that
        differ from ``config_json``.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures: list[tuple[int, str]] = []
        for step in reversed(steps):
            error: BaseException | None = None
            try:
                state, data_state = _read(self._manager, step, abstract_state, with_data=True)
            except _TreeMismatch as e:
                if not failures:
                    raise _mismatch_error(
                        self._manager, self.directory, step, e, config_json
                    ) from None
                error = e
            except Exception as e:  # Orbax/tensorstore raise many types for corrupt data.
                error = e
            if not _everywhere(error is None):
                reason = _why(error) if error is not None else "unreadable on another host"
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                    step,
                    self.directory,
                    reason,
                )
                failures.append((step, reason))
                continue
            if config_json is not None:
                stored = _stored_config(self._manager, step)
                changed = config_differences(stored, config_json) if stored is not None else []
                if changed:
                    logging.warning(
                        "Resuming step %d with a config that differs from the checkpoint's "
                        "(checkpoint → now): %s.",
                        step,
                        "; ".join(changed),
                    )
            for bad, reason in failures:
                self._move_aside(bad, reason)
            if failures:
                self._manager.reload()
                logging.warning(
                    "Resumed from step %d after skipping %d unreadable checkpoint(s).",
                    step,
                    len(failures),
                )
            return step, state, data_state
        raise CheckpointError(
            f"All checkpoints in {self.directory} are unreadable: "
            + "; ".join(f"step {s}: {r}" for s, r in failures)
            + ". Move the directory away to start fresh, or repair/restore it from a backup."
        )

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        """Waits for the last save (raising its failure) and releases Orbax's threads; once."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._failed:
                self._finish_pending()
        finally:
            with contextlib.suppress(Exception):
                self._manager.close()


def load_params(
    directory: str | os.PathLike, *, key: str = "ema_params", step: int | None = None,
    with_step: bool = False,
) -> Any:
    """Reads one sub-tree (``params`` or ``ema_params``) of another run's checkpoint; with
    ``with_step``, ``(tree, the step it came from)`` (for manifests that pin it).

    Used for warm starts, evaluation and by downstream stages (pretokenization, post-training)
    that need a trained tokenizer without its optimizer state. The newest checkpoint that passes
    its integrity check is used (older ones are tried, with a warning, like the trainer's
    resume); nothing is moved, since the run that owns the directory may still be writing.
    """
    directory = _absolute(directory)
    if not directory.exists():
        raise CheckpointError(f"No checkpoint directory at {directory}.")
    manager = _manager(directory, create=False)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{directory} holds no checkpoints.")
        if step is not None and step not in steps:
            raise CheckpointError(f"{directory} has no checkpoint at step {step} (has {steps}).")
        failures = []
        for candidate in [step] if step is not None else list(reversed(steps)):
            try:
                state, _ = _read(manager, candidate, None, with_data=False)
            except Exception as e:
                failures.append(f"step {candidate}: {_why(e)}")
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                    candidate,
                    directory,
                    _why(e),
                )
                continue
            step = candidate
            break
        else:
            raise CheckpointError(
                f"No readable checkpoint in {directory}: " + "; ".join(failures) + "."
            )
    finally:
        manager.close()
    tree = state.get(key) if isinstance(state, dict) else getattr(state, key, None)
    if tree is None:
        raise CheckpointError(
            f"Checkpoint {directory} step {step} has no '{key}' "
            f"(has: {sorted(state) if isinstance(state, dict) else type(state)})."
        )
    return (tree, step) if with_step else tree
