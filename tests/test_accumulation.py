"""Gradient accumulation (train/accumulate.py) and rematerialisation (models/remat.py).

k accumulated microbatches against one step on the whole batch, from the same state and key:
after one step everything agrees within float32 summation order. Parameters (params, EMA, the
discriminator's): ``|a − b| <= 1e-5·|b| + 1e-6``, except where the gradient is rounding noise
(|g| <= 1e-6·max|g|: a bias that a following norm cancels, an attention key bias — zero in exact
arithmetic): the first Adam step moves such a weight by lr·noise/(|noise| + 1e-8), anywhere in
[−lr, lr], so there only ``|a − b| <= 2·lr`` holds. Optimizer moments
and the other state (the gradients themselves, LeCAM, code usage, spectral vectors):
``|a − b| <= 1e-5·|b| + 1e-5·max|group|``, the group being one moment over all parameters
(rounding noise scales with the gradients). What is random per
microbatch (dropout, DiffAugment, perturbation, label dropout, orders, the posterior sample) is
switched off or made negligible in the test configs; the statistics that are per microbatch by
design are tested as documented: the adaptive weight and CODA's entropy batch distribution of k
microbatches equal one step with k groups on the batch ordered microbatch by microbatch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tokpost_jax import config_checks as cc
from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.data import make_train_iterator
from tokpost_jax.models import build
from tokpost_jax.models.klvae import KLVAE
from tokpost_jax.train import accumulate
from tokpost_jax.train.coda import CODAStage
from tokpost_jax.train.generator import GeneratorStage
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.tokenizer import TokenizerStage
from tokpost_jax.train.vae import VAEStage

RTOL = 1e-5  # float32 summation order
PARAM_ATOL = 1e-6  # absolute, on parameters after one Adam step of lr 1e-5 (module docstring)
NOISE = 1e-6  # |g| below this × max|g|: a gradient that is rounding noise (module docstring)
SCALED_ATOL = 1e-5  # relative to the group's largest value, on moments and other state


def _config(path: str, variant: str, **overrides):
    cfg = load_config_file(path, variant, lock=False)
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def _images(cfg, n: int) -> dict:
    it = make_train_iterator(cfg.data, seed=0, host_batch_size=n, process_index=0,
                             process_count=1)
    return {k: jnp.asarray(v) for k, v in next(it).items()}


_INITIAL: dict = {}


def _initial_state(stage_cls, cfg, prepare=None):
    """Seed 0's state (then ``prepare(stage, state)``), computed once per stage and GAN switch:
    neither k nor the group counts change its shapes (one init compile per family)."""
    key = (stage_cls, cfg.trainer, bool(cfg.gan.enabled) if "gan" in cfg else False, prepare)
    if key not in _INITIAL:
        stage = stage_cls(cfg, cfg.total_steps, _mesh())
        state = jax.jit(lambda r: nn.unbox(stage.init(r)))(jax.random.PRNGKey(0))
        if prepare is not None:
            state = prepare(stage, state)
        _INITIAL[key] = jax.device_get(state)
    return _INITIAL[key]


def _one_step(stage_cls, cfg, batch, prepare=None):
    """(state after one jitted step, metrics) from :func:`_initial_state`, key 1."""
    state = _initial_state(stage_cls, cfg, prepare)
    stage = stage_cls(cfg, cfg.total_steps, _mesh())
    new, metrics = jax.jit(stage.train_step)(state, batch, jax.random.PRNGKey(1),
                                             stage.frozen_params())
    return jax.device_get(new), jax.device_get(metrics)


def _group(path) -> str:
    """The path up to its last non-dict key: one optimizer moment (``[0].mu``), or the whole
    tree when it is a dict of parameter names (gradients)."""
    last = max((i for i, k in enumerate(path) if not isinstance(k, jax.tree_util.DictKey)),
               default=-1)
    return jax.tree_util.keystr(tuple(path[: last + 1]))


def assert_trees_close(got, want, what: str, rtol: float = RTOL,
                       scaled_atol: float = SCALED_ATOL) -> None:
    """Leafwise within ``rtol`` and ``scaled_atol`` × the largest |value| of the leaf's group
    (a gradient's rounding noise scales with the gradients, not with a leaf that is itself
    noise: the key bias of attention has a zero gradient in exact arithmetic)."""
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want), what
    scale: dict[str, float] = {}
    for (path, _), b in zip(flat_got, flat_want, strict=True):
        b = np.asarray(b)
        if np.issubdtype(b.dtype, np.inexact) and b.size:
            g = _group(path)
            scale[g] = max(scale.get(g, 0.0), float(np.max(np.abs(b))))
    for (path, a), b in zip(flat_got, flat_want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        name = f"{what}{jax.tree_util.keystr(path)}"
        if not np.issubdtype(b.dtype, np.inexact):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        atol = scaled_atol * max(scale.get(_group(path), 0.0), 1e-30)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def _noise(opt_state: Any, params: Any) -> Any:
    """Per parameter element: is its gradient rounding noise? From Adam's first moment (mu =
    (1 − b1)·g after one step); None where the moments do not mirror ``params``."""
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    if mu is None or jax.tree.structure(mu) != jax.tree.structure(params):
        return None
    top = max(float(np.max(np.abs(np.asarray(m)))) for m in jax.tree.leaves(mu))
    return jax.tree.map(lambda m: np.abs(np.asarray(m)) <= NOISE * top, mu)


def assert_params_close(got: Any, want: Any, noise: Any, lr: float, what: str) -> None:
    """``|a − b| <= RTOL·|b| + PARAM_ATOL``, and ``<= 2·lr`` where ``noise`` (module docstring)."""
    masks = jax.tree.leaves(noise) if noise is not None else [None] * len(jax.tree.leaves(want))
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, a), b, m in zip(flat, jax.tree.leaves(want), masks, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        bound = RTOL * np.abs(b) + PARAM_ATOL
        if m is not None:
            bound = np.where(m, np.maximum(bound, 2 * lr), bound)
        bad = np.abs(a - b) > bound
        assert not bad.any(), (
            f"{what}{jax.tree_util.keystr(path)}: {int(bad.sum())}/{bad.size} differ, max "
            f"{float(np.max(np.abs(a - b)[bad])):.3g} (lr {lr:g})")


def assert_states_close(got, want, metrics: dict) -> None:
    """Every part of two train states after one step (module docstring); ``metrics`` are the
    reference step's (its learning rates)."""
    noise = _noise(want.opt_state, want.params)
    for field in ("params", "ema_params"):
        assert_params_close(getattr(got, field), getattr(want, field), noise,
                            float(metrics["lr"]), field)
    assert_trees_close(got.opt_state, want.opt_state, "opt_state")
    extra_got, extra_want = dict(got.extra), dict(want.extra)
    if "disc" in extra_want:
        disc_got, disc_want = dict(extra_got.pop("disc")), dict(extra_want.pop("disc"))
        assert_params_close(disc_got.pop("params"), disc_want["params"],
                            _noise(disc_want["opt_state"], disc_want["params"]),
                            float(metrics["disc_lr"]), "extra['disc']['params']")
        disc_want.pop("params")
        assert_trees_close(disc_got, disc_want, "extra['disc']")
    assert_trees_close(extra_got, extra_want, "extra")
    assert int(got.step) == int(want.step) == 1


