"""Reference and sample sets as ADM-format ``.npz`` files, and reference statistics of a split.

ADM (guided-diffusion) reference batches hold ``arr_0`` (uint8 NHWC images) and the Inception
statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s``; a samples file holds ``arr_0``. Ours add
``pool_features`` (precision/recall without re-running the images) and ``count``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from tokpost_jax import data as data_lib
from tokpost_jax import sharding as shd
from tokpost_jax.metrics import fid
from tokpost_jax.metrics.features import Activations, InceptionExtractor, gather, quantize_uint8


class ReferenceError(ValueError):
    """An ``.npz`` that is not a usable ADM reference or samples batch."""


def load_images_npz(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an ADM samples/reference file, checked to be uint8 [N, H, W, 3]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no samples file at {path}")
    try:
        with np.load(path) as z:
            if "arr_0" not in z.files:
                raise ReferenceError(
                    f"{path} has no 'arr_0' (keys: {z.files}); an ADM samples batch stores uint8 "
                    "NHWC images as arr_0, e.g. np.savez(path, images)"
                )
            images = z["arr_0"]
    except (OSError, ValueError) as e:
        if isinstance(e, ReferenceError):
            raise
        raise ReferenceError(f"{path} is not a readable .npz: {e}") from e
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ReferenceError(
            f"{path}: arr_0 must be uint8 [N, H, W, 3] (ADM layout), got {images.dtype} "
            f"{images.shape}"
        )
    return images


def read_reference(path: str | os.PathLike, extractor: InceptionExtractor) -> Activations:
    """Reference activations as ADM's evaluator builds them.

    Statistics come from ``mu``/``sigma`` (``mu_s``/``sigma_s``) when stored, else from the
    images; precision/recall rows from ``pool_features`` when stored, else from ``arr_0``. The
    images are run through the network only when something is missing.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no reference file at {path}")
    with np.load(path) as z:
        keys = set(z.files)
        stored = {k: z[k] for k in keys & {"mu", "sigma", "mu_s", "sigma_s", "pool_features"}}
        count = int(z["count"]) if "count" in keys else None
    complete = {"mu", "sigma", "mu_s", "sigma_s", "pool_features"} <= keys
    if "arr_0" in keys and not complete:
        acts = extractor.from_arrays(load_images_npz(path))
    elif {"mu", "sigma"} <= keys:
        acts = Activations(pool_rows=None, logits=None, spatial=None)
    else:
        raise ReferenceError(
            f"{path} has neither images (arr_0) nor statistics (mu, sigma); keys: {sorted(keys)}"
        )
    if {"mu", "sigma"} <= keys:
        acts.pool = fid.FeatureStats.from_moments(stored["mu"], stored["sigma"], count)
        acts.spatial = None
        if {"mu_s", "sigma_s"} <= keys:
            acts.spatial = fid.FeatureStats.from_moments(stored["mu_s"], stored["sigma_s"], count)
    if "pool_features" in stored and not acts.pool_rows:
        acts.pool_rows = [np.asarray(stored["pool_features"], np.float32)]
    return acts


def split_config(
    data_cfg: ml_collections.ConfigDict, split: str, num_images: int | None
) -> ml_collections.ConfigDict:
    """A copy of ``data_cfg`` whose eval set is the first ``num_images`` of ``split``."""
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.eval_split = split
    cfg.num_eval_examples = num_images
    return cfg


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
    for batch in global_eval_batches(cfg, extractor.batch_size, extractor.mesh, extractor.rules):
        images = quantize(batch["image"])
        mask = gather(batch["mask"])
        extractor.add_batch(images, mask, acts)
        if keep_images:
            kept.append(gather(images)[mask])
    return acts, (np.concatenate(kept) if keep_images else None)
