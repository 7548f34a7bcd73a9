r"""Encode a dataset split into token indices on disk, for the generator (robustok.md §8 "Data").

COMMAND:
  python -m tokpost_jax.pretokenize --config=configs/tokenizer.py:demo \
      --workdir=runs/tokenizer_demo --out=runs/tokens_demo --split=train --mode=center_flip

Writes shards of ``{'tokens': int32 [num_latent_tokens] (raster order), 'label': int32}`` to
``<out>/<split>``; read them back with ``--config.data.name=shards --config.data.data_dir=<out>``.
Tokens come from the tokenizer's EMA parameters (``--params_key``), through the index path
(``Tokenizer.encode``: nearest code), not continuous features (the upstream script's bug).

Modes (views per source image, in this order; record ``r`` is view ``r % V`` of image ``r // V``):
  center       the ADM center crop (V = 1).
  center_flip  the center crop, then its horizontal mirror (V = 2).
  ten_crop     LlamaGen/RAR: ADM center crop to round(1.1·S), then the four corners and the center
               of size S, then the same five crops of the mirrored image (V = 10, torchvision's
               TenCrop order).

A killed run resumes: rerunning the same command computes only the shards not yet on disk, and a
rerun with other settings (mode, tokenizer parameters, dataset, ...) into the same directory is an
error instead of a mix.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from tokpost_jax import sharding as shd
from tokpost_jax.data import pipeline
from tokpost_jax.data import shards as shards_lib
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import FieldSpec, ShardWriter
from tokpost_jax.data.sources import DataError

__all__ = [
    "DEFAULT_RECORDS_PER_SHARD",
    "MODES",
    "PretokenizeResult",
    "crop_views",
    "params_fingerprint",
    "pretokenize",
]

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


def params_fingerprint(params: Any) -> str:
    """A hash of every parameter's path, dtype, shape and bytes.

    Why: the manifest records it, so resuming with other tokenizer weights (a later checkpoint,
    raw instead of EMA) is refused instead of silently mixing two tokenizers' indices.
    """
    digest = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class PretokenizeResult:
    directory: str  # <out_dir>/<split>
    num_records: int
    num_shards: int
    computed: tuple[int, ...]  # shards this call computed (empty when everything was on disk)


class _RecordReader:
    """Host-side records (views × labels) of a source, decoded on a thread pool.

    Why threads: PIL decoding and resizing release the GIL, and the device should not wait for
    one core to crop ImageNet.
    """

    def __init__(self, source: Any, size: int, mode: str, num_threads: int):
        self.source = source
        self.size = size
        self.mode = mode
        self.views = MODES[mode]
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))

    def _image(self, index: int) -> tuple[list[np.ndarray], int]:
        record = self.source[index]
        return crop_views(record["image"], self.size, self.mode), int(record["label"])

    def read(self, lo: int, hi: int, rows: int) -> dict[str, np.ndarray]:
        """Records [lo, hi) padded with zeros (index -1) to `rows` rows."""
        images = np.zeros((rows, self.size, self.size, 3), np.uint8)
        labels = np.zeros((rows,), np.int32)
        index = np.full((rows,), -1, np.int32)
        if hi > lo:
            first = lo // self.views
            decoded = self.pool.map(self._image, range(first, (hi - 1) // self.views + 1))
            r = first * self.views
            for views, label in decoded:
                for view in views:
                    if lo <= r < hi:
                        images[r - lo], labels[r - lo], index[r - lo] = view, label, r
                    r += 1
        # float here, on the prefetch thread, with the pipeline's exact conversion
        return {"image": to_float(images), "label": labels, "index": index}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def device_params(model: nn.Module, params: Any, size: int, mesh: Any, rules: Any) -> Any:
    """Host tokenizer params placed with the training shardings (FSDP stays FSDP)."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    return shd.place_host_params(
        params, abstract, mesh, rules,
        "tokenizer parameters do not match config.model (wrong config for this checkpoint?)",
    )


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
) -> PretokenizeResult:
    """Encodes ``tokenizer_config.data``'s `split` into shards under ``<out_dir>/<split>``.

    `params` are host (numpy) tokenizer parameters, e.g. ``checkpoint.load_params(...,
    key="ema_params")``; `batch_size` is global (a multiple of the hosts and of the batch shards
    of `mesh`); each host decodes its slice of every batch. Only shards missing on disk are
    computed; `metadata` (checkpoint step, ...) is recorded in the manifest and must match on
    resume.
    """
    # On use: tokpost_jax.train pulls in clu (and so TensorFlow) and the GAN/LPIPS code.
    from tokpost_jax.train.tokenizer import build_tokenizer

    if mode not in MODES:
        raise ValueError(f"unknown pretokenize mode {mode!r}; choose one of {sorted(MODES)}")
    rules = shd.rules_tuple(rules)
    hosts = jax.process_count()
    split_size = shd.batch_split_size(mesh, rules)
    if batch_size < 1 or batch_size % hosts or batch_size % split_size:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the number of hosts "
            f"({hosts}) and of batch shards ({split_size})"
        )
    cfg = tokenizer_config
    size = int(cfg.data.image_size)
    model = build_tokenizer(cfg)
    source = pipeline.make_source(cfg.data, split)
    views = MODES[mode]
    num_records = len(source) * views
    if num_records >= 2**31:
        raise ValueError(f"{num_records} records do not fit int32 record indices")
    directory = os.path.join(os.fspath(out_dir), split)
    fingerprint = params_fingerprint(shd.strip_boxes(params))
    manifest_meta = {
        "producer": "tokpost_jax.pretokenize (rerun the same command to finish or regenerate)",
        "dataset": cfg.data.name,
        "split": split,
        "mode": mode,
        "views_per_image": views,
        "num_images": len(source),
        "image_size": size,
        "num_latent_tokens": int(cfg.model.num_latent_tokens),
        "codebook_size": int(cfg.model.codebook_size),
        "params_fingerprint": fingerprint,
        **dict(metadata or {}),
    }
    fields = {
        "tokens": FieldSpec(np.dtype(np.int32), (int(cfg.model.num_latent_tokens),)),
        "label": FieldSpec(np.dtype(np.int32), ()),
    }
    writer, error = None, None
    try:
        writer = ShardWriter(
            directory,
            num_records=num_records,
            records_per_shard=records_per_shard,
            fields=fields,
            metadata=manifest_meta,
            process_index=jax.process_index(),
        )
    except DataError as e:  # raised on every host after the broadcast, so none hangs
        error = e
    num_shards = math.ceil(num_records / records_per_shard)
    todo = shards_lib.missing_everywhere(num_shards, writer, error)
    assert writer is not None  # missing_everywhere raised otherwise
    logging.info(
        "Pretokenize %s/%s (%s, %d records in %d shards) → %s: %d shards to compute.",
        cfg.data.name,
        split,
        mode,
        num_records,
        num_shards,
        directory,
        len(todo),
    )
    if todo:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _encode_shards(
                model,
                params,
                writer,
                todo,
                source,
                size,
                mode,
                batch_size,
                mesh,
                rules,
                num_threads,
            )
    writer.finalize()  # a no-op off process 0
    return PretokenizeResult(directory, num_records, num_shards, tuple(todo))