# --------------------------------------------------------------------------- the helper


def test_split_join_and_the_sample_order():
    """Microbatch i holds samples i, i+k, …; join restores the batch; k = 1 is the identity."""
    x = jnp.arange(24).reshape(12, 2)
    micro = accumulate.split({"x": x}, 3)["x"]
    assert micro.shape == (3, 4, 2)
    np.testing.assert_array_equal(micro[1, :, 0], [2, 8, 14, 20])  # samples 1, 4, 7, 10
    np.testing.assert_array_equal(accumulate.join(micro), x)
    order = accumulate.sample_order(12, 3)
    np.testing.assert_array_equal(np.asarray(x)[order], np.asarray(micro).reshape(12, 2))
    with pytest.raises(ValueError, match="does not split into 5 microbatches"):
        accumulate.split({"x": x}, 5)


def test_accumulate_is_the_batch_mean_and_keys_are_folded_per_microbatch():
    w = jnp.array([0.5, -1.0])
    batch = {"x": jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)}

    def fn(mb, rng):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((mb["x"] @ p) ** 2))(w)
        return {"grads": grads, "loss": loss}, {"key": rng}

    whole, _ = fn(batch, jax.random.PRNGKey(3))
    for k in (1, 2, 4):
        mean, per = jax.jit(lambda b, r, k=k: accumulate.accumulate(fn, b, r, k))(
            batch, jax.random.PRNGKey(3))
        assert_trees_close(mean, whole, f"k={k}")
        keys = np.asarray(per["key"])
        assert keys.shape[0] == k and len({tuple(row) for row in keys}) == k
    want = accumulate.micro_rng(jax.random.PRNGKey(3), 1)
    np.testing.assert_array_equal(keys[1], np.asarray(want))


