"""Raster-order sampling from a RAR generator: KV cache, CFG schedule, temperature, teacher forcing.

Follows RAR's ``generate`` (robustok.md §8): N steps; CFG runs the conditional and null-class copies
as one 2B batch and mixes them as ``u + (c − u)·s(step)``; logits are divided by the temperature and
sampled from the full softmax (top-k / top-p exist but are off by default). Teacher forcing
(robustok.md §9.1) overrides chosen positions with ground-truth tokens; the override is what both
CFG branches see as prefix afterwards.

The whole loop is one jitted ``lax.fori_loop`` with static shapes. Randomness is
``fold_in(rng, step)``, so a seed gives the same tokens whatever the cache setting.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from tokpost_jax.models.generator import RAR, decode_step, null_class_id, prefill


def cfg_scale(
    step: int | jax.Array, num_steps: int, guidance: float | jax.Array, power: float | jax.Array
) -> jax.Array:
    """Guidance at ``step``: 1 + (g − 1)·½(1 − cos(π·(step/N)^p)).

    ``step`` counts from 0 for the first token, as in RAR's ``generate``: the first token is
    sampled with scale 1 (no guidance) and the last with (g − 1)·½(1 − cos(π((N−1)/N)^p)) + 1,
    never quite reaching g.
    """
    frac = jnp.power(jnp.asarray(step, jnp.float32) / num_steps, power)
    return 1.0 + (guidance - 1.0) * 0.5 * (1.0 - jnp.cos(math.pi * frac))


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Masks logits outside the top-k and outside the smallest top-p nucleus (0 / 1.0 = off)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each entry
        # Keep an entry while the mass ahead of it is below top_p (the first one always stays).
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample(
    model: RAR,
    params: Any,
    labels: jax.Array,
    rng: jax.Array,
    *,
    guidance: float | jax.Array,
    power: float | jax.Array,
    temperature: float | jax.Array,
    top_k: int = 0,
    top_p: float = 1.0,
    teacher_tokens: jax.Array | None = None,
    teacher_mask: jax.Array | None = None,
    use_cache: bool = True,
) -> jax.Array:
    """Samples [B, N] int32 tokens in raster order for class ``labels`` ([B] in [0, classes)).

    ``params`` are the model's variables (``{"params": ...}``). ``guidance == 1`` (a Python number)
    skips the null-class branch, since then s(step) ≡ 1. Where ``teacher_mask[b, j]`` is True the
    token at j is ``teacher_tokens[b, j]``. ``use_cache=False`` recomputes the full causal forward
    every step (same tokens up to float ties; for benchmarks and tests).
    """
    if (teacher_mask is None) != (teacher_tokens is None):
        raise ValueError("teacher forcing needs both teacher_tokens and teacher_mask")
    if teacher_mask is not None:
        teacher_mask = jnp.asarray(teacher_mask, bool)
        teacher_tokens = jnp.asarray(teacher_tokens, jnp.int32)
    use_cfg = not (isinstance(guidance, int | float) and guidance == 1)
    return _sample(
        model,
        params,
        jnp.asarray(labels, jnp.int32),
        rng,
        jnp.asarray(guidance, jnp.float32),
        jnp.asarray(power, jnp.float32),
        jnp.asarray(temperature, jnp.float32),
        teacher_tokens,
        teacher_mask,
        top_k=int(top_k),
        top_p=float(top_p),
        use_cfg=use_cfg,
        use_cache=use_cache,
    )


@functools.partial(jax.jit, static_argnames=("model", "top_k", "top_p", "use_cfg", "use_cache"))
def _sample(
    model: RAR,
    params: Any,
    labels: jax.Array,
    rng: jax.Array,
    guidance: jax.Array,
    power: jax.Array,
    temperature: jax.Array,
    teacher_tokens: jax.Array | None,
    teacher_mask: jax.Array | None,
    *,
    top_k: int,
    top_p: float,
    use_cfg: bool,
    use_cache: bool,
) -> jax.Array:
    batch, n = labels.shape[0], model.num_tokens
    if use_cfg:
        null = jnp.full_like(labels, null_class_id(model.num_classes))
        labels = jnp.concatenate([labels, null])

    def both(tok: jax.Array) -> jax.Array:
        return jnp.concatenate([tok, tok]) if use_cfg else tok

    def pick(logits: jax.Array, step: jax.Array | int) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if use_cfg:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (cond - uncond) * cfg_scale(step, n, guidance, power)
        logits = filter_logits(logits / temperature, top_k, top_p)
        tok = jax.random.categorical(jax.random.fold_in(rng, step), logits).astype(jnp.int32)
        if teacher_mask is not None:
            tok = jnp.where(teacher_mask[:, step], teacher_tokens[:, step], tok)
        return tok

    tokens = jnp.zeros((batch, n), jnp.int32)
    if use_cache:
        logits, cache = prefill(model, params, labels)

        def step_fn(j: jax.Array, carry: tuple) -> tuple:
            tokens, logits, cache = carry
            tok = pick(logits, j)
            logits, cache = decode_step(model, params, cache, both(tok), j)
            return tokens.at[:, j].set(tok), logits, cache

        tokens, logits, _ = jax.lax.fori_loop(0, n - 1, step_fn, (tokens, logits, cache))
        return tokens.at[:, n - 1].set(pick(logits, n - 1))

    raster = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (labels.shape[0], n))

    def full_fn(j: jax.Array, tokens: jax.Array) -> jax.Array:
        # Causal: output j sees only tokens < j, so the unfilled zeros after j do not matter.
        logits = model.apply(params, both(tokens), labels, raster, True)
        return tokens.at[:, j].set(pick(jax.lax.dynamic_index_in_dim(logits, j, 1, False), j))

    return jax.lax.fori_loop(0, n, full_fn, tokens)
