"""RAR / RobusTok pretokenized ``.jsonl`` files as a data source (data/jsonl_tokens.py): the same
batches as the equivalent ``cli.pretokenize`` shards, and clear errors for bad lines."""

from __future__ import annotations

import json
import pickle

import ml_collections
import numpy as np
import pytest

from tokpost_jax.data import jsonl_tokens
from tokpost_jax.data.pipeline import (
    DataError,
    dataset_kind,
    eval_batches,
    make_source,
    make_train_iterator,
)
from tokpost_jax.data.shards import ShardWriter, write_shards
from tokpost_jax.data.sources import BadRecordError

N, L, K = 23, 6, 50


def _records() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, K, (N, L), dtype=np.int32), rng.integers(0, 10, N, dtype=np.int32)


def _write_official(path, tokens, labels, *, nested: bool = True) -> None:
    """As the official scripts write it: ``json.dump`` per record, one per line; the code tensor
    of one image is [1, L] there, so its list is nested. One line ends in CRLF, and the file in
    an empty line."""
    with open(path, "w", newline="") as f:
        for i, (t, y) in enumerate(zip(tokens, labels, strict=True)):
            item = {"class_id": int(y), "tokens": [t.tolist()] if nested else t.tolist()}
            f.write(json.dumps(item) + ("\r\n" if i == 3 else "\n"))
        f.write("\n")


def _cfg(name: str, data_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name=name, data_dir=data_dir, train_split="train", eval_split="train", image_size=16,
        image_fields=(), num_eval_examples=None, worker_count=0, prefetch_threads=2,
        manual_dir=None,
    ))


@pytest.fixture
def token_dirs(tmp_path):
    tokens, labels = _records()
    path = tmp_path / "pretokenized.jsonl"
    _write_official(path, tokens, labels)
    writer = ShardWriter(tmp_path / "shards" / "train", num_records=N, records_per_shard=5,
                         fields={"tokens": (np.int32, (L,)), "label": (np.int32, ())})
    write_shards(writer, lambda r: {"tokens": tokens[r.start:r.stop],
                                    "label": labels[r.start:r.stop]})
    return str(path), str(tmp_path / "shards"), tokens, labels


def test_records_and_batches_equal_the_pretokenized_shards(token_dirs, monkeypatch):
    path, shards, tokens, labels = token_dirs
    monkeypatch.setattr(jsonl_tokens, "_INDEX_CHUNK", 7)  # lines split across index reads
    assert dataset_kind("jsonl") == "jsonl"
    source = make_source(_cfg("jsonl", path), "train")
    assert len(source) == N and source.num_tokens == L
    for i in (0, 3, 4, N - 1):
        np.testing.assert_array_equal(source[i]["tokens"], tokens[i])
        assert source[i]["label"] == labels[i] and source[i]["tokens"].dtype == np.int32
    again = pickle.loads(pickle.dumps(source))  # what a grain worker receives
    np.testing.assert_array_equal(again[5]["tokens"], tokens[5])

    def train(cfg):
        it = make_train_iterator(cfg, seed=3, host_batch_size=4, process_index=0,
                                 process_count=1)
        return [next(it) for _ in range(12)]  # two epochs: reshuffled, as for shards

    for got, want in zip(train(_cfg("jsonl", path)), train(_cfg("shards", shards)), strict=True):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    def evaluate(cfg):
        return list(eval_batches(cfg, host_batch_size=8, process_index=0, process_count=1))

    for got, want in zip(evaluate(_cfg("jsonl", path)), evaluate(_cfg("shards", shards)),
                         strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_a_directory_holds_one_file_per_split(tmp_path):
    tokens, labels = _records()
    _write_official(tmp_path / "train.jsonl", tokens, labels, nested=False)
    source = make_source(_cfg("jsonl", str(tmp_path)), "train")
    np.testing.assert_array_equal(source[7]["tokens"], tokens[7])
    with pytest.raises(DataError, match=r"val\.jsonl.*does not exist"):
        make_source(_cfg("jsonl", str(tmp_path)), "val")


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"tokens": [1, 2, 3, 4, 5, 6]}', r"record 2 is not a .*KeyError: 'class_id'"),
        ('{"class_id": 1, "tokens": [1, 2, 3]}', "record 2 has 3 tokens, the first record 6"),
        ('{"class_id": 1, "tokens": [1, 2, 3, 4, 5, -6]}', "record 2: tokens must be non-neg"),
        ('{"class_id": 1.5, "tokens": [1, 2, 3, 4, 5, 6]}', "class_id must be a non-negative"),
        ('{"class_id": 1, "tokens": [1, 2, 3, 4, 5, 6]', r"record 2 is not a .*JSONDecodeError"),
    ],
)
def test_a_bad_line_is_an_error_naming_its_record(tmp_path, line, match):
    good = '{"class_id": 0, "tokens": [1, 2, 3, 4, 5, 6]}'
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([good, good, line, good]) + "\n")
    source = make_source(_cfg("jsonl", str(path)), "train")
    assert len(source) == 4
    source[3]
    with pytest.raises(BadRecordError, match=match) as e:
        source[2]
    assert e.value.index == 2


def test_missing_or_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"must name the pretokenized \.jsonl"):
        make_source(_cfg("jsonl", None), "train")
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist"):
        make_source(_cfg("jsonl", str(tmp_path / "nope.jsonl")), "train")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        make_source(_cfg("jsonl", str(tmp_path / "empty.jsonl")), "train")
