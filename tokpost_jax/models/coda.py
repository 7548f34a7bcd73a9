"""CODA (arXiv 2503.17760; coda.md): a continuous KL-VAE, LoRA-adapted, made discrete by a
multi-scale residual attention quantizer — the second tokenizer family behind the interface.

images → VAE encoder (+ LoRA) → posterior (sample in training, mean for tokens) → latent norm
(z − shift)·scale → :class:`~tokpost_jax.models.coda_quantizer.CODAQuantizer` → f̂ → unscale →
VAE decoder (+ LoRA). The VAE's own weights are ordinary parameters: the trainer freezes them by
pattern (only LoRA and the quantizer train), never with ``stop_gradient``, so merged export stays
trivial. ``latent_norm/{scale,shift}`` are frozen parameters filled from the VAE run or the
release (MAR: scale 0.2325, shift 0; FLUX: 0.3611 / 0.1159), so inference needs only params.

RobusTok's latent perturbation (coda.md §9, option A): the residual loop runs with clean codes
(losses and later assignments unchanged); for the selected samples tokens are swapped among
their δ nearest codes and the decoder sees f̂' = Σ_k up(U[idx'_k]) with the clean path's
straight-through gradient, f̂ + sg(f̂' − f̂). Swaps never touch scales smaller than
``perturb_min_side`` (a wrong 1×1 token is broadcast over the whole image).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokpost_jax.models.coda_quantizer import CODAQuantizer, MultiScaleQuantized
from tokpost_jax.models.interface import TokenizerInterface
from tokpost_jax.models.klvae import build_klvae
from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.perturbation import Perturbation, perturb_from_ranks

POSTERIOR_MODES = ("mean", "sample")
NEIGHBOURS = ("feature", "value", "key")


class CODATokenizer(TokenizerInterface, nn.Module):
    """The CODA tokenizer; fields mirror ``config.model`` of ``configs/coda.py``."""

    vae_config: dict  # KLVAE fields (config_lib.klvae(...)), LoRA rank and patterns included
    codebook_size: int
    scales: tuple[int, ...]
    quantizer_config: dict  # the other CODAQuantizer fields (configs/coda.py model.quantizer)
    # Tokens (encode / reconstruct / pFID) from the posterior mean (deterministic; ours) or a
    # posterior sample (the official eval, which needs an rng stream "posterior").
    eval_posterior: str = "mean"
    perturb_min_side: int = 1
    dtype: Any = jnp.float32
    remat: str = "none"  # the VAE's res/attn blocks (models/remat.py); the quantizer has its own

    def setup(self) -> None:
        if self.eval_posterior not in POSTERIOR_MODES:
            raise ValueError(
                f"eval_posterior={self.eval_posterior!r}; use one of {POSTERIOR_MODES}"
            )
        self.vae = build_klvae(dict(self.vae_config), dtype=self.dtype, remat=self.remat)
        self.quantizer = CODAQuantizer(
            codebook_size=self.codebook_size,
            dim=int(self.vae_config["z_channels"]),
            scales=tuple(self.scales),
            **self.quantizer_config,
        )
        z = int(self.vae_config["z_channels"])
        self.latent_scale = self.param("latent_scale", nn.initializers.ones, (z,))
        self.latent_shift = self.param("latent_shift", nn.initializers.zeros, (z,))

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(tuple(self.scales))

    # ---- latent space --------------------------------------------------------------------------
    def latent(self, images: jax.Array, sample: bool) -> jax.Array:
        """Normalised latent f [B, h, w, z] (the quantizer's input)."""
        mean, logvar = self.vae.encode_moments(images)
        z = self.vae.sample_posterior(mean, logvar) if sample else mean
        return (z - self.latent_shift) * self.latent_scale

    def decode_latent(self, f: jax.Array) -> jax.Array:
        """Normalised latent → images (unclamped)."""
        return self.vae.decode(f / self.latent_scale + self.latent_shift)

    def _eval_latent(self, images: jax.Array) -> jax.Array:
        return self.latent(images, sample=self.eval_posterior == "sample")

    # ---- the tokenizer interface ---------------------------------------------------------------
    def encode(self, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] → token indices [B, L] (int32), the layout's flat order."""
        return self.quantizer(self._eval_latent(images)).indices

    def decode(self, indices: jax.Array) -> jax.Array:
        """Token indices [B, L] → images, clamped to [-1, 1]."""
        return jnp.clip(self.decode_latent(self.quantizer.lookup(indices)), -1.0, 1.0)

    # ---- training forward ----------------------------------------------------------------------
    def quantize(
        self, images: jax.Array, deterministic: bool, perturbation: Perturbation | None = None
    ) -> tuple[jax.Array, MultiScaleQuantized]:
        """(decoder input f̂ or its perturbed version, the clean quantization)."""
        f = self.latent(images, sample=not deterministic or self.eval_posterior == "sample")
        delta_max = perturbation.delta_max if perturbation is not None else 0
        if perturbation is not None and perturbation.neighbours != "feature":
            delta_max = 0  # ranks come from code-to-code similarities instead
        q = self.quantizer(f, delta_max=delta_max)
        if perturbation is None:
            return q.f_hat, q
        return self.perturb(q, perturbation), q

    def perturbed_indices(self, q: MultiScaleQuantized, p: Perturbation) -> jax.Array:
        """[B, L] tokens after the swaps: among each token's δ nearest codes (by the assignment
        logits, or by code-to-code distance of values / keys), for the samples ``p`` selects,
        never at scales smaller than ``perturb_min_side``."""
        if p.neighbours not in NEIGHBOURS:
            raise ValueError(
                f"neighbours must be one of {NEIGHBOURS} for CODA, got {p.neighbours!r}"
            )
        if p.neighbours == "feature":
            ranks = q.ranks  # top-δ by the assignment logits
        else:
            table = self.quantizer.values() if p.neighbours == "value" else self.quantizer.keys()
            table = jax.lax.stop_gradient(table)
            chosen = jnp.take(table, q.indices, axis=0)
            sims = jnp.einsum(
                "blc,vc->blv", chosen, table, precision=jax.lax.Precision.HIGHEST
            ) - 0.5 * jnp.sum(jnp.square(table), -1)  # argmax = nearest by Euclidean distance
            ranks = jax.lax.top_k(sims, p.delta_max)[1].astype(jnp.int32)
        idx, _ = perturb_from_ranks(p, ranks)
        num_coarse = sum(s < self.perturb_min_side for s in self.scales)
        if num_coarse:
            coarse = jnp.asarray(self.layout.scale_of_token()) < num_coarse
            idx = jnp.where(coarse[None], q.indices, idx)
        return idx

    def perturb(self, q: MultiScaleQuantized, p: Perturbation) -> jax.Array:
        """f̂ + sg(lookup(idx') − lookup(idx)): perturbed values, the clean path's gradient."""
        swapped = self.quantizer.lookup(self.perturbed_indices(q, p))
        clean = self.quantizer.lookup(q.indices)
        return q.f_hat + jax.lax.stop_gradient(swapped - clean)

    def __call__(
        self,
        images: jax.Array,
        deterministic: bool = True,
        perturbation: Perturbation | None = None,
    ) -> tuple[jax.Array, MultiScaleQuantized]:
        """Training forward: reconstruction (unclamped) and the clean quantization."""
        f_dec, q = self.quantize(images, deterministic, perturbation)
        return self.decode_latent(f_dec), q
