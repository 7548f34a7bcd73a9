"""Per-token log-probabilities of token sequences under an AR generator, in its sampling order.

Why: the mean negative log-likelihood of held-out tokens is the generator's own validation
number (cheap next to gFID, and free of the tokenizer's decoder), and per-token scores show
where in the sequence (which scale of a CODA pyramid, which raster position) a generator is
unsure. ``python -m tokpost_jax.cli.score`` writes them for a token file.

The scores are conditional on the true label and use no guidance: ``log p(t_j | t_<j, y)`` with
the tokens in raster order (the order the sampler uses), from one teacher-forced forward pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax import sharding as shd
from tokpost_jax.data import DataError
from tokpost_jax.metrics.features import gather


def raster_logprobs(model: Any, variables: Any, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    """``log p(tokens[b, j] | tokens[b, :j], labels[b])`` as float32 [B, N]."""
    batch, n = tokens.shape
    orders = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    logits = model.apply(variables, tokens, labels, orders, deterministic=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def score_tokens(
    model: Any,
    variables: Any,
    tokens: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
) -> np.ndarray:
    """Per-token log-probabilities [N, L] float32 of a whole token set.

    ``tokens``/``labels`` are held identically on every host; fixed, zero-padded global batches
    sharded over the mesh's batch axes (one compiled program), padding rows dropped.
    """
    tokens, labels = np.asarray(tokens, np.int32), np.asarray(labels, np.int32)
    if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
        raise DataError(
            f"tokens must be [N, L] with labels [N]; got {tokens.shape} and {labels.shape}"
        )
    if tokens.shape[1] != model.num_tokens:
        raise DataError(
            f"the token file holds {tokens.shape[1]} tokens per image; the generator models "
            f"{model.num_tokens}"
        )
    for name, values, bound in (("tokens", tokens, model.codebook_size),
                                ("labels", labels, model.num_classes)):
        if values.size and (values.min() < 0 or values.max() >= bound):
            raise DataError(
                f"{name} must lie in [0, {bound}) for this generator; the file holds "
                f"{values.min()} … {values.max()}"
            )
    splits = shd.batch_split_size(mesh, rules)
    if batch_size % (splits * jax.process_count()):
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {splits} batch "
                         f"shards and {jax.process_count()} processes")
    data = shd.batch_sharding(mesh, rules)
    step = jax.jit(lambda v, t, y: raster_logprobs(model, v, t, y), out_shardings=data)
    out = []
    for (t, mask), (y, _) in zip(shd.padded_host_batches(tokens, batch_size),
                                 shd.padded_host_batches(labels, batch_size), strict=True):
        batch = shd.host_to_global({"t": t, "y": y}, data)
        out.append(gather(step(variables, batch["t"], batch["y"]))[mask])
    return np.concatenate(out).astype(np.float32)
