"""``config.trainer`` → the stage that trains it (for the ``main`` command and the pipeline)."""

from __future__ import annotations

import importlib

from tokpost_jax.config_checks import ConfigValueError

#: trainer name → "module:Stage class" (imported on use: a trainer's imports stay its own).
TRAINERS = {
    "tokenizer": "tokpost_jax.train.tokenizer:TokenizerStage",
    "generator": "tokpost_jax.train.generator:GeneratorStage",
    "post_train": "tokpost_jax.train.post_train:PostTrainStage",
    "vae": "tokpost_jax.train.vae:VAEStage",
    "coda": "tokpost_jax.train.coda:CODAStage",
    "coda_post_train": "tokpost_jax.train.post_train:CODAPostTrainStage",
    "diffusion": "tokpost_jax.train.diffusion:DiffusionStage",
    "vae_post_train": "tokpost_jax.train.post_train:VAEPostTrainStage",
}


def stage_class(trainer: str) -> type:
    if trainer not in TRAINERS:
        raise ConfigValueError("trainer", trainer, f"must be one of {sorted(TRAINERS)}")
    module, cls = TRAINERS[trainer].split(":")
    return getattr(importlib.import_module(module), cls)