def _encode_shards(
    model: nn.Module,
    params: Any,
    writer: ShardWriter,
    todo: list[int],
    source: Any,
    size: int,
    mode: str,
    batch_size: int,
    mesh: Any,
    rules: Any,
    num_threads: int,
) -> None:
    """The device loop: read the next batch while this one encodes, gather, fill, write shards."""
    batch_sharding = shd.batch_sharding(mesh, rules)
    placed = device_params(model, params, size, mesh, rules)

    def encode(p: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        tokens = model.apply({"params": p}, batch["image"], method="encode")
        return {
            "tokens": tokens.astype(jnp.int32),
            "label": batch["label"],
            "index": batch["index"],
        }

    encode_fn = jax.jit(encode, out_shardings=batch_sharding)
    local = batch_size // jax.process_count()
    host = jax.process_index()
    # (shard, global chunk start, global chunk stop); chunks never straddle shards.
    plan = [
        (s, c, min(c + batch_size, writer.shard_range(s).stop))
        for s in todo
        for c in range(writer.shard_range(s).start, writer.shard_range(s).stop, batch_size)
    ]
    reader = _RecordReader(source, size, mode, num_threads)
    prefetch = concurrent.futures.ThreadPoolExecutor(1)

    def read(k: int) -> concurrent.futures.Future:
        _, c0, c1 = plan[k]
        lo = min(c0 + host * local, c1)
        return prefetch.submit(reader.read, lo, min(lo + local, c1), local)

    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}

    def collect(k: int, out: dict[str, jax.Array]) -> None:
        shard = plan[k][0]
        rng = writer.shard_range(shard)
        got = multihost_utils.process_allgather(out, tiled=True)
        index = np.asarray(got["index"])
        keep = index >= 0
        if shard not in buffers:
            buffers[shard] = {
                "tokens": np.zeros((len(rng), model.num_latent_tokens), np.int32),
                "label": np.zeros((len(rng),), np.int32),
            }
            filled[shard] = 0
        rows = index[keep] - rng.start
        buffers[shard]["tokens"][rows] = np.asarray(got["tokens"])[keep]
        buffers[shard]["label"][rows] = np.asarray(got["label"])[keep]
        filled[shard] += int(keep.sum())
        if filled[shard] == len(rng):
            writer.write_shard(shard, buffers.pop(shard))
        elif filled[shard] > len(rng):
            raise RuntimeError(f"shard {shard}: {filled[shard]} records for {len(rng)} rows")

    t0, done = time.time(), 0
    try:
        pending: tuple[int, dict[str, jax.Array]] | None = None
        next_batch = read(0)
        for k in range(len(plan)):
            local_batch = next_batch.result()
            if k + 1 < len(plan):
                next_batch = read(k + 1)
            out = encode_fn(placed, shd.host_to_global(local_batch, batch_sharding))
            if pending is not None:  # gather the previous batch while this one runs
                collect(*pending)
            pending = (k, out)
            done += plan[k][2] - plan[k][1]
            if (k + 1) % 50 == 0:
                logging.info(
                    "Pretokenize: %d/%d batches, %.1f records/s.",
                    k + 1,
                    len(plan),
                    done / max(time.time() - t0, 1e-9),
                )
        if pending is not None:
            collect(*pending)
    finally:
        prefetch.shutdown(wait=False, cancel_futures=True)
        reader.close()
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} were not filled completely")


