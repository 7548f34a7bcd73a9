"""Config → deterministic, per-host-sharded, resumable grain pipelines.

Train: source → shuffle → repeat (reshuffled every epoch) → random_map
(crop/flip, grain's per-record rng) → batch of ``config.batch_size / hosts`` →
this host's batches ``[process_index::process_count]`` → to_iter_dataset
(thread prefetch) → optional mp_prefetch.

Why hosts take every P-th *batch* of one global stream: global batch k is then records
``[k·B, (k+1)·B)`` of a stream that does not depend on the number of hosts, and host h holds
its contiguous slice h, which is where the batch sharding puts host h's devices. So a run on
2 hosts × 4 devices sees exactly the batches of a run on 1 host × 8 devices, and a checkpoint
resumes on any host count. Eval does the same with the split in its stored order.

Shards (``data.name == "shards"``, arrays written by e.g. tokpost_jax.cli.pretokenize) are already
final views: they skip the augmentation, and only their uint8 image fields
(``data.image_fields``) are converted to float per batch; other fields pass through.

Everything up to the batch is a grain ``MapDataset``, so batch ``k`` is a pure
function of (config, seed, host, k): the iterator state is just a batch
counter (plus what fixes the stream, so a foreign state is refused), resuming
is exact, and the batches do not depend on `prefetch_threads` or
`worker_count` (each grain worker produces whole batches). Batching before
`to_iter_dataset` is deliberate: with per-element batching after
`mp_prefetch` the batch composition would depend on the number of workers.

Unreadable images (decoded sources: image folders, tfds): ``data.scan='full'``
reads every record of this host's share before the first batch and reports
all bad ones at once; ``data.on_bad_image='skip'`` replaces a bad record by
the next readable one (deterministic, so resume stays exact). Absent keys
mean the defaults ('none', 'error').
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from tokpost_jax import files
from tokpost_jax.data.builtin import (
    BUILTIN_NAMES,
    PhotoTrainSource,
    builtin_source,
    random_photo_patch,
)
from tokpost_jax.data.jsonl_tokens import JsonlTokenSource, jsonl_path
from tokpost_jax.data.preprocess import (
    center_crop,
    maybe_flip,
    random_crop,
    to_float,
    to_rgb_uint8,
)
from tokpost_jax.data.shards import ShardSource
from tokpost_jax.data.sources import (
    BadRecordError,
    DataError,
    FolderSource,
    SkipBadRecords,
    TfdsSource,
    folder_class_names,
    open_tfds_source,
    scan_records,
    tfds_name_known,
)

__all__ = [
    "DATASET_KINDS_TEXT",
    "FOLDER_NAME",
    "JSONL_NAME",
    "ON_BAD_IMAGE",
    "SCAN_MODES",
    "SHARDS_NAME",
    "AddMask",
    "DataError",
    "EvalTransform",
    "FloatFields",
    "TrainIterator",
    "TrainTransform",
    "check_data_state",
    "dataset_kind",
    "eval_batches",
    "make_source",
    "make_train_iterator",
    "num_examples",
]

SHARDS_NAME = "shards"
FOLDER_NAME = "folder"
JSONL_NAME = "jsonl"  # RAR / RobusTok pretokenized .jsonl (data/jsonl_tokens.py)
SCAN_MODES = ("none", "full")  # config.data.scan
ON_BAD_IMAGE = ("error", "skip")  # config.data.on_bad_image
DATASET_KINDS_TEXT = (
    f"a built-in name ({', '.join(BUILTIN_NAMES)}), {FOLDER_NAME!r}, {SHARDS_NAME!r}, "
    f"{JSONL_NAME!r} or a tfds dataset name (registered, or prepared in config.data.data_dir)"
)
#: Sources whose records are decoded from stored images (what scan / on_bad_image act on).
_DECODED_SOURCES = (FolderSource, TfdsSource)
#: Sources of final views (stored arrays): no augmentation, image fields only converted.
_FINAL_SOURCES = (ShardSource, JsonlTokenSource)
#: Bad records found by data.scan='full', per (source, indices): eval scans once per process.
_SCANS: dict[tuple[str, int, int, int], tuple[BadRecordError, ...]] = {}
_DEFAULT_IMAGE_FIELDS = ("image",)

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


# --------------------------------------------------------------------------- helpers


def dataset_kind(name: str, data_dir: str | None = None) -> str:
    """How :func:`make_source` opens `name`: 'builtin', 'shards', 'folder', 'jsonl' or 'tfds'.

    Raises the DataError make_source would raise for a name it cannot open; reads no records
    (tfds: the builder registry, or the prepared files' metadata in `data_dir`). Why: config
    checks reject a mistyped name before minutes of model building.
    """
    if name in BUILTIN_NAMES:
        return "builtin"
    if name in (SHARDS_NAME, FOLDER_NAME, JSONL_NAME):
        return name
    tfds_name_known(name, data_dir=data_dir, builtin_names=(*BUILTIN_NAMES, FOLDER_NAME,
                                                            SHARDS_NAME, JSONL_NAME))
    return "tfds"


def make_source(data_cfg: Any, split: str):
    """The random-access source (``__len__``/``__getitem__``) of one split.

    Why public: tests and tools inspect raw records; the pipeline uses it too.
    """
    name = data_cfg.name
    if name in BUILTIN_NAMES:
        return builtin_source(name, split)
    if name == SHARDS_NAME:
        if data_cfg.data_dir is None:
            raise DataError(
                "config.data.data_dir must be set to the directory holding <split>/manifest.json "
                "for name='shards' (the --out of python -m tokpost_jax.cli.pretokenize)"
            )
        return ShardSource(files.join(data_cfg.data_dir, split))
    if name == JSONL_NAME:
        if data_cfg.data_dir is None:
            raise DataError(
                "config.data.data_dir must name the pretokenized .jsonl file (or a directory "
                "holding <split>.jsonl) for name='jsonl'"
            )
        return JsonlTokenSource(jsonl_path(data_cfg.data_dir, split))
    if name == FOLDER_NAME:
        classes = folder_class_names(data_cfg.data_dir, data_cfg.train_split)
        return FolderSource(data_cfg.data_dir, split, classes)
    return open_tfds_source(
        name,
        split,
        data_dir=data_cfg.data_dir,
        manual_dir=data_cfg.manual_dir,
        builtin_names=(*BUILTIN_NAMES, FOLDER_NAME, SHARDS_NAME, JSONL_NAME),
    )


def _derive_seed(seed: int, stream: int) -> int:
    """A uint32 seed per (user seed, purpose).

    Why: shuffle seeds of nearby user seeds must not coincide (grain reseeds epochs with
    seed + epoch, so seed=0 epoch 1 would equal seed=1 epoch 0). The middle 0 was the host index
    when each host had its own stream; it stays so that one-host streams are unchanged.
    """
    return int(np.random.SeedSequence([seed, 0, stream]).generate_state(1)[0])


def _check_args(data_cfg: Any, host_batch_size: int, process_index: int, process_count: int):
    if not isinstance(data_cfg.image_size, int) or data_cfg.image_size < 1:
        raise DataError(
            f"config.data.image_size must be a positive int, got {data_cfg.image_size!r}"
        )
    if host_batch_size < 1:
        raise DataError(f"host_batch_size must be >= 1, got {host_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    if data_cfg.worker_count < 0 or data_cfg.prefetch_threads < 0:
        raise DataError(
            "config.data.worker_count and config.data.prefetch_threads must be >= 0, got "
            f"{data_cfg.worker_count} and {data_cfg.prefetch_threads}"
        )
    for key, allowed, default in (("scan", SCAN_MODES, "none"),
                                  ("on_bad_image", ON_BAD_IMAGE, "error")):
        value = data_cfg.get(key, default)
        if value not in allowed:
            raise DataError(f"config.data.{key} must be one of {allowed}, got {value!r}")


def _scan(source: Any, indices: range, data_cfg: Any) -> tuple[BadRecordError, ...]:
    """data.scan='full': every record of `indices` read once per process; each failure logged."""
    key = (repr(source), indices.start, indices.stop, indices.step)
    if key not in _SCANS:
        t0 = time.time()
        logging.info("config.data.scan='full': reading %d records of %r.", len(indices), source)
        bad = tuple(scan_records(source, indices, threads=os.cpu_count() or 1))
        for e in bad:
            logging.error("config.data.scan='full': %s", e)
        logging.info("Scan done in %.0fs: %d unreadable.", time.time() - t0, len(bad))
        _SCANS[key] = bad
    return _SCANS[key]


_LISTED = 20  # bad records named in a scan's error message (all are logged)


def _guard_bad_records(data_cfg: Any, source: Any, indices: range) -> Any:
    """`source` after the opt-in scan, wrapped to skip bad records under on_bad_image='skip'."""
    if not isinstance(source, _DECODED_SOURCES):
        return source  # arrays already (built-ins, shards): nothing is decoded
    policy = data_cfg.get("on_bad_image", "error")
    known_bad: tuple[int, ...] = ()
    if data_cfg.get("scan", "none") == "full":
        bad = _scan(source, indices, data_cfg)
        if bad and policy == "error":
            named = "; ".join(e.where for e in bad[:_LISTED])
            more = f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
            raise DataError(
                f"config.data.scan='full' found {len(bad)} unreadable of {len(indices)} records "
                f"of {source!r}: {named}{more} (each is logged with its reason); remove or "
                "replace them, or set config.data.on_bad_image='skip'"
            )
        known_bad = tuple(e.index for e in bad)
    return SkipBadRecords(source, known_bad) if policy == "skip" else source


def _to_iter(ds: grain.MapDataset, data_cfg: Any) -> grain.IterDataset:
    """Thread prefetch of whole batches, plus worker processes when asked."""
    threads = int(data_cfg.prefetch_threads)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads))
    it_ds = ds.to_iter_dataset(read_options)
    if data_cfg.worker_count > 0:
        # grain 0.2.18's mp_prefetch reads an absl flag (worker profiling) and
        # fails with UnparsedFlagAccessError unless flags were parsed, i.e. when
        # not running under absl.app (pytest, notebooks). Parsed flags are left
        # alone; otherwise grain's flags take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_cfg.worker_count))
        )
    return it_ds


def _float_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 → float32 [-1, 1] once per batch: one vectorised op instead of one per record."""
    out = dict(batch)
    out["image"] = to_float(batch["image"])
    return out


class FloatFields(grain.transforms.Map):
    """Converts the named uint8 image fields of a batch to float32 [-1, 1]; others pass through.

    Why a class: it must pickle into grain workers, and shard datasets name their own fields
    (e.g. 'image' and 'generated' for post-training pairs).
    """

    def __init__(self, fields: Sequence[str]):
        self.fields = tuple(fields)

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        for name in self.fields:
            out[name] = to_float(batch[name])
        return out


class AddMask(grain.transforms.Map):
    """Marks a record as real (eval padding rows get mask False)."""

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return {**element, "mask": np.bool_(True)}


def _shard_image_fields(
    data_cfg: Any, source: ShardSource | JsonlTokenSource
) -> tuple[str, ...]:
    """The fields of `source` named in ``config.data.image_fields``, checked to be [S, S, 3] uint8.

    Names absent from the shards are skipped, so the default ('image',) also suits token shards.
    """
    names = data_cfg.get("image_fields", _DEFAULT_IMAGE_FIELDS)
    if names is None:
        names = ()
    if isinstance(names, str):
        names = (names,)
    size = data_cfg.image_size
    found = []
    for name in names:
        spec = source.fields.get(name)
        if spec is None:
            continue
        if spec.dtype != np.uint8 or spec.shape != (size, size, 3):
            raise DataError(
                f"shard field {name!r} in {source.directory!r} is {spec.dtype} {spec.shape}, but "
                f"config.data.image_fields lists it as a uint8 ({size}, {size}, 3) image "
                "(config.data.image_size); fix image_fields or image_size"
            )
        found.append(name)
    return tuple(found)


def _shard_eval_spec(
    source: ShardSource | JsonlTokenSource, image_fields: Sequence[str]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-record (shape, dtype) of every field of an eval batch after float conversion."""
    spec = {
        name: (f.shape, np.dtype(np.float32) if name in image_fields else f.dtype)
        for name, f in source.fields.items()
    }
    spec["mask"] = ((), np.dtype(np.bool_))
    return spec


# --------------------------------------------------------------------------- transforms


class TrainTransform(grain.transforms.RandomMap):
    """Per-record train augmentation driven by grain's per-record rng.

    Why a class: it must pickle into spawned grain workers. Order of random
    draws: [photo patch] → crop scale → crop position → flip coin.
    """

    def __init__(
        self,
        image_size: int,
        min_crop_frac: float,
        max_crop_frac: float,
        random_flip: bool,
        photo_patch: bool = False,
    ):
        self.image_size = image_size
        self.min_crop_frac = float(min_crop_frac)
        self.max_crop_frac = float(max_crop_frac)
        self.random_flip = bool(random_flip)
        self.photo_patch = photo_patch

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.photo_patch:
            element = random_photo_patch(element, rng)
        img = to_rgb_uint8(element["image"])
        img = random_crop(img, self.image_size, rng, self.min_crop_frac, self.max_crop_frac)
        img = maybe_flip(img, rng, self.random_flip)
        return {"image": img, "label": np.int32(element["label"])}


class EvalTransform(grain.transforms.Map):
    """Deterministic eval view: ADM center crop; `mask` marks real records."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        img = center_crop(to_rgb_uint8(element["image"]), self.image_size)
        return {"image": img, "label": np.int32(element["label"]), "mask": np.bool_(True)}


# --------------------------------------------------------------------------- train iterator

#: What fixes the global batch stream besides the batch counter, with where it comes from. The
#: host count is not one of them: every host count reads the same global batches.
_STREAM_KEYS = {
    "num_records": "records in the train split",
    "batch_size": "config.batch_size (all hosts)",
    "seed": "config.seed",
}
#: Keys of states written when each host had its own stream; such a state replays the same
#: batches only if it came from one host (process_count 1).
_HOST_STREAM_KEYS = ("host_batch_size", "process_index", "process_count")


def check_data_state(
    state: Any, stream: Mapping[str, int], *, step: int | None = None
) -> int:
    """The batch index to resume at from a restored iterator `state`; a DataError names what
    does not fit this run's `stream` (see :data:`_STREAM_KEYS`) or checkpoint `step`.

    States from before the stream keys existed (``{"next_index": k}``) are checked for shape and
    `step` only. The loop draws one batch per step, so a state restored with the checkpoint of
    step s must be at batch s.
    """
    index = state.get("next_index") if isinstance(state, Mapping) else None
    if not isinstance(index, int | np.integer) or isinstance(index, bool) or index < 0:
        raise DataError(
            f"restored data-iterator state {state!r} is not this pipeline's: it needs "
            "'next_index' (an int >= 0, the batches already drawn)"
        )
    unknown = sorted(set(state) - {"next_index", *_STREAM_KEYS, *_HOST_STREAM_KEYS})
    if unknown:
        raise DataError(
            f"restored data-iterator state has unknown keys {unknown} (a state of another "
            "pipeline, or of grain worker processes before tokpost kept its own); start a new "
            "workdir"
        )
    if state.get("process_count", 1) != 1:
        raise DataError(
            f"restored data-iterator state comes from a {state['process_count']}-host run whose "
            "hosts each had their own stream (before this version), so it would not replay the "
            "same batches; use a new workdir"
        )
    if "host_batch_size" in state:  # one-host state of that version: its batch is the global one
        state = {**state, "batch_size": state["host_batch_size"]}
    for key, value in stream.items():
        if key in state and state[key] != value:
            raise DataError(
                f"restored data-iterator state has {key}={state[key]!r} but this run has "
                f"{value!r} ({_STREAM_KEYS[key]}), so it would not replay the same batches; "
                "resume with the data and config that wrote the checkpoint, or use a new workdir"
            )
    if step is not None and int(index) != int(step):
        raise DataError(
            f"restored data-iterator state is at batch {int(index)} but its checkpoint is at "
            f"step {int(step)}; the loop draws one batch per step, so the data state does not "
            "belong to this checkpoint"
        )
    return int(index)


class TrainIterator:
    """This host's infinite train batches, resumable from a JSON state.

    The state is the number of batches drawn plus the stream keys (records, global batch size,
    seed), the same on every host; :meth:`set_state` validates it (:func:`check_data_state`)
    and restarts the grain pipeline at that batch, so it does not depend on prefetch threads or
    worker processes.
    """

    def __init__(self, batches: grain.MapDataset, data_cfg: Any, stream: Mapping[str, int]):
        self._batches = batches
        self._data_cfg = data_cfg
        self.stream = dict(stream)
        self._next = 0
        self._it: Any = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:  # started lazily: set_state must not spawn workers twice
            ds = self._batches[self._next :] if self._next else self._batches
            self._it = iter(_to_iter(ds, self._data_cfg))
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next, **self.stream}

    def set_state(self, state: Mapping[str, Any], step: int | None = None) -> None:
        """Resume at ``state``; with `step` (the restored checkpoint's), also check it matches."""
        index = check_data_state(state, self.stream, step=step)
        self.close()
        self._next = index

    def close(self) -> None:
        """Stops prefetch threads / worker processes (a later next() starts them again)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


# --------------------------------------------------------------------------- public API


def num_examples(data_cfg: Any, split: str) -> int:
    """Number of records in the whole split (all hosts; ignores num_eval_examples).

    For 'photos' the train split is virtual (fixed length, PHOTO_TRAIN_LENGTH).
    """
    return len(make_source(data_cfg, split))


def make_train_iterator(
    data_cfg: Any,
    *,
    seed: int,
    host_batch_size: int,
    process_index: int,
    process_count: int,
) -> TrainIterator:
    """Infinite iterator of this host's train batches: its slice of each global batch.

    Yields {'image': float32 [host_batch_size, S, S, 3] in [-1, 1],
    'label': int32 [host_batch_size]}; for shards, every stored field with a
    leading batch axis (image fields as float32 [-1, 1]). Each epoch of the
    split is reshuffled deterministically from `seed`; a batch may straddle an epoch
    boundary (no record is dropped). ``it.get_state()`` is JSON-serialisable
    and ``set_state`` on a fresh iterator built with the same arguments
    resumes bit-exactly (and refuses a state of another stream).
    """
    _check_args(data_cfg, host_batch_size, process_index, process_count)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative int, got {seed!r}")
    source = make_source(data_cfg, data_cfg.train_split)
    records = _guard_bad_records(
        data_cfg, source, range(process_index, len(source), process_count)
    )
    ds = grain.MapDataset.source(records)
    stream = {
        "num_records": len(ds),
        "batch_size": int(host_batch_size) * int(process_count),
        "seed": int(seed),
    }
    if len(ds) == 0:
        raise DataError(f"train split {data_cfg.train_split!r} of {data_cfg.name!r} is empty")
    ds = ds.shuffle(seed=_derive_seed(int(seed), _SHUFFLE_STREAM)).repeat(None)

    def host_batches(records: grain.MapDataset) -> grain.MapDataset:
        return records.batch(host_batch_size, drop_remainder=True)[process_index::process_count]

    if isinstance(source, _FINAL_SOURCES):  # final views already: no augmentation
        fields = _shard_image_fields(data_cfg, source)
        ds = host_batches(ds).map(FloatFields(fields))
        return TrainIterator(ds, data_cfg, stream)
    transform = TrainTransform(
        data_cfg.image_size,
        data_cfg.min_crop_frac,
        data_cfg.max_crop_frac,
        data_cfg.random_flip,
        photo_patch=isinstance(source, PhotoTrainSource),
    )
    if not 0.0 < transform.min_crop_frac <= transform.max_crop_frac <= 1.0:
        raise DataError(
            "need 0 < config.data.min_crop_frac <= config.data.max_crop_frac <= 1, got "
            f"{transform.min_crop_frac} and {transform.max_crop_frac}"
        )
    # repeat(None) above is infinite; the shuffle reseeds itself every epoch.
    ds = host_batches(
        ds.random_map(transform, seed=_derive_seed(int(seed), _AUGMENT_STREAM))
    ).map(_float_batch)
    return TrainIterator(ds, data_cfg, stream)


def eval_batches(
    data_cfg: Any, *, host_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of the eval split, in a fixed order, padded.

    The eval set is the first `num_eval_examples` records of the split (all
    if None), in global batches of B = b · process_count records; host h gets
    records [k·B + h·b, k·B + (h+1)·b) of batch k. Yields
    {'image' float32 [b,S,S,3], 'label' int32 [b], 'mask' bool [b]} with
    b = host_batch_size; padding rows are zeros with mask False. Every host
    yields ceil(N / B) batches (all-padding where its slice of the last one is
    empty), so multi-host jitted eval never hangs, and the gathered global
    batches are those of a one-host run.
    Shards yield every stored field (image fields as float32) plus 'mask',
    padded the same way.
    """
    _check_args(data_cfg, host_batch_size, process_index, process_count)
    source = make_source(data_cfg, data_cfg.eval_split)
    ds = grain.MapDataset.source(source)
    limit = data_cfg.num_eval_examples
    if limit is not None:
        if not 0 < limit <= len(ds):
            raise DataError(
                f"config.data.num_eval_examples={limit} but eval split {data_cfg.eval_split!r} "
                f"of {data_cfg.name!r} has {len(ds)} records; use 1..{len(ds)} or None"
            )
        ds = ds[:limit]
    total = len(ds)
    ds = grain.MapDataset.source(
        _guard_bad_records(data_cfg, source, range(process_index, total, process_count))
    )[:total]
    num_batches = math.ceil(total / (host_batch_size * process_count))
    share = ds
    if isinstance(source, _FINAL_SOURCES):
        fields = _shard_image_fields(data_cfg, source)
        spec = _shard_eval_spec(source, fields)
        records, to_float_map = share.map(AddMask()), FloatFields(fields)
    else:
        size = data_cfg.image_size
        spec = {
            "image": ((size, size, 3), np.dtype(np.float32)),
            "label": ((), np.dtype(np.int32)),
            "mask": ((), np.dtype(np.bool_)),
        }
        records, to_float_map = share.map(EvalTransform(size)), _float_batch
    batches = records.batch(host_batch_size, drop_remainder=False)[process_index::process_count]
    return _padded_eval(data_cfg, batches, to_float_map, spec, host_batch_size, num_batches)


def _padded_eval(
    data_cfg: Any,
    batches: grain.MapDataset,
    to_float_map: Any,
    spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    batch_size: int,
    num_batches: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Zero-pads a short batch of `batches` and appends all-padding batches (per `spec`)."""

    def zeros(n: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((n, *shape), dtype) for k, (shape, dtype) in spec.items()}

    emitted = 0
    if len(batches) > 0:
        ds = batches.map(to_float_map)
        it = iter(_to_iter(ds, data_cfg))
        try:
            for batch in it:
                n = len(batch["mask"])
                if n < batch_size:
                    pad = zeros(batch_size - n)
                    batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
                emitted += 1
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
    for _ in range(num_batches - emitted):
        yield zeros(batch_size)
