"""Paired post-training data: real images and teacher-forced generator samples (robustok.md §9.1).

For each image of a seeded random subset of a split: encode its ADM center crop to ground-truth
indices g (the tokenizer layout's flat order), draw a per-token Bernoulli(σ) mask m, run the RAR
sampler with the true label and CFG settings while forcing token j to g_j wherever m_j (the forced
tokens are the prefix both CFG branches see), decode the result and quantize it to uint8 as saved
samples are. σ = 1 is plain reconstruction (bit-exact), σ = 0 free class-conditional generation.

Records (one per subset image), in shards under ``<out_dir>/train`` whatever the source split,
because post-training reads the pairs as its train split (``data.name="shards"``,
``data.data_dir=<out_dir>``, ``data.image_fields=("image", "generated")``):

  generated      uint8 [S, S, 3]  the decoded teacher-forced sample (the decoder's input side)
  image          uint8 [S, S, 3]  the real ADM center crop (the target)
  label          int32            its class id, the label the sampler was given
  index          int64            the image's index in the source split (pairing and provenance)
  teacher_mask   bool  [L]        m: True where the ground-truth token was kept (layout order)

Determinism: the subset is ``numpy.random.default_rng(seed).choice(len(split), num_images,
replace=False)``, stored in ascending source index (sorted: sequential reads from the source);
an image's mask depends only on (seed, its source index), so not on the batch size, the device
count or restarts; the sampler's rng is one per global batch, ``fold_in(seed, first record of
the batch)``, since :func:`tokpost_jax.sampling.sample` draws a batch from one key. Batches never
straddle shards, so a resumed run recomputes exactly what a fresh one would; the global batch
size is pinned in the manifest for that reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tokpost_jax import files
from tokpost_jax import sharding as shd
from tokpost_jax.data import pipeline
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import FieldSpec
from tokpost_jax.data.sources import DataError
from tokpost_jax.datagen.shard_loop import (
    POSITION,
    ShardsResult,
    check_batch_size,
    params_fingerprint,
    produce_shards,
)
from tokpost_jax.datagen.tokens import device_params
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build
from tokpost_jax.models.generator import RAR
from tokpost_jax.sampling import sample

# ~400 MB per shard at 256x256 (two uint8 images per record): a kill loses at most one shard.
DEFAULT_RECORDS_PER_SHARD = 1024
OUTPUT_SPLIT = "train"  # post-training trains on the pairs, whatever split they came from

# fold_in streams of the user seed: the masks and the sampler must never share random bits.
_MASK_STREAM = 0
_SAMPLE_STREAM = 1

_SAMPLING_REQUIRED = ("guidance", "power", "temperature")
_SAMPLING_DEFAULTS = {"top_k": 0, "top_p": 1.0}


def choose_subset(num_source: int, num_images: int, seed: int) -> np.ndarray:
    """Sorted int64 source indices of the subset: `num_images` drawn without replacement.

    Why public: tests and analyses recompute which images a pair set holds from its manifest.
    """
    if not 1 <= num_images <= num_source:
        raise ValueError(f"num_images={num_images} must be in [1, {num_source}] (the split size)")
    chosen = np.random.default_rng(seed).choice(num_source, size=num_images, replace=False)
    return np.sort(chosen).astype(np.int64)


def row_keys(seed: int, stream: int, indices: jax.Array) -> jax.Array:
    """[B] keys, row b from (seed, ``stream``, ``indices[b]``) alone.

    Why per row: a batch-wide draw would change an image's random bits with the batch size or
    its position in a batch; negative indices (padding rows) are treated as 0.
    """
    base = jax.random.fold_in(jax.random.key(seed), stream)
    rows = jnp.maximum(jnp.asarray(indices, jnp.int32), 0)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(rows)


def teacher_mask(seed: int, indices: jax.Array, sigma: float, num_tokens: int) -> jax.Array:
    """[B, num_tokens] bool Bernoulli(σ) masks, row b from (seed, ``indices[b]``) alone."""
    keys = row_keys(seed, _MASK_STREAM, indices)
    return jax.vmap(lambda k: jax.random.bernoulli(k, sigma, (num_tokens,)))(keys)


def _sampling_settings(sampling: Any) -> dict[str, Any]:
    """The sampler's CFG settings as plain numbers: JSON for the manifest, static for jit."""
    raw = sampling.to_dict() if hasattr(sampling, "to_dict") else dict(sampling)
    unknown = sorted(set(raw) - set(_SAMPLING_REQUIRED) - set(_SAMPLING_DEFAULTS))
    missing = [k for k in _SAMPLING_REQUIRED if k not in raw]
    if unknown or missing:
        raise ValueError(
            f"sampling needs {list(_SAMPLING_REQUIRED)} (optional {sorted(_SAMPLING_DEFAULTS)}); "
            f"missing {missing}, unknown {unknown}"
        )
    out = {**_SAMPLING_DEFAULTS, **raw}
    settings = {k: float(out[k]) for k in (*_SAMPLING_REQUIRED, "top_p")}
    settings["top_k"] = int(out["top_k"])
    return settings


