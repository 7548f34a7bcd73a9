"""Random-access record sources: an image folder tree and tfds (array_record).

Sources are thin grain-compatible objects (`__len__` + `__getitem__`) that
return ``{'image': uint8 HxWx3, 'label': int}``; all randomness, ordering and
sharding live in the grain pipeline (pipeline.py). They are picklable so grain
can ship them to spawned worker processes. tensorflow_datasets is imported
lazily because importing it pulls in TensorFlow (seconds, and per worker).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from tokpost_jax import files
from tokpost_jax.data.preprocess import to_rgb_uint8

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CONSECUTIVE_BAD",
    "BadRecordError",
    "DataError",
    "FolderSource",
    "SkipBadRecords",
    "TfdsSource",
    "folder_class_names",
    "open_tfds_source",
    "scan_records",
    "tfds_name_known",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(Exception):
    """A data problem the user must fix (missing files, unprepared dataset, ...).

    Why a dedicated type: the trainer reports these as one actionable sentence
    instead of a deep traceback from PIL/tfds/grain internals.
    """


class BadRecordError(DataError):
    """One record cannot be read (an undecodable image file). Why separate: it is the only data
    error that ``config.data.on_bad_image='skip'`` may step over; `where` names the record."""

    def __init__(self, message: str, index: int, where: str):
        super().__init__(message)
        self.index, self.where = index, where

    def __reduce__(self) -> tuple:
        # grain ships a worker process's exception to the main process by pickling it.
        return type(self), (str(self), self.index, self.where)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


# --------------------------------------------------------------------------- folder


def _unreachable(path: str) -> str | None:
    """Why `path` cannot be followed (symlink loop, dangling link), or None if it can."""
    if not files.is_local(path):  # object stores have no symlinks
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        if os.path.islink(path):
            return f"is a symlink to a missing target ({os.readlink(path)!r})"
        return None
    return None


def _check_dir(path: str, missing: str) -> None:
    why = _unreachable(path)
    if why is not None:
        raise DataError(f"{path!r} {why}; fix or remove it")
    if not files.isdir(path):
        raise DataError(missing)


def _split_dir(root: str | os.PathLike, split: str) -> str:
    if root is None:
        raise DataError(
            "config.data.data_dir must be set to the image-folder root for name='folder'"
        )
    root = os.fspath(root)
    _check_dir(root, f"image-folder root {root!r} does not exist; set config.data.data_dir")
    split_dir = files.join(root, split)
    _check_dir(
        split_dir,
        f"split directory {split_dir!r} does not exist; expected "
        f"<data_dir>/<split>/<class_name>/<image files>",
    )
    return split_dir


def _entries(directory: str, want: str) -> list[str]:
    """Sorted names of the sub-directories (``want='dir'``) or files of `directory`.

    Hidden names (``.DS_Store``, macOS ``._img.jpg`` resource forks, ``.ipynb_checkpoints``) are
    left out: they are never images of the dataset. A symlink loop is an error naming it.
    """
    if not files.is_local(directory):
        return _remote_entries(directory, want)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)  # first error: stable
    except OSError as e:
        raise DataError(f"cannot list {directory!r} ({_one_line(e)})") from e
    names = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            keep = entry.is_dir() if want == "dir" else entry.is_file()
        except OSError as e:
            why = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e})"
            raise DataError(f"{entry.path!r} {why}; fix or remove it") from e
        if not keep and entry.is_symlink() and want == "file":
            why = _unreachable(entry.path)
            if why is not None and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                raise DataError(f"{entry.path!r} {why}; fix or remove it")
        if keep:
            names.append(entry.name)
    return sorted(names)


def _remote_entries(directory: str, want: str) -> list[str]:
    """:func:`_entries` on an object store (``gs://``): one listing, and a directory check only
    for names without an image extension, so an ImageNet class of 1,300 files costs one request
    (not one per file). Hidden names are left out as locally."""
    try:
        names = [n for n in files.listdir(directory) if not n.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list {directory!r} ({_one_line(e)})") from e
    if want == "dir":
        return [n for n in names if files.isdir(files.join(directory, n))]
    return [
        n for n in names
        if n.lower().endswith(IMAGE_EXTENSIONS) or not files.isdir(files.join(directory, n))
    ]


def folder_class_names(root: str | os.PathLike, split: str) -> list[str]:
    """Sorted class sub-directory names of ``root/split`` (label id = position).

    Why separate: the pipeline takes the class list from the *train* split and
    reuses it for eval so label ids agree even if eval lacks some classes.
    """
    split_dir = _split_dir(root, split)
    names = _entries(split_dir, "dir")
    if not names:
        raise DataError(f"split directory {split_dir!r} has no class sub-directories")
    return names


class FolderSource:
    """``root/split/<class>/<image>`` tree (ImageNet layout), decoded with PIL on access.

    Files are sorted per class and classes alphabetically, so the record order
    is a pure function of the directory contents. Paths are kept in a numpy
    bytes array (compact to pickle to workers even for 1.28M ImageNet files).
    Hidden files and directories (names starting with '.') are not records.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, class_names: Sequence[str] | None = None
    ):
        split_dir = _split_dir(root, split)
        present = _entries(split_dir, "dir")
        if class_names is None:
            class_names = present
        class_names = list(class_names)
        unknown = sorted(set(present) - set(class_names))
        if unknown:
            raise DataError(
                f"{split_dir!r} has class directories {unknown[:5]} that are not in the "
                f"class list taken from the train split; the splits must share class names"
            )
        rel_paths: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(class_names):
            class_dir = files.join(split_dir, name)
            if not files.isdir(class_dir):
                continue
            images = [
                f for f in _entries(class_dir, "file")
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
            rel_paths.extend(os.path.join(name, f).encode("utf-8") for f in images)
            labels.extend([label] * len(images))
        if not rel_paths:
            raise DataError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir!r}"
            )
        self._split_dir = split_dir
        self._rel_paths = np.array(rel_paths, dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int32)
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self._rel_paths)

    def path(self, index: int) -> str:
        """Absolute path of record `index` (for error messages and debugging)."""
        return files.join(self._split_dir, self._rel_paths[index].decode("utf-8"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.path(index)
        try:
            # A gs:// image is read whole in one request (PIL's small reads would be many).
            with Image.open(path if files.is_local(path) else files.open_read(path)) as pil:
                pil.load()
                image = to_rgb_uint8(pil)
        # Anything decoding a user's file raises (PIL's DecompressionBombError is no OSError;
        # corrupt files surface as OSError, SyntaxError, EOFError, struct.error, ...) means
        # this file is bad; the message names it.
        except Exception as e:
            raise BadRecordError(
                f"cannot decode image file {path!r} ({_one_line(e)}); remove or replace it, "
                "or set config.data.on_bad_image='skip'",
                index,
                path,
            ) from e
        return {"image": image, "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"FolderSource({self._split_dir!r}, n={len(self)})"


# --------------------------------------------------------------------------- tfds


class TfdsSource:
    """Wraps a tfds array_record data source and normalises its records.

    Why a wrapper: tfds records carry dataset-specific extra features and
    int64/HxWx1 arrays; the pipeline wants exactly {'image': HxWx3 uint8,
    'label': int}. Batched reads (grain's `_getitems`) are forwarded so array_record
    can read many records per call.
    """

    def __init__(self, data_source: Any, name: str, split: str):
        self._ds = data_source
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self._ds)

    def _normalise(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            image = to_rgb_uint8(np.asarray(record["image"]))
        except ValueError as e:
            where = f"record {index} of tfds {self.name!r} split {self.split!r}"
            raise BadRecordError(
                f"{where} is not an image ({_one_line(e)}); fix the dataset or set "
                "config.data.on_bad_image='skip'",
                index,
                where,
            ) from e
        return {"image": image, "label": int(record["label"])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._normalise(self._ds[index], index)

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """grain's batched-read hook (SupportsBatchedReadRandomAccessDataSource)."""
        getitems = getattr(self._ds, "__getitems__", None)
        records = getitems(list(indices)) if getitems else [self._ds[i] for i in indices]
        return [self._normalise(r, i) for r, i in zip(records, indices, strict=True)]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def _tfds_builder(tfds: Any, name: str, data_dir: str | None, builtin_names: Sequence[str]):
    """tfds's builder for `name`: registered code, or files prepared in `data_dir`."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown dataset name {name!r}: it is neither a built-in name "
            f"({', '.join(builtin_names) or 'none'}) nor a registered tfds dataset; "
            "fix config.data.name"
        ) from e


def tfds_name_known(name: str, *, data_dir: str | None, builtin_names: Sequence[str] = ()) -> None:
    """Raises the DataError :func:`open_tfds_source` would for an unknown `name`, without
    preparing or reading the dataset (for config checks before anything is built)."""
    import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only on use
    from tensorflow_datasets.core import naming

    try:
        parsed, _ = naming.parse_builder_name_kwargs(name)
    except ValueError as e:
        raise DataError(f"{name!r} is not a tfds dataset name ({_one_line(e)}); "
                        "fix config.data.name") from e
    if parsed.namespace:  # community datasets are resolved only when opened
        return
    try:
        tfds.builder_cls(parsed.name)
        return
    except tfds.core.registered.DatasetNotFoundError:
        pass
    _tfds_builder(tfds, name, data_dir, builtin_names)  # prepared files without builder code


def _prepare(tfds: Any, builder: Any, name: str, manual_dir: str | None) -> None:
    """Prepares an unprepared tfds dataset from ``manual_dir`` (this machine has no network)."""
    if manual_dir is None:
        raise DataError(
            f"tfds dataset {name!r} is not prepared at {os.fspath(builder.data_dir)!r} and "
            "this machine cannot download it; prepare it as array_record on a machine "
            f"with network (`tfds build {name} --file_format=array_record "
            "--data_dir=<dir>`) and set config.data.data_dir, or set config.data.manual_dir "
            "to the manually downloaded files"
        )
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record",
        )
    except Exception as e:
        raise DataError(
            f"preparing tfds dataset {name!r} from manual_dir {manual_dir!r} failed "
            f"({type(e).__name__}: {e}); check that manual_dir holds the files the "
            "tfds builder documents"
        ) from e


def open_tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    builtin_names: Sequence[str] = (),
) -> TfdsSource:
    """Open `name`/`split` from a prepared tfds data_dir as an array_record source.

    Why not tf.data: grain needs random access, and array_record gives it
    without TensorFlow in the input path. This machine has no network, so an
    unprepared dataset is prepared only from `manual_dir`; otherwise it is an
    error telling the user how to prepare it.
    """
    import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only on use

    from tokpost_jax import multihost

    builder = _tfds_builder(tfds, name, data_dir, builtin_names)
    # Prepared once, by process 0, while the other hosts wait (data_dir is shared on a pod).
    if not multihost.decided_by_process0(builder.is_prepared):
        multihost.once(lambda: _prepare(tfds, builder, name, manual_dir))
        builder = _tfds_builder(tfds, name, data_dir, builtin_names)  # sees the prepared files

    splits = builder.info.splits
    if split not in splits:
        raise DataError(
            f"tfds dataset {name!r} has no split {split!r}; available splits: "
            f"{sorted(splits.keys())}"
        )
    features = builder.info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise DataError(
            f"tfds dataset {name!r} has no feature(s) {missing}; this pipeline needs "
            f"'image' and 'label' (features: {sorted(features.keys())})"
        )
    try:
        data_source = builder.as_data_source(split=split, file_format="array_record")
    except (NotImplementedError, ValueError) as e:
        raise DataError(
            f"tfds dataset {name!r} at {os.fspath(builder.data_dir)!r} is stored as "
            f"{builder.info.file_format.value} but random access needs array_record; "
            "convert it with `tfds convert_format --dataset_version_dir=<that dir> "
            "--out_file_format=array_record` or re-prepare it with "
            "file_format='array_record'"
        ) from e
    return TfdsSource(data_source, name, split)


# --------------------------------------------------------------------------- bad records

#: Consecutive unreadable records after which skipping gives up: that many in a row means the
#: dataset (or its disk) is broken, not a few stray files.
MAX_CONSECUTIVE_BAD = 1000


class SkipBadRecords:
    """Reads `source`, replacing an unreadable record by the next readable one (``i+1``, ...).

    Why this rule: the substitute is a pure function of the index and of which files are bad,
    so batches (and a resumed run) do not depend on when a bad file was first seen. Each bad
    record is logged once per process; `known_bad` (e.g. from a scan) is skipped unread.
    """

    def __init__(self, source: Any, known_bad: Sequence[int] = ()):
        self._source = source
        self._bad = set(int(i) for i in known_bad)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        n = len(self._source)
        for offset in range(min(n, MAX_CONSECUTIVE_BAD)):
            i = (int(index) + offset) % n
            if i in self._bad:
                continue
            try:
                return self._source[i]
            except BadRecordError as e:
                self._bad.add(i)
                logging.warning("on_bad_image='skip': %s", e)
        raise DataError(
            f"{min(n, MAX_CONSECUTIVE_BAD)} consecutive records from index {index} of "
            f"{self._source!r} are unreadable; the dataset looks broken (check the files)"
        )

    def __repr__(self) -> str:
        return f"SkipBadRecords({self._source!r})"


def scan_records(source: Any, indices: Sequence[int], threads: int) -> list[BadRecordError]:
    """Reads every record in `indices` of `source` (decoding it) and returns the failures.

    Why threads: PIL decodes with the GIL released, so a scan of a large image folder runs
    on every core. Errors other than BadRecordError (a missing package, ...) propagate.
    """
    import concurrent.futures

    def read(i: int) -> BadRecordError | None:
        try:
            source[int(i)]
        except BadRecordError as e:
            return e
        return None

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        return [e for e in pool.map(read, indices) if e is not None]
