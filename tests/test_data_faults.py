"""Data faults injected into real image folders: hidden files, decompression bombs, symlink loops,
corrupt files (found by data.scan='full', stepped over by data.on_bad_image='skip'), and restored
iterator states that do not belong to the run."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tokpost_jax.data import DataError, builtin, eval_batches, make_train_iterator
from tokpost_jax.data.pipeline import check_data_state
from tokpost_jax.data.sources import BadRecordError, FolderSource, SkipBadRecords


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(name="mnist5k", train_split="train", eval_split="val", image_size=16,
               data_dir=None, manual_dir=None, min_crop_frac=0.8, max_crop_frac=1.0,
               random_flip=True, num_eval_examples=None, worker_count=0, prefetch_threads=2)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _real_images(n: int) -> list[np.ndarray]:
    """`n` different real photo crops (the built-in photos), 24x20."""
    photos = builtin.load_photos()
    return [np.ascontiguousarray(photos[i % len(photos)][10 * i : 10 * i + 24, :20])
            for i in range(n)]


def _folder(root, per_class: int = 4, classes=("cat", "dog")) -> str:
    images = iter(_real_images(per_class * len(classes)))
    for name in classes:
        os.makedirs(root / "train" / name, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(next(images)).save(root / "train" / name / f"{i}.png")
    return str(root)


def _corrupt(path) -> None:
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def _cfg(root: str, **kw):
    return make_cfg(name="folder", data_dir=root, eval_split="train", image_size=8,
                    random_flip=False, **kw)


def _train(cfg, batch: int = 2, seed: int = 0):
    return make_train_iterator(cfg, seed=seed, host_batch_size=batch, process_index=0,
                               process_count=1)


# --------------------------------------------------------------------------- listing


def test_hidden_files_and_directories_are_not_records(tmp_path):
    root = _folder(tmp_path)
    _corrupt(tmp_path / "train" / "cat" / "._0.png")  # macOS resource fork
    _corrupt(tmp_path / "train" / "cat" / ".DS_Store")
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")
    Image.fromarray(_real_images(1)[0]).save(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    src = FolderSource(root, "train")
    assert src.class_names == ("cat", "dog")
    assert len(src) == 8
    assert not any("/." in src.path(i) for i in range(len(src)))
    for i in range(len(src)):  # every listed record decodes
        assert src[i]["image"].shape == (24, 20, 3)


def test_symlink_loops_are_one_line_errors_naming_the_path(tmp_path):
    root = _folder(tmp_path)
    loop = tmp_path / "train" / "cat" / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match=r"loop\.png' is a symlink loop"):
        FolderSource(root, "train")
    os.remove(loop)

    a, b = tmp_path / "train" / "a", tmp_path / "train" / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(DataError, match=r"train/a' is a symlink loop"):
        FolderSource(root, "train")
    os.remove(a)
    os.remove(b)

    os.symlink(tmp_path / "loop_root", tmp_path / "loop_root")
    with pytest.raises(DataError, match="loop_root' is a symlink loop"):
        FolderSource(str(tmp_path / "loop_root"), "train")


def test_decompression_bomb_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24x20 = 480 > 2 x 100: a "bomb"
    src = FolderSource(root, "train")
    with pytest.raises(BadRecordError, match=r"cat/0\.png.*DecompressionBombError"):
        src[0]


# --------------------------------------------------------------------------- scan


def test_scan_full_reports_every_bad_file_before_the_first_batch(tmp_path):
    root = _folder(tmp_path)
    _corrupt(tmp_path / "train" / "cat" / "1.png")
    _corrupt(tmp_path / "train" / "dog" / "3.png")
    _train(_cfg(root))  # default scan='none': building succeeds, the files are found when read
    with pytest.raises(DataError) as err:
        _train(_cfg(root, scan="full"))
    message = str(err.value)
    assert "found 2 unreadable of 8 records" in message and "\n" not in message
    assert "cat/1.png" in message and "dog/3.png" in message
    with pytest.raises(DataError, match="2 unreadable"):
        list(eval_batches(_cfg(root, scan="full", num_eval_examples=8), host_batch_size=4,
                          process_index=0, process_count=1))


def test_scan_and_policy_values_are_checked(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DataError, match=r"config.data.scan must be one of \('none', 'full'\)"):
        _train(_cfg(root, scan="fulll"))
    with pytest.raises(DataError, match=r"config\.data\.on_bad_image must be one of"):
        _train(_cfg(root, on_bad_image="ignore"))


# --------------------------------------------------------------------------- skip


def test_skip_substitutes_the_next_good_record_and_logs_once(tmp_path, caplog):
    root = _folder(tmp_path)
    _corrupt(tmp_path / "train" / "cat" / "1.png")  # record 1
    _corrupt(tmp_path / "train" / "cat" / "2.png")  # record 2
    src = FolderSource(root, "train")
    skip = SkipBadRecords(src)
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(skip[1]["image"], src[3]["image"])
        np.testing.assert_array_equal(skip[2]["image"], src[3]["image"])
        np.testing.assert_array_equal(skip[1]["image"], src[3]["image"])
    warned = [r.getMessage() for r in caplog.records if "on_bad_image='skip'" in r.getMessage()]
    assert len(warned) == 2 and "cat/1.png" in warned[0] and "cat/2.png" in warned[1]
    np.testing.assert_array_equal(skip[0]["image"], src[0]["image"])  # good records untouched

    class Counting:  # scan-known bad records are skipped without being read again
        def __init__(self):
            self.reads: list[int] = []

        def __len__(self):
            return len(src)

        def __getitem__(self, i):
            self.reads.append(i)
            return src[i]

    counting = Counting()
    np.testing.assert_array_equal(SkipBadRecords(counting, known_bad=[1, 2])[1]["image"],
                                  src[3]["image"])
    assert counting.reads == [3]
    for i in range(len(src)):
        _corrupt(src.path(i))
    with pytest.raises(DataError, match=r"8 consecutive records from index 5 .* are unreadable"):
        SkipBadRecords(src)[5]


def test_skip_trains_through_bad_files_and_resumes_exactly(tmp_path):
    root = _folder(tmp_path)
    _corrupt(tmp_path / "train" / "dog" / "0.png")
    with pytest.raises(BadRecordError, match=r"dog/0\.png"):
        take(_train(_cfg(root)), 8)  # two epochs: the bad file is read
    for scan in ("none", "full"):
        cfg = _cfg(root, on_bad_image="skip", scan=scan)
        reference = take(_train(cfg), 8)
        it = _train(cfg)
        got = take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        fresh = _train(cfg)
        fresh.set_state(state, step=3)
        assert_batches_equal(got + take(fresh, 5), reference)
    ev = list(eval_batches(_cfg(root, on_bad_image="skip"), host_batch_size=4, process_index=0,
                           process_count=1))
    assert sum(int(b["mask"].sum()) for b in ev) == 8


def test_bad_file_in_a_worker_process_is_the_same_data_error(tmp_path):
    root = _folder(tmp_path)
    _corrupt(tmp_path / "train" / "cat" / "2.png")
    it = _train(_cfg(root, worker_count=1))
    try:
        with pytest.raises(BadRecordError, match=r"cat/2\.png"):
            take(it, 8)
    finally:
        it.close()


# --------------------------------------------------------------------------- iterator state


def test_restored_state_is_validated():
    cfg = make_cfg()
    it = _train(cfg, batch=8, seed=3)
    take(it, 2)
    state = it.get_state()
    assert state["next_index"] == 2 and state["num_records"] == 4500
    with pytest.raises(DataError, match="at batch 123456789 but its checkpoint is at step 10"):
        _train(cfg, batch=8, seed=3).set_state({"next_index": 123456789}, step=10)
    for bad, match in (
        ({**state, "seed": 4}, r"seed=4 but this run has 3 \(config.seed\)"),
        ({**state, "batch_size": 16}, r"batch_size=16 but this run has 8 \(config.batch_size"),
        ({**state, "process_count": 2}, "2-host run whose hosts each had their own stream"),
        ({**state, "num_records": 4400}, "num_records=4400 but this run has 4500"),
        ({"next_index": -1}, "needs 'next_index'"),
        ({"next_index": "7"}, "needs 'next_index'"),
        ([7], "needs 'next_index'"),
        ({**state, "iterators_in_use_states": []}, "unknown keys"),
    ):
        with pytest.raises(DataError, match=match):
            _train(cfg, batch=8, seed=3).set_state(bad)
    with pytest.raises(DataError, match="num_records"):  # a changed dataset is refused
        _train(make_cfg(name="photos"), batch=8, seed=3).set_state(state)
    # Legacy states (a batch counter only; one host's own stream) and the run's own state resume.
    reference = take(_train(cfg, batch=8, seed=3), 4)
    one_host = {"next_index": 2, "num_records": 4500, "host_batch_size": 8, "seed": 3,
                "process_index": 0, "process_count": 1}
    for good in ({"next_index": 2}, one_host, state):
        fresh = _train(cfg, batch=8, seed=3)
        fresh.set_state(good, step=2)
        assert_batches_equal(take(fresh, 2), reference[2:])
    assert check_data_state(state, it.stream, step=2) == 2
