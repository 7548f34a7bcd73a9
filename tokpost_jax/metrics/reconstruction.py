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


def _gaussian_window(sigma: float, truncate: float) -> jax.Array:
    radius = int(truncate * sigma + 0.5)
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * jnp.square(x / sigma))
    return w / jnp.sum(w)


def _filter_valid(x: jax.Array, window: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of [B, H, W, C] along H then W, channel by channel."""
    k = window.shape[0]
    b, h, w, c = x.shape
    y = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
    kh = window.reshape(k, 1, 1, 1)
    kw = window.reshape(1, k, 1, 1)
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    y = jax.lax.conv_general_dilated(y, kh, (1, 1), "VALID", dimension_numbers=dn, precision=prec)
    y = jax.lax.conv_general_dilated(y, kw, (1, 1), "VALID", dimension_numbers=dn, precision=prec)
    return jnp.moveaxis(y.reshape(b, c, h - k + 1, w - k + 1), 1, -1)


def ssim_per_image(
    x: jax.Array, y: jax.Array, sigma: float = 1.5, truncate: float = 3.5
) -> jax.Array:
    """SSIM per image on the [0, 1] scale (inputs in [-1, 1]), [B].

    The Wang et al. (2004) definition as scikit-image computes it with ``gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1``: an 11x11 Gaussian window, K1 = 0.01,
    K2 = 0.03, the map averaged over the window-valid region and the channels.
    """
    window = _gaussian_window(sigma, truncate)
    if x.shape[1] < window.shape[0] or x.shape[2] < window.shape[0]:
        raise ValueError(f"SSIM needs images of at least {window.shape[0]} px, got {x.shape}")
    a = (x.astype(jnp.float32) + 1.0) * 0.5
    b = (y.astype(jnp.float32) + 1.0) * 0.5
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a * mu_a
    var_b = _filter_valid(b * b, window) - mu_b * mu_b
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))
