"""The KL-VAE stage (trainer "vae") on real MNIST digits: its loss, that it learns, its evaluation
(PSNR and the latent statistics CODA's scale comes from), exact resume through the loop, the GAN
side and its reference gradient, the configs, and 8 fake devices against 1."""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import config_checks
from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.data import eval_batches, make_train_iterator
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models import build
from tokpost_jax.models.klvae import gaussian_kl
from tokpost_jax.train import loop
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.partition import param_at as get_path
from tokpost_jax.train.state import step_rng, stream
from tokpost_jax.train.vae import VAEStage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(REPO, "configs/klvae.py:micro")


def micro(**overrides):
    cfg = load_config_file(MICRO)
    cfg.unlock()
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def real_batches(cfg, n):
    it = make_train_iterator(
        cfg.data, seed=0, host_batch_size=cfg.batch_size, process_index=0, process_count=1
    )
    return [next(it) for _ in range(n)]


class Run:
    """A stage's jitted step on a mesh of ``devices``, driven batch by batch.

    ``state``: a host state to start from (the initial state compiles once per module: the
    initialisers' RNG costs XLA more than the train step itself).
    """

    def __init__(self, cfg, state=None, devices=None, mesh_axes=None, stage_cls=VAEStage):
        devices = jax.devices()[:1] if devices is None else devices
        self.mesh = shd.make_mesh(mesh_axes or {"data": 1, "fsdp": 1}, devices)
        self.rules = shd.rules_tuple(cfg.sharding_rules)
        self.stage = stage_cls(cfg, cfg.total_steps, self.mesh)
        with self:
            self.sharded = ShardedStage.build(self.stage, self.mesh, self.rules)
            if state is None:
                self.state = self.sharded.init(jax.random.PRNGKey(cfg.seed))
            else:
                self.state = jax.device_put(state, self.sharded.state_sharding)
            self.frozen = jax.device_put(self.stage.frozen_params(), self.sharded.replicated)

    def __enter__(self):
        self._ctx = [jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)]
        for c in self._ctx:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)

    def step(self, host_batch, seed=1):
        rng = jax.random.PRNGKey(seed)
        with self:
            batch = shd.host_to_global(host_batch, self.sharded.batch_sharding)
            self.state, metrics = self.sharded.step(self.state, batch, rng, self.frozen)
        return jax.device_get(metrics)


@pytest.fixture(scope="module")
def initial():
    """The micro VAE's initial state on the host."""
    return jax.device_get(Run(micro()).state)


@pytest.fixture(scope="module")
def trained(initial):
    """The micro VAE after 30 steps on real digits, with every step's metrics."""
    cfg = micro()
    run = Run(cfg, initial)
    history = [run.step(b) for b in real_batches(cfg, cfg.total_steps)]
    return cfg, run, history


def test_the_micro_vae_learns_on_real_digits(trained):
    _, _, history = trained
    loss = np.array([m["loss"] for m in history])
    psnr = np.array([m["psnr"] for m in history])
    assert np.isfinite(loss).all()
    assert loss[-5:].mean() < 0.6 * loss[:5].mean(), loss
    assert psnr[-5:].mean() > psnr[:5].mean() + 3.0, psnr
    for key in ("l1_loss", "l2_loss", "kl_loss", "grad_norm", "param_norm", "lr",
                "posterior_std"):
        assert np.isfinite(history[-1][key]), key


def test_the_loss_is_l1_plus_l2_plus_kl_over_3hw(trained):
    cfg, _, history = trained
    m = history[-1]
    size = cfg.data.image_size
    expected = m["l1_loss"] + m["l2_loss"] + cfg.loss.kl_weight * m["kl_loss"] / (3 * size**2)
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
    assert m["kl_loss"] > 1.0  # a per-image sum over the 8×8×4 latent, not a mean


