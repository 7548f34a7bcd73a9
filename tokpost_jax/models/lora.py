"""A 2-D convolution with an optional LoRA adapter, in the form CODA injects into its VAE.

Why this form (coda.md §1): CODA's adapter is ``conv(x, W) + b + up(down(x))`` where ``down`` has
the wrapped conv's kernel size, stride and padding (in → r, no bias, init N(0, (1/r)²)) and ``up``
is a 1×1 conv (r → out, no bias, zero init), with no alpha/rank scaling. A zero ``up`` makes a
freshly adapted network equal to the pretrained one.

Freezing is not done here (no ``stop_gradient``): the trainer freezes ``kernel``/``bias`` by
parameter-path pattern in the optimizer, so merged export stays a plain tree operation
(:func:`merge_lora`). Placement follows the official substring rule (:func:`lora_rank_for`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from tokpost_jax.models.vit import logical

Padding = Sequence[tuple[int, int]]


def lora_rank_for(qualified_name: str, patterns: Iterable[str], rank: int) -> int:
    """``rank`` if any pattern is a substring of the torch-style qualified module name, else 0.

    This is ``build_peft_from_vae``'s rule, applied to LDM names: with MAR's list it also adapts
    the *encoder* convs (``encoder.down.0.block.0.conv1`` contains ``conv1``).
    """
    if rank <= 0:
        return 0
    return rank if any(p in qualified_name for p in patterns) else 0


def _uniform(bound: float) -> Any:
    """U(−bound, bound): torch's default Conv2d init uses it for the bias (bound 1/√fan_in)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch's Conv2d weight init, kaiming_uniform(a=√5), is exactly U(±1/√fan_in).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRAConv(nn.Module):
    """NHWC conv with HWIO ``kernel`` [kh,kw,in,out] + ``bias``, and LoRA leaves when rank > 0.

    ``padding`` is explicit per spatial axis (torch semantics, never "SAME"). ``in_axis`` and
    ``out_axis`` are the logical axis names of the kernel's channel dimensions (at most one may be
    a sharded name, since one mesh axis cannot appear twice in a spec).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    rank: int = 0
    use_bias: bool = True
    in_axis: str | None = None
    out_axis: str | None = "embed"
    dtype: Any = jnp.float32

    def _conv(self, x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Any):
        return jax.lax.conv_general_dilated(
            x, kernel.astype(self.dtype), window_strides=tuple(strides),
            padding=tuple(tuple(p) for p in padding) if not isinstance(padding, str) else padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        in_ch = x.shape[-1]
        fan_in = kh * kw * in_ch
        kernel = self.param(
            "kernel", logical(_TORCH_KERNEL_INIT, (None, None, self.in_axis, self.out_axis)),
            (kh, kw, in_ch, self.features),
        )
        x = x.astype(self.dtype)
        y = self._conv(x, kernel, self.strides, self.padding)
        if self.use_bias:
            bias = self.param(
                "bias", logical(_uniform(fan_in**-0.5), (self.out_axis,)), (self.features,)
            )
            y = y + bias.astype(self.dtype)
        if self.rank > 0:
            down = self.param(
                "lora_down",
                logical(nn.initializers.normal(stddev=1.0 / self.rank),
                        (None, None, self.in_axis, None)),
                (kh, kw, in_ch, self.rank),
            )
            up = self.param(
                "lora_up", logical(nn.initializers.zeros, (None, None, None, self.out_axis)),
                (1, 1, self.rank, self.features),
            )
            h = self._conv(x, down, self.strides, self.padding)
            y = y + jnp.einsum("bhwr,ro->bhwo", h, up[0, 0].astype(self.dtype))
        return y


def _unbox(x: Any) -> Any:
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def merge_lora(params: Mapping[str, Any]) -> Any:
    """Folds every adapter into its kernel and drops the LoRA leaves.

    ``kernel += einsum('hwir,ro->hwio', lora_down, lora_up[0, 0])`` (official ``_fuse_lora``, in
    HWIO). Works on plain or ``nn.Partitioned``-boxed trees, dict or FrozenDict; the merged
    network computes the same function as the adapted one.
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            out[name] = merge_lora(value)
        elif name not in ("lora_down", "lora_up"):
            out[name] = value
    if "lora_down" in params and "lora_up" in params:
        if "kernel" not in params:
            raise ValueError("merge_lora: a LoRA pair without a 'kernel' next to it")
        down, up = _unbox(params["lora_down"]), _unbox(params["lora_up"])
        kernel_leaf = params["kernel"]
        kernel = _unbox(kernel_leaf)
        xp = np if all(isinstance(a, np.ndarray) for a in (kernel, down, up)) else jnp
        delta = xp.einsum("hwir,ro->hwio", down.astype(np.float32), up[0, 0].astype(np.float32))
        merged = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
        out["kernel"] = (kernel_leaf.replace_boxed(merged)
                         if isinstance(kernel_leaf, nn.meta.AxisMetadata) else merged)
    elif "lora_down" in params or "lora_up" in params:
        raise ValueError("merge_lora: found only one of 'lora_down' / 'lora_up'")
    return FrozenDict(out) if isinstance(params, FrozenDict) else out
