"""Resizing with PyTorch's ``F.interpolate`` semantics, as constant separable matrices.

Why not ``jax.image.resize``: its cubic kernel (a = −0.5) and antialiasing differ from torch's
bicubic (A = −0.75, clamped taps, no antialias) and its area mode is not torch's adaptive average
pooling, so the DINO discriminator's input and CODA's multi-scale pool/upsample would not match the
released checkpoints. A matrix per axis is exact, jit-friendly and runs as two einsums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights of the 4 taps at offsets −1, 0, 1, 2 (torch's A = −0.75)."""

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """[out, in] float64 matrix of ``F.interpolate`` along one axis (``align_corners=False``).

    ``"area"`` is adaptive average pooling (input cells ``[floor(i·in/out), ceil((i+1)·in/out))``);
    ``"bicubic"`` is torch's cubic convolution with A = −0.75 and border-clamped taps.
    """
    m = np.zeros((out_size, in_size), np.float64)
    if mode == "area":
        for i in range(out_size):
            start = (i * in_size) // out_size
            end = -((-(i + 1) * in_size) // out_size)
            m[i, start:end] = 1.0 / (end - start)
    elif mode == "bicubic":
        scale = in_size / out_size
        src = (np.arange(out_size) + 0.5) * scale - 0.5  # no clamp for cubic (torch)
        base = np.floor(src)
        weights = _cubic_weights(src - base)
        for i in range(out_size):
            for tap in range(4):
                j = int(np.clip(base[i] - 1 + tap, 0, in_size - 1))
                m[i, j] += weights[i, tap]
    else:
        raise ValueError(f"unknown resize mode {mode!r}; use 'area' or 'bicubic'")
    return m


def resize_like_torch(images: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
    """NHWC resize equal to torch's ``F.interpolate(NCHW, size, mode)`` (separable matrices)."""
    _, h, w, _ = images.shape
    if (h, w) == tuple(size):
        return images
    mh = jnp.asarray(torch_resize_matrix(h, size[0], mode), images.dtype)
    mw = jnp.asarray(torch_resize_matrix(w, size[1], mode), images.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("sh,bhwc->bswc", mh, images, precision=hi)
    return jnp.einsum("tw,bswc->bstc", mw, x, precision=hi)
