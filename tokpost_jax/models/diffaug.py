"""DiffAugment for the GAN discriminator: translation, colour and cutout as pure jnp functions.

Follows the ``DiffAug`` class that RobusTok's DinoDisc uses (VAR / ImageFolder lineage, robustok.md
§4), with probability 1: every call applies all three ops, in this order, with per-sample random
parameters drawn from one explicit key:

1. **translation** by an integer shift in ``[-round(H/8), round(H/8)]`` (resp. W) with zero fill:
   ``out[h, w] = x[h + dh, w + dw]`` where that lies inside the image, else 0;
2. **colour** (in the [-1, 1] image space, no clamping):
   brightness ``x + (r - 0.5)``; saturation ``(x - mean_c) * 2r + mean_c`` (mean over channels,
   factor in [0, 2]); contrast ``(x - mean) * (r + 0.5) + mean`` (mean over H, W, C, factor in
   [0.5, 1.5]);
3. **cutout** of a ``round(0.2 H) × round(0.2 W)`` rectangle (a square for square images) whose
   centre is uniform over the image (clipped at the border), set to 0.

Images are NHWC. Everything is differentiable with respect to the images (the random parameters
are constants); computations run in float32 like the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "OPS",
    "color",
    "cutout",
    "cutout_mask",
    "cutout_size",
    "diff_augment",
    "sample_params",
    "translate",
    "translation_limit",
]

OPS: tuple[str, ...] = ("translation", "color", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.2


def translation_limit(size: int, ratio: float = TRANSLATION_RATIO) -> int:
    """Largest shift in pixels along an axis of ``size`` pixels (Python ``round``)."""
    return round(size * ratio)


def cutout_size(size: int, ratio: float = CUTOUT_RATIO) -> int:
    """Side (pixels) of the cutout along an axis of ``size`` pixels."""
    return round(size * ratio)


def sample_params(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    translation_ratio: float = TRANSLATION_RATIO,
    cutout_ratio: float = CUTOUT_RATIO,
) -> dict[str, jax.Array]:
    """Per-sample random parameters of all three ops (seven uniforms per sample, as the reference).

    Returns int32 ``shift_h``/``shift_w`` in [-limit, limit], float ``brightness`` in [-0.5, 0.5),
    ``saturation`` in [0, 2), ``contrast`` in [0.5, 1.5), and int32 ``cutout_h``/``cutout_w``,
    the cutout centres in [0, H + (1 - ch % 2)) (resp. W), each of shape [B].
    """
    u = jax.random.uniform(key, (7, batch), jnp.float32)
    dh = translation_limit(height, translation_ratio)
    dw = translation_limit(width, translation_ratio)
    ch, cw = cutout_size(height, cutout_ratio), cutout_size(width, cutout_ratio)
    return {
        "shift_h": jnp.floor(u[0] * (2 * dh + 1)).astype(jnp.int32) - dh,
        "shift_w": jnp.floor(u[1] * (2 * dw + 1)).astype(jnp.int32) - dw,
        "brightness": u[2] - 0.5,
        "saturation": u[3] * 2.0,
        "contrast": u[4] + 0.5,
        "cutout_h": jnp.floor(u[5] * (height + (1 - ch % 2))).astype(jnp.int32),
        "cutout_w": jnp.floor(u[6] * (width + (1 - cw % 2))).astype(jnp.int32),
    }


def translate(images: jax.Array, shift_h: jax.Array, shift_w: jax.Array) -> jax.Array:
    """``out[b, h, w] = images[b, h + shift_h[b], w + shift_w[b]]`` inside the image, else 0."""
    _, height, width, _ = images.shape

    def one(img: jax.Array, dh: jax.Array, dw: jax.Array) -> jax.Array:
        padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
        rows = jnp.clip(jnp.arange(height) + dh + 1, 0, height + 1)
        cols = jnp.clip(jnp.arange(width) + dw + 1, 0, width + 1)
        return padded[rows][:, cols]

    return jax.vmap(one)(images, shift_h, shift_w)


def color(
    images: jax.Array, brightness: jax.Array, saturation: jax.Array, contrast: jax.Array
) -> jax.Array:
    """Brightness shift, then saturation and contrast scaling about the channel / image mean."""
    b = lambda v: v.reshape(-1, 1, 1, 1)
    x = images + b(brightness)
    mean_c = x.mean(axis=-1, keepdims=True)
    x = (x - mean_c) * b(saturation) + mean_c
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * b(contrast) + mean


def cutout_mask(
    height: int, width: int, centre_h: jax.Array, centre_w: jax.Array, ratio: float = CUTOUT_RATIO
) -> jax.Array:
    """[B, H, W] float mask: 0 inside each sample's cutout rectangle (clipped), 1 elsewhere."""
    ch, cw = cutout_size(height, ratio), cutout_size(width, ratio)
    top = (centre_h - ch // 2)[:, None]
    left = (centre_w - cw // 2)[:, None]
    hs, ws = jnp.arange(height)[None], jnp.arange(width)[None]
    in_rows = (hs >= top) & (hs < top + ch)  # [B, H]
    in_cols = (ws >= left) & (ws < left + cw)  # [B, W]
    return 1.0 - (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)


def cutout(
    images: jax.Array, centre_h: jax.Array, centre_w: jax.Array, ratio: float = CUTOUT_RATIO
) -> jax.Array:
    """Zeroes a ``round(ratio·H) × round(ratio·W)`` rectangle centred at (centre_h, centre_w)."""
    _, height, width, _ = images.shape
    mask = cutout_mask(height, width, centre_h, centre_w, ratio)
    return images * mask[..., None].astype(images.dtype)


def diff_augment(
    key: jax.Array,
    images: jax.Array,
    ops: Sequence[str] = OPS,
    translation_ratio: float = TRANSLATION_RATIO,
    cutout_ratio: float = CUTOUT_RATIO,
) -> jax.Array:
    """Applies ``ops`` (default: all three, always) to NHWC images in [-1, 1]; returns float32.

    The same key gives the same augmentation; use a fresh key per call (e.g. separate keys for the
    real and the fake batch of a discriminator step).
    """
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown DiffAugment ops {sorted(unknown)}; known: {OPS}")
    x = images.astype(jnp.float32)
    batch, height, width, _ = x.shape
    p = sample_params(key, batch, height, width, translation_ratio, cutout_ratio)
    if "translation" in ops:
        x = translate(x, p["shift_h"], p["shift_w"])
    if "color" in ops:
        x = color(x, p["brightness"], p["saturation"], p["contrast"])
    if "cutout" in ops and cutout_ratio > 0:
        x = cutout(x, p["cutout_h"], p["cutout_w"], cutout_ratio)
    return x
