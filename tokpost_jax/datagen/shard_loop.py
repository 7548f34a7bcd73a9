"""The one shard-producing device loop: records → jitted batch function on the mesh → shards.

Pretokenization and post-training pairs are the same job with different records: read a global
batch of records (each host its slice, on a prefetch thread), run one jitted function on the mesh,
gather the outputs, put each row at its record position in its shard's buffer, and write the
shard atomically once it is full. Shards already on disk are skipped, so a killed job resumes
where it stopped, and the manifest (metadata) pins everything that determines the bytes, so a
rerun with other settings is refused instead of mixed in.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tokpost_jax import sharding as shd
from tokpost_jax.data import shards as shards_lib
from tokpost_jax.data.shards import FieldSpec, ShardWriter
from tokpost_jax.data.sources import DataError

#: The row field every job's reader and step carry: the record's global position (−1: padding).
POSITION = "position"


@dataclasses.dataclass(frozen=True)
class ShardsResult:
    directory: str
    num_records: int
    num_shards: int
    computed: tuple[int, ...]  # shards this call computed (empty when everything was on disk)


class ShardJob(Protocol):
    """What a job gives the loop."""

    def read(self, lo: int, hi: int, rows: int) -> dict[str, np.ndarray]:
        """Host arrays of records [lo, hi) padded to ``rows`` rows, with ``POSITION``."""

    def step(self, batch: dict[str, jax.Array], start: np.int32) -> dict[str, jax.Array]:
        """Device outputs for a global batch starting at record ``start``: every shard field and
        ``POSITION``."""

    def close(self) -> None:
        """Frees the reader's threads."""


def params_fingerprint(params: Any) -> str:
    """A hash of every parameter's path, dtype, shape and bytes.

    Why: the manifest records it, so resuming with other weights (a later checkpoint, raw
    instead of EMA) is refused instead of silently mixing two models' outputs.
    """
    digest = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, rules: Any) -> None:
    hosts, split = jax.process_count(), shd.batch_split_size(mesh, rules)
    if batch_size < 1 or batch_size % hosts or batch_size % split:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the number of hosts "
            f"({hosts}) and of batch shards ({split})"
        )


def produce_shards(
    directory: str | os.PathLike,
    *,
    num_records: int,
    records_per_shard: int,
    fields: Mapping[str, FieldSpec],
    metadata: Mapping[str, Any],
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    make_job: Callable[[], ShardJob],
    what: str,
    log_every: int = 50,
) -> ShardsResult:
    """Writes the shards of ``directory`` that are not on disk yet; ``make_job`` is called only
    when there is something to compute (it places parameters and compiles)."""
    directory = os.fspath(directory)
    writer, error = None, None
    try:
        writer = ShardWriter(
            directory,
            num_records=num_records,
            records_per_shard=records_per_shard,
            fields=dict(fields),
            metadata=dict(metadata),
            process_index=jax.process_index(),
        )
    except DataError as e:  # raised on every host after the broadcast, so none hangs
        error = e
    num_shards = math.ceil(num_records / records_per_shard)
    todo = shards_lib.missing_everywhere(num_shards, writer, error)
    assert writer is not None  # missing_everywhere raised otherwise
    logging.info(
        "%s: %d records in %d shards → %s: %d shards to compute.",
        what, num_records, num_shards, directory, len(todo),
    )
    if todo:
        job = make_job()
        try:
            _run(job, writer, todo, batch_size, shd.batch_sharding(mesh, rules), what, log_every)
        finally:
            job.close()
    writer.finalize()  # a no-op off process 0
    return ShardsResult(directory, num_records, num_shards, tuple(todo))


def _run(
    job: ShardJob,
    writer: ShardWriter,
    todo: list[int],
    batch_size: int,
    batch_sharding: jax.sharding.NamedSharding,
    what: str,
    log_every: int,
) -> None:
    """Read the next batch while this one runs; gather the previous one; fill and write shards."""
    local = batch_size // jax.process_count()
    host = jax.process_index()
    # (shard, global chunk start, global chunk stop); chunks never straddle shards.
    plan = [
        (s, c, min(c + batch_size, writer.shard_range(s).stop))
        for s in todo
        for c in range(writer.shard_range(s).start, writer.shard_range(s).stop, batch_size)
    ]
    prefetch = concurrent.futures.ThreadPoolExecutor(1)

    def read(k: int) -> concurrent.futures.Future:
        _, c0, c1 = plan[k]
        lo = min(c0 + host * local, c1)
        return prefetch.submit(job.read, lo, min(lo + local, c1), local)

    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}

    def collect(k: int, out: dict[str, jax.Array]) -> None:
        shard = plan[k][0]
        rng = writer.shard_range(shard)
        got = multihost_utils.process_allgather(out, tiled=True)
        position = np.asarray(got[POSITION])
        keep = position >= 0
        if shard not in buffers:
            buffers[shard] = {
                name: np.zeros((len(rng), *spec.shape), spec.dtype)
                for name, spec in writer.fields.items()
            }
            filled[shard] = 0
        rows = position[keep] - rng.start
        for name, buf in buffers[shard].items():
            buf[rows] = np.asarray(got[name])[keep]
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
            out = job.step(shd.host_to_global(local_batch, batch_sharding), np.int32(plan[k][1]))
            if pending is not None:  # gather the previous batch while this one runs
                collect(*pending)
            pending = (k, out)
            done += plan[k][2] - plan[k][1]
            if (k + 1) % log_every == 0:
                logging.info(
                    "%s: %d/%d batches, %.1f records/s.",
                    what, k + 1, len(plan), done / max(time.time() - t0, 1e-9),
                )
        if pending is not None:
            collect(*pending)
    finally:
        prefetch.shutdown(wait=False, cancel_futures=True)
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} were not filled completely")
