"""Dropout whose mask costs fewer random words: ``bits``-bit draws packed into 32-bit words.

Why: ``flax.linen.Dropout`` draws one 32-bit threefry word per element and turns it into a float
uniform. On CPU that was ~15% of a RAR train step (performance.md). Here each 32-bit word gives
``32 // bits`` masks (uint8 or uint16 lanes of one word, compared against an integer threshold),
so a step draws a quarter (bits=8) or half (bits=16) of the words. The keep probability becomes
``t / 2**bits`` with ``t = round((1 - rate) · 2**bits)`` (0.1 → 0.1016 at 8 bits, 0.10000 at 16)
and kept values are scaled by its exact inverse, so the expectation is preserved exactly.

The words are drawn per row (``x.shape[:-1] + (⌈last / lanes⌉,)``), so the mask is a function of
each element's index only: with partitionable threefry it does not depend on the sharding, and
the leading (batch) axes stay sharded. ``bits=32`` is flax's ``nn.Dropout`` exactly (same stream,
same mask): the module is also named ``Dropout``, so its RNG path is the one flax's had, and it
hands its key to ``nn.Dropout``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LANE_DTYPES = {8: jnp.uint8, 16: jnp.uint16}


def keep_threshold(rate: float, bits: int) -> int:
    """Integer threshold t: an element is kept when its ``bits``-bit draw is < t."""
    return round((1.0 - rate) * 2**bits)


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float, bits: int) -> jax.Array:
    """Boolean keep mask of ``shape`` from ``bits``-bit lanes of 32-bit threefry words."""
    lanes = 32 // bits
    last = shape[-1]
    words = jax.random.bits(rng, (*shape[:-1], math.ceil(last / lanes)), jnp.uint32)
    lane = jax.lax.bitcast_convert_type(words, LANE_DTYPES[bits])  # [..., words, lanes]
    lane = lane.reshape((*shape[:-1], -1))[..., :last]
    return lane < keep_threshold(rate, bits)


class Dropout(nn.Module):
    """``nn.Dropout(rate)`` with ``bits``-bit masks (32: flax's own, bit for bit)."""

    rate: float
    bits: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.bits not in (8, 16, 32):
            raise ValueError(f"dropout bits must be 8, 16 or 32, got {self.bits}")
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        rng = self.make_rng("dropout")
        if self.bits == 32:
            return nn.Dropout(self.rate)(x, deterministic=False, rng=rng)
        t = keep_threshold(self.rate, self.bits)
        if not 0 < t < 2**self.bits:
            raise ValueError(f"dropout rate {self.rate} rounds to 0 or 1 at {self.bits} bits")
        mask = keep_mask(rng, x.shape, self.rate, self.bits)
        scale = jnp.asarray(2**self.bits / t, x.dtype)
        return jax.lax.select(mask, x * scale, jnp.zeros_like(x))
