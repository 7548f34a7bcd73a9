"""Generated arrays on disk: fixed-size ``.npz`` shards written resumably, read by random access.

Layout of one dataset directory (one split)::

    manifest.json                  what the shards hold (sizes, fields, the producer's metadata)
    shard-00000-of-00042.npz       records [0, S), one array per field with a leading record axis
    ...
    complete                       written once every shard exists

Why this shape: generating tokens or image pairs takes hours, so a killed job must resume without
recomputing or mixing data. Shard ``i`` always holds records ``[i·S, (i+1)·S)``, each shard is
renamed into place only when fully written (a kill leaves no half shard), and the manifest pins
everything that decides the content, so a rerun with other settings is refused instead of mixed in.
Shards are uncompressed, so readers memory-map single records instead of loading whole shards:
shuffled training touches one record per read. On object stores (``gs://``), which cannot be
mapped, a shard of at most :data:`WHOLE_REMOTE_SHARD_BYTES` (token shards) is read whole once and
kept like a mapping; a record of a larger one (image pairs) is one byte-range read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tokpost_jax import files
from tokpost_jax.data.sources import DataError

__all__ = [
    "COMPLETE_NAME",
    "MANIFEST_NAME",
    "FieldSpec",
    "ShardSource",
    "ShardWriter",
    "shard_name",
    "write_shards",
]

MANIFEST_NAME = "manifest.json"
COMPLETE_NAME = "complete"
_FORMAT = "tokpost_shards"
_VERSION = 1
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the 30-byte zip local file header
#: Remote shards up to this size are read in one request (a default token shard is ~8 MiB);
#: the reader keeps ``max_open_shards`` of them in memory.
WHOLE_REMOTE_SHARD_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field of every record: its dtype and per-record shape (no record axis)."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, spec: FieldSpec | tuple[Any, Sequence[int]]) -> FieldSpec:
        """Accepts a FieldSpec or a ``(dtype, shape)`` pair."""
        if isinstance(spec, FieldSpec):
            return spec
        dtype, shape = spec
        return cls(np.dtype(dtype), tuple(int(s) for s in shape))

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype.hasobject or self.dtype.fields is not None:
            raise ValueError(f"field dtype must be a plain numeric dtype, got {self.dtype}")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"field shape must be non-negative, got {self.shape}")

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype.str, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FieldSpec:
        return cls(np.dtype(obj["dtype"]), tuple(obj["shape"]))


def shard_name(index: int, num_shards: int) -> str:
    """File name of shard `index`; the total is in the name so sets of different sizes never mix."""
    return f"shard-{index:05d}-of-{num_shards:05d}.npz"


def _num_shards(num_records: int, records_per_shard: int) -> int:
    return -(-num_records // records_per_shard)


def _json_normal(obj: Any) -> Any:
    """JSON round trip (tuples → lists, numpy scalars refused) so manifests compare as stored."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"shard metadata must be JSON-serialisable: {e}") from e


