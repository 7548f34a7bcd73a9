"""Decoder post-training (robustok.md §9.2): teach the decoder what the generator really emits.

Each batch pairs a generated image (the generator run with teacher forcing at preservation ratio
σ, then decoded) with the real image it came from. The generated image is re-encoded by the
*frozen* encoder and quantizer, and only the parameters downstream of the tokens (by default the
decoder and ``post_quant_conv``) learn to reconstruct the real image, with the main-training
losses and no perturbation. Everything upstream of the tokens stays bit-for-bit unchanged, so a
generator trained on the old tokens stays valid.

Freezing is by pattern (:mod:`tokpost_jax.train.partition`, ``post.trainable``): frozen leaves get
no optimizer state, a zero update, and their old values back in the update and the EMA.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax.train import optim
from tokpost_jax.train.partition import Partition
from tokpost_jax.train.state import TrainState
from tokpost_jax.train.tokenizer import TokenizerStage


class PostTrainStage(TokenizerStage):
    """The tokenizer objective on (generated → real) pairs, with everything before the tokens
    frozen; warm-started from the main-training EMA weights (and, by default, discriminator)."""

    input_key = "generated"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        if config.perturbation.enabled:
            raise ValueError("post-training uses no latent perturbation (robustok.md §9.2): "
                             "set perturbation.enabled=False")
        if config.dead_code_restart.every_steps:
            raise ValueError("dead-code restart rewrites the codebook; post-training must keep "
                             "it frozen: set dead_code_restart.every_steps=0")
        if not (config.get("init_from") and config.init_from.get("workdir")):
            raise ValueError("post-training starts from a main-training run: set "
                             "init_from.workdir to the tokenizer's workdir")
        super().__init__(config, total_steps, mesh)
        self.partition = Partition(tuple(config.post.trainable), what="post.trainable")
        self.tx = self.partition.optimizer(self.tx)

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return self.partition.keep_frozen(super().apply_updates(params, updates), params)

    def update_ema(self, ema: Any, params: Any) -> Any:
        new = optim.ema_update(ema, params, self.config.optim.ema_decay)
        return self.partition.keep_frozen(new, ema)

    def warm_start(self, state: TrainState, params: Any) -> TrainState:
        """Main-training weights into params and EMA; the discriminator too when
        ``post.reuse_discriminator`` (paper; the official code re-initialises it)."""
        state = super().warm_start(state, params)
        if self.gan is None or not self.config.post.reuse_discriminator:
            return state
        src = os.path.join(self.config.init_from.workdir, "checkpoints")
        extra = ckpt_lib.load_params(src, key="extra")
        if "disc" not in extra:
            raise ckpt_lib.CheckpointError(
                f"{src} has no discriminator state to reuse (was its GAN enabled?); set "
                "post.reuse_discriminator=False to start the discriminator fresh"
            )
        logging.info("Post-training reuses the discriminator (and LeCAM EMAs) from %s.", src)
        return state.replace(extra=self.gan.reuse(state.extra, extra))
