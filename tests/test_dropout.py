"""models/dropout.py: 32 bits is flax's nn.Dropout bit for bit; fewer bits keep the expectation
exactly, drop at the rounded rate, and give the same mask however the batch is sharded."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tokpost_jax.models.dropout import Dropout, keep_threshold


class _Wrap(nn.Module):
    """One dropout site inside a parent, as in the models (the RNG path includes the name)."""

    impl: type
    rate: float
    bits: int | None = None

    @nn.compact
    def __call__(self, x):
        layer = self.impl(self.rate) if self.bits is None else self.impl(self.rate, self.bits)
        return layer(x, deterministic=False)


def _apply(module, x, seed=0):
    return module.apply({}, x, rngs={"dropout": jax.random.key(seed)})


def test_32_bits_is_flax_dropout_bit_for_bit():
    x = jax.random.normal(jax.random.key(1), (4, 10, 33))
    want = _apply(_Wrap(nn.Dropout, 0.1), x)
    got = _apply(_Wrap(Dropout, 0.1, 32), x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("bits", [8, 16])
def test_fewer_bits_drop_at_the_rounded_rate_and_keep_the_mean(bits):
    rate = 0.1
    x = jnp.ones((64, 50, 257))  # odd last axis: lanes of the last word are sliced off
    y = np.asarray(_apply(_Wrap(Dropout, rate, bits), x))
    kept = y != 0
    p_keep = keep_threshold(rate, bits) / 2**bits
    n = kept.size
    assert abs(kept.mean() - p_keep) < 4 * np.sqrt(p_keep * (1 - p_keep) / n)
    np.testing.assert_allclose(y[kept], 1 / p_keep, rtol=1e-6)  # kept values scaled exactly
    assert abs(y.mean() - 1.0) < 4 * np.sqrt((1 - p_keep) / p_keep / n)
    assert not np.array_equal(kept[0], kept[1])  # rows draw their own words


def test_the_mask_does_not_depend_on_the_batch_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    x = jnp.ones((16, 6, 130))
    f = jax.jit(lambda v: _apply(_Wrap(Dropout, 0.25, 8), v))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(f(sharded)), np.asarray(f(x)))


def test_unsupported_bits_and_unrepresentable_rates_are_errors():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="8, 16 or 32"):
        _apply(_Wrap(Dropout, 0.1, 4), x)
    with pytest.raises(ValueError, match="rounds to 0 or 1"):
        _apply(_Wrap(Dropout, 1e-4, 8), x)
