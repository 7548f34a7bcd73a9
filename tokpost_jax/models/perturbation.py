"""RobusTok latent perturbation (robustok.md §5): swap tokens for random near neighbours.

During main training a fraction β of the batch has each token replaced, with probability α, by a
code drawn uniformly from its δ nearest codebook entries (measured from the continuous feature z,
not code-to-code). This simulates the generator's sampling errors so that the decoder learns to
tolerate them. α and δ are annealed to half over training (:func:`perturbation_schedule`).

Everything here is a pure function of an explicit PRNG key, with static shapes: δ enters only as a
traced integer below a static ``delta_max``, so annealing δ never recompiles the train step. A
:class:`Perturbation` describes one perturbed forward; the tokenizers take it as an argument, so
training and pFID run the same code.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.quantizer import Quantized

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


def samples_per_group(beta: float, group_size: int) -> int:
    """⌊β·G⌋ in Python float64 arithmetic, as the reference's ``int(B_local * beta)``."""
    return math.floor(float(beta) * int(group_size))


@flax.struct.dataclass
class Perturbation:
    """One perturbed forward: which samples, how often and among how many neighbours to swap.

    Training and pFID both pass one of these to the tokenizer (``perturbation=``), so there is one
    code path. ``alpha``/``delta`` may be traced (annealed without recompiling); the rest is
    static. ``group_size`` splits the global batch into contiguous groups of that many samples and
    perturbs the first ⌊β·group_size⌋ of each (the reference perturbs the first ⌊β·B_gpu⌋ of each
    GPU's batch: 8 GPUs × ⌊0.1·128⌋ = 96 of 1024); 0 means one group, the whole batch. It is a
    number of samples, never the device count, so a pod and a laptop perturb the same samples.
    """

    rng: jax.Array
    alpha: Any
    delta: Any
    beta: float = flax.struct.field(pytree_node=False, default=1.0)
    delta_max: int = flax.struct.field(pytree_node=False, default=1)
    group_size: int = flax.struct.field(pytree_node=False, default=0)
    exclude_clean: bool = flax.struct.field(pytree_node=False, default=False)
    neighbours: str = flax.struct.field(pytree_node=False, default="feature")


def selected_samples(batch: int, beta: float, group_size: int = 0) -> jax.Array:
    """[B] bool: the first ⌊β·G⌋ samples of each contiguous group of G samples (G = ``group_size``,
    or the whole batch when 0). The loader shuffles, so this is a random subset."""
    group = batch if group_size == 0 else int(group_size)
    if group < 1 or batch % group:
        raise ValueError(
            f"perturbation.group_size={group_size}: the batch of {batch} does not split into "
            "groups of that size"
        )
    n = samples_per_group(beta, group)
    return (jnp.arange(batch, dtype=jnp.int32) % group) < n


def choose_ranks(p: Perturbation, shape: tuple[int, int]) -> jax.Array:
    """[B, L] int32 neighbour ranks to take (0 = the clean token) for the samples ``p`` selects.

    Per token: u ~ U(0,1), r = ⌊U'·δ⌋ ~ UniformInt[0, δ); rank r if u < α, else 0. As in the
    official code r = 0 is allowed, so a selected token changes with probability α·(1 − 1/δ), not
    α; ``exclude_clean`` draws r from [1, δ) instead (the paper's reading; δ = 1 then leaves the
    token clean). δ is clipped to [1, delta_max]. All draws have shape [B, L] from ``p.rng``
    (partitionable threefry), so sharding the batch does not change them.
    """
    if _is_concrete(p.delta) and not 1 <= int(p.delta) <= p.delta_max:
        raise ValueError(f"delta={p.delta} must be in [1, delta_max={p.delta_max}]")
    batch, length = shape
    key_u, key_r = jax.random.split(p.rng)
    u = jax.random.uniform(key_u, (batch, length), jnp.float32)
    delta_f = jnp.clip(jnp.asarray(p.delta, jnp.float32), 1.0, float(p.delta_max))
    low = 1.0 if p.exclude_clean else 0.0
    r = low + jnp.floor(jax.random.uniform(key_r, (batch, length), jnp.float32) * (delta_f - low))
    # U·δ can round up to δ in float32 when U is within one ulp of 1.
    r = jnp.minimum(r, delta_f - 1.0).astype(jnp.int32)
    selected = selected_samples(batch, p.beta, p.group_size)[:, None]
    perturb = (u < jnp.asarray(p.alpha, jnp.float32)) & selected
    return jnp.where(perturb, r, 0)


def perturb_from_ranks(p: Perturbation, ranks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Perturbed indices [B, L] and the mask of changed tokens, from each token's nearest-code
    ranks [B, L, delta_max] (rank 0 = its clean code). Shared by every tokenizer family: the ViT
    quantizer ranks by cosine to z, CODA by its assignment logits."""
    rank = choose_ranks(p, ranks.shape[:2])
    indices = jnp.take_along_axis(ranks, rank[..., None], axis=-1)[..., 0]
    return indices, rank > 0


def perturb_indices(
    p: Perturbation, features: jax.Array, codebook: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Perturbed token indices [B, L] (int32) and the mask [B, L] of changed tokens, for unit
    ``features`` [B, L, d] against a unit ``codebook`` (neighbours by cosine)."""
    return perturb_from_ranks(p, nearest_code_ranks(features, codebook, p.delta_max))


def perturb_codes(p: Perturbation, q: Quantized, codebook: jax.Array) -> jax.Array:
    """Decoder input codes [B, L, d]: perturbed codes with a straight-through gradient to z.

    Replaced tokens are ``z + sg(e_idx − z)`` (z = ``q.features``), the same estimator as the clean
    path, so the encoder receives exactly the gradient it would with clean tokens; untouched tokens
    are ``q.quantized`` itself (bitwise).

    ``p.neighbours``: "feature" ranks codes by distance to the continuous feature z (official
    code); "code" by distance to the token's assigned code (the paper's Eq. 4, and the only choice
    for a third-party tokenizer whose features are unavailable).
    """
    if p.neighbours == "feature":
        query = q.features
    elif p.neighbours == "code":
        query = jnp.take(codebook, q.indices, axis=0)
    else:
        raise ValueError(f"neighbours must be 'feature' or 'code', got {p.neighbours!r}")
    indices, replaced = perturb_indices(p, query, codebook)
    codes = jnp.take(codebook, indices, axis=0).astype(q.features.dtype)
    perturbed = q.features + jax.lax.stop_gradient(codes - q.features)
    return jnp.where(replaced[..., None], perturbed, q.quantized)


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