# --------------------------------------------------------------------------- CLI


def _define_flags() -> dict[str, Any]:
    """Flags are defined only when run as a script, so importing this module (tests, the trainer)
    never collides with tokpost_jax.main's --config/--workdir."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config",
            None,
            "Tokenizer config file, e.g. configs/tokenizer.py:demo",
            lock_config=True,
        ),
        "workdir": flags.DEFINE_string("workdir", None, "The tokenizer's training run directory."),
        "out": flags.DEFINE_string("out", None, "Output root; shards go to <out>/<split>."),
        "split": flags.DEFINE_string("split", "train", "Dataset split to encode."),
        "mode": flags.DEFINE_enum("mode", "center_flip", sorted(MODES), "Views per image."),
        "batch_size": flags.DEFINE_integer(
            "batch_size", None, "Global batch (default: the config's eval_batch_size)."
        ),
        "records_per_shard": flags.DEFINE_integer(
            "records_per_shard", DEFAULT_RECORDS_PER_SHARD, "Records per shard file."
        ),
        "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest)."),
        "params_key": flags.DEFINE_string(
            "params_key", "ema_params", "Which parameters to encode with."
        ),
        "threads": flags.DEFINE_integer("threads", 8, "Image decoding threads per host."),
    }


def _latest_step(checkpoints: str) -> int | None:
    """Highest finished step (Orbax names step directories by their number), for the manifest."""
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
    return max(steps) if steps else None


def _main(fl: dict[str, Any]) -> None:
    if os.environ.get("TOKPOST_DISTRIBUTED"):  # as in tokpost_jax.main
        jax.distributed.initialize()
    from tokpost_jax import checkpoint as ckpt_lib

    config = fl["config"].value
    workdir, out = fl["workdir"].value, fl["out"].value
    checkpoints = os.path.join(workdir, "checkpoints")
    step = fl["step"].value if fl["step"].value is not None else _latest_step(checkpoints)
    try:
        params = ckpt_lib.load_params(checkpoints, key=fl["params_key"].value, step=step)
        result = pretokenize(
            config,
            params,
            out,
            split=fl["split"].value,
            mode=fl["mode"].value,
            batch_size=fl["batch_size"].value or config.eval_batch_size,
            mesh=shd.make_mesh(config.mesh),
            rules=config.sharding_rules,
            records_per_shard=fl["records_per_shard"].value,
            metadata={
                "tokenizer_workdir": os.path.abspath(workdir),
                "checkpoint_step": step,
                "params_key": fl["params_key"].value,
            },
            num_threads=fl["threads"].value,
        )
    except (DataError, ckpt_lib.CheckpointError, ValueError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(
            f"Done: {result.num_records} records in {result.num_shards} shards at "
            f"{result.directory} ({len(result.computed)} computed now). Train on them with "
            f"--config.data.name=shards --config.data.data_dir={out}"
        )


if __name__ == "__main__":
    _FLAGS = _define_flags()
    flags.mark_flags_as_required(["config", "workdir", "out"])
    app.run(lambda argv: _main(_FLAGS))
