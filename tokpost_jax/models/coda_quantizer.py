"""CODA's discretizer: a multi-scale residual quantizer with attention assignment (coda.md §2).

One shared codebook E quantizes a pyramid of area-pooled residuals, coarse → fine. A token's code
is the argmax of attention logits between its RMS-normalised query and the normalised keys of all
codes; the emitted vector is the chosen code's *value* U = E Wv + bv, and a straight-through
softmax lets the gradient reach the logits. Each scale's vector is bicubic-upsampled and
subtracted from the residual.

Resizing uses torch-exact constant matrices (``models/resize.py``), so a released checkpoint gives
the same indices as the official code. Everything runs in float32 with HIGHEST matmul precision:
the logits are sharp (τ = 0.01 in the entropy term) and default TPU/GPU matmuls round to bf16/TF32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.resize import torch_resize_matrix
from tokpost_jax.models.vit import logical

_HI = jax.lax.Precision.HIGHEST
_NORMS = ("rms", "layer", "none")
_ASSIGNMENTS = ("attention", "nearest")
_STRAIGHT_THROUGH = ("lean", "one_hot")
# The official batch entropy takes log(avg + 1e-5): at τ = 0.01 the batch-mean probability of an
# unused code underflows to exactly 0, where log(0) would make the value and gradient NaN.
_AVG_LOG_EPS = 1e-5


def torch_linear_kernel_init(
    key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
) -> jax.Array:
    """torch ``nn.Linear``'s default weight init, U(±1/√fan_in), for a Flax [in, out] kernel."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def torch_linear_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """torch ``nn.Linear``'s default bias init, U(±1/√fan_in), fan_in of the weight."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


@flax.struct.dataclass
class MultiScaleQuantized:
    """Everything a loss, a perturbation or a metric needs from one multi-scale quantizer call."""

    f_hat: jax.Array  # [B, H, H, C] Σ_k upsampled z_k, the decoder input
    indices: jax.Array  # [B, L] int32, the layout's flat coarse → fine order
    losses: dict[str, jax.Array]  # "vq", "entropy": means over scales
    per_scale: dict[str, jax.Array]  # [K] each: vq, entropy_sample, entropy_batch, residual_rms
    residual: jax.Array  # [B, H, H, C] final residual r_K (f̂ + r_K = f up to rounding)
    ranks: jax.Array | None = None  # [B, L, delta_max] int32 top codes by logit; rank 0 = chosen


