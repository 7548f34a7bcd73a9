"""The tokenizer interface every stage after the tokenizer talks to, for any family.

A tokenizer module provides ``layout`` (a :class:`~tokpost_jax.models.layout.TokenLayout`),
``codebook_size``, ``encode(images) -> [B, L] int32``, ``decode(indices) -> images`` (clamped),
and a training forward ``__call__(images, deterministic, perturbation) -> (recon, quantized)``
whose quantized result carries ``indices`` and its named ``losses``. This mixin derives the
evaluation entry points from that forward, so reconstruction, training and pFID share one path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokpost_jax.models.perturbation import Perturbation


class TokenizerInterface:
    """``reconstruct`` and ``perturbed_reconstruct`` from the module's own forward."""

    def reconstruct(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(clamped reconstruction, token indices [B, L]) in one deterministic pass."""
        recon, q = self(images, deterministic=True)
        return jnp.clip(recon, -1.0, 1.0), q.indices

    def perturbed_reconstruct(self, images: jax.Array, perturbation: Perturbation) -> jax.Array:
        """The clamped decode of perturbed tokens (pFID): the training forward's own path."""
        recon, _ = self(images, deterministic=True, perturbation=perturbation)
        return jnp.clip(recon, -1.0, 1.0)
