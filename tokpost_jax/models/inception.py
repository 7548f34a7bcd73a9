"""FID InceptionV3 (TF "inception-2015-12-05" graph) as a pure Flax Linen module.

Why this exact network: FID/sFID/IS numbers are only comparable with published ones (ADM/TTUR,
torch-fidelity, clean-fid ``legacy_tensorflow``) when the *same* graph sees the *same* pixels. The
graph is not torchvision's InceptionV3: its average pools exclude padding from the divisor, the last
block (``mixed_10``) max-pools its pool branch, BN has no scale and eps = 1e-3, and it resizes its
input inside the graph with TF1's legacy bilinear kernel before mapping [0, 255] to (x - 128) / 128.

Layer names follow the TF graph (and NVIDIA's TorchScript conversion of it): ``conv`` .. ``conv_4``
(stem), ``mixed`` .. ``mixed_10`` (blocks), so ``params["mixed_6"]["conv"]`` is TF's
``mixed_6/conv``. Convolutions use ``precision=HIGHEST`` because one bf16 pass (TPU default) moves
the 2048-d features by ~1.7 % relative L2, which is larger than many FID differences one reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "INCEPTION_SIZE",
    "POOL_DIM",
    "SPATIAL_CHANNELS",
    "SPATIAL_DIM",
    "InceptionV3",
    "inception_features",
    "tf1_resize_bilinear",
]

INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# ADM's sFID takes `mixed_6/conv:0`[..., :7] (a 17x17 map) and flattens it in NHWC order.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3

_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# TF1 legacy bilinear resize
# ---------------------------------------------------------------------------------------------


def _tf1_axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and lerp weights of TF1 ``ResizeBilinear`` (align_corners=False,
    half_pixel_centers=False), computed in float32 exactly as TF's ``LegacyScaler`` does:
    ``src = float(dst) * float32(in / out)``, lower = floor, upper = min(ceil, in - 1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    src_floor = np.floor(src)
    lower = np.maximum(src_floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lerp = (src - src_floor).astype(np.float32)
    return lower.astype(np.int32), upper.astype(np.int32), lerp


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC images like TF1 ``tf.image.resize_bilinear`` (the op inside the FID graph).

    Why not ``jax.image.resize``: that uses half-pixel centres (TF2 semantics); on a real
    256 -> 299 photo the two differ by up to ~22/255 and move pool3 features by ~7 %.
    The source grid is asymmetric (``src = dst * in/out``) with no antialiasing, so downscaling
    aliases exactly as the reference graph does. Output is float32; same size = identity.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {x.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    y0, y1, wy = _tf1_axis_weights(in_h, out_h)
    x0, x1, wx = _tf1_axis_weights(in_w, out_w)
    top = jnp.take(x, y0, axis=1)
    bottom = jnp.take(x, y1, axis=1)
    wx_b = jnp.asarray(wx)[None, None, :, None]
    # Same association order as TF's compute_lerp: a + (b - a) * t.
    top = jnp.take(top, x0, axis=2) + (jnp.take(top, x1, axis=2) - jnp.take(top, x0, axis=2)) * wx_b
    bottom = (
        jnp.take(bottom, x0, axis=2)
        + (jnp.take(bottom, x1, axis=2) - jnp.take(bottom, x0, axis=2)) * wx_b
    )
    return top + (bottom - top) * jnp.asarray(wy)[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3/1 average pool whose divisor counts only in-image pixels (TF SAME avg-pool; torch
    ``count_include_pad=False``). Border outputs differ from an include-pad pool."""
    dims, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)
    return total / count


