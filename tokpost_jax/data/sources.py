"""Random-access record sources: an image folder tree and tfds (array_record).

Sources are thin grain-compatible objects (`__len__` + `__getitem__`) that
return ``{'image': uint8 HxWx3, 'label': int}``; all randomness, ordering and
sharding live in the grain pipeline (pipeline.py). They are picklable so grain
can ship them to spawned worker processes. tensorflow_datasets is imported
lazily because importing it pulls in TensorFlow (seconds, and per worker).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tokpost_jax.data.preprocess import to_rgb_uint8

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "FolderSource",
    "TfdsSource",
    "folder_class_names",
    "open_tfds_source",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(Exception):
    """A data problem the user must fix (missing files, unprepared dataset, ...).

    Why a dedicated type: the trainer reports these as one actionable sentence
    instead of a deep traceback from PIL/tfds/grain internals.
    """


# --------------------------------------------------------------------------- folder


def _split_dir(root: str | os.PathLike, split: str) -> str:
    if root is None:
        raise DataError(
            "config.data.data_dir must be set to the image-folder root for name='folder'"
        )
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image-folder root {root!r} does not exist; set config.data.data_dir")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"split directory {split_dir!r} does not exist; expected "
            f"<data_dir>/<split>/<class_name>/<image files>"
        )
    return split_dir


def folder_class_names(root: str | os.PathLike, split: str) -> list[str]:
    """Sorted class sub-directory names of ``root/split`` (label id = position).

    Why separate: the pipeline takes the class list from the *train* split and
    reuses it for eval so label ids agree even if eval lacks some classes.
    """
    split_dir = _split_dir(root, split)
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not names:
        raise DataError(f"split directory {split_dir!r} has no class sub-directories")
    return names


class FolderSource:
    """``root/split/<class>/<image>`` tree (ImageNet layout), decoded with PIL on access.

    Files are sorted per class and classes alphabetically, so the record order
    is a pure function of the directory contents. Paths are kept in a numpy
    bytes array (compact to pickle to workers even for 1.28M ImageNet files).
    """

    def __init__(
        self, root: str | os.PathLike, split: str, class_names: Sequence[str] | None = None
    ):
        split_dir = _split_dir(root, split)
        present = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
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
            class_dir = os.path.join(split_dir, name)
            if not os.path.isdir(class_dir):
                continue
            files = sorted(
                e.name
                for e in os.scandir(class_dir)
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
            rel_paths.extend(os.path.join(name, f).encode("utf-8") for f in files)
            labels.extend([label] * len(files))
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
        return os.path.join(self._split_dir, self._rel_paths[index].decode("utf-8"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.path(index)
        try:
            with Image.open(path) as pil:
                pil.load()
                image = to_rgb_uint8(pil)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(
                f"cannot decode image file {path!r} ({type(e).__name__}: {e}); remove or replace it"
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

    @staticmethod
    def _normalise(record: dict[str, Any]) -> dict[str, Any]:
        return {"image": to_rgb_uint8(np.asarray(record["image"])), "label": int(record["label"])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._normalise(self._ds[index])

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """grain's batched-read hook (SupportsBatchedReadRandomAccessDataSource)."""
        getitems = getattr(self._ds, "__getitems__", None)
        records = getitems(list(indices)) if getitems else [self._ds[i] for i in indices]
        return [self._normalise(r) for r in records]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


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

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown dataset name {name!r}: it is neither a built-in name "
            f"({', '.join(builtin_names) or 'none'}) nor a registered tfds dataset; "
            "fix config.data.name"
        ) from e

    if not builder.is_prepared():
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
