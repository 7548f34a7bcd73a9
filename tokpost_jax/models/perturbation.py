"""RobusTok latent perturbation (robustok.md §5): swap tokens for random near neighbours.

During main training a fraction β of the batch has each token replaced, with probability α, by a
code drawn uniformly from its δ nearest codebook entries (measured from the continuous feature z,
not code-to-code). This simulates the generator's sampling errors so that the decoder learns to
tolerate them. α and δ are annealed to half over training (:func:`perturbation_schedule`).

Everything here is a pure function of an explicit PRNG key, with static shapes: δ enters only as a
traced integer below a static ``delta_max``, so annealing δ never recompiles the train step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.quantizer import Quantized
from tokpost_jax.models.tokenizer import LatentHook

Scalar = Any  # Python number or 0-d (possibly traced) jax.Array


def nearest_code_ranks(features: jax.Array, codebook: jax.Array, k_max: int) -> jax.Array:
    """Indices [..., k_max] (int32) of each feature's k_max nearest codes, nearest first.

    ``features`` and ``codebook`` rows are unit vectors, so ascending squared distance is
    descending cosine; the similarity is computed exactly as :func:`quantizer.nearest_codes` does
    and ``lax.top_k`` breaks ties towards the lower index like ``argmax``, so rank 0 is the clean
    token. ``k_max`` is static (shapes must not depend on the annealed δ).
    """
    num_codes = codebook.shape[0]
    if not 1 <= k_max <= num_codes:
        raise ValueError(f"k_max={k_max} must be in [1, codebook size {num_codes}]")
    sims = jnp.einsum(
        "...d,kd->...k",
        jax.lax.stop_gradient(features),
        jax.lax.stop_gradient(codebook),
        precision=jax.lax.Precision.HIGHEST,
    )
    _, idx = jax.lax.top_k(sims, k_max)
    return idx.astype(jnp.int32)


def _is_concrete(x: Scalar) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating))


def _selected_samples(batch: int, beta: Scalar, num_groups: int) -> jax.Array:
    """[B] bool: the first ⌊β·G⌋ samples of each contiguous group of G = B/num_groups samples.

    The reference perturbs the first ⌊β·B_local⌋ samples of each per-device batch; the loader
    shuffles, so this is a random subset. ``num_groups`` = number of data-parallel shards reproduces
    that count exactly (8·⌊β·128⌋ = 96 of 1024, not ⌊β·1024⌋ = 102); 1 selects over the whole batch.
    """
    if num_groups < 1 or batch % num_groups:
        raise ValueError(f"batch {batch} is not divisible into num_groups={num_groups}")
    group = batch // num_groups
    if _is_concrete(beta):
        # Python float64 arithmetic, as the reference's int(B * beta).
        n = jnp.int32(math.floor(float(beta) * group))
    else:
        n = jnp.floor(jnp.asarray(beta, jnp.float32) * group).astype(jnp.int32)
    return (jnp.arange(batch, dtype=jnp.int32) % group) < n


def perturb_indices(
    rng: jax.Array,
    features: jax.Array,
    codebook: jax.Array,
    *,
    alpha: Scalar,
    delta: Scalar,
    beta: Scalar,
    delta_max: int,
    num_groups: int = 1,
    exclude_clean: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Perturbed token indices [B, L] (int32) and the mask [B, L] (bool) of changed tokens.

    Per token: u ~ U(0,1), r = ⌊U'·δ⌋ ~ UniformInt[0, δ); the token takes the code of rank r among
    its nearest codes if u < α, else rank 0 (its clean code). As in the official code r = 0 is
    allowed, so a selected token changes with probability α·(1 − 1/δ), not α. Only the samples
    chosen by :func:`_selected_samples` (⌊β·B⌋ of them) are perturbed. The mask is true exactly
    where the index differs from the clean one.

    ``alpha``, ``beta`` and ``delta`` may be traced; δ is clipped to [1, delta_max] (a static
    top-k of delta_max codes is taken, so changing δ never changes shapes). All draws have shape
    [B, L] from ``rng`` (partitionable threefry), so sharding the batch does not change them.
    ``features`` are the quantizer's l2-normalised z, ``codebook`` the normalised codebook.
    ``exclude_clean`` draws r from [1, δ) instead (the paper's reading: a chosen token always
    changes, rate α; with δ = 1 there is nothing to change to and the token stays clean).
    """
    if _is_concrete(delta) and not 1 <= int(delta) <= delta_max:
        raise ValueError(f"delta={delta} must be in [1, delta_max={delta_max}]")
    batch, length = features.shape[:2]
    ranks = nearest_code_ranks(features, codebook, delta_max)  # [B, L, delta_max]

    key_u, key_r = jax.random.split(rng)
    u = jax.random.uniform(key_u, (batch, length), jnp.float32)
    delta_f = jnp.clip(jnp.asarray(delta, jnp.float32), 1.0, float(delta_max))
    low = 1.0 if exclude_clean else 0.0
    r = low + jnp.floor(jax.random.uniform(key_r, (batch, length), jnp.float32) * (delta_f - low))
    # U·δ can round up to δ in float32 when U is within one ulp of 1.
    r = jnp.minimum(r, delta_f - 1.0).astype(jnp.int32)

    selected = _selected_samples(batch, beta, num_groups)[:, None]
    perturb = (u < jnp.asarray(alpha, jnp.float32)) & selected
    rank = jnp.where(perturb, r, 0)
    indices = jnp.take_along_axis(ranks, rank[..., None], axis=-1)[..., 0]
    return indices, rank > 0