def _manifest_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two manifests (nested keys dotted)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _manifest_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: on disk {a!r}, requested {b!r}")
    return out


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one dataset directory shard by shard; a new writer on the same directory resumes.

    The manifest is written (or checked against the one on disk) when the writer is created;
    :meth:`missing_shards` lists what a resumed job still has to compute. Only process 0 touches
    the disk: on other processes the writer is inert, so multi-host jobs can run the same code
    on every host (and must take the list of missing shards from process 0).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        num_records: int,
        records_per_shard: int,
        fields: Mapping[str, FieldSpec | tuple[Any, Sequence[int]]],
        metadata: Mapping[str, Any] | None = None,
        process_index: int = 0,
    ):
        if int(num_records) < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if int(records_per_shard) < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        if not fields:
            raise ValueError("a shard dataset needs at least one field")
        self.directory = os.fspath(directory)
        self.num_records = int(num_records)
        self.records_per_shard = int(records_per_shard)
        self.num_shards = _num_shards(self.num_records, self.records_per_shard)
        self.fields = {str(k): FieldSpec.of(v) for k, v in fields.items()}
        self.metadata = _json_normal(dict(metadata or {}))
        self.process_index = int(process_index)
        self.manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_records": self.num_records,
            "records_per_shard": self.records_per_shard,
            "num_shards": self.num_shards,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "metadata": self.metadata,
        }
        self._present: set[int] = set()
        if self.is_writer:
            self._open()

    @property
    def is_writer(self) -> bool:
        return self.process_index == 0

    def _open(self) -> None:
        files.makedirs(self.directory)
        path = files.join(self.directory, MANIFEST_NAME)
        if files.exists(path):
            try:
                on_disk = files.read_json(path)
            except (OSError, ValueError) as e:
                raise DataError(
                    f"cannot read {path} ({type(e).__name__}: {e}); delete {self.directory} "
                    "and rerun to regenerate it"
                ) from e
            diff = _manifest_diff(on_disk, self.manifest)
            if diff:
                raise DataError(
                    f"{self.directory} already holds a shard dataset with other settings, so "
                    "resuming would mix data:\n  " + "\n  ".join(diff) + "\nUse another output "
                    "directory, or delete this one to regenerate it."
                )
        else:
            files.write_json(path, self.manifest, sort_keys=True)
        names = set(files.listdir(self.directory))
        for name in names:
            if name.startswith(files.TMP_PREFIX):  # left by a killed writer
                files.remove(files.join(self.directory, name))
        self._present = {
            i for i in range(self.num_shards) if shard_name(i, self.num_shards) in names
        }
        if COMPLETE_NAME in names and len(self._present) < self.num_shards:
            files.remove(files.join(self.directory, COMPLETE_NAME))  # shards were deleted since

    def shard_range(self, index: int) -> range:
        """Record indices of shard `index`; the last shard may be short."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range [0, {self.num_shards})")
        start = index * self.records_per_shard
        return range(start, min(start + self.records_per_shard, self.num_records))

    def missing_shards(self) -> list[int]:
        """Shards not yet on disk, ascending. On processes other than 0: all shards (unknown)."""
        return [i for i in range(self.num_shards) if i not in self._present]

    @property
    def is_complete(self) -> bool:
        return self.is_writer and len(self._present) == self.num_shards

    def _checked(self, index: int, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = len(self.shard_range(index))
        if set(arrays) != set(self.fields):
            raise ValueError(
                f"shard {index}: got fields {sorted(arrays)}, the manifest has "
                f"{sorted(self.fields)}"
            )
        out = {}
        for name, spec in self.fields.items():
            arr = np.asarray(arrays[name])
            if arr.shape != (n, *spec.shape):
                raise ValueError(
                    f"shard {index} field {name!r}: shape {arr.shape}, expected {(n, *spec.shape)}"
                )
            if arr.dtype != spec.dtype:
                if not np.can_cast(arr.dtype, spec.dtype, "same_kind"):
                    raise ValueError(
                        f"shard {index} field {name!r}: dtype {arr.dtype} cannot be stored as "
                        f"{spec.dtype}"
                    )
                cast = arr.astype(spec.dtype)
                if spec.dtype.kind in "iub" and not np.array_equal(cast, arr):
                    raise ValueError(
                        f"shard {index} field {name!r}: values do not fit in {spec.dtype}"
                    )
                arr = cast
            out[name] = np.ascontiguousarray(arr)
        return out

    def write_shard(self, index: int, arrays: Mapping[str, Any]) -> None:
        """Atomically writes shard `index` (fields → arrays with a leading record axis).

        Inputs are checked against the manifest on every process, so a shape bug surfaces on
        every host; only process 0 writes. The ``complete`` marker follows the last shard.
        """
        checked = self._checked(index, arrays)
        if not self.is_writer:
            return
        path = files.join(self.directory, shard_name(index, self.num_shards))
        files.atomic_write(path, lambda f: np.savez(f, **checked))
        self._present.add(index)
        if self.is_complete:
            self.finalize()

    def finalize(self) -> None:
        """Writes the ``complete`` marker; an error while shards are missing."""
        if not self.is_writer:
            return
        missing = self.missing_shards()
        if missing:
            raise DataError(
                f"{self.directory}: {len(missing)} of {self.num_shards} shards are missing "
                f"(first: {missing[:5]}); write them before finalizing"
            )
        done = {"num_shards": self.num_shards}
        files.write_json(files.join(self.directory, COMPLETE_NAME), done, sort_keys=True)


def write_shards(
    writer: ShardWriter,
    compute: Callable[[range], Mapping[str, Any]],
    shards: Iterable[int] | None = None,
) -> list[int]:
    """Computes and writes each missing shard (or the given ones) in order; returns them.

    Why a helper: resuming is then the default — a rerun computes only what is not on disk.
    `compute(records)` gets the shard's record range and returns its arrays.
    """
    todo = writer.missing_shards() if shards is None else list(shards)
    for index in todo:
        writer.write_shard(index, compute(writer.shard_range(index)))
    if writer.is_writer and not writer.missing_shards():
        writer.finalize()
    return todo


# --------------------------------------------------------------------------- reading


def missing_everywhere(
    num_shards: int, writer: ShardWriter | None, error: Exception | None
) -> list[int]:
    """Process 0's list of missing shards, on every process (hosts need not share a disk).

    ``error`` is process 0's failure to open the writer, if any; it is raised there and reported
    on the other hosts instead of leaving them waiting in a collective.
    """
    import jax  # here, not at module level: the reader side of this module stays JAX-free
    from jax.experimental import multihost_utils

    missing = np.zeros(num_shards + 1, np.int32)
    if jax.process_index() == 0:
        missing[0] = error is not None
        if writer is not None:
            missing[1 + np.asarray(writer.missing_shards(), np.int64)] = 1
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    if error is not None:
        raise error
    if missing[0]:
        raise DataError("process 0 could not open the output directory; see its log")
    return [int(i) for i in np.flatnonzero(missing[1:])]


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's parser is not thread-safe
# ("AST constructor recursion depth mismatch" when grain's prefetch threads open shards at once).
_HEADER_LOCK = threading.Lock()


def _npz_members(
    path: str, names: Iterable[str], data: bytes | None = None
) -> dict[str, tuple[np.dtype, tuple, int]]:
    """(dtype, shape, byte offset) of each stored ``.npy`` member, for memory-mapping.

    Why parse the zip by hand: ``np.load`` cannot memory-map inside ``.npz`` files, and loading a
    whole shard to read one record would make shuffled reads shard-sized. ``data``: the file's
    bytes, when already read.
    """
    out = {}
    # A local file, a gs:// object (range reads) or the bytes read already.
    opened = (
        files.path(path).open("rb") if data is None else contextlib.nullcontext(io.BytesIO(data))
    )
    with opened as f:
        with zipfile.ZipFile(f) as zf:
            infos = {info.filename: info for info in zf.infolist()}
        expected = {f"{n}.npy" for n in names}
        if set(infos) != expected:
            raise ValueError(f"members {sorted(infos)}, expected {sorted(expected)}")
        f.seek(0, os.SEEK_END)
        size = f.tell()
        for member, info in infos.items():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {member} is compressed; shards must be stored")
            f.seek(info.header_offset)
            header = f.read(_ZIP_LOCAL_HEADER.size)
            if len(header) != _ZIP_LOCAL_HEADER.size:
                raise ValueError(f"truncated zip header of {member}")
            fields = _ZIP_LOCAL_HEADER.unpack(header)
            if fields[0] != b"PK\x03\x04":
                raise ValueError(f"bad zip header signature for {member}")
            name_len, extra_len = fields[-2], fields[-1]
            f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version} in {member}")
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            with _HEADER_LOCK:
                shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"member {member} is Fortran-ordered or holds objects")
            offset = f.tell()
            if offset + int(np.prod(shape)) * dtype.itemsize > size:
                raise ValueError(f"member {member} extends past the end of the file")
            out[member[: -len(".npy")]] = (dtype, tuple(shape), offset)
    return out


class _RemoteRows:
    """One field of a shard on an object store: ``rows[i]`` is one byte-range read of record i.

    Why not load the shard: image-pair shards are hundreds of MB, and shuffled reads touch one
    record of each; the read opens its own handle, so grain's threads never share one.
    """

    def __init__(self, path: str, dtype: np.dtype, shape: tuple, offset: int):
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset
        self.row_bytes = int(np.prod(shape[1:])) * dtype.itemsize

    def __getitem__(self, row: int) -> np.ndarray:
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"row {row} out of range [0, {self.shape[0]})")
        with files.path(self.path).open("rb") as f:
            f.seek(self.offset + row * self.row_bytes)
            data = f.read(self.row_bytes)
        if len(data) != self.row_bytes:
            raise DataError(f"shard file {self.path!r} is truncated at record row {row}")
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])


class ShardSource:
    """A complete shard directory as a grain random-access source of ``{field: array}`` records.

    Shards are opened lazily and memory-mapped; each process keeps the most recently used
    `max_open_shards` mappings (the cache is not pickled, so grain workers build their own).
    Problems are ``DataError`` naming the directory or file and how to regenerate it.
    """

    def __init__(self, directory: str | os.PathLike, *, max_open_shards: int = 64):
        self.directory = os.fspath(directory)
        self.max_open_shards = int(max_open_shards)
        path = files.join(self.directory, MANIFEST_NAME)
        if not files.isdir(self.directory):
            raise DataError(
                f"shard directory {self.directory!r} does not exist; write it first "
                "(python -m tokpost_jax.cli.pretokenize --out=<data_dir> --split=<split> ... for "
                "tokens) or fix config.data.data_dir"
            )
        try:
            manifest = files.read_json(path)
            if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
                raise ValueError(f"format {manifest.get('format')!r} v{manifest.get('version')}")
            self.num_records = int(manifest["num_records"])
            self.records_per_shard = int(manifest["records_per_shard"])
            self.num_shards = int(manifest["num_shards"])
            self.fields = {k: FieldSpec.from_json(v) for k, v in manifest["fields"].items()}
            self.metadata: dict[str, Any] = dict(manifest.get("metadata", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path} is missing or unreadable ({type(e).__name__}: {e}); "
                f"{self.directory!r} is not a shard dataset, or it was damaged; "
                + self._regenerate_hint("the directory")
            ) from e
        names = set(files.listdir(self.directory))
        absent = [i for i in range(self.num_shards) if shard_name(i, self.num_shards) not in names]
        if absent or COMPLETE_NAME not in names:
            raise DataError(
                f"shard dataset {self.directory!r} is incomplete: "
                f"{self.num_shards - len(absent)} of {self.num_shards} shards present"
                + (f" (missing e.g. {shard_name(absent[0], self.num_shards)})" if absent else "")
                + f"; rerun the job that writes it to finish it (it resumes, computing only the "
                f"missing shards). {self._producer_note()}"
            )
        self._init_cache()

    def _producer_note(self) -> str:
        producer = getattr(self, "metadata", {}).get("producer")
        return f"It was written by {producer}." if producer else ""

    def _regenerate_hint(self, what: str) -> str:
        return (
            f"delete {what} and rerun the job that wrote {self.directory!r} (a rerun recomputes "
            f"only missing shards). {self._producer_note()}"
        ).strip()

    def _init_cache(self) -> None:
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_cache"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return self.num_records

    def shard_path(self, index: int) -> str:
        return files.join(self.directory, shard_name(index, self.num_shards))

    def _open_shard(self, index: int) -> dict[str, np.ndarray]:
        path = self.shard_path(index)
        start = index * self.records_per_shard
        n = min(self.records_per_shard, self.num_records - start)
        remote = not files.is_local(path)
        record_bytes = sum(s.dtype.itemsize * int(np.prod(s.shape)) for s in self.fields.values())
        whole = remote and n * record_bytes <= WHOLE_REMOTE_SHARD_BYTES
        try:
            data = files.read_bytes(path) if whole else None
            members = _npz_members(path, self.fields, data)
            arrays = {}
            for name, spec in self.fields.items():
                dtype, shape, offset = members[name]
                if dtype != spec.dtype or shape != (n, *spec.shape):
                    raise ValueError(
                        f"field {name!r} is {dtype} {shape}, the manifest says "
                        f"{spec.dtype} {(n, *spec.shape)}"
                    )
                if int(np.prod(shape)) == 0:  # mmap cannot map zero bytes
                    arrays[name] = np.zeros(shape, dtype)
                elif data is not None:  # a small remote shard, read whole
                    count = int(np.prod(shape))
                    arrays[name] = np.frombuffer(data, dtype, count, offset).reshape(shape)
                elif remote:  # object stores cannot be mapped
                    arrays[name] = _RemoteRows(path, dtype, shape, offset)
                else:
                    arrays[name] = np.memmap(path, dtype, mode="r", offset=offset, shape=shape)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as e:
            raise DataError(
                f"shard file {path!r} is corrupt ({type(e).__name__}: {e}); "
                + self._regenerate_hint("that file")
            ) from e
        return arrays

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        with self._lock:
            arrays = self._cache.get(index)
            if arrays is not None:
                self._cache.move_to_end(index)
                return arrays
        arrays = self._open_shard(index)
        with self._lock:
            self._cache[index] = arrays
            while len(self._cache) > max(self.max_open_shards, 1):
                self._cache.popitem(last=False)
        return arrays

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        shard, row = divmod(index, self.records_per_shard)
        return {k: np.array(v[row]) for k, v in self._shard(shard).items()}

    def __repr__(self) -> str:
        return f"ShardSource({self.directory!r}, n={self.num_records}, fields={list(self.fields)})"
