"""Optimizer pieces: warmup+cosine values, clipping really applied, decay mask, EMA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tokpost_jax.train import optim


def _cfg(**kw):
    base = dict(
        lr=1e-3,
        warmup_init_lr=1e-5,
        warmup_steps=10,
        min_lr=1e-4,
        b1=0.9,
        b2=0.95,
        weight_decay=0.0,
        clip_grad_norm=0.0,
        ema_decay=0.9,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_schedule_values():
    s = optim.lr_schedule(_cfg(), total_steps=110)
    assert float(s(0)) == pytest.approx(1e-5, rel=1e-5)
    assert float(s(5)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-5)
    assert float(s(10)) == pytest.approx(1e-3, rel=1e-5)
    assert float(s(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine midpoint
    assert float(s(110)) == pytest.approx(1e-4, rel=1e-5)


def test_clipping_is_applied():
    params = {"w": jnp.ones((3, 3))}
    grads = [{"w": jnp.full((3, 3), 100.0)}, {"w": jnp.full((3, 3), -1.0)}]

    def run(clip):
        tx = optim.adamw(_cfg(clip_grad_norm=clip), optax.constant_schedule(0.1))
        state, p = tx.init(params), params
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["w"])

    clipped, unclipped = run(1.0), run(0.0)
    assert not np.allclose(clipped, unclipped)
    # With clip 1 both grads have norm 1 after clipping (3 = sqrt(9) entries each ±1/3).
    tx = optim.adamw(_cfg(clip_grad_norm=1.0), optax.constant_schedule(0.1))
    first = tx.update(grads[0], tx.init(params), params)[1]
    mu = np.asarray(first[1][0].mu["w"])  # adam first moment sees the clipped gradient
    np.testing.assert_allclose(mu, 0.1 * 100.0 / np.sqrt(9 * 100.0**2), rtol=1e-5)


def test_weight_decay_mask():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "pos_embed": jnp.ones((1, 4, 2)),
        "norm": {"scale": jnp.ones(2)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "pos_embed": False,
        "norm": {"scale": False},
    }


def test_ema_update():
    out = optim.ema_update({"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, 0.9)
    np.testing.assert_allclose(np.asarray(out["a"]), 0.1)
    assert jax.tree.structure(out) == jax.tree.structure({"a": 0})