# --------------------------------------------------------------------------- the stages

#: The micro tokenizer with LPIPS and the PatchGAN (active from step 0), nothing random per
#: microbatch, λ fixed (its per-microbatch form has its own test) and LeCAM's weight 0 (its
#: loss sees each microbatch's EMA update; the EMAs kept are compared), dead codes re-seeded.
TOKENIZER = {
    "perturbation.enabled": False, "gan.start": 0, "gan.diffaug": False,
    "gan.adaptive_weight": False, "gan.lecam_weight": 0.0, "dead_code_restart.every_steps": 1,
}


@pytest.fixture(scope="module")
def tokenizer_reference():
    cfg = _config("configs/tokenizer.py", "micro_gan", **TOKENIZER)
    batch = _images(cfg, cfg.batch_size)
    return batch, _one_step(TokenizerStage, cfg, batch)


@pytest.mark.parametrize("k", [2])  # 4: the generator's test (a tokenizer compile is seconds)
def test_tokenizer_with_gan_accumulated_equals_one_batch(tokenizer_reference, k):
    batch, (want, want_metrics) = tokenizer_reference
    got, metrics = _one_step(
        TokenizerStage, _config("configs/tokenizer.py", "micro_gan", grad_accum_steps=k,
                                **TOKENIZER), batch)
    assert_states_close(got, want, want_metrics)
    assert float(want_metrics["disc_active"]) == 1.0 and float(want_metrics["disc_grad_norm"]) > 0
    for key in ("loss", "l2_loss", "lpips_loss", "psnr", "codebook_usage", "grad_norm",
                "disc_hinge", "disc_grad_norm", "codes_restarted"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


def test_the_adaptive_weight_is_per_microbatch():
    """k microbatches with one λ each = one step with k λ groups on the batch ordered
    microbatch by microbatch (adaptive_eps ≈ 0: each group's gradients are 1/k of a
    microbatch's, and only eps does not scale)."""
    base = {**TOKENIZER, "gan.adaptive_weight": True, "gan.adaptive_eps": 1e-12,
            "dead_code_restart.every_steps": 0}
    cfg = _config("configs/tokenizer.py", "micro_gan", grad_accum_steps=2, **base)
    batch = _images(cfg, cfg.batch_size)
    got, metrics = _one_step(TokenizerStage, cfg, batch)
    order = accumulate.sample_order(cfg.batch_size, 2)
    grouped = _config("configs/tokenizer.py", "micro_gan", **base,
                      **{"gan.adaptive_weight_groups": 2})
    want, want_metrics = _one_step(TokenizerStage, grouped,
                                   jax.tree.map(lambda x: x[order], batch))
    assert_states_close(got, want, want_metrics)
    np.testing.assert_allclose(metrics["adaptive_weight"], want_metrics["adaptive_weight"],
                               rtol=1e-5)


def _noisy(params: Any, std: float = 0.05, seed: int = 7) -> Any:
    """``params`` plus host-drawn Gaussian noise (eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: np.asarray(p) + std * rng.standard_normal(np.shape(p)).astype(np.float32),
        jax.device_get(params))


def _perturbed_rar(stage, state):
    """RAR with noisy parameters: adaLN-Zero's init leaves most block gradients zero."""
    params = _noisy(state.params)
    return state.replace(params=params, ema_params=params,
                         opt_state=jax.jit(stage.tx.init)(params))


#: No label dropout, no dropout, raster orders (random orders would differ per microbatch);
#: a warm-up starting at 1e-5 instead of 0, so that the first step moves the parameters.
GENERATOR = {"label_dropout": 0.0, "model.size.dropout": 0.0, "model.size.attn_dropout": 0.0,
             "randomness.anneal_start": 0, "randomness.anneal_end": 0,
             "optim.warmup_init_lr": 1e-5}


def _tokens(batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, 64, (batch_size, 16)), jnp.int32),
            "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}


@pytest.fixture(scope="module")
def generator_reference():
    cfg = _config("configs/rar.py", "micro", **GENERATOR)
    batch = _tokens(cfg.batch_size)
    return batch, _one_step(GeneratorStage, cfg, batch, _perturbed_rar)