def entropy_terms(
    logits: jax.Array, temperature: float, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """(mean per-token entropy, entropy of the mean distribution) of softmax(logits / τ).

    ``logits`` is [B, ..., V]; tokens are everything but the last axis. The batch-mean
    distribution is taken within each of ``groups`` contiguous groups of the leading (batch) axis
    and its entropy averaged over groups: the official code's per-GPU form when the groups are the
    devices. MAGVIT/LFQ form, as the official ``compute_entropy_loss``; its 1e-5 inside
    ``log_softmax`` is a constant shift that log_softmax ignores, so it is left out.
    """
    v = logits.shape[-1]
    scaled = logits.reshape(groups, -1, v) / temperature
    probs = jax.nn.softmax(scaled, axis=-1)
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    sample = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    avg = jnp.mean(probs, axis=1)  # [G, V]
    batch_entropy = jnp.mean(-jnp.sum(avg * jnp.log(avg + _AVG_LOG_EPS), axis=-1))
    return sample, batch_entropy


def _assign_attention(
    q: jax.Array,
    x: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    beta: float,
    temperature: float,
    groups: int,
    delta_max: int,
    straight_through: str,
) -> tuple[jax.Array, ...]:
    """One scale's assignment: every V-sized tensor lives here (and only here, under remat)."""
    logits = jnp.einsum("bstd,vd->bstv", q, keys, precision=_HI) * (1.0 / math.sqrt(q.shape[-1]))
    idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first index on ties, as torch
    p = jax.nn.softmax(logits, axis=-1)
    hard = jnp.take(values, idx, axis=0)
    if straight_through == "lean":
        # Equal to the official (h − sg(p) + p) @ U in value (the bracket is exactly 0) and in
        # gradient (∂/∂p = g Uᵀ; its two ∂/∂U terms cancel), without a V-sized one-hot.
        soft = jnp.einsum("bstv,vc->bstc", p, values, precision=_HI)
        soft_sg = jnp.einsum("bstv,vc->bstc", jax.lax.stop_gradient(p), values, precision=_HI)
        z = hard + (soft - soft_sg)
    else:  # the official form, kept as the reference for tests and memory measurements
        h = jax.nn.one_hot(idx, values.shape[0], dtype=p.dtype)
        z = jnp.einsum("bstv,vc->bstc", h - jax.lax.stop_gradient(p) + p, values, precision=_HI)
    vq = (
        jnp.mean(jnp.square(z - x))
        + jnp.mean(jnp.square(jax.lax.stop_gradient(hard) - x))
        + beta * jnp.mean(jnp.square(hard - jax.lax.stop_gradient(x)))
    )
    sample, batch_entropy = entropy_terms(logits, temperature, groups)
    ranks = jax.lax.top_k(logits, delta_max)[1].astype(jnp.int32) if delta_max else idx[..., None]
    return z, idx, vq, sample, batch_entropy, ranks


def _assign_nearest(
    x: jax.Array,
    codebook: jax.Array,
    *,
    beta: float,
    temperature: float,
    groups: int,
    delta_max: int,
) -> tuple[jax.Array, ...]:
    """Plain residual-VQ assignment (the ablation): nearest code, classic straight-through.

    The "logits" for entropy and ranks are −‖x − e‖², so both mean the same as in attention mode.
    """
    dots = jnp.einsum("bstc,vc->bstv", x, codebook, precision=_HI)
    logits = 2.0 * dots - jnp.sum(jnp.square(codebook), -1) - jnp.sum(jnp.square(x), -1)[..., None]
    idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    code = jnp.take(codebook, idx, axis=0)
    z = x + jax.lax.stop_gradient(code - x)
    vq = jnp.mean(jnp.square(code - jax.lax.stop_gradient(x))) + beta * jnp.mean(
        jnp.square(x - jax.lax.stop_gradient(code))
    )
    sample, batch_entropy = entropy_terms(logits, temperature, groups)
    ranks = jax.lax.top_k(logits, delta_max)[1].astype(jnp.int32) if delta_max else idx[..., None]
    return z, idx, vq, sample, batch_entropy, ranks


class CODAQuantizer(nn.Module):
    """Multi-scale residual quantizer over one shared codebook; NHWC input f of side scales[-1].

    Parameter names are fixed (the checkpoint converter maps the released weights to them):
    ``codebook`` [V, C]; ``to_q``, ``to_k`` (C → d_a) and ``to_v`` (C → C) Dense with bias;
    ``norm_q``, ``norm_k`` (RMSNorm ``scale``, or LayerNorm ``scale``/``bias``, eps 1e-5).

    ``entropy_groups`` = 1 (default) takes the batch-mean distribution over the whole global
    batch: under jit that is what the loss means, independent of how many devices hold the batch.
    The official code computes it per GPU (16 tokens per GPU at 1×1 for MAR); set
    ``entropy_groups`` to the official GPU count for parity with it.
    ``straight_through="one_hot"`` is the official V-sized one-hot form (same values and
    gradients; XLA may fuse its one-hot away, the lean form never builds it); ``remat``
    recomputes each scale's V-sized tensors in the backward pass instead of keeping them (FLUX:
    3.2 GB per tensor at 12 images of 32²). The finest scale's own working set (about six
    logits-sized buffers) stays the floor; XLA:CPU reports the same temp size either way.
    ``assignment="nearest"`` is plain residual VQ on E (VQ-VAE loss weighted by ``nearest_beta``).
    """

    codebook_size: int
    dim: int
    scales: tuple[int, ...]
    attn_dim: int = 32
    norm: str = "rms"  # official vq_norm_type: rms_norm → rms, layer_norm → layer, None → none
    beta: float = 0.05
    entropy_temperature: float = 0.01
    entropy_weights: tuple[float, float] = (1.0, 1.0)  # (per-token, batch-mean)
    entropy_groups: int = 1
    assignment: str = "attention"
    nearest_beta: float = 0.25
    straight_through: str = "lean"
    remat: bool = False

    def setup(self) -> None:
        for name, value, allowed in (
            ("norm", self.norm, _NORMS),
            ("assignment", self.assignment, _ASSIGNMENTS),
            ("straight_through", self.straight_through, _STRAIGHT_THROUGH),
        ):
            if value not in allowed:
                raise ValueError(f"CODAQuantizer.{name}={value!r}; use one of {allowed}")
        side = self.layout.side
        if any(s > side for s in self.scales):
            raise ValueError(f"CODAQuantizer.scales={self.scales}: no side may exceed the last")
        if self.entropy_groups < 1:
            raise ValueError(f"CODAQuantizer.entropy_groups={self.entropy_groups} must be >= 1")
        self.codebook = self.param(
            "codebook",
            logical(nn.initializers.normal(1.0), ("codebook", "code")),
            (self.codebook_size, self.dim),
        )
        if self.assignment != "attention":
            return
        def dense(features: int, out_axis: str, in_axis: str | None = "code") -> nn.Dense:
            return nn.Dense(
                features, dtype=jnp.float32, param_dtype=jnp.float32, precision=_HI,
                kernel_init=logical(torch_linear_kernel_init, (in_axis, out_axis)),
                bias_init=logical(torch_linear_bias_init(self.dim), (out_axis,)),
            )

        self.to_q = dense(self.attn_dim, "attn")
        self.to_k = dense(self.attn_dim, "attn")
        self.to_v = dense(self.dim, "code", in_axis=None)  # one mesh axis may not appear twice
        if self.norm == "rms":
            norm = functools.partial(
                nn.RMSNorm, epsilon=1e-5, dtype=jnp.float32,
                scale_init=logical(nn.initializers.ones, ("attn",)),
            )
        elif self.norm == "layer":
            norm = functools.partial(
                nn.LayerNorm, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False,
                scale_init=logical(nn.initializers.ones, ("attn",)),
                bias_init=logical(nn.initializers.zeros, ("attn",)),
            )
        else:
            norm = None
        if norm is not None:
            self.norm_q = norm()
            self.norm_k = norm()

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(tuple(self.scales))

    def _norm_q(self, x: jax.Array) -> jax.Array:
        return x if self.norm == "none" else self.norm_q(x)

    def _norm_k(self, x: jax.Array) -> jax.Array:
        return x if self.norm == "none" else self.norm_k(x)

    def values(self) -> jax.Array:
        """[V, C] the vectors the decoder sees: U = E Wv + bv (E itself for nearest assignment)."""
        codebook = self.codebook.astype(jnp.float32)
        return codebook if self.assignment == "nearest" else self.to_v(codebook)

    def keys(self) -> jax.Array:
        """[V, d_a] normalised code keys K (attention assignment only)."""
        if self.assignment != "attention":
            raise ValueError("CODAQuantizer.keys() exists only for assignment='attention'")
        return self._norm_k(self.to_k(self.codebook.astype(jnp.float32)))

    def _matrices(self, s: int) -> tuple[jax.Array, jax.Array]:
        side = self.layout.side
        pool = jnp.asarray(torch_resize_matrix(side, s, "area"), jnp.float32)  # [s, H]
        up = jnp.asarray(torch_resize_matrix(s, side, "bicubic"), jnp.float32)  # [H, s]
        return pool, up

    def _upsample(self, z: jax.Array, s: int) -> jax.Array:
        _, up = self._matrices(s)
        return jnp.einsum("hs,bstc,wt->bhwc", up, z, up, precision=_HI)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """[B, L] indices → f̂ [B, H, H, C] = Σ_k B_k U[idx_k] B_kᵀ (the detokenize path)."""
        values = self.values()
        grids = self.layout.split(jnp.asarray(indices, jnp.int32))
        side = self.layout.side
        f_hat = jnp.zeros((indices.shape[0], side, side, self.dim), jnp.float32)
        for s, idx in zip(self.scales, grids, strict=True):
            f_hat = f_hat + self._upsample(jnp.take(values, idx, axis=0), s)
        return f_hat

    def __call__(self, f: jax.Array, delta_max: int = 0) -> MultiScaleQuantized:
        """Quantizes latent f [B, H, H, C]; ``delta_max`` > 0 (static) also returns top-δ ranks."""
        side = self.layout.side
        if f.ndim != 4 or tuple(f.shape[1:]) != (side, side, self.dim):
            raise ValueError(
                f"CODAQuantizer: input of shape {tuple(f.shape)}, expected [B, {side}, {side}, "
                f"{self.dim}] (NHWC, side = scales[-1])"
            )
        batch = f.shape[0]
        if batch % self.entropy_groups:
            raise ValueError(
                f"CODAQuantizer.entropy_groups={self.entropy_groups} does not divide batch {batch}"
            )
        if not isinstance(delta_max, int) or isinstance(delta_max, bool):
            raise TypeError(
                f"CODAQuantizer: delta_max must be a static Python int (got {type(delta_max)}); "
                "close over it or mark it static under jit"
            )
        if not 0 <= delta_max <= self.codebook_size:
            raise ValueError(f"delta_max={delta_max} must be in [0, {self.codebook_size}]")
        f = f.astype(jnp.float32)
        statics = dict(
            temperature=self.entropy_temperature, groups=self.entropy_groups, delta_max=delta_max
        )
        if self.assignment == "attention":
            keys, values = self.keys(), self.values()
            assign = functools.partial(
                _assign_attention, beta=self.beta, straight_through=self.straight_through,
                **statics,
            )
        else:
            codebook = self.codebook.astype(jnp.float32)
            assign = functools.partial(_assign_nearest, beta=self.nearest_beta, **statics)
        if self.remat:
            assign = jax.checkpoint(assign)

        residual = f
        f_hat = jnp.zeros_like(f)
        grids, rank_grids, stats = [], [], []
        for s in self.scales:
            pool, _ = self._matrices(s)
            x = jnp.einsum("sh,bhwc,tw->bstc", pool, residual, pool, precision=_HI)
            if self.assignment == "attention":
                q = self._norm_q(self.to_q(x))
                z, idx, vq, sample, batch_entropy, ranks = assign(q, x, keys, values)
            else:
                z, idx, vq, sample, batch_entropy, ranks = assign(x, codebook)
            u = self._upsample(z, s)
            f_hat = f_hat + u
            residual = residual - u
            grids.append(idx)
            rank_grids.append(ranks.reshape(batch, s * s, -1))
            stats.append((vq, sample, batch_entropy, jnp.sqrt(jnp.mean(jnp.square(residual)))))

        vq, sample, batch_entropy, rms = (jnp.stack(col) for col in zip(*stats, strict=True))
        w_sample, w_batch = self.entropy_weights
        entropy = w_sample * sample - w_batch * batch_entropy
        return MultiScaleQuantized(
            f_hat=f_hat,
            indices=self.layout.join(grids),
            losses={"vq": jnp.mean(vq), "entropy": jnp.mean(entropy)},
            per_scale={
                "vq": vq, "entropy_sample": sample, "entropy_batch": batch_entropy,
                "residual_rms": rms,
            },
            residual=residual,
            ranks=jnp.concatenate(rank_grids, axis=1) if delta_max else None,
        )
