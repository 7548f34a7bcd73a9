"""tokpost_jax.datagen.tokens: tokens equal a direct Tokenizer.encode, views, resuming, CLI.

A randomly initialised micro tokenizer (configs/tokenizer.py:micro, 16x16) encodes the 500 real
mnist5k val digits over the 8 fake CPU devices of conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import Checkpointer
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.data import DataError, make_source, make_train_iterator
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import COMPLETE_NAME, ShardSource, shard_name
from tokpost_jax.datagen.tokens import crop_views, pretokenize
from tokpost_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "val"
PER_SHARD = 96  # not a multiple of the batch: every shard ends with a padded batch
BATCH = 64


@pytest.fixture(scope="module")
def setup():
    cfg = load_config_file(os.path.join(REPO, "configs/tokenizer.py:micro"))
    model = build.tokenizer(cfg)
    size = cfg.data.image_size
    # jitted: eager init runs op by op (~14 s on the fake devices)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    mesh = shd.make_mesh(cfg.mesh)
    source = make_source(cfg.data, SPLIT)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    return cfg, model, params, mesh, source, encode


def run(setup, out, mode, params=None, **kw):
    cfg, _, default_params, mesh, _, _ = setup
    return pretokenize(
        cfg,
        default_params if params is None else params,
        out,
        split=SPLIT,
        mode=mode,
        batch_size=BATCH,
        mesh=mesh,
        rules=cfg.sharding_rules,
        records_per_shard=kw.pop("records_per_shard", PER_SHARD),
        **kw,
    )


def stored(directory) -> dict[str, np.ndarray]:
    src = ShardSource(directory)
    recs = [src[i] for i in range(len(src))]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


@pytest.fixture(scope="module")
def center_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("center")
    result = run(setup, out, "center")
    return out, result, stored(result.directory)


def direct(setup, images: list[np.ndarray]) -> np.ndarray:
    """Tokenizer.encode on one unsharded batch: the reference the sharded job must reproduce."""
    _, _, params, _, _, encode = setup
    return np.asarray(encode(params, to_float(np.stack(images))))


def test_center_and_center_flip_equal_direct_encode(setup, center_run, tmp_path):
    cfg, _, _, _, source, _ = setup
    size = cfg.data.image_size
    _, result, data = center_run
    n = len(source)
    assert result.num_records == n and result.num_shards == -(-n // PER_SHARD)
    crops = [center_crop(source[i]["image"], size) for i in range(n)]
    labels = np.array([source[i]["label"] for i in range(n)], np.int32)
    want = direct(setup, crops)
    assert data["tokens"].dtype == np.int32 and data["tokens"].shape == (n, 16)
    np.testing.assert_array_equal(data["tokens"], want)
    np.testing.assert_array_equal(data["label"], labels)

    flip = stored(run(setup, tmp_path, "center_flip").directory)
    assert len(flip["tokens"]) == 2 * n
    np.testing.assert_array_equal(flip["tokens"][0::2], want)
    np.testing.assert_array_equal(flip["tokens"][1::2], direct(setup, [c[:, ::-1] for c in crops]))
    np.testing.assert_array_equal(flip["label"], np.repeat(labels, 2))
    assert (flip["tokens"][0::2] != flip["tokens"][1::2]).any()  # the flip is a different view


def test_ten_crop_views_and_count(setup, tmp_path):
    cfg, _, _, _, source, _ = setup
    size = cfg.data.image_size
    image = source[7]["image"]
    views = crop_views(image, size, "ten_crop")
    big = center_crop(image, round(1.1 * size))
    assert big.shape == (18, 18, 3) and len(views) == 10
    assert all(v.shape == (size, size, 3) and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[0], big[:size, :size])  # top-left
    np.testing.assert_array_equal(views[3], big[-size:, -size:])  # bottom-right
    np.testing.assert_array_equal(views[4], big[1:17, 1:17])  # center
    np.testing.assert_array_equal(views[9], big[:, ::-1][1:17, 1:17])  # mirrored center
    np.testing.assert_array_equal(views[5], big[:, ::-1][:size, :size])  # mirrored top-left

    result = run(setup, tmp_path, "ten_crop", records_per_shard=1000)
    assert result.num_records == 10 * len(source) and result.num_shards == 5
    data = stored(result.directory)
    np.testing.assert_array_equal(data["tokens"][70:80], direct(setup, views))
    assert (data["label"][70:80] == source[7]["label"]).all()


def test_killed_and_resumed_run_equals_fresh_run(setup, center_run, tmp_path, monkeypatch):
    _, fresh, want = center_run
    from tokpost_jax.data.shards import ShardWriter

    real = ShardWriter.write_shard
    written = []

    def killed_after_two(self, index, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real(self, index, arrays)
        written.append(index)

    monkeypatch.setattr(ShardWriter, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, "center")
    monkeypatch.setattr(ShardWriter, "write_shard", real)
    directory = os.path.join(tmp_path, SPLIT)
    assert written == [0, 1] and not os.path.exists(os.path.join(directory, COMPLETE_NAME))
    with pytest.raises(DataError, match="incomplete"):
        ShardSource(directory)

    resumed = run(setup, tmp_path, "center")
    assert resumed.computed == tuple(range(2, fresh.num_shards))
    got = stored(directory)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    os.remove(os.path.join(directory, shard_name(3, fresh.num_shards)))
    assert run(setup, tmp_path, "center").computed == (3,)
    assert run(setup, tmp_path, "center").computed == ()
    np.testing.assert_array_equal(stored(directory)["tokens"], want["tokens"])


def test_other_settings_into_the_same_directory_are_refused(setup, center_run):
    out, _, _ = center_run
    _, _, params, _, _, _ = setup
    with pytest.raises(DataError, match="mode: on disk 'center', requested 'center_flip'"):
        run(setup, out, "center_flip", records_per_shard=2 * PER_SHARD)
    other = jax.tree.map(lambda x: x * 1.01, params)
    with pytest.raises(DataError, match="params_fingerprint"):
        run(setup, out, "center", params=other)
    with pytest.raises(DataError, match="checkpoint_step"):
        run(setup, out, "center", metadata={"checkpoint_step": 5})


def test_argument_errors(setup, tmp_path):
    cfg, _, params, mesh, _, _ = setup
    with pytest.raises(ValueError, match="mode"):
        run(setup, tmp_path, "five_crop")
    with pytest.raises(ValueError, match="batch_size=12"):
        pretokenize(
            cfg,
            params,
            tmp_path,
            split=SPLIT,
            mode="center",
            batch_size=12,
            mesh=mesh,
            rules=cfg.sharding_rules,
        )
    wrong = {**params, "quant_conv": {"kernel": np.zeros((3, 3), np.float32)}}
    with pytest.raises(ValueError, match=r"do not match config\.model"):
        run(setup, tmp_path / "wrong", "center", params=wrong)


def test_pipeline_reads_pretokenized_shards(setup, center_run):
    cfg, *_ = setup
    out, _, want = center_run
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(name="shards", data_dir=str(out), train_split=SPLIT)
    it = make_train_iterator(data_cfg, seed=0, host_batch_size=8, process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"tokens", "label"} and batch["tokens"].shape == (8, 16)
    assert batch["tokens"].dtype == np.int32
    rows = [np.flatnonzero((want["tokens"] == t).all(axis=1)) for t in batch["tokens"]]
    assert all(len(r) >= 1 for r in rows)


def test_cli_writes_the_same_tokens_from_a_checkpoint(setup, center_run, tmp_path):
    _, _, params, _, _, _ = setup
    _, _, want = center_run
    workdir = tmp_path / "tok_run"
    ckpt = Checkpointer(workdir / "checkpoints", asynchronous=False)
    host = shd.strip_boxes(params)
    ckpt.save(40, {"params": jax.tree.map(lambda x: x * 0, host), "ema_params": host}, {}, {})
    ckpt.close()
    out = tmp_path / "tokens"
    cmd = [
        sys.executable, "-m", "tokpost_jax.cli.pretokenize",
        f"--config={os.path.join(REPO, 'configs/tokenizer.py')}:micro",
        f"--workdir={workdir}", f"--out={out}", f"--split={SPLIT}", "--mode=center",
        f"--batch_size={BATCH}", "--records_per_shard=128",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--config.data.data_dir={out}" in proc.stdout
    src = ShardSource(out / SPLIT)
    assert src.metadata["checkpoint_step"] == 40 and src.metadata["params_key"] == "ema_params"
    np.testing.assert_array_equal(stored(out / SPLIT)["tokens"], want["tokens"])
