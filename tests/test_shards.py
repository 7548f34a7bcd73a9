"""Tests for tokpost_jax.data.shards and the 'shards' source of the grain pipeline.

Shard datasets are small synthetic arrays written to tmp dirs: the point is the storage contract
(round trip, atomic resumable writes, refusing mixed data, clear errors) and that the pipeline
reads them deterministically and resumably.
"""

from __future__ import annotations

import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from tokpost_jax.data import DataError, eval_batches, make_source, make_train_iterator, num_examples
from tokpost_jax.data.preprocess import to_float
from tokpost_jax.data.shards import (
    COMPLETE_NAME,
    MANIFEST_NAME,
    FieldSpec,
    ShardSource,
    ShardWriter,
    shard_name,
    write_shards,
)

SIZE = 4
FIELDS = {
    "tokens": (np.int32, (5,)),
    "label": (np.int32, ()),
    "id": (np.int32, ()),
    "image": (np.uint8, (SIZE, SIZE, 3)),
    "generated": (np.uint8, (SIZE, SIZE, 3)),
    "score": (np.float16, (2,)),
}


def records(rng: range, salt: int = 0) -> dict[str, np.ndarray]:
    """Deterministic content of records `rng`: every field is a function of the record index."""
    idx = np.arange(rng.start, rng.stop)
    pix = (idx[:, None, None, None] * 7 + np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3)) % 256
    return {
        "tokens": (idx[:, None] * 10 + np.arange(5) + salt).astype(np.int64),  # cast on write
        "label": idx % 3,
        "id": idx,
        "image": pix.astype(np.uint8),
        "generated": (255 - pix).astype(np.uint8),
        "score": np.stack([idx / 2, -idx], axis=1).astype(np.float16),
    }


def make_writer(directory, num_records=23, per_shard=5, metadata=None, fields=FIELDS, **kw):
    return ShardWriter(
        directory,
        num_records=num_records,
        records_per_shard=per_shard,
        fields=fields,
        metadata={"mode": "test", "sigma": 0.7} if metadata is None else metadata,
        **kw,
    )


def write_full(directory, num_records=23, per_shard=5) -> ShardWriter:
    writer = make_writer(directory, num_records, per_shard)
    write_shards(writer, records)
    return writer


def read_all(directory) -> dict[str, np.ndarray]:
    src = ShardSource(directory)
    recs = [src[i] for i in range(len(src))]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


