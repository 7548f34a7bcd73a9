"""Gradient accumulation inside the one jitted train step: the paper's batch on fewer chips.

A stage writes its step as a function of one microbatch, ``fn(micro_batch, micro_rng) →
(averaged, per_micro)``, and :func:`accumulate` runs it over the k microbatches of the global
batch with ``jax.lax.scan``. The optimizer update stays outside, once per step, so the step's
shardings and donation are those of the unaccumulated step. With k = 1 ``fn`` is called on the
whole batch with the step's key, so the program (and every number) is what it was before.

* ``averaged`` (gradients, loss terms, mean metrics) is summed over microbatches and divided by
  k: every loss in the project is a mean over samples and microbatches have equal sizes, so this
  is the global-batch mean up to float32 summation order.
* ``per_micro`` (token indices, features, latents: anything that needs the whole batch, or a
  value that is the same in every microbatch) comes back stacked, ``[k, ...]``; :func:`join`
  puts per-sample leaves back in the global batch's order, :func:`last` takes the last value.

Microbatch i holds samples i, i+k, i+2k, … of the global batch. A device holds a contiguous
block of the batch, so this way every microbatch is spread evenly over all batch shards without
moving data (the batch must be a multiple of k × the batch shards), and a microbatch's
contiguous groups of B/(k·shards) samples are exactly the devices' shares of it (the per-GPU
groups of ``gan.adaptive_weight_groups`` and ``perturbation.group_size``).

Microbatch i's key is ``fold_in(step_key, i)`` (k > 1), so a resumed run draws the same numbers.

XLA:CPU runs convolutions inside a loop body far slower than outside one (jax-ml/jax#12868;
measured here: 4 NHWC convs, 37x; the demo tokenizer step with its PatchGAN, 2.5x at k = 4;
the same step without GAN and perturbation, 0.75x). Accumulation is for accelerators with too
little memory for the batch; on CPU keep k = 1 unless memory is what runs out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokpost_jax import sharding as shd
from tokpost_jax.config_checks import ConfigValueError

MicroFn = Callable[[Any, jax.Array], tuple[Any, Any]]


def steps_from_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """``config.grad_accum_steps`` (1 when absent), checked against the batch and the mesh."""
    k = config.get("grad_accum_steps", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigValueError("grad_accum_steps", k, "must be an int >= 1")
    shards = shd.batch_split_size(mesh, shd.rules_tuple(config.sharding_rules))
    if config.batch_size % (k * shards):
        raise ConfigValueError(
            "grad_accum_steps", k,
            f"must split batch_size={config.batch_size} into {k} microbatches that divide over "
            f"the {shards} batch shards (batch_size must be a multiple of {k * shards})",
        )
    return k


def micro_rng(rng: jax.Array, index: jax.Array | int) -> jax.Array:
    """Microbatch ``index``'s key from the step's key."""
    return jax.random.fold_in(rng, index)


def split(batch: Any, steps: int) -> Any:
    """Every leaf [B, ...] → [k, B/k, ...]; row j of microbatch i is sample j·k + i."""

    def one(x: jax.Array) -> jax.Array:
        if x.ndim == 0 or x.shape[0] % steps:
            raise ValueError(
                f"grad_accum_steps={steps}: a batch leaf of shape {x.shape} does not split into "
                f"{steps} microbatches"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def join(stacked: Any) -> Any:
    """Inverse of :func:`split`: [k, b, ...] → [k·b, ...] in the global batch's sample order."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), stacked
    )


def last(stacked: Any) -> Any:
    """The last microbatch's value of every leaf (for values every microbatch computes alike)."""
    return jax.tree.map(lambda x: x[-1], stacked)


def sample_order(batch_size: int, steps: int) -> np.ndarray:
    """Global sample index of each row of the microbatches, microbatch after microbatch."""
    return np.arange(batch_size).reshape(batch_size // steps, steps).T.reshape(-1)


def _sum_dtype(dtype: Any) -> Any:
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"accumulate: averaged outputs must be floating point, got {dtype}")
    return jnp.promote_types(dtype, jnp.float32)


def _constrain_batch(x: jax.Array, lead: int = 0) -> jax.Array:
    """A microbatch stays split over the batch shards (a no-op outside a mesh/rules context);
    ``lead`` unsharded axes come first (the microbatch axis of :func:`split`)."""
    return nn.with_logical_constraint(
        x, (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)
    )


def accumulate(fn: MicroFn, batch: Any, rng: jax.Array, steps: int) -> tuple[Any, Any]:
    """(mean over microbatches of ``fn``'s averaged part, its per-microbatch part ``[k, ...]``).

    ``steps`` = 1 calls ``fn(batch, rng)`` once (per-microbatch leaves get a leading axis of 1).
    """
    if steps == 1:
        averaged, per_micro = fn(batch, rng)
        return averaged, jax.tree.map(lambda x: x[None], per_micro)
    micro = jax.tree.map(lambda x: _constrain_batch(x, lead=1), split(batch, steps))
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), rng)[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _sum_dtype(s.dtype)), shapes)

    def body(total: Any, xs: tuple[jax.Array, Any]) -> tuple[Any, Any]:
        index, mb = xs
        averaged, per_micro = fn(jax.tree.map(_constrain_batch, mb), micro_rng(rng, index))
        total = jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, averaged)
        return total, per_micro

    total, per_micro = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
    mean = jax.tree.map(lambda t, s: (t / steps).astype(s.dtype), total, shapes)
    return mean, per_micro
