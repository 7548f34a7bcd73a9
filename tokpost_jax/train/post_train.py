"""Decoder post-training (robustok.md §9.2): teach the decoder what the generator really emits.

Each batch pairs a generated image (the generator run with teacher forcing at preservation ratio
σ, then decoded) with the real image it came from. The generated image is re-encoded by the
*frozen* encoder and quantizer, and only the parameters downstream of the tokens (by default the
decoder and ``post_quant_conv``) learn to reconstruct the real image, with the main-training
losses and no perturbation. Everything upstream of the tokens stays bit-for-bit unchanged, so a
generator trained on the old tokens stays valid.

Freezing is by pattern (:mod:`tokpost_jax.train.partition`, ``post.trainable``): frozen leaves get
no optimizer state, a zero update, and their old values back in the update and the EMA.

A continuous tokenizer post-trains here too (:class:`VAEPostTrainStage`, robustok.md §9.4): the
pairs hold latents a diffusion model regenerated (datagen/sdedit_pairs.py), the KL-VAE's decoder
side learns to map them to the real images, and its encoder and quant_conv stay bitwise.

The discrete tokenizer families post-train here: :class:`PostTrainStage` (ViT VQ) and
:class:`CODAPostTrainStage` (CODA: decoder-side LoRA by default; any pattern reaching upstream of
the tokens — encoder with its LoRA, quant_conv, latent norm, codebook, q/k/v projections and
norms, the values included, since they feed the residual — is refused).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import files
from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.train.coda import CODAStage
from tokpost_jax.train.partition import Partition
from tokpost_jax.train.reconstruction import ReconstructionStage
from tokpost_jax.train.state import TrainState
from tokpost_jax.train.tokenizer import TokenizerStage
from tokpost_jax.train.vae import VAEStage

#: Everything that determines a KL-VAE latent: never trainable in post-training.
VAE_UPSTREAM = ("encoder/*", "quant_conv/*")
#: Everything that determines a CODA token: never trainable in post-training.
CODA_UPSTREAM = (
    "vae/encoder/*", "vae/quant_conv/*", "quantizer/*", "latent_scale", "latent_shift",
)


def check_post_config(config: ml_collections.ConfigDict) -> None:
    """Post-training starts from a main run and never perturbs (a VAE config has no
    perturbation block: nothing to perturb)."""
    if config.get("perturbation") is not None and config.perturbation.enabled:
        raise ConfigValueError(
            "perturbation.enabled", True, "must be False: post-training uses no latent "
            "perturbation (robustok.md §9.2)",
        )
    if not (config.get("init_from") and config.init_from.get("workdir")):
        raise ConfigValueError(
            "init_from.workdir", None, "must name the main tokenizer run post-training starts from"
        )


def reuse_discriminator(stage: ReconstructionStage, state: TrainState) -> TrainState:
    """The main run's discriminator weights and LeCAM EMAs in ``state`` when
    ``post.reuse_discriminator`` (RobusTok's paper; its code re-initialises them)."""
    if stage.gan is None or not stage.config.post.reuse_discriminator:
        return state
    src = files.join(stage.config.init_from.workdir, "checkpoints")
    extra = ckpt_lib.load_params(src, key="extra")
    if "disc" not in extra:
        raise ckpt_lib.CheckpointError(
            f"{src} has no discriminator state to reuse (was its GAN enabled?); set "
            "post.reuse_discriminator=False to start the discriminator fresh"
        )
    logging.info("Post-training reuses the discriminator (and LeCAM EMAs) from %s.", src)
    return state.replace(extra=stage.gan.reuse(state.extra, extra))


class _KeepsUpstreamFrozen:
    """What the post-training stages whose step updates every leaf share: frozen leaves come
    back bitwise in the update and the EMA (``self.partition``), and the warm start reuses the
    main run's discriminator."""

    partition: Partition

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return self.partition.keep_frozen(super().apply_updates(params, updates), params)

    def update_ema(self, ema: Any, params: Any) -> Any:
        return self.partition.keep_frozen(super().update_ema(ema, params), ema)

    def warm_start(self, state: TrainState, params: Any) -> TrainState:
        """Main-training weights into params and EMA, and by default its discriminator."""
        return reuse_discriminator(self, super().warm_start(state, params))


class PostTrainStage(_KeepsUpstreamFrozen, TokenizerStage):
    """The tokenizer objective on (generated → real) pairs, with everything before the tokens
    frozen; warm-started from the main-training EMA weights (and, by default, discriminator)."""

    input_key = "generated"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        check_post_config(config)
        if config.dead_code_restart.every_steps:
            raise ConfigValueError(
                "dead_code_restart.every_steps", config.dead_code_restart.every_steps,
                "must be 0: dead-code restart rewrites the codebook, which post-training keeps",
            )
        super().__init__(config, total_steps, mesh)
        self.partition = Partition(tuple(config.post.trainable), what="post.trainable")
        self.tx = self.partition.optimizer(self.tx)


class CODAPostTrainStage(CODAStage):
    """CODA's decoder side trained on (generated → real) pairs; the token space stays bitwise."""

    input_key = "generated"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        check_post_config(config)
        super().__init__(config, total_steps, mesh)
        self.partition = Partition(
            tuple(config.post.trainable), must_freeze=CODA_UPSTREAM, what="post.trainable"
        )

    def load_pretrained(self, state: TrainState) -> TrainState:
        return state  # everything comes from the main run (warm_start)

    def warm_start(self, state: TrainState, params: Any) -> TrainState:
        return reuse_discriminator(self, super().warm_start(state, params))


class VAEPostTrainStage(_KeepsUpstreamFrozen, VAEStage):
    """The KL-VAE decoder trained on (generated latent → real image) pairs: the VAE objective
    on ``decode(batch["generated"])`` without the KL term (no encoder runs in the step), with
    the GAN side as in main training; raw and EMA decoders are judged on real images."""

    input_key = "generated"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        check_post_config(config)
        super().__init__(config, total_steps, mesh)
        self.partition = Partition(
            tuple(config.post.trainable), must_freeze=VAE_UPSTREAM, what="post.trainable"
        )
        self.tx = self.partition.optimizer(self.tx)

    def forward(
        self, params: Any, latents: jax.Array, rng: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
        """((decode of the generated latent, zero KL), (latent, latent, log-variance −∞)): the
        decoder gets the latent as it is, no posterior noise (``posterior_std`` reads 0)."""
        del rng
        recon = self.model.apply({"params": params}, latents, method="decode")
        no_noise = jnp.full_like(latents, -jnp.inf)
        return (recon, jnp.zeros((), jnp.float32)), (latents, latents, no_noise)

    def kl_per_pixel_weight(self) -> float:
        return 0.0  # the encoder is frozen and not run: no KL term