class ConvBN(nn.Module):
    """Conv (no bias) -> inference BatchNorm with stored statistics (eps 1e-3) -> ReLU.

    Params: ``kernel`` (HWIO), ``bias`` (BN beta), ``scale`` (BN gamma; ones for the TF graph,
    which has none), ``mean``, ``var``. All live in the ``params`` collection because this network
    is never trained: a single frozen tree keeps ``apply`` and checkpoint handling trivial.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.features
        kernel = self.param("kernel", nn.initializers.zeros, (*self.kernel_size, x.shape[-1], c))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        scale = self.param("scale", nn.initializers.ones, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        ph, pw = self.padding
        y = lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        y = (y - mean) * (scale * lax.rsqrt(var + BN_EPS)) + bias
        return nn.relu(y)


class _Tower(nn.Module):
    """A chain of ConvBN layers named ``conv``, ``conv_1``, ... (TF scope ``tower*/conv*``),
    optionally preceded by the padding-excluding 3x3 average pool (``tower_2``)."""

    specs: Sequence[tuple[int, tuple[int, int], int, tuple[int, int]]]
    avg_pool_first: bool = False
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.avg_pool_first:
            x = _avg_pool_exclude_pad(x)
        for i, (features, kernel, stride, pad) in enumerate(self.specs):
            name = "conv" if i == 0 else f"conv_{i}"
            x = ConvBN(features, kernel, stride, pad, self.precision, name=name)(x)
        return x


class InceptionA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``; torchvision Mixed_5b-d)."""

    pool_features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        a = ConvBN(64, precision=p, name="conv")(x)
        b = _Tower([(48, (1, 1), 1, (0, 0)), (64, (5, 5), 1, (2, 2))], precision=p, name="tower")(x)
        c = _Tower(
            [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 1, (1, 1))],
            precision=p,
            name="tower_1",
        )(x)
        d = _Tower(
            [(self.pool_features, (1, 1), 1, (0, 0))],
            avg_pool_first=True,
            precision=p,
            name="tower_2",
        )(x)
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (TF ``mixed_3``; torchvision Mixed_6a)."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        a = ConvBN(384, (3, 3), 2, precision=p, name="conv")(x)
        b = _Tower(
            [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 2, (0, 0))],
            precision=p,
            name="tower",
        )(x)
        return jnp.concatenate([a, b, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (TF ``mixed_4``-``mixed_7``; Mixed_6b-e).

    The first 192 output channels are the ``conv`` (1x1) branch, i.e. TF's ``mixed_N/conv``.
    """

    c7: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, c7 = self.precision, self.c7
        h, w = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1
        a = ConvBN(192, precision=p, name="conv")(x)
        b = _Tower(
            [(c7, (1, 1), 1, (0, 0)), (c7, h[0], 1, h[1]), (192, w[0], 1, w[1])],
            precision=p,
            name="tower",
        )(x)
        c = _Tower(
            [
                (c7, (1, 1), 1, (0, 0)),
                (c7, w[0], 1, w[1]),
                (c7, h[0], 1, h[1]),
                (c7, w[0], 1, w[1]),
                (192, h[0], 1, h[1]),
            ],
            precision=p,
            name="tower_1",
        )(x)
        d = _Tower([(192, (1, 1), 1, (0, 0))], avg_pool_first=True, precision=p, name="tower_2")(x)
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (TF ``mixed_8``; torchvision Mixed_7a)."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        a = _Tower([(192, (1, 1), 1, (0, 0)), (320, (3, 3), 2, (0, 0))], precision=p, name="tower")(
            x
        )
        b = _Tower(
            [
                (192, (1, 1), 1, (0, 0)),
                (192, (1, 7), 1, (0, 3)),
                (192, (7, 1), 1, (3, 0)),
                (192, (3, 3), 2, (0, 0)),
            ],
            precision=p,
            name="tower_1",
        )(x)
        return jnp.concatenate([a, b, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads (TF ``mixed_9``, ``mixed_10``; Mixed_7b/c).

    ``max_pool=True`` for ``mixed_10``: the TF graph max-pools that block's pool branch (a known
    quirk; pytorch-fid's FIDInceptionE_2), while ``mixed_9`` average-pools excluding padding.
    """

    max_pool: bool = False
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision

        def conv(features: int, kernel=(1, 1), pad=(0, 0), *, name: str):
            return ConvBN(features, kernel, 1, pad, p, name=name)

        a = conv(384, name="tower_conv")(x)
        b = conv(448, name="tower_1_conv")(x)
        b = conv(384, (3, 3), (1, 1), name="tower_1_conv_1")(b)
        pooled = _max_pool(x, 3, 1, 1) if self.max_pool else _avg_pool_exclude_pad(x)
        return jnp.concatenate(
            [
                conv(320, name="conv")(x),
                conv(384, (1, 3), (0, 1), name="tower_mixed_conv")(a),
                conv(384, (3, 1), (1, 0), name="tower_mixed_conv_1")(a),
                conv(384, (1, 3), (0, 1), name="tower_1_mixed_conv")(b),
                conv(384, (3, 1), (1, 0), name="tower_1_mixed_conv_1")(b),
                conv(192, name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nn.Module):
    """The FID Inception: images in [0, 255] (uint8 or float, NHWC, any size) -> features.

    Returns ``{"pool": (B, 2048), "spatial": (B, 2023)}`` plus ``"logits": (B, 1008)`` when
    ``with_logits`` (needs the ``fc`` kernel of pytorch-fid's checkpoint). ``spatial`` is ADM's sFID
    tap: ``mixed_6/conv`` output, first 7 channels, flattened in (H, W, C) order. ``logits`` are
    ADM's IS logits, ``pool · W`` with no bias (see :class:`_Logits`).
    """

    with_logits: bool = False
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) RGB images, got {images.shape}")
        p = self.precision
        x = tf1_resize_bilinear(images, (INCEPTION_SIZE, INCEPTION_SIZE))
        x = (x - 128.0) / 128.0
        x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)  # 147 (VALID)
        x = ConvBN(64, (3, 3), padding=(1, 1), precision=p, name="conv_2")(x)
        x = _max_pool(x, 3, 2, 0)  # 73
        x = ConvBN(80, precision=p, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)  # 71 (VALID)
        x = _max_pool(x, 3, 2, 0)  # 35
        x = InceptionA(32, p, name="mixed")(x)
        x = InceptionA(64, p, name="mixed_1")(x)
        x = InceptionA(64, p, name="mixed_2")(x)
        x = InceptionB(p, name="mixed_3")(x)  # 17
        x = InceptionC(128, p, name="mixed_4")(x)
        x = InceptionC(160, p, name="mixed_5")(x)
        x = InceptionC(160, p, name="mixed_6")(x)
        # The block's first channels are its 1x1 `conv` branch, so this slice *is* mixed_6/conv:0.
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionC(192, p, name="mixed_7")(x)
        x = InceptionD(p, name="mixed_8")(x)  # 8
        x = InceptionE(False, p, name="mixed_9")(x)
        x = InceptionE(True, p, name="mixed_10")(x)
        pool = jnp.mean(x, axis=(1, 2))  # 8x8 average pool == global mean at 299 input
        out = {"pool": pool, "spatial": spatial}
        if self.with_logits:
            out["logits"] = _Logits(NUM_LOGITS, p, name="fc")(pool)
        return out


class _Logits(nn.Module):
    """IS logits ``pool · W`` (2048 -> 1008), with no bias on purpose.

    ADM's evaluator takes the weight of the TF graph's ``softmax/logits/MatMul`` and computes
    ``softmax(pool_3 · W)``, skipping the graph's bias add; ``softmax(x W + b) != softmax(x W)``,
    so adding pytorch-fid's ``fc.bias`` would give Inception Scores no ADM table reports.
    ``kernel`` is torch ``fc.weight`` transposed.
    """

    features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features))
        return jnp.dot(x, kernel, precision=self.precision)


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if set(params) == {"params"}:
        return params["params"]
    return params


def inception_features(params: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    """Jittable feature extraction: ``(B, H, W, 3)`` uint8/float [0, 255] -> feature dict.

    ``params`` is the tree from :func:`tokpost_jax.convert.inception_weights.load_inception_params`
    (a ``{"params": ...}`` variables dict is accepted too). ``logits`` is returned iff the tree has
    an ``fc`` entry; that is a static property of the pytree, so ``jax.jit`` handles it. Pad the
    last partial batch to a fixed size (and drop the padded rows) to avoid recompiles.
    """
    p = _unwrap(params)
    model = InceptionV3(with_logits="fc" in p)
    return model.apply({"params": p}, jnp.asarray(images))