def assert_same_dataset(a, b) -> None:
    x, y = read_all(a), read_all(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype
        np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------- storage


def test_round_trip_fields_dtypes_and_layout(tmp_path):
    d = tmp_path / "ds"
    writer = write_full(d)
    assert writer.num_shards == 5 and len(writer.shard_range(4)) == 3  # short last shard
    names = sorted(os.listdir(d))
    assert names == sorted([MANIFEST_NAME, COMPLETE_NAME] + [shard_name(i, 5) for i in range(5)])
    manifest = json.loads((d / MANIFEST_NAME).read_text())
    assert manifest["num_records"] == 23 and manifest["records_per_shard"] == 5
    assert manifest["metadata"] == {"mode": "test", "sigma": 0.7}
    assert manifest["fields"]["image"]["shape"] == [SIZE, SIZE, 3]

    src = ShardSource(d)
    assert len(src) == 23 and src.metadata["sigma"] == 0.7
    assert src.fields["tokens"] == FieldSpec(np.dtype(np.int32), (5,))
    want = records(range(23))
    for i in (0, 4, 5, 17, 22):
        rec = src[i]
        assert rec.keys() == want.keys()
        for k, spec in FIELDS.items():
            assert rec[k].dtype == np.dtype(spec[0]) and rec[k].shape == spec[1]
            np.testing.assert_array_equal(rec[k], want[k][i].astype(spec[0]))
    with pytest.raises(IndexError):
        src[23]
    # Records are copies, not views into the memory-mapped shard.
    rec = src[3]["image"]
    assert not isinstance(rec, np.memmap) and rec.flags.owndata
    # grain ships sources to worker processes: the open-shard cache is not pickled.
    clone = pickle.loads(pickle.dumps(src))
    assert not clone._cache and len(src._cache) == 4
    np.testing.assert_array_equal(clone[17]["tokens"], src[17]["tokens"])


def test_writer_checks_arrays_against_the_manifest(tmp_path):
    writer = make_writer(tmp_path / "ds")
    good = records(writer.shard_range(0))
    with pytest.raises(ValueError, match="fields"):
        writer.write_shard(0, {k: v for k, v in good.items() if k != "label"})
    with pytest.raises(ValueError, match="shape"):
        writer.write_shard(0, {**good, "tokens": good["tokens"][:, :4]})
    with pytest.raises(ValueError, match="do not fit"):
        writer.write_shard(0, {**good, "tokens": good["tokens"] + 2**40})
    with pytest.raises(ValueError, match="cannot be stored"):
        writer.write_shard(0, {**good, "label": good["label"] + 0.5})
    assert writer.missing_shards() == list(range(5))


def test_kill_mid_job_then_resume_computes_only_missing_and_matches(tmp_path, monkeypatch):
    write_full(tmp_path / "reference")
    d = tmp_path / "ds"

    # A job killed while computing shard 2: shards 0 and 1 are on disk, nothing else.
    def dies_at_2(rng):
        if rng.start >= 10:
            raise KeyboardInterrupt("killed")
        return records(rng)

    with pytest.raises(KeyboardInterrupt):
        write_shards(make_writer(d), dies_at_2)
    # A job killed inside the write of shard 2: a half-written temporary file, no shard.
    real_savez = np.savez

    def dies_while_writing(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    writer = make_writer(d)
    monkeypatch.setattr(np, "savez", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        writer.write_shard(2, records(writer.shard_range(2)))
    monkeypatch.setattr(np, "savez", real_savez)
    assert sorted(os.listdir(d)) == [MANIFEST_NAME, shard_name(0, 5), shard_name(1, 5)]
    with pytest.raises(DataError, match="incomplete: 2 of 5 shards"):
        ShardSource(d)

    (d / ".tmp-shard-00002-of-00005.npz.abc").write_bytes(b"left by a SIGKILL")
    computed = []

    def counting(rng):
        computed.append(rng.start)
        return records(rng)

    resumed = make_writer(d)
    assert resumed.missing_shards() == [2, 3, 4]
    assert write_shards(resumed, counting) == [2, 3, 4] and computed == [10, 15, 20]
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]
    assert_same_dataset(d, tmp_path / "reference")

    # Deleting a finished shard: the marker goes, the source refuses, a rerun recomputes it.
    os.remove(d / shard_name(3, 5))
    with pytest.raises(DataError, match=r"missing e\.g\. shard-00003"):
        ShardSource(d)
    again = make_writer(d)
    assert again.missing_shards() == [3] and not (d / COMPLETE_NAME).exists()
    write_shards(again, records)
    assert_same_dataset(d, tmp_path / "reference")
    assert write_shards(make_writer(d), counting) == []  # complete: nothing to do


def test_other_settings_on_an_existing_directory_are_refused(tmp_path):
    d = tmp_path / "ds"
    write_full(d)
    with pytest.raises(DataError, match="num_records: on disk 23, requested 24"):
        make_writer(d, num_records=24)
    with pytest.raises(DataError, match=r"metadata\.sigma: on disk 0\.7, requested 1\.0"):
        make_writer(d, metadata={"mode": "test", "sigma": 1.0})
    with pytest.raises(DataError, match="records_per_shard"):
        make_writer(d, per_shard=6)
    with pytest.raises(DataError, match=r"fields\.tokens"):
        make_writer(d, fields={**FIELDS, "tokens": (np.int32, (6,))})
    make_writer(d, metadata={"sigma": 0.7, "mode": "test"})  # same content, any key order


def test_process_other_than_zero_never_touches_the_disk(tmp_path):
    d = tmp_path / "ds"
    writer = make_writer(d, process_index=1)
    assert not d.exists() and writer.missing_shards() == list(range(5))
    write_shards(writer, records)
    assert not d.exists()


def test_corrupt_missing_or_foreign_directories_are_clear_errors(tmp_path):
    d = tmp_path / "ds"
    write_full(d)
    shard = d / shard_name(1, 5)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated copy
    src = ShardSource(d)
    src[0]  # other shards still read
    with pytest.raises(DataError, match=r"shard-00001-of-00005\.npz' is corrupt.*delete that file"):
        src[7]
    shard.write_bytes(b"\x00" * len(data))
    with pytest.raises(DataError, match="corrupt"):
        ShardSource(d)[5]
    # A valid npz with the wrong shape for this slot.
    np.savez(shard, **{k: v[:2] for k, v in records(range(5, 10)).items()})
    with pytest.raises(DataError, match="the manifest says"):
        ShardSource(d)[5]

    with pytest.raises(DataError, match="does not exist"):
        ShardSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a shard dataset"):
        ShardSource(tmp_path / "empty")


# --------------------------------------------------------------------------- pipeline


def make_cfg(root, **overrides) -> ml_collections.ConfigDict:
    cfg = {
        "name": "shards",
        "train_split": "train",
        "eval_split": "val",
        "image_size": SIZE,
        "data_dir": str(root),
        "manual_dir": None,
        "min_crop_frac": 0.8,
        "max_crop_frac": 1.0,
        "random_flip": True,
        "num_eval_examples": None,
        "worker_count": 0,
        "prefetch_threads": 2,
        "image_fields": ("image", "generated"),
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_full(root / "train", num_records=23, per_shard=5)
    write_full(root / "val", num_records=13, per_shard=4)
    return root


def take(it, n):
    return [next(it) for _ in range(n)]


def train_iter(cfg, seed=0, batch=4, index=0, count=1):
    return make_train_iterator(
        cfg, seed=seed, host_batch_size=batch, process_index=index, process_count=count
    )


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_convert_only_image_fields(shard_root):
    cfg = make_cfg(shard_root)
    assert num_examples(cfg, "train") == 23 and len(make_source(cfg, "val")) == 13
    batch = next(train_iter(cfg))
    assert batch["image"].dtype == batch["generated"].dtype == np.float32
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    assert batch["tokens"].dtype == np.int32 and batch["label"].dtype == np.int32
    assert batch["score"].dtype == np.float16
    want = records(range(23))
    ids = batch["id"]
    np.testing.assert_array_equal(batch["image"], to_float(want["image"][ids]))
    np.testing.assert_array_equal(batch["generated"], to_float(want["generated"][ids]))
    np.testing.assert_array_equal(batch["tokens"], want["tokens"][ids])
    # Default image_fields ('image',): 'generated' stays uint8.
    plain = dict(make_cfg(shard_root))
    del plain["image_fields"]
    batch = next(train_iter(ml_collections.ConfigDict(plain)))
    assert batch["image"].dtype == np.float32 and batch["generated"].dtype == np.uint8


def test_train_order_is_deterministic_covers_epochs_and_resumes(shard_root):
    cfg = make_cfg(shard_root)
    reference = take(train_iter(cfg, seed=3), 12)
    assert_batches_equal(reference, take(train_iter(cfg, seed=3), 12))
    other = take(train_iter(cfg, seed=4), 1)
    assert not np.array_equal(other[0]["id"], reference[0]["id"])
    ids = np.concatenate([b["id"] for b in reference])
    assert sorted(ids[:23]) == list(range(23)) and sorted(ids[23:46]) == list(range(23))
    assert not np.array_equal(ids[:23], ids[23:46])  # reshuffled per epoch

    it = train_iter(cfg, seed=3)
    first = take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    fresh = train_iter(cfg, seed=3)
    fresh.set_state(state)
    assert_batches_equal(first + take(fresh, 7), reference)

    # Two hosts hold the two halves of each one-host batch (one global stream, disjoint halves).
    double = take(train_iter(cfg, seed=3, batch=8), 3)
    hosts = [take(train_iter(cfg, seed=3, batch=4, index=i, count=2), 3) for i in (0, 1)]
    for k, batch in enumerate(double):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][k][key], hosts[1][k][key]]), batch[key])
    assert not set(hosts[0][0]["id"]) & set(hosts[1][0]["id"])


