"""Encode a dataset split into token indices on disk, for the generator (robustok.md §8 "Data").

Writes shards of ``{'tokens': int32 [L] (the tokenizer layout's flat order), 'label': int32}`` to
``<out>/<split>``; read them back with ``data.name="shards"``. Tokens come from the tokenizer's
``encode`` (the index path: nearest code for the ViT tokenizer, the residual pyramid for CODA),
never continuous features (the upstream script's bug).

Modes (views per source image, in this order; record ``r`` is view ``r % V`` of image ``r // V``):
  center       the ADM center crop (V = 1).
  center_flip  the center crop, then its horizontal mirror (V = 2).
  ten_crop     LlamaGen/RAR: ADM center crop to round(1.1·S), then the four corners and the center
               of size S, then the same five crops of the mirrored image (V = 10, torchvision's
               TenCrop order).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokpost_jax import files
from tokpost_jax import sharding as shd
from tokpost_jax.data import pipeline
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import FieldSpec
from tokpost_jax.datagen.shard_loop import (
    POSITION,
    ShardsResult,
    check_batch_size,
    params_fingerprint,
    produce_shards,
)
from tokpost_jax.models import build

# mode → views per source image
MODES: dict[str, int] = {"center": 1, "center_flip": 2, "ten_crop": 10}
DEFAULT_RECORDS_PER_SHARD = 8192  # ~8 MiB of tokens at 256 per record; a multiple of most batches
TEN_CROP_SCALE = 1.1


def _five_crops(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right, center (torchvision's FiveCrop order)."""
    h, w = image.shape[:2]
    top, left = round((h - size) / 2), round((w - size) / 2)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [np.ascontiguousarray(image[y : y + size, x : x + size]) for y, x in corners]


def crop_views(image: np.ndarray, size: int, mode: str) -> list[np.ndarray]:
    """The uint8 [size, size, 3] views of one source image that `mode` stores, in record order."""
    if mode == "center":
        return [center_crop(image, size)]
    if mode == "center_flip":
        crop = center_crop(image, size)
        return [crop, np.ascontiguousarray(crop[:, ::-1])]
    if mode == "ten_crop":
        big = center_crop(image, round(TEN_CROP_SCALE * size))
        return _five_crops(big, size) + _five_crops(np.ascontiguousarray(big[:, ::-1]), size)
    raise ValueError(f"unknown pretokenize mode {mode!r}; choose one of {sorted(MODES)}")


def device_params(model: nn.Module, params: Any, size: int, mesh: Any, rules: Any) -> Any:
    """Host tokenizer params placed with the training shardings (FSDP stays FSDP)."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    return shd.place_host_params(
        params, abstract, mesh, rules,
        "tokenizer parameters do not match config.model (wrong config for this checkpoint?)",
    )


class _EncodeJob:
    """Records are (view, label) pairs; the step encodes them. PIL decoding and resizing release
    the GIL, so views are decoded on a thread pool and the device never waits for one core."""

    def __init__(self, model, params, source, size, mode, mesh, rules, num_threads):
        self.source, self.size, self.mode = source, size, mode
        self.views = MODES[mode]
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
        placed = device_params(model, params, size, mesh, rules)

        def encode(p: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            tokens = model.apply({"params": p}, batch["image"], method="encode")
            return {
                "tokens": tokens.astype(jnp.int32),
                "label": batch["label"],
                POSITION: batch[POSITION],
            }

        self._placed = placed
        self._encode = jax.jit(encode, out_shardings=shd.batch_sharding(mesh, rules))

    def step(self, batch: dict[str, jax.Array], start: np.int32) -> dict[str, jax.Array]:
        del start  # the tokens of a record do not depend on its batch
        return self._encode(self._placed, batch)

    def _image(self, index: int) -> tuple[list[np.ndarray], int]:
        record = self.source[index]
        return crop_views(record["image"], self.size, self.mode), int(record["label"])

    def read(self, lo: int, hi: int, rows: int) -> dict[str, np.ndarray]:
        images = np.zeros((rows, self.size, self.size, 3), np.uint8)
        labels = np.zeros((rows,), np.int32)
        position = np.full((rows,), -1, np.int32)
        if hi > lo:
            first = lo // self.views
            decoded = self.pool.map(self._image, range(first, (hi - 1) // self.views + 1))
            r = first * self.views
            for views, label in decoded:
                for view in views:
                    if lo <= r < hi:
                        images[r - lo], labels[r - lo], position[r - lo] = view, label, r
                    r += 1
        # float here, on the prefetch thread, with the pipeline's exact conversion
        return {"image": to_float(images), "label": labels, POSITION: position}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def pretokenize(
    tokenizer_config: ml_collections.ConfigDict,
    params: Any,
    out_dir: str | os.PathLike,
    *,
    split: str,
    mode: str,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    metadata: Mapping[str, Any] | None = None,
    num_threads: int = 8,
) -> ShardsResult:
    """Encodes ``tokenizer_config.data``'s `split` into shards under ``<out_dir>/<split>``.

    `params` are host (numpy) tokenizer parameters, e.g. ``checkpoint.load_params(...,
    key="ema_params")``; `batch_size` is global (a multiple of the hosts and of the batch shards
    of `mesh`); each host decodes its slice of every batch. Only shards missing on disk are
    computed; `metadata` (checkpoint step, ...) is recorded in the manifest and must match on
    resume.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pretokenize mode {mode!r}; choose one of {sorted(MODES)}")
    rules = shd.rules_tuple(rules)
    check_batch_size(batch_size, mesh, rules)
    cfg = tokenizer_config
    size = int(cfg.data.image_size)
    model = build.tokenizer(cfg)
    layout = model.layout
    source = pipeline.make_source(cfg.data, split)
    views = MODES[mode]
    num_records = len(source) * views
    if num_records >= 2**31:
        raise ValueError(f"{num_records} records do not fit int32 record indices")
    manifest_meta = {
        "producer": "tokpost_jax.cli.pretokenize (rerun the same command to finish or regenerate)",
        "dataset": cfg.data.name,
        "split": split,
        "mode": mode,
        "views_per_image": views,
        "num_images": len(source),
        "image_size": size,
        "layout": layout.to_json(),
        "num_tokens": layout.num_tokens,
        "codebook_size": int(model.codebook_size),
        "params_fingerprint": params_fingerprint(shd.strip_boxes(params)),
        **dict(metadata or {}),
    }
    fields = {
        "tokens": FieldSpec(np.dtype(np.int32), (layout.num_tokens,)),
        "label": FieldSpec(np.dtype(np.int32), ()),
    }

    def make_job() -> _EncodeJob:
        return _EncodeJob(model, params, source, size, mode, mesh, rules, num_threads)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return produce_shards(
            files.join(out_dir, split),
            num_records=num_records, records_per_shard=records_per_shard, fields=fields,
            metadata=manifest_meta, batch_size=batch_size, mesh=mesh, rules=rules,
            make_job=make_job, what=f"Pretokenize {cfg.data.name}/{split} ({mode})",
        )