def test_the_kl_gradient_is_that_of_its_weighted_per_pixel_term(initial):
    """With the pixel losses off, the step's loss is kl_weight·mean KL/(3HW) and its gradient
    that term's."""
    cfg = micro(**{"loss.l1_weight": 0.0, "loss.l2_weight": 0.0, "loss.kl_weight": 1.0})
    run = Run(cfg, initial)
    (batch,) = real_batches(cfg, 1)
    model = run.stage.model

    @jax.jit
    def kl_grad_norm(p, images):
        def kl_term(p):
            mean, logvar = model.apply({"params": p}, images, method="encode_moments")
            return jnp.mean(gaussian_kl(mean, logvar)) / (3 * cfg.data.image_size**2)

        return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(kl_term)(p))))

    expected = kl_grad_norm(initial.params, jnp.asarray(batch["image"]))
    assert expected > 0
    metrics = run.step(batch)
    np.testing.assert_allclose(metrics["grad_norm"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["kl_loss"] / (3 * cfg.data.image_size**2),
                               rtol=1e-6)


def test_eval_reports_psnr_and_the_latent_statistics(trained):
    cfg, run, _ = trained
    with run:
        results = run.stage.evaluate(run.state, 30, {"lpips": None})  # LPIPS: tests/test_lpips.py
    assert set(results) == {"val", "val_ema"}
    params = jax.device_get(run.state.params)
    model = run.stage.model
    images = np.concatenate([
        b["image"][b["mask"]]
        for b in eval_batches(cfg.data, host_batch_size=cfg.eval_batch_size, process_index=0,
                              process_count=1)
    ])
    assert len(images) == cfg.data.num_eval_examples
    mean, logvar = model.apply({"params": params}, images, method="encode_moments")
    recon, _ = model.apply({"params": params}, images, method="reconstruct")
    val = results["val"]
    np.testing.assert_allclose(val["latent_std"], np.std(np.asarray(mean, np.float64)), rtol=1e-4)
    np.testing.assert_allclose(val["latent_mean"], np.mean(np.asarray(mean, np.float64)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(val["posterior_std"], np.mean(np.exp(0.5 * logvar)), rtol=1e-4)
    np.testing.assert_allclose(
        val["psnr"], np.mean(reconstruction.psnr_per_image(recon, images)), rtol=1e-4
    )
    assert val["num_images"] == cfg.data.num_eval_examples
    assert val["psnr"] > results["val_ema"]["psnr"]  # EMA 0.99 lags 30 steps behind
    assert results["val"].images["reconstructions"].dtype == np.uint8


class _NoEvalVAEStage(VAEStage):
    """The VAE stage with evaluation skipped: the resume test is about the training state."""

    def evaluate(self, state, step, frozen):
        return {}


@pytest.mark.slow  # the loop's resume stays pinned by test_train and test_coda_stage
def test_resume_through_the_loop_is_bitwise_identical(tmp_path):
    cfg = micro(total_steps=20, checkpoint_every_steps=10, eval_every_steps=1000)
    cfg.lock()
    loop.train(cfg, str(tmp_path), _NoEvalVAEStage)
    ckpts = tmp_path / "checkpoints"
    want = {k: ckpt_lib.load_params(ckpts, key=k) for k in ("params", "ema_params")}
    # A run killed after step 10's checkpoint: resuming redoes steps 11..20.
    os.rename(ckpts / "20", tmp_path / "lost-20")
    loop.train(cfg, str(tmp_path), _NoEvalVAEStage)
    for key, ref in want.items():
        got = ckpt_lib.load_params(ckpts, key=key)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _replace_leaf(tree, path, value):
    head, _, rest = path.partition("/")
    return {**tree, head: _replace_leaf(tree[head], rest, value) if rest else value}


def test_the_gan_reference_gradient_is_that_of_the_decode_wrt_its_parameter(initial):
    """reference_grad(g) = ∂⟨decode(z; W), g⟩/∂W for W = gan.adaptive_param: λ's input."""
    cfg = micro(**{"gan.enabled": True})
    stage = VAEStage(cfg, cfg.total_steps, shd.make_mesh({"data": 1, "fsdp": 1},
                                                         jax.devices()[:1]))
    (batch,) = real_batches(cfg, 1)
    images = jnp.asarray(batch["image"])
    path = cfg.gan.adaptive_param
    params = initial.params
    cotangent = jax.random.normal(jax.random.PRNGKey(3), images.shape)

    @jax.jit
    def both(p):
        rng = jax.random.PRNGKey(4)
        (_, kl), backward, (z, _, _) = jax.vjp(
            lambda q: stage.forward(q, images, rng), p, has_aux=True
        )
        got = stage.reference_grad(backward, jnp.zeros_like(kl))(cotangent)

        def decoded(w):
            out = stage.model.apply({"params": _replace_leaf(p, path, w)}, z, method="decode")
            return jnp.vdot(out, cotangent)

        return got, jax.grad(decoded)(get_path(p, path))

    got, want = both(params)
    assert got.shape == get_path(params, path).shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))


def test_a_gan_step_adds_the_adaptively_weighted_adversarial_term(initial):
    """Discriminator active from step 0: λ > 0, the D step runs, and the loss is the
    reconstruction terms plus weight·λ·L_adv."""
    cfg = micro(**{"gan.enabled": True, "gan.start": 0})
    (batch,) = real_batches(cfg, 1)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    gan = VAEStage(cfg, cfg.total_steps, mesh).gan
    extra = nn.unbox(gan.init(jax.random.PRNGKey(2), cfg.data.image_size))
    m = Run(cfg, initial.replace(extra=jax.device_get(extra))).step(batch)
    assert m["disc_active"] == 1.0 and m["adaptive_weight"] > 0
    assert np.isfinite(m["disc_grad_norm"]) and m["disc_grad_norm"] > 0
    size = cfg.data.image_size
    rec = m["l1_loss"] + m["l2_loss"] + cfg.loss.kl_weight * m["kl_loss"] / (3 * size**2)
    adv = cfg.gan.weight * m["adaptive_weight"] * m["gan_g_loss"]
    np.testing.assert_allclose(m["loss"], rec + adv, rtol=1e-5)


def test_the_posterior_is_sampled_from_its_named_stream(trained):
    """The training forward decodes mean + σ·ε with ε drawn from stream(step key, "posterior")."""
    cfg, run, _ = trained
    (batch,) = real_batches(cfg, 1)
    params = jax.device_get(run.state.params)
    rng = step_rng(jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    _, (z, mean, logvar) = jax.jit(run.stage.forward)(params, jnp.asarray(batch["image"]), rng)
    eps = jax.random.normal(stream(rng, "posterior"), mean.shape)
    np.testing.assert_allclose(z, mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(z - mean)) > 1e-3


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_8_devices_give_the_loss_of_1(initial, trained):
    """Per-sample GroupNorm and a sharding-independent ε: the 1-device run's losses to fp32
    rounding of the differently split reductions (rtol 1e-5)."""
    cfg, _, history = trained
    eight = Run(cfg, initial, devices=jax.devices()[:8], mesh_axes={"data": 4, "fsdp": 2})
    kernel = eight.state.params["decoder"]["conv_in"]["kernel"]
    assert "fsdp" in kernel.sharding.spec  # the parameters really are split
    for b, m1 in zip(real_batches(cfg, 3), history, strict=False):
        m8 = eight.step(b)
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["kl_loss"], m1["kl_loss"], rtol=1e-5)


@pytest.mark.parametrize("variant", ["demo", "photos", "micro"])
def test_every_variant_passes_the_config_checks_and_builds(variant):
    cfg = load_config_file(os.path.join(REPO, "configs/klvae.py"), variant)
    config_checks.check_config(cfg, num_devices=1, num_hosts=1)  # the CPU runs
    model = build.vae(cfg)
    assert model.resolution == cfg.data.image_size and cfg.trainer == "vae"


def test_bad_vae_configs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown variant 'tiny'"):
        load_config_file(os.path.join(REPO, "configs/klvae.py"), "tiny")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    cfg = micro(**{"gan.enabled": True, "gan.adaptive_param": "vit_decoder/to_pixel/kernel"})
    with pytest.raises(config_checks.ConfigError, match=re.escape("adaptive_param='vit_dec")):
        VAEStage(cfg, 30, mesh)
    with pytest.raises(config_checks.ConfigError, match=re.escape("pfid=True: must be False")):
        VAEStage(micro(**{"fid_eval.pfid": True}), 30, mesh)
    with pytest.raises(ValueError, match=re.escape("resolution=16 must equal data.image_size=32")):
        build.vae(micro(**{"data.image_size": 32}))


@pytest.mark.slow  # one Inception compile: ~1-2 min on 2 CPU cores
def test_rfid_of_the_ema_weights_when_fid_eval_is_due(trained):
    _, run, _ = trained
    fid_cfg = micro(**{"fid_eval.every_steps": 30, "fid_eval.num_images": 16,
                       "fid_eval.batch_size": 8})
    stage = VAEStage(fid_cfg, fid_cfg.total_steps, run.mesh)
    with run:
        results = stage.evaluate(run.state, 30, {"lpips": None})
    fid = results["fid_ema"]
    assert fid["num_images"] == 16 and np.isfinite(fid["rfid"]) and fid["rfid"] > 0
    assert "pfid" not in fid and "codebook_usage" not in fid