def perturb_codes(
    rng: jax.Array,
    q: Quantized,
    codebook: jax.Array,
    *,
    alpha: Scalar,
    delta: Scalar,
    beta: Scalar,
    delta_max: int,
    num_groups: int = 1,
    exclude_clean: bool = False,
    neighbours: str = "feature",
) -> jax.Array:
    """Decoder input codes [B, L, d]: perturbed codes with a straight-through gradient to z.

    Replaced tokens are ``z + sg(e_idx − z)`` (z = ``q.features``), the same estimator as the clean
    path, so the encoder receives exactly the gradient it would with clean tokens; untouched tokens
    are ``q.quantized`` itself (bitwise). See :func:`perturb_indices` for the sampling.

    ``neighbours``: "feature" ranks codes by distance to the continuous feature z (official code);
    "code" by distance to the token's assigned code (the paper's Eq. 4, and the only choice for a
    third-party tokenizer whose features are unavailable).
    """
    if neighbours == "feature":
        query = q.features
    elif neighbours == "code":
        query = jnp.take(codebook, q.indices, axis=0)
    else:
        raise ValueError(f"neighbours must be 'feature' or 'code', got {neighbours!r}")
    indices, replaced = perturb_indices(
        rng, query, codebook,
        alpha=alpha, delta=delta, beta=beta, delta_max=delta_max, num_groups=num_groups,
        exclude_clean=exclude_clean,
    )
    codes = jnp.take(codebook, indices, axis=0).astype(q.features.dtype)
    perturbed = q.features + jax.lax.stop_gradient(codes - q.features)
    return jnp.where(replaced[..., None], perturbed, q.quantized)


def make_latent_hook(
    rng: jax.Array,
    *,
    alpha: Scalar,
    delta: Scalar,
    beta: Scalar,
    delta_max: int,
    num_groups: int = 1,
    exclude_clean: bool = False,
    neighbours: str = "feature",
) -> LatentHook:
    """A ``Tokenizer.__call__(..., latent_hook=...)`` hook applying :func:`perturb_codes`.

    It runs after the VQ/commit losses are computed, so those stay clean (robustok.md §4).
    """

    def hook(q: Quantized, codebook: jax.Array) -> jax.Array:
        return perturb_codes(
            rng, q, codebook,
            alpha=alpha, delta=delta, beta=beta, delta_max=delta_max, num_groups=num_groups,
            exclude_clean=exclude_clean, neighbours=neighbours,
        )

    return hook


def perturbation_schedule(
    progress: Scalar,
    *,
    alpha0: float,
    delta0: int,
    anneal_start: float,
    anneal_end: float,
    end_ratio: float,
) -> tuple[jax.Array, jax.Array]:
    """(α float32, δ int32) at ``progress`` (step or epoch; the caller picks the unit).

    ratio = 1 before ``anneal_start``, linear to ``end_ratio`` at ``anneal_end``, constant after;
    α = ratio·α₀ and δ = max(1, ⌊ratio·δ₀⌋), as the reference's per-epoch ``get_random_ratio``
    (paper: α₀ 1, δ₀ 100, epochs 40 → 120, end ratio 0.5, i.e. from (1, 100) to (0.5, 50)).

    A concrete ``progress`` is evaluated in Python float64, bit-for-bit the reference's values; a
    traced one in float32 with a slack of 5e-7·δ₀ before the floor, so float32 rounding cannot
    land one below an integer the float64 reference hits exactly (e.g. 0.95·100); it can then
    differ from float64 only where ratio·δ₀ lies within that slack below an integer.
    """
    if not anneal_end > anneal_start:
        raise ValueError(f"anneal_end={anneal_end} must exceed anneal_start={anneal_start}")
    if _is_concrete(progress):
        frac = min(max((float(progress) - anneal_start) / (anneal_end - anneal_start), 0.0), 1.0)
        ratio = 1.0 - (1.0 - end_ratio) * frac
        return jnp.float32(ratio * alpha0), jnp.int32(max(1, math.floor(ratio * delta0)))
    p = jnp.asarray(progress, jnp.float32)
    frac = jnp.clip((p - anneal_start) / (anneal_end - anneal_start), 0.0, 1.0)
    ratio = 1.0 - (1.0 - end_ratio) * frac
    alpha = (ratio * alpha0).astype(jnp.float32)
    slack = 5e-7 * abs(delta0)
    delta = jnp.maximum(1, jnp.floor(ratio * delta0 + slack).astype(jnp.int32))
    return alpha, delta
