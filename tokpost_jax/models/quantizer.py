"""L2-normalised vector quantizer (RobusTok §3): nearest code by cosine, straight-through estimator.

The stored codebook is raw; every use normalises its rows, and encoder features are normalised per
token, so the nearest code by squared distance is the code of largest cosine.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tokpost_jax.models.vit import logical


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit vectors along the last axis (eps keeps a zero vector finite, as F.normalize does)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def codebook_uniform_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Uniform(-1/K, 1/K), the reference initialisation (rows are normalised at use)."""
    k = shape[0]
    return jax.random.uniform(key, shape, dtype, minval=-1.0 / k, maxval=1.0 / k)


@flax.struct.dataclass
class Quantized:
    """Everything a loss, a perturbation or a metric needs from one quantizer call."""

    quantized: jax.Array  # [..., d] straight-through code vectors (forward = unit codes)
    indices: jax.Array  # [...] int32 code ids
    features: jax.Array  # [..., d] l2-normalised encoder features z
    # Named quantizer losses, weighted by the stage's ``loss.quantizer_weights``: "codebook" is
    # mean((ẑ − sg(z))²), "commit" commit_weight · mean((sg(ẑ) − z)²).
    losses: dict[str, jax.Array]


def nearest_codes(features: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the max-cosine code for each unit feature ([..., d] × [K, d] → [...])."""
    sims = jnp.einsum("...d,kd->...k", features, codebook, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(sims, axis=-1).astype(jnp.int32)


def code_usage(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Fraction of codes hit and perplexity of the code histogram over all given indices."""
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


class L2VectorQuantizer(nn.Module):
    """VQ over a K×d codebook with l2-normalised codes and features."""

    codebook_size: int
    code_dim: int
    commit_weight: float = 0.25

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            logical(codebook_uniform_init, ("codebook", "code")),
            (self.codebook_size, self.code_dim),
        )

    def normalized_codebook(self) -> jax.Array:
        return l2_normalize(self.embedding.astype(jnp.float32))

    def __call__(self, z: jax.Array) -> Quantized:
        z = l2_normalize(z.astype(jnp.float32))
        codebook = self.normalized_codebook()
        indices = nearest_codes(z, codebook)
        z_q = jnp.take(codebook, indices, axis=0)
        codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
        commit_loss = self.commit_weight * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
        quantized = z + jax.lax.stop_gradient(z_q - z)
        return Quantized(
            quantized, indices, z, {"codebook": codebook_loss, "commit": commit_loss}
        )

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Unit code vectors for given indices (the decode path)."""
        return jnp.take(self.normalized_codebook(), indices, axis=0)


def update_code_usage(usage: jax.Array, indices: jax.Array, decay: float) -> jax.Array:
    """EMA of each code's share of the assignments (sums to 1); used to find dead codes."""
    counts = jnp.bincount(indices.reshape(-1), length=usage.shape[0]).astype(jnp.float32)
    return decay * usage + (1.0 - decay) * counts / jnp.maximum(counts.sum(), 1.0)


def restart_dead_codes(
    rng: jax.Array, embedding: jax.Array, usage: jax.Array, features: jax.Array, min_usage: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Re-seeds codes whose usage share is below ``min_usage``/K with random current features.

    A from-scratch encoder maps every token to a few directions at first, so the codebook
    collapses to a handful of codes; re-seeding the unused ones at real features brings them back
    into play. Returns (embedding, usage with restarted codes reset to 1/K, number restarted).
    """
    k = embedding.shape[0]
    dead = usage < (min_usage / k)
    flat = features.reshape(-1, features.shape[-1]).astype(embedding.dtype)
    picks = jax.random.randint(rng, (k,), 0, flat.shape[0])
    # Norm of the stored row is irrelevant (rows are normalised at use); keep the codebook's scale.
    scale = jnp.mean(jnp.linalg.norm(embedding, axis=-1))
    embedding = jnp.where(dead[:, None], flat[picks] * scale, embedding)
    usage = jnp.where(dead, 1.0 / k, usage)
    return embedding, usage, jnp.sum(dead)
