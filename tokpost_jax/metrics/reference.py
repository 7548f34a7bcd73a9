"""Reference and sample sets as ADM-format ``.npz`` files, and reference statistics of a split.

ADM (guided-diffusion) reference batches hold ``arr_0`` (uint8 NHWC images) and the Inception
statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s``; a samples file holds ``arr_0``. Ours add
``pool_features`` (precision/recall without re-running the images) and ``count``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np

from tokpost_jax import data as data_lib
from tokpost_jax import files
from tokpost_jax import sharding as shd
from tokpost_jax.metrics import fid
from tokpost_jax.metrics.features import Activations, InceptionExtractor, gather, quantize_uint8
from tokpost_jax.metrics.progress import Progress
from tokpost_jax.models.inception import POOL_DIM, SPATIAL_DIM


class ReferenceError(ValueError):
    """An ``.npz`` that is not a usable ADM reference or samples batch."""


#: Everything ``np.load`` and member reads raise on truncated, corrupt or pickled npz files.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
_STAT_KEYS = frozenset({"mu", "sigma", "mu_s", "sigma_s", "pool_features", "count"})


def _read_npz(path: str, keys: set[str] | frozenset[str]) -> tuple[list[str], dict[str, Any]]:
    """``(all keys, {k: array for k in keys present})``; any read failure is a ReferenceError.

    Why read eagerly: a truncated member only fails when it is decompressed, and that must give
    the same one-line error as a truncated directory.
    """
    try:
        with files.open_read(path) as f:  # a local file or a gs:// object
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ReferenceError(f"{path} is a single .npy array, not an .npz archive")
            with z:
                names = list(z.files)
                return names, {k: z[k] for k in names if k in keys}
    except _NPZ_ERRORS as e:
        if isinstance(e, ReferenceError):
            raise
        raise ReferenceError(f"{path} is not a readable .npz: {type(e).__name__}: {e}") from e


def _check_images(path: str, images: np.ndarray, min_images: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ReferenceError(
            f"{path}: arr_0 must be uint8 [N, H, W, 3] (ADM layout), got {images.dtype} "
            f"{images.shape}"
        )
    if images.shape[0] < min_images or 0 in images.shape:
        raise ReferenceError(
            f"{path}: arr_0 holds {images.shape[0]} image(s) of {images.shape[1:3]}; FID needs at "
            f"least {min_images} (a covariance)"
        )
    return images


def load_images_npz(path: str | os.PathLike, min_images: int = 2) -> np.ndarray:
    """``arr_0`` of an ADM samples/reference file, checked to be uint8 [N, H, W, 3], N >= 2."""
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(f"no samples file at {path}")
    names, arrays = _read_npz(path, {"arr_0"})
    if "arr_0" not in arrays:
        raise ReferenceError(
            f"{path} has no 'arr_0' (keys: {names}); an ADM samples batch stores uint8 "
            "NHWC images as arr_0, e.g. np.savez(path, images)"
        )
    return _check_images(path, arrays["arr_0"], min_images)


def _stored_stats(path: str, stored: dict[str, Any], prefix: str, dim: int) -> fid.FeatureStats:
    """``mu{prefix}``/``sigma{prefix}`` as stats, checked against the Inception feature size."""
    mu_key, sigma_key = f"mu{prefix}", f"sigma{prefix}"
    mu = np.asarray(stored[mu_key])
    if mu.ndim != 1 or mu.shape[0] != dim:
        raise ReferenceError(
            f"{path}: {mu_key} has shape {mu.shape}; the FID Inception gives {dim}-d features"
        )
    count = stored.get("count")
    if count is not None:
        if np.ndim(count) != 0 or not np.issubdtype(np.asarray(count).dtype, np.integer):
            raise ReferenceError(f"{path}: count must be an integer scalar, got {count!r}")
        count = int(count)
    try:
        return fid.FeatureStats.from_moments(
            mu, stored[sigma_key], count, names=(mu_key, sigma_key)
        )
    except fid.StatisticsError as e:
        raise ReferenceError(f"{path}: {e}") from e


def read_reference(path: str | os.PathLike, extractor: InceptionExtractor) -> Activations:
    """Reference activations as ADM's evaluator builds them.

    Statistics come from ``mu``/``sigma`` (``mu_s``/``sigma_s``) when stored, else from the
    images; precision/recall rows from ``pool_features`` when stored, else from ``arr_0``. The
    images are run through the network only when something is missing. Every stored array is
    checked (finite, Inception-sized, ``sigma`` a covariance) before any image is run, so a bad
    file fails in one line within seconds.
    """
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(f"no reference file at {path}")
    names, stored = _read_npz(path, _STAT_KEYS)
    keys = set(names)
    acts = Activations(pool_rows=None, logits=None, spatial=None)
    if {"mu", "sigma"} <= keys:
        acts.pool = _stored_stats(path, stored, "", POOL_DIM)
        if {"mu_s", "sigma_s"} <= keys:
            acts.spatial = _stored_stats(path, stored, "_s", SPATIAL_DIM)
    if "pool_features" in stored:
        rows = np.asarray(stored["pool_features"])
        if rows.ndim != 2 or rows.shape[1] != POOL_DIM or not np.issubdtype(rows.dtype, np.number):
            raise ReferenceError(
                f"{path}: pool_features is {rows.dtype} {rows.shape}, expected [N, {POOL_DIM}] "
                "floats"
            )
        try:
            fid.check_finite(rows, "pool_features")
        except fid.StatisticsError as e:
            raise ReferenceError(f"{path}: {e}") from e
        acts.pool_rows = [rows.astype(np.float32)]
    complete = {"mu", "sigma", "mu_s", "sigma_s", "pool_features"} <= keys
    if "arr_0" in keys and not complete:
        computed = extractor.from_arrays(load_images_npz(path))
        if {"mu", "sigma"} <= keys:  # stored statistics win, as in ADM's evaluator
            computed.pool, computed.spatial = acts.pool, acts.spatial
        return computed  # precision/recall rows from the images themselves, as ADM
    if not {"mu", "sigma"} <= keys:
        raise ReferenceError(
            f"{path} has neither images (arr_0) nor statistics (mu, sigma); keys: {sorted(keys)}"
        )
    return acts


def split_config(
    data_cfg: ml_collections.ConfigDict, split: str, num_images: int | None
) -> ml_collections.ConfigDict:
    """A copy of ``data_cfg`` whose eval set is the first ``num_images`` of ``split``."""
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.eval_split = split
    cfg.num_eval_examples = num_images
    return cfg


def split_size(data_cfg: ml_collections.ConfigDict) -> int:
    """How many images an eval pass over ``data_cfg`` sees: ``num_eval_examples``, else the whole
    ``eval_split`` (for progress totals; the pass itself checks the count)."""
    if data_cfg.num_eval_examples is not None:
        return int(data_cfg.num_eval_examples)
    return len(data_lib.make_source(data_cfg, data_cfg.eval_split))


def global_eval_batches(data_cfg: Any, batch_size: int, mesh: Any, rules: Any):
    """The eval split as global batches ``{'image', 'label', 'mask'}`` sharded over the mesh."""
    sharding = shd.batch_sharding(mesh, rules)
    for local in data_lib.eval_batches(
        data_cfg,
        host_batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        yield shd.host_to_global(local, sharding)


def split_reference(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    extractor: InceptionExtractor,
    *,
    num_images: int | None = None,
    keep_images: bool = False,
) -> tuple[Activations, np.ndarray | None]:
    """Activations of a dataset split (ADM center crop), plus its uint8 images if asked."""
    cfg = split_config(data_cfg, split, num_images)
    acts = extractor.new_activations(keep_rows=True)
    kept: list[np.ndarray] = []
    quantize = jax.jit(quantize_uint8, out_shardings=extractor.batch_sharding)
    progress = Progress(f"reference {data_cfg.name}:{split}", split_size(cfg))
    for batch in global_eval_batches(cfg, extractor.batch_size, extractor.mesh, extractor.rules):
        images = quantize(batch["image"])
        mask = gather(batch["mask"])
        extractor.add_batch(images, mask, acts)
        progress.update(int(mask.sum()))
        if keep_images:
            kept.append(gather(images)[mask])
    progress.finish()
    return acts, (np.concatenate(kept) if keep_images else None)
