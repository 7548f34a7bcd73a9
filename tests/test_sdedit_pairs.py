"""tokpost_jax.datagen.sdedit_pairs: σ = 1 is the VAE posterior mean, σ < 1 the flow model's ODE
from the noised latent; deterministic, batch- and device-independent, resumable, refused when the
settings change.

A random micro KL-VAE (a VAE run dir, tests/test_diffusion_stage.py) and a random micro LatentDiT
(its zero-initialised head perturbed, so the velocity is not 0) pair 16 of the 500 mnist5k val
digits, on 1 device and on 8 fake CPU devices (data 4 × fsdp 2).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_diffusion_stage import micro, write_vae_run

from tokpost_jax import sampling_ode
from tokpost_jax import sharding as shd
from tokpost_jax.data import DataError, make_source
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.data.shards import ShardSource, shard_name
from tokpost_jax.datagen.pairs import choose_subset
from tokpost_jax.datagen.sdedit_pairs import generate_sdedit_pairs, ode_steps, sdedit_noise
from tokpost_jax.models import build
from tokpost_jax.models import diffusion as dif
from tokpost_jax.train.diffusion import load_vae_params

SPLIT = "val"
NUM_IMAGES, SEED = 16, 7
PER_SHARD = 8
SCALE, SHIFT = 4.4, 0.1  # not 1 and 0: the residual form and the normalisation are exercised
FIELDS = {"generated", "image", "label", "index"}


def init_model(cfg, seed=1):
    model = build.diffusion(cfg)
    variables = nn.unbox(
        jax.jit(model.init)(
            jax.random.PRNGKey(seed), jnp.zeros((1, *cfg.latent.shape)), jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32),
        )
    )
    # The adaLN-Zero head starts at 0 (velocity 0); small random values make the ODE move.
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [
        np.asarray(0.05 * jax.random.normal(k, x.shape)) if not np.any(x) else np.asarray(x)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vae_run = write_vae_run(str(tmp_path_factory.mktemp("vae")))
    cfg = micro(vae_run, **{"latent.scale": SCALE, "latent.shift": SHIFT})
    vae_params = load_vae_params(cfg)
    one = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    return cfg, vae_params, init_model(cfg), one, make_source(cfg.data, SPLIT)


def run(setup, out, sigma, **kw):
    cfg, vae_params, variables, mesh, _ = setup
    return generate_sdedit_pairs(
        kw.pop("config", cfg),
        kw.pop("vae_params", vae_params),
        kw.pop("model_variables", variables),
        out,
        split=SPLIT,
        num_images=kw.pop("num_images", NUM_IMAGES),
        sigma=sigma,
        seed=kw.pop("seed", SEED),
        batch_size=kw.pop("batch_size", 8),
        mesh=kw.pop("mesh", mesh),
        rules=cfg.sharding_rules,
        records_per_shard=PER_SHARD,
        **kw,
    )


def stored(directory) -> dict[str, np.ndarray]:
    src = ShardSource(directory)
    recs = [src[i] for i in range(len(src))]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


@pytest.fixture(scope="module")
def mean_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigma1")
    result = run(setup, out, 1.0)
    return out, result, stored(result.directory)


@pytest.fixture(scope="module")
def half_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigma05")
    result = run(setup, out, 0.5)
    return out, result, stored(result.directory)


def vae_fns(cfg, vae_params):
    vae = build.latent_vae(cfg)
    v = {"params": vae_params}
    mean = jax.jit(lambda x: vae.apply(v, x, method="encode_moments")[0])
    decode = jax.jit(lambda z: vae.apply(v, z, method="decode"))
    recon = jax.jit(lambda x: vae.apply(v, x)[0])
    return mean, decode, recon


def in_batches(fn, x, batch=8):
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def test_sigma_one_is_the_posterior_mean_bit_for_bit(setup, mean_run):
    cfg, vae_params, _, _, source = setup
    _, result, data = mean_run
    assert result.directory.endswith(os.path.join("", "train"))
    assert result.num_records == NUM_IMAGES and result.computed == (0, 1)
    assert set(data) == FIELDS
    assert data["generated"].dtype == np.float32 and data["generated"].shape == (16, 8, 8, 4)
    assert data["image"].dtype == np.uint8 and data["image"].shape == (16, 16, 16, 3)
    assert data["label"].dtype == np.int32 and data["index"].dtype == np.int64
    np.testing.assert_array_equal(data["index"], choose_subset(len(source), NUM_IMAGES, SEED))
    for r, i in enumerate(data["index"]):
        np.testing.assert_array_equal(data["image"][r], center_crop(source[int(i)]["image"], 16))
        assert data["label"][r] == source[int(i)]["label"]
    mean, decode, recon = vae_fns(cfg, vae_params)
    pixels = to_float(data["image"])
    np.testing.assert_array_equal(data["generated"], in_batches(mean, pixels))
    # The decoder's input is the real latent, so decoding it is the VAE's reconstruction.
    np.testing.assert_array_equal(in_batches(decode, data["generated"]), in_batches(recon, pixels))
    meta = ShardSource(result.directory).metadata
    assert meta["sigma"] == 1.0 and meta["seed"] == SEED and meta["source_split"] == SPLIT
    assert meta["sampling"] == {"method": "heun", "num_steps": 4, "guidance": 2.0}
    assert meta["latent_scale"] == SCALE and meta["latent_shift"] == SHIFT
    assert meta["latent_shape"] == [8, 8, 4] and meta["batch_size"] == 8
    assert meta["ode_steps"] == 1 and meta["dtype"] == "float32"


def test_sigma_half_is_the_ode_from_the_noised_latent(setup, mean_run, half_run):
    cfg, _, variables, _, _ = setup
    _, _, real = mean_run
    _, result, data = half_run
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(data[k], real[k])
    differs = np.abs(data["generated"] - real["generated"]).reshape(NUM_IMAGES, -1).max(axis=1)
    assert (differs > 1e-3).all()
    assert ShardSource(result.directory).metadata["ode_steps"] == 2  # ceil(4 · 0.5)
    # Recomputed here: x0 = (z − shift)·scale, ε per image, Heun from t = 0.5, residual form.
    model = build.diffusion(cfg)
    x0 = dif.to_model_space(real["generated"], SCALE, SHIFT)
    eps = sdedit_noise(SEED, data["index"], (8, 8, 4))
    x_gen = sampling_ode.integrate_from(
        model, variables, sampling_ode.noise_to(x0, eps, 0.5), data["label"], 0.5,
        num_steps=2, method="heun", guidance=2.0,
    )
    want = real["generated"] + (np.asarray(x_gen) - np.asarray(x0)) / SCALE
    np.testing.assert_allclose(data["generated"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        data["generated"], dif.to_vae_space(x_gen, SCALE, SHIFT), rtol=1e-5, atol=1e-5
    )


def test_noise_and_steps_are_per_image():
    idx = jnp.asarray([3, 9, 1], jnp.int32)
    all3 = sdedit_noise(SEED, idx, (2, 2, 1))
    np.testing.assert_array_equal(all3[1:2], sdedit_noise(SEED, idx[1:2], (2, 2, 1)))
    assert not np.array_equal(all3, sdedit_noise(SEED + 1, idx, (2, 2, 1)))
    assert [ode_steps(20, s) for s in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0)] == [20, 10, 2, 1, 1, 1]


def test_same_settings_same_bytes_and_batch_size_does_not_matter(setup, half_run, tmp_path):
    _, _, want = half_run
    again = stored(run(setup, tmp_path / "again", 0.5).directory)
    for k in FIELDS:
        np.testing.assert_array_equal(again[k], want[k])
    four = stored(run(setup, tmp_path / "b4", 0.5, batch_size=4).directory)
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(four[k], want[k])
    # Same noise and ODE per image; only rounding differs: XLA:CPU's VAE convolutions are not
    # batch-size invariant (measured: 2.6e-7 at most here, 4.8e-7 already at σ = 1).
    np.testing.assert_allclose(four["generated"], want["generated"], rtol=1e-5, atol=1e-6)


def test_8_devices_give_the_records_of_1(setup, half_run, tmp_path):
    _, _, want = half_run
    eight = shd.make_mesh({"data": 4, "fsdp": 2}, jax.devices()[:8])
    got = stored(run(setup, tmp_path, 0.5, mesh=eight).directory)
    for k in ("image", "label", "index"):
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_allclose(got["generated"], want["generated"], rtol=1e-5, atol=2e-6)


def test_resume_after_a_lost_shard_and_other_settings_are_refused(setup, half_run, tmp_path):
    import shutil

    out, fresh, _ = half_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    directory = copy / "train"
    lost = directory / shard_name(1, fresh.num_shards)
    before = lost.read_bytes()
    lost.unlink()  # the stale ``complete`` marker is the writer's to drop
    resumed = run(setup, copy, 0.5)
    assert resumed.computed == (1,) and (directory / "complete").exists()
    assert lost.read_bytes() == before
    assert run(setup, copy, 0.5).computed == ()
    with pytest.raises(DataError, match=r"sigma: on disk 0\.5, requested 0\.25"):
        run(setup, copy, 0.25)
    with pytest.raises(DataError, match="seed"):
        run(setup, copy, 0.5, seed=SEED + 1)
    _, _, variables, _, _ = setup
    other = jax.tree.map(lambda x: x * 1.01, variables)
    with pytest.raises(DataError, match="model_params_fingerprint"):
        run(setup, copy, 0.5, model_variables=other)
    with pytest.raises(DataError, match="guidance"):
        run(setup, copy, 0.5, sampling={"method": "heun", "num_steps": 4, "guidance": 3.0})


def test_argument_errors(setup, tmp_path):
    cfg, *_ = setup
    with pytest.raises(ValueError, match="sigma"):
        run(setup, tmp_path, 1.5)
    with pytest.raises(ValueError, match="seed"):
        run(setup, tmp_path, 0.5, seed="7")
    with pytest.raises(ValueError, match=r"sampling\.method"):
        run(setup, tmp_path, 0.5, sampling={"method": "rk4", "num_steps": 4, "guidance": 1.0})
    with pytest.raises(ValueError, match="missing"):
        run(setup, tmp_path, 0.5, sampling={"method": "heun", "guidance": 1.0})
    with pytest.raises(ValueError, match="num_images"):
        run(setup, tmp_path, 0.5, num_images=501)
    with pytest.raises(ValueError, match="batch_size=6"):
        run(setup, tmp_path, 0.5, batch_size=6, mesh=shd.make_mesh({"data": 4, "fsdp": 1},
                                                                   jax.devices()[:4]))
    with pytest.raises(ValueError, match=r"latent\.shape=\(4, 4, 4\) must be the VAE"):
        run(setup, tmp_path, 0.5, config=micro(cfg.vae_init, **{"latent.shape": (4, 4, 4)}))
    wide = micro(cfg.vae_init, **{"model.width": 64})
    with pytest.raises(ValueError, match="model variables do not match"):
        run(setup, tmp_path, 0.5, config=wide)
    five = micro(cfg.vae_init, **{"model.num_classes": 3})
    with pytest.raises(DataError, match=r"outside the generator's classes \[0, 3\)"):
        run(setup, tmp_path / "five", 0.5, config=five, model_variables=init_model(five))
