"""Per-image reconstruction quality (PSNR, MSE) on [-1, 1] images, as pure jnp functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mse_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error per image on the [0, 1] scale, [B]."""
    d = (x.astype(jnp.float32) - y.astype(jnp.float32)) * 0.5
    return jnp.mean(jnp.square(d), axis=tuple(range(1, x.ndim)))


def psnr_per_image(x: jax.Array, y: jax.Array, eps: float = 1e-10) -> jax.Array:
    """PSNR in dB per image with peak 1 on the [0, 1] scale (inputs in [-1, 1]), [B]."""
    return -10.0 * jnp.log10(mse_per_image(x, y) + eps)