@pytest.mark.parametrize("k", [2, 4])
def test_generator_accumulated_equals_one_batch(generator_reference, k):
    batch, (want, want_metrics) = generator_reference
    got, metrics = _one_step(
        GeneratorStage, _config("configs/rar.py", "micro", grad_accum_steps=k, **GENERATOR),
        batch, _perturbed_rar)
    assert_states_close(got, want, want_metrics)
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


def test_generator_accumulation_on_a_sharded_mesh(generator_reference):
    """The loop's sharded, donating step (ShardedStage) with k = 2 on 4 devices (data 2 ×
    fsdp 2, each microbatch of 8 split over the 4 batch shards) equals one batch on 1 device."""
    batch, (want, want_metrics) = generator_reference
    cfg = _config("configs/rar.py", "micro", grad_accum_steps=2, **GENERATOR)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = GeneratorStage(cfg, cfg.total_steps, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = ShardedStage.build(stage, mesh, rules)
        state = jax.device_put(_initial_state(GeneratorStage, cfg, _perturbed_rar),
                               sharded.state_sharding)
        data = jax.device_put(batch, sharded.batch_sharding)
        got, _ = sharded.step(state, data, jax.random.PRNGKey(1), {})
        got = jax.device_get(got)
    assert_states_close(got, want, want_metrics)


@pytest.fixture
def mean_posterior(monkeypatch):
    """The posterior sample is drawn per microbatch (its own key): the equality tests decode
    the posterior mean instead, so both sides see the same latents by construction."""
    monkeypatch.setattr(KLVAE, "sample_posterior", lambda self, mean, logvar, rng=None: mean)


#: CODA micro with its GAN at full weight from step 0 (no ramp, λ fixed) and no entropy loss
#: (its batch distribution is per microbatch: the next test).
CODA = {"gan.ramp": "none", "gan.adaptive_weight": False, "loss.quantizer_weights.entropy": 0.0}


def test_coda_accumulated_equals_one_batch(mean_posterior):
    cfg = _config("configs/coda.py", "micro", **CODA)
    batch = _images(cfg, cfg.batch_size)
    want, want_metrics = _one_step(CODAStage, cfg, batch)
    got, metrics = _one_step(CODAStage, _config("configs/coda.py", "micro", grad_accum_steps=2,
                                                **CODA), batch)
    assert_states_close(got, want, want_metrics)
    for key in ("loss", "vq_loss", "psnr", "codebook_usage", "disc_hinge"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


def test_coda_entropy_batch_distribution_is_per_microbatch(mean_posterior):
    """With the entropy loss on, k microbatches = k entropy groups on the reordered batch."""
    base = {**CODA, "loss.quantizer_weights.entropy": 0.05}
    cfg = _config("configs/coda.py", "micro", grad_accum_steps=2, **base)
    batch = _images(cfg, cfg.batch_size)
    got, metrics = _one_step(CODAStage, cfg, batch)
    order = accumulate.sample_order(cfg.batch_size, 2)
    grouped = _config("configs/coda.py", "micro", **base,
                      **{"model.quantizer.entropy_groups": 2})
    want, want_metrics = _one_step(CODAStage, grouped, jax.tree.map(lambda x: x[order], batch))
    assert_states_close(got, want, want_metrics)
    np.testing.assert_allclose(metrics["entropy_loss"], want_metrics["entropy_loss"], rtol=1e-5)


def test_vae_with_gan_accumulated_equals_one_batch(mean_posterior):
    base = {"gan.enabled": True, "gan.start": 0, "gan.diffaug": False,
            "gan.adaptive_weight": False, "gan.lecam_weight": 0.0}
    cfg = _config("configs/klvae.py", "micro", **base)
    batch = _images(cfg, cfg.batch_size)
    want, want_metrics = _one_step(VAEStage, cfg, batch)
    got, metrics = _one_step(VAEStage, _config("configs/klvae.py", "micro", grad_accum_steps=2,
                                               **base), batch)
    assert_states_close(got, want, want_metrics)
    for key in ("loss", "kl_loss", "latent_std", "disc_hinge"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- config checks


def test_a_bad_accumulation_is_refused_naming_the_key():
    def errors(cfg, devices=1):
        try:
            cc.check_config(cfg, num_devices=devices, num_hosts=1)
        except cc.ConfigError as e:
            return {err.key: str(err) for err in getattr(e, "errors", (e,))}
        return {}

    tok = "configs/tokenizer.py"
    assert errors(_config(tok, "micro", grad_accum_steps=8)) == {}  # 8 microbatches of 1
    bad = errors(_config(tok, "micro", grad_accum_steps=3))
    assert list(bad) == ["grad_accum_steps"] and "multiple of grad_accum_steps x 1" in bad[
        "grad_accum_steps"]
    on_8 = errors(_config(tok, "micro", grad_accum_steps=2), devices=8)  # 8 % (2 × 8 shards)
    assert list(on_8) == ["grad_accum_steps"] and "8 batch shard(s)" in on_8["grad_accum_steps"]
    assert "must be an int >= 1" in errors(_config(tok, "micro", grad_accum_steps=0))[
        "grad_accum_steps"]
    # Per-microbatch statistics: ⌊0.25·2⌋ = 0 perturbed samples, λ groups, entropy groups.
    gan = errors(_config(tok, "micro_gan", grad_accum_steps=4,
                         **{"gan.adaptive_weight_groups": 4}))
    assert set(gan) == {"perturbation.beta", "gan.adaptive_weight_groups"}
    assert "⌊β·2⌋ = 0" in gan["perturbation.beta"]
    assert "batch_size / grad_accum_steps = 2" in gan["gan.adaptive_weight_groups"]
    coda = errors(_config("configs/coda.py", "micro", grad_accum_steps=2,
                          **{"model.quantizer.entropy_groups": 8}))
    assert list(coda) == ["model.quantizer.entropy_groups"]
    assert list(errors(_config("configs/rar.py", "micro", grad_accum_steps=32,
                               **{"data.data_dir": "/d"}))) == ["grad_accum_steps"]
    assert list(errors(_config(tok, "micro", **{"model.remat": "some"}))) == ["model.remat"]
    # The stage refuses the same before it builds anything.
    with pytest.raises(cc.ConfigValueError, match=r"config\.grad_accum_steps=3"):
        TokenizerStage(_config(tok, "micro", grad_accum_steps=3), 10, _mesh())


# --------------------------------------------------------------------------- remat


def _assert_remat_matches(make, init_args, loss_fn, policy, perturb=False):
    """Same loss and gradients (and the same parameter names) with ``policy`` as without."""
    plain, remat = make("none"), make(policy)
    params = nn.unbox(jax.jit(plain.init)(jax.random.PRNGKey(0), *init_args)["params"])
    if perturb:
        params = _noisy(params)
    shapes = jax.eval_shape(remat.init, jax.random.PRNGKey(0), *init_args)["params"]
    assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(params)  # same names
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(plain, p)))(params)
    loss_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss_fn(remat, p)))(params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert_trees_close(grads_r, grads, f"remat={policy}", rtol=1e-5, scaled_atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_tokenizer_loss_and_gradients(policy):
    images = _images(_config("configs/tokenizer.py", "micro"), 4)["image"]

    def make(p):
        return build.tokenizer(_config("configs/tokenizer.py", "micro", **{
            "model.remat": p, "model.encoder.drop_path": 0.2}))

    def loss(model, p):  # drop-path on: remat must replay the same masks
        recon, q = model.apply({"params": p}, images, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(jnp.square(recon - images)) + sum(q.losses.values())

    _assert_remat_matches(make, (images,), loss, policy)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_rar_loss_and_gradients(policy):
    assert _config("configs/rar.py", "micro").model.size.dropout > 0
    batch = _tokens(4)
    orders = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))

    def make(p):
        return build.generator(_config("configs/rar.py", "micro", **{"model.remat": p}))

    def loss(model, p):  # dropout on (0.1): remat must replay the same masks
        logits = model.apply({"params": p}, batch["tokens"], batch["label"], orders,
                             deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"]))

    _assert_remat_matches(make, (batch["tokens"], batch["label"], orders), loss, policy,
                          perturb=True)


def test_remat_keeps_the_vae_loss_and_gradients():
    """The KL-VAE's blocks (the VAE stage's model, and CODA's frozen VAE: model.remat there
    reaches the same module through CODATokenizer.remat)."""
    images = _images(_config("configs/klvae.py", "micro"), 4)["image"]

    def make(p):
        return build.vae(_config("configs/klvae.py", "micro", **{"model.remat": p}))

    def loss(model, p):
        recon, mean, logvar = model.apply({"params": p}, images)
        return jnp.mean(jnp.square(recon - images)) + 1e-3 * jnp.mean(model.kl(mean, logvar))

    _assert_remat_matches(make, (images,), loss, "full")
    assert build.tokenizer(_config("configs/coda.py", "micro", **{"model.remat": "full"})
                           ).remat == "full"
