"""tokpost_jax.datagen.pairs: σ = 1 is reconstruction, σ = 0 generation, resuming, reading back.

A randomly initialised micro tokenizer (configs/tokenizer.py:micro, 16x16, 16 tokens of 64 codes)
and micro RAR pair 40 of the 500 mnist5k val digits over the 8 fake CPU devices of conftest.py.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.data import DataError, make_source, make_train_iterator
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import COMPLETE_NAME, ShardSource, ShardWriter
from tokpost_jax.datagen.pairs import choose_subset, generate_pairs, teacher_mask
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build
from tokpost_jax.models.generator import RAR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "val"
NUM_IMAGES, SEED = 40, 42
PER_SHARD = 12  # not a multiple of the batch: every shard ends with a padded batch
BATCH = 16
SAMPLING = {"guidance": 3.0, "power": 1.15, "temperature": 1.0}
FIELDS = {"generated", "image", "label", "index", "teacher_mask"}


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tokenizer.py"), "micro")
    tokenizer = build.tokenizer(cfg)
    size, n = cfg.data.image_size, cfg.model.num_latent_tokens
    # jitted: eager init runs op by op (seconds on the fake devices)
    tok_params = nn.unbox(
        jax.jit(tokenizer.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    generator = RAR(
        codebook_size=cfg.model.codebook_size,
        num_tokens=n,
        num_classes=10,
        **config_lib.RAR_SIZES["micro"],
    )
    gen_vars = nn.unbox(
        jax.jit(generator.init)(
            jax.random.PRNGKey(1),
            jnp.zeros((1, n), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            jnp.arange(n, dtype=jnp.int32)[None],
        )
    )
    return (
        cfg,
        tok_params,
        generator,
        gen_vars,
        shd.make_mesh(cfg.mesh),
        make_source(cfg.data, SPLIT),
    )


def run(setup, out, sigma, **kw):
    cfg, tok_params, generator, gen_vars, mesh, _ = setup
    return generate_pairs(
        cfg,
        kw.pop("tokenizer_params", tok_params),
        kw.pop("generator", generator),
        kw.pop("generator_variables", gen_vars),
        out,
        split=SPLIT,
        num_images=kw.pop("num_images", NUM_IMAGES),
        sigma=sigma,
        seed=kw.pop("seed", SEED),
        sampling=kw.pop("sampling", SAMPLING),
        batch_size=kw.pop("batch_size", BATCH),
        mesh=mesh,
        rules=cfg.sharding_rules,
        records_per_shard=PER_SHARD,
        **kw,
    )


def stored(directory) -> dict[str, np.ndarray]:
    src = ShardSource(directory)
    recs = [src[i] for i in range(len(src))]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


@pytest.fixture(scope="module")
def recon_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigma1")
    result = run(setup, out, 1.0)
    return out, result, stored(result.directory)


@pytest.fixture(scope="module")
def mixed_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigma05")
    result = run(setup, out, 0.5)
    return out, result, stored(result.directory)


def check_pairing(setup, data):
    """Records are the seeded subset in ascending order, each with its own crop and label."""
    cfg, *_, source = setup
    want = np.sort(np.random.default_rng(SEED).choice(len(source), NUM_IMAGES, replace=False))
    np.testing.assert_array_equal(data["index"], want)
    np.testing.assert_array_equal(choose_subset(len(source), NUM_IMAGES, SEED), want)
    size = cfg.data.image_size
    for r, i in enumerate(data["index"]):
        np.testing.assert_array_equal(data["image"][r], center_crop(source[int(i)]["image"], size))
        assert data["label"][r] == source[int(i)]["label"]


def test_sigma_one_is_exact_reconstruction(setup, recon_run):
    cfg, tok_params, *_ = setup
    _, result, data = recon_run
    assert result.directory.endswith(os.path.join("", "train"))  # post-training's train split
    assert result.num_records == NUM_IMAGES and result.computed == (0, 1, 2, 3)
    assert set(data) == FIELDS and data["generated"].dtype == np.uint8
    assert data["index"].dtype == np.int64 and data["teacher_mask"].shape == (NUM_IMAGES, 16)
    check_pairing(setup, data)
    assert data["teacher_mask"].all()
    tokenizer = build.tokenizer(cfg)

    @jax.jit
    def reconstruct(x):
        p = {"params": tok_params}
        tokens = tokenizer.apply(p, x, method="encode")
        return quantize_uint8(tokenizer.apply(p, tokens, method="decode"))

    np.testing.assert_array_equal(data["generated"], reconstruct(to_float(data["image"])))
    meta = ShardSource(result.directory).metadata
    assert meta["sigma"] == 1.0 and meta["source_split"] == SPLIT and meta["seed"] == SEED
    assert meta["num_images"] == NUM_IMAGES and meta["sampling"]["guidance"] == 3.0


def test_sigma_zero_is_free_generation(setup, recon_run, tmp_path):
    _, _, recon = recon_run
    data = stored(run(setup, tmp_path, 0.0).directory)
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(data[k], recon[k])
    assert not data["teacher_mask"].any()
    differs = (data["generated"] != recon["generated"]).any(axis=(1, 2, 3))
    assert differs.mean() > 0.9


def test_masks_depend_only_on_seed_and_image(setup, mixed_run):
    _, _, data = mixed_run
    check_pairing(setup, data)
    mask = data["teacher_mask"]
    assert 0.4 < mask.mean() < 0.6  # σ = 0.5 over 640 tokens
    np.testing.assert_array_equal(mask, teacher_mask(SEED, data["index"], 0.5, 16))
    one = teacher_mask(SEED, data["index"][7:8], 0.5, 16)  # another batch, same image
    np.testing.assert_array_equal(mask[7:8], one)
    assert (np.asarray(teacher_mask(SEED + 1, data["index"], 0.5, 16)) != mask).any()


def test_killed_and_resumed_run_equals_uninterrupted(setup, mixed_run, tmp_path, monkeypatch):
    _, fresh, want = mixed_run
    real = ShardWriter.write_shard
    written = []

    def killed_after_two(self, index, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real(self, index, arrays)
        written.append(index)

    monkeypatch.setattr(ShardWriter, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, 0.5)
    monkeypatch.setattr(ShardWriter, "write_shard", real)
    directory = os.path.join(tmp_path, "train")
    assert written == [0, 1] and not os.path.exists(os.path.join(directory, COMPLETE_NAME))

    resumed = run(setup, tmp_path, 0.5)
    assert resumed.computed == tuple(range(2, fresh.num_shards))
    got = stored(directory)
    for k in FIELDS:
        np.testing.assert_array_equal(got[k], want[k])
    check_pairing(setup, got)
    assert run(setup, tmp_path, 0.5).computed == ()


def test_pipeline_reads_pairs_as_float_images(setup, mixed_run):
    cfg, *_ = setup
    out, _, want = mixed_run
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(name="shards", data_dir=str(out), train_split="train")
    data_cfg.image_fields = ("image", "generated")
    it = make_train_iterator(data_cfg, seed=0, host_batch_size=8, process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == FIELDS
    for k in ("image", "generated"):
        assert batch[k].dtype == np.float32 and batch[k].shape == (8, 16, 16, 3)
        assert batch[k].min() >= -1.0 and batch[k].max() <= 1.0
    rows = np.searchsorted(want["index"], batch["index"])
    np.testing.assert_array_equal(want["index"][rows], batch["index"])
    for k in ("image", "generated"):  # the pair stays together through the shuffle
        np.testing.assert_array_equal(batch[k], to_float(want[k][rows]))
    np.testing.assert_array_equal(batch["teacher_mask"], want["teacher_mask"][rows])


def test_other_settings_into_the_same_directory_are_refused(setup, recon_run):
    out, _, _ = recon_run
    _, _, _, gen_vars, _, _ = setup
    with pytest.raises(DataError, match=r"sigma: on disk 1\.0, requested 0\.5"):
        run(setup, out, 0.5)
    with pytest.raises(DataError, match="seed"):
        run(setup, out, 1.0, seed=SEED + 1)
    other = jax.tree.map(lambda x: x * 1.01, gen_vars)
    with pytest.raises(DataError, match="generator_params_fingerprint"):
        run(setup, out, 1.0, generator_variables=other)
    with pytest.raises(DataError, match="guidance"):
        run(setup, out, 1.0, sampling={**SAMPLING, "guidance": 4.0})


def test_argument_errors(setup, tmp_path):
    _, _, generator, _, _, _ = setup
    with pytest.raises(ValueError, match="sigma"):
        run(setup, tmp_path, 1.5)
    with pytest.raises(ValueError, match="missing"):
        run(setup, tmp_path, 0.5, sampling={"guidance": 3.0, "temperature": 1.0})
    with pytest.raises(ValueError, match="num_images"):
        run(setup, tmp_path, 0.5, num_images=501)
    with pytest.raises(ValueError, match="batch_size=12"):
        run(setup, tmp_path, 0.5, batch_size=12)
    with pytest.raises(ValueError, match="code book"):
        run(setup, tmp_path, 0.5, generator=generator.clone(codebook_size=32))