def subset_fingerprint(chosen: np.ndarray) -> str:
    """Hash of the subset, so a numpy whose ``choice`` draws differently is refused on resume."""
    return hashlib.blake2b(chosen.astype("<i8").tobytes(), digest_size=16).hexdigest()


def _generator_variables(model: RAR, variables: Any, mesh: Any, rules: Any) -> Any:
    """Host generator variables placed with their training shardings; shape-checked first."""
    n = model.num_tokens
    abstract = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, n), jnp.int32),
        jnp.zeros((1,), jnp.int32),
        jnp.arange(n, dtype=jnp.int32)[None],
    )
    return shd.place_host_params(
        dict(variables), abstract, mesh, rules,
        "generator variables do not match the RAR module (they must be {'params': ...} of this "
        "size)",
    )


class SubsetReader:
    """A job's reader of the subset: record ``position`` is image ``chosen[position]`` of
    `source`, its ADM center crop (uint8) and label (checked against ``num_classes``). Crops are
    decoded on a thread pool. Shared by the AR pairs and the SDEdit pairs (datagen/sdedit_pairs)."""

    def __init__(
        self, source: Any, chosen: np.ndarray, size: int, num_classes: int, num_threads: int
    ):
        self.source, self.chosen, self.size = source, chosen, size
        self.num_classes = num_classes
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))

    def _record(self, position: int) -> tuple[np.ndarray, int]:
        index = int(self.chosen[position])
        record = self.source[index]
        label = int(record["label"])
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"image {index} has label {label}, outside the generator's classes "
                f"[0, {self.num_classes})"
            )
        return center_crop(record["image"], self.size), label

    def read(self, lo: int, hi: int, rows: int) -> dict[str, np.ndarray]:
        """Records [lo, hi) padded with zeros (position and index -1) to `rows` rows."""
        images = np.zeros((rows, self.size, self.size, 3), np.uint8)
        labels = np.zeros((rows,), np.int32)
        position = np.full((rows,), -1, np.int32)
        index = np.full((rows,), -1, np.int32)
        for r, (crop, label) in enumerate(self.pool.map(self._record, range(lo, hi))):
            images[r], labels[r] = crop, label
        position[: hi - lo] = np.arange(lo, hi)
        index[: hi - lo] = self.chosen[lo:hi]
        # The float view is converted here with the pipeline's exact to_float; the uint8 crop
        # travels through the device too, so process 0 can store every host's real images.
        return {
            "pixels": to_float(images),
            "image": images,
            "label": labels,
            "index": index,
            POSITION: position,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _PairJob(SubsetReader):
    """Records are subset images (real crop + label); the step encodes, samples with teacher
    forcing and decodes."""

    def __init__(
        self, tokenizer, tok_params, generator, gen_vars, source, chosen, size, sigma, seed,
        settings, forced, mesh, rules, num_threads,
    ):
        super().__init__(source, chosen, size, generator.num_classes, num_threads)
        self._tok = device_params(tokenizer, tok_params, size, mesh, rules)
        self._gen = _generator_variables(generator, gen_vars, mesh, rules)

        def step(tok_params: Any, gen_vars: Any, batch: dict, start: jax.Array) -> dict:
            variables = {"params": tok_params}
            truth = tokenizer.apply(variables, batch["pixels"], method="encode").astype(jnp.int32)
            mask = teacher_mask(seed, batch["index"], sigma, truth.shape[1]) | forced[None]
            rng = jax.random.fold_in(
                jax.random.fold_in(jax.random.key(seed), _SAMPLE_STREAM), start
            )
            tokens = sample(
                generator, gen_vars, batch["label"], rng, **settings,
                teacher_tokens=truth, teacher_mask=mask,
            )
            images = tokenizer.apply(variables, tokens, method="decode")
            return {
                "generated": quantize_uint8(images),
                "image": batch["image"],
                "label": batch["label"],
                "index": batch["index"],
                POSITION: batch[POSITION],
                "teacher_mask": mask,
            }

        self._step = jax.jit(step, out_shardings=shd.batch_sharding(mesh, rules))

    def step(self, batch: dict[str, jax.Array], start: np.int32) -> dict[str, jax.Array]:
        return self._step(self._tok, self._gen, batch, start)


def generate_pairs(
    tokenizer_config: ml_collections.ConfigDict,
    tokenizer_params: Any,
    generator: RAR,
    generator_variables: Any,
    out_dir: str | os.PathLike,
    *,
    split: str,
    num_images: int,
    sigma: float,
    seed: int,
    sampling: Mapping[str, Any],
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    metadata: Mapping[str, Any] | None = None,
    num_threads: int = 8,
    gt_max_side: int = 0,
) -> ShardsResult:
    """Writes `num_images` (generated, real) pairs of ``tokenizer_config.data``'s `split`.

    Output goes to ``<out_dir>/train`` regardless of `split` (post-training's train split; the
    source split is in the manifest). `tokenizer_params` are host tokenizer parameters (e.g. the
    EMA ones), `generator_variables` the RAR's ``{"params": ...}``; `sampling` holds guidance,
    power, temperature and optionally top_k / top_p. `batch_size` is global (a multiple of the
    hosts and of the batch shards of `mesh`). Only shards missing on disk are computed; σ, seed,
    the subset, the sampling settings, the batch size and fingerprints of both parameter trees
    are pinned in the manifest, with `metadata`, so a rerun with other settings is refused.
    `gt_max_side` > 0 always keeps the ground truth at the layout's scales of at most that side
    (a multi-scale tokenizer's coarsest tokens cover the whole image).
    """
    if not 0.0 <= float(sigma) <= 1.0:
        raise ValueError(f"sigma={sigma} must be in [0, 1] (the fraction of kept GT tokens)")
    if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    settings = _sampling_settings(sampling)
    rules = shd.rules_tuple(rules)
    check_batch_size(batch_size, mesh, rules)
    cfg = tokenizer_config
    size = int(cfg.data.image_size)
    tokenizer = build.tokenizer(cfg)
    num_tokens, codebook = tokenizer.layout.num_tokens, int(tokenizer.codebook_size)
    if generator.num_tokens != num_tokens or generator.codebook_size != codebook:
        raise ValueError(
            f"the generator models {generator.num_tokens} tokens of a {generator.codebook_size}-"
            f"code book, the tokenizer makes {num_tokens} of {codebook}"
        )
    source = pipeline.make_source(cfg.data, split)
    if len(source) >= 2**31:
        raise ValueError(f"{len(source)} source images do not fit int32 indices")
    chosen = choose_subset(len(source), int(num_images), int(seed))
    manifest_meta = {
        "producer": "tokpost_jax.cli.pairs (rerun the same command to finish it)",
        "dataset": cfg.data.name,
        "source_split": split,
        "source_size": len(source),
        "num_images": int(num_images),
        "seed": int(seed),
        "subset_fingerprint": subset_fingerprint(chosen),
        "sigma": float(sigma),
        "sampling": settings,
        "batch_size": int(batch_size),  # the sampler's rng is per global batch
        "image_size": size,
        "layout": tokenizer.layout.to_json(),
        "num_tokens": num_tokens,
        "codebook_size": codebook,
        "tokenizer_dtype": str(jnp.dtype(cfg.dtype)),
        "generator_dtype": str(jnp.dtype(generator.dtype)),
        "tokenizer_params_fingerprint": params_fingerprint(shd.strip_boxes(tokenizer_params)),
        "generator_params_fingerprint": params_fingerprint(shd.strip_boxes(generator_variables)),
        "gt_max_side": int(gt_max_side),
        **dict(metadata or {}),
    }
    layout = tokenizer.layout
    forced = np.asarray(layout.scales)[layout.scale_of_token()] <= int(gt_max_side)
    fields = {
        "generated": FieldSpec(np.dtype(np.uint8), (size, size, 3)),
        "image": FieldSpec(np.dtype(np.uint8), (size, size, 3)),
        "label": FieldSpec(np.dtype(np.int32), ()),
        "index": FieldSpec(np.dtype(np.int64), ()),
        "teacher_mask": FieldSpec(np.dtype(np.bool_), (num_tokens,)),
    }
    logging.info("Pairs at σ=%g from %d of %d images.", sigma, len(chosen), len(source))

    def make_job() -> _PairJob:
        return _PairJob(
            tokenizer, tokenizer_params, generator, generator_variables, source, chosen, size,
            float(sigma), int(seed), settings, jnp.asarray(forced), mesh, rules, num_threads,
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return produce_shards(
            files.join(out_dir, OUTPUT_SPLIT),
            num_records=len(chosen), records_per_shard=records_per_shard, fields=fields,
            metadata=manifest_meta, batch_size=batch_size, mesh=mesh, rules=rules,
            make_job=make_job, what=f"Pairs {cfg.data.name}/{split}", log_every=10,
        )
