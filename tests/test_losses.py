"""Hinge/LeCAM hand cases, LeCAM EMA, adaptive weight vs finite differences, InfoNCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import losses


def test_hinge_d_loss_hand_case():
    real = jnp.array([2.0, 0.5, -1.0, 1.0])  # relu(1 - r): 0, 0.5, 2, 0  -> mean 0.625
    fake = jnp.array([-2.0, 0.5, 1.0, -1.0])  # relu(1 + f): 0, 1.5, 2, 0 -> mean 0.875
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.625 + 0.875))
    # A perfect discriminator (margins met) has zero loss.
    assert float(losses.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -4.0))) == 0.0


def test_hinge_g_loss_hand_case():
    assert float(losses.hinge_g_loss(jnp.array([[1.0, 3.0], [-2.0, 2.0]]))) == pytest.approx(-1.0)


def test_lecam_loss_hand_case_and_constant_emas():
    real = jnp.array([1.0, -1.0, 3.0])
    fake = jnp.array([0.0, -2.0, 2.0])
    ema_real, ema_fake = jnp.array(0.5), jnp.array(-0.5)
    # relu(real - ema_fake) = 1.5, 0, 3.5 -> squares mean (2.25 + 12.25) / 3
    # relu(ema_real - fake) = 0.5, 2.5, 0 -> squares mean (0.25 + 6.25) / 3
    expected = (2.25 + 12.25) / 3 + (0.25 + 6.25) / 3
    assert float(losses.lecam_loss(real, fake, ema_real, ema_fake)) == pytest.approx(expected)
    g_real, g_fake = jax.grad(lambda a, b: losses.lecam_loss(real, fake, a, b), (0, 1))(
        ema_real, ema_fake)
    assert float(g_real) == 0.0 and float(g_fake) == 0.0
    g_logits = jax.grad(lambda r: losses.lecam_loss(r, fake, ema_real, ema_fake))(real)
    np.testing.assert_allclose(g_logits, 2 * np.array([1.5, 0.0, 3.5]) / 3, rtol=1e-6)


def test_update_lecam_ema():
    real, fake = jnp.array([1.0, 3.0]), jnp.array([-4.0, 0.0])
    er, ef = losses.update_lecam_ema(0.0, 0.0, real, fake, decay=0.9)
    assert float(er) == pytest.approx(0.2) and float(ef) == pytest.approx(-0.2)
    er, ef = losses.update_lecam_ema(er, ef, real, fake, decay=0.9)
    assert float(er) == pytest.approx(0.9 * 0.2 + 0.1 * 2.0)
    assert float(ef) == pytest.approx(0.9 * -0.2 + 0.1 * -2.0)
    # Reference default decay 0.999; the EMAs carry no gradient to the logits.
    g = jax.grad(lambda r: losses.update_lecam_ema(0.0, 0.0, r, fake)[0])(real)
    assert float(jnp.abs(g).sum()) == 0.0


def test_adaptive_weight_explicit_and_clamped():
    g1 = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    g2 = jnp.array([1.0, 2.0, 2.0])  # norm 3
    assert float(losses.adaptive_weight(g1, g2)) == pytest.approx(5.0 / (3.0 + 1e-4), rel=1e-6)
    # Pytrees: global norm over all leaves.
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    assert float(losses.adaptive_weight(tree, g2, eps=0.0)) == pytest.approx(5.0 / 3.0)
    # Upper clamp: vanishing adversarial gradient -> 1e4 (not 5 / 1e-4 = 5e4).
    assert float(losses.adaptive_weight(g1, jnp.zeros(3))) == pytest.approx(1e4)
    assert float(losses.adaptive_weight(g1, jnp.zeros(3), max_value=7.0)) == pytest.approx(7.0)
    # Lower end: a zero reconstruction gradient gives exactly 0.
    assert float(losses.adaptive_weight(jnp.zeros(4), g2)) == 0.0
    # Detached.
    dg1, dg2 = jax.grad(lambda a, b: losses.adaptive_weight(a, b), (0, 1))(g1, g2)
    assert float(jnp.abs(dg1).sum()) == 0.0 and float(jnp.abs(dg2).sum()) == 0.0


def test_adaptive_weight_matches_finite_differences_on_toy_model():
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(6, 3)) * 0.5, jnp.float32)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)

    def decode(last):  # 2-layer model; `last` is the "decoder's last-layer kernel"
        return jnp.tanh(x @ w1) @ last

    rec = jax.jit(lambda last: jnp.mean((decode(last) - target) ** 2))
    adv = jax.jit(lambda last: -jnp.mean(jnp.sin(decode(last))))  # a smooth non-linear "G loss"

    weight = losses.adaptive_weight(jax.grad(rec)(w2), jax.grad(adv)(w2))

    def fd_grad(f, w, h=1e-2):  # central differences, one kernel entry at a time
        w = np.asarray(w, np.float64)
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            e = np.zeros_like(w)
            e[idx] = h
            g[idx] = (float(f(jnp.asarray(w + e, jnp.float32))) -
                      float(f(jnp.asarray(w - e, jnp.float32)))) / (2 * h)
        return g

    g_rec, g_adv = fd_grad(rec, w2), fd_grad(adv, w2)
    expected = np.linalg.norm(g_rec) / (np.linalg.norm(g_adv) + 1e-4)
    assert float(weight) == pytest.approx(expected, rel=2e-3)


def _numpy_info_nce(s: np.ndarray, t: np.ndarray, scale: float) -> float:
    logits = scale * s.astype(np.float64) @ t.astype(np.float64).T

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_info_nce_alignment_symmetry_and_numpy_reference():
    n, d = 8, 16
    eye = np.eye(n, d, dtype=np.float32) * 10.0  # one-hot-ish, well separated pairs
    aligned = float(losses.info_nce(eye, eye))
    shuffled = float(losses.info_nce(eye, eye[np.roll(np.arange(n), 1)]))
    assert aligned < 1e-3
    assert shuffled > 50.0  # the positive scores 0 while one negative scores 100
    assert aligned < shuffled

    rng = np.random.default_rng(1)
    s = rng.normal(size=(n, d)).astype(np.float32)
    t = rng.normal(size=(n, d)).astype(np.float32)
    np.testing.assert_allclose(float(losses.info_nce(s, t)), float(losses.info_nce(t, s)),
                               rtol=1e-6)
    for scale in (1.0, 0.3):
        np.testing.assert_allclose(float(losses.info_nce(s, t, logit_scale=scale)),
                                   _numpy_info_nce(s, t, scale), rtol=1e-5)
    # Random pairs sit near log(n); no feature normalisation happens (scaling inputs matters).
    assert float(losses.info_nce(s * 0.01, t * 0.01)) == pytest.approx(np.log(n), rel=1e-2)
    with pytest.raises(ValueError):
        losses.info_nce(s, t[:, :4])


def test_lpips_head_dropout_acts_only_in_training():
    """loss.lpips_dropout: the official trainer leaves LPIPS's head dropout (0.5) on; it must be
    a no-op at evaluation (deterministic) and change the value in training."""
    from tokpost_jax.convert.lpips_weights import load_lpips_params
    from tokpost_jax.models.lpips import LPIPS

    params = {"params": load_lpips_params()}
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    y = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    plain = LPIPS().apply(params, x, y)
    eval_ = LPIPS(dropout_rate=0.5).apply(params, x, y, deterministic=True)
    train = LPIPS(dropout_rate=0.5).apply(params, x, y, deterministic=False,
                                         rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(np.asarray(eval_), np.asarray(plain))
    assert not np.allclose(np.asarray(train), np.asarray(plain))


def test_adaptive_weight_per_group_matches_each_group_alone():
    """gan.adaptive_weight_groups=G: λ from each contiguous group's own gradients (the official
    per-GPU losses), not the batch's."""
    import ml_collections

    from tokpost_jax.train.gan import GANSide

    gan = ml_collections.ConfigDict(dict(
        adaptive_weight=True, adaptive_eps=1e-4, adaptive_max=1e4, adaptive_weight_groups=2,
        ramp="none", discriminator="patch", patch_channels=4, patch_layers=1, start=0,
        optim=dict(lr=1e-4, warmup_init_lr=0.0, warmup_steps=0, min_lr=0.0, b1=0.5, b2=0.9,
                   weight_decay=0.0, clip_grad_norm=0.0)))
    side = GANSide(gan, 10, 1.0, 0)
    w = jax.random.normal(jax.random.PRNGKey(0), (8 * 8 * 3, 5))
    reference = lambda g: g.reshape(g.shape[0], -1).sum(0) @ w  # a linear map, like ∂/∂W
    rec = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    adv = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3)) * jnp.asarray(
        [1.0, 1.0, 10.0, 10.0])[:, None, None, None]
    lam = np.asarray(side._adaptive(rec, adv, reference))
    for g in (slice(0, 2), slice(2, 4)):
        want = losses.adaptive_weight(reference(rec[g]), reference(adv[g]))
        np.testing.assert_allclose(lam[g], float(want), rtol=1e-5)
    assert lam[0] > 5 * lam[2]  # the second group's adversarial gradient is 10× larger