def test_eval_batches_pad_every_field_and_mask(shard_root):
    cfg = make_cfg(shard_root)
    full = list(eval_batches(cfg, host_batch_size=4, process_index=0, process_count=1))
    assert len(full) == 4 and [int(b["mask"].sum()) for b in full] == [4, 4, 4, 1]
    last = full[-1]
    assert last["tokens"].shape == (4, 5) and last["tokens"].dtype == np.int32
    assert last["image"].dtype == np.float32 and last["score"].dtype == np.float16
    for k in ("tokens", "label", "image", "generated", "score"):
        assert not last[k][1:].any()
    ids = np.concatenate([b["id"][b["mask"]] for b in full])
    np.testing.assert_array_equal(ids, np.arange(13))
    np.testing.assert_array_equal(
        np.concatenate([b["image"][b["mask"]] for b in full]), to_float(records(range(13))["image"])
    )

    hosts = [
        list(
            eval_batches(
                make_cfg(shard_root, num_eval_examples=9),
                host_batch_size=4,
                process_index=i,
                process_count=2,
            )
        )
        for i in (0, 1)
    ]
    assert [len(h) for h in hosts] == [2, 2]
    assert [int(b["mask"].sum()) for b in hosts[1]] == [4, 0]  # an all-padding batch
    assert set(hosts[1][1].keys()) == set(full[0].keys())
    got = np.sort(np.concatenate([b["id"][b["mask"]] for h in hosts for b in h]))
    np.testing.assert_array_equal(got, np.arange(9))


def test_shard_config_errors(shard_root, tmp_path):
    with pytest.raises(DataError, match="data_dir must be set"):
        num_examples(make_cfg(shard_root, data_dir=None), "train")
    with pytest.raises(DataError, match=r"'tokens'.*uint8 \(4, 4, 3\) image"):
        train_iter(make_cfg(shard_root, image_fields=("tokens",)))
    with pytest.raises(DataError, match="image_size"):
        next(
            iter(
                eval_batches(
                    make_cfg(shard_root, image_size=8),
                    host_batch_size=4,
                    process_index=0,
                    process_count=1,
                )
            )
        )
    with pytest.raises(DataError, match="does not exist"):
        num_examples(make_cfg(tmp_path), "train")


def test_shards_and_manifests_are_readable_by_others(tmp_path):
    """Written through the one atomic write with the usual permissions (0666 minus the umask),
    not mkstemp's 0600: other users of a shared run directory must be able to read them."""
    old = os.umask(0o022)
    try:
        d = tmp_path / "ds"
        write_full(d)
    finally:
        os.umask(old)
    modes = {name: os.stat(d / name).st_mode & 0o777 for name in os.listdir(d)}
    assert set(modes.values()) == {0o644}, modes
