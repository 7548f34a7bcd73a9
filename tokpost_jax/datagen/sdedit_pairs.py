"""Paired post-training data, SDEdit variant: real images and latents the flow model regenerated
from their noised latents (robustok.md §9.4).

For each image of a seeded random subset of a split (the same subset as the AR pairs,
:func:`tokpost_jax.datagen.pairs.choose_subset`): encode its ADM center crop with the frozen KL-VAE
to the posterior *mean* z, move it to the flow model's units ``x0 = (z − shift)·scale``, noise it
to t = 1 − σ on the training path ``x_t = (1 − t)·x0 + t·ε``, and integrate the LatentDiT's ODE
(with the true label and CFG) from t back to 0 in ``max(1, ceil(num_steps·(1 − σ)))`` steps of
the configured method. σ = 1 keeps the real latent (no integration), σ = 0 is free generation.

The generated latent is stored, not a decoded image, because decoder post-training decodes it with
the decoder being trained. It is stored in VAE space in the residual form
``generated = z + (x_gen − x0)/scale``: with x_gen = x0 that is z itself bit for bit (σ = 1 gives
exactly the posterior mean, so post-training at σ = 1 is plain reconstruction), where
``to_vae_space(x_gen)`` would round differently. It equals ``x_gen/scale + shift`` up to rounding.

Records (one per subset image), in shards under ``<out_dir>/train`` whatever the source split:

  generated      float32 [h, w, C]  the regenerated latent in VAE space (the decoder's input)
  image          uint8   [S, S, 3]  the real ADM center crop (the target)
  label          int32              its class id, the label the flow model was given
  index          int64              the image's index in the source split

Determinism: the subset, its order and the resume rules are the AR pairs' (datagen/pairs.py).
Image i's noise is drawn from ``fold_in(fold_in(key(seed), NOISE_STREAM), i)`` alone and the ODE
is deterministic, so a record depends on neither the batch size, the device count nor restarts,
up to float rounding (XLA's convolutions and matmuls are not batch-size or sharding invariant:
~1e-6 on the micro models). The batch size is therefore pinned in the manifest, so a resumed run
recomputes exactly what a fresh one would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tokpost_jax import files, sampling_ode
from tokpost_jax import sharding as shd
from tokpost_jax.data import pipeline
from tokpost_jax.data.shards import FieldSpec
from tokpost_jax.datagen.pairs import (
    OUTPUT_SPLIT,
    SubsetReader,
    choose_subset,
    row_keys,
    subset_fingerprint,
)
from tokpost_jax.datagen.shard_loop import (
    POSITION,
    ShardsResult,
    check_batch_size,
    params_fingerprint,
    produce_shards,
)
from tokpost_jax.datagen.tokens import device_params
from tokpost_jax.models import build
from tokpost_jax.models import diffusion as dif

# ~200 MB per shard at 256x256 with a 16x16x16 latent: a kill loses at most one shard.
DEFAULT_RECORDS_PER_SHARD = 1024
#: fold_in stream of the user seed for the SDEdit noise ε.
NOISE_STREAM = 0

_SAMPLING_FIELDS = ("method", "num_steps", "guidance")


def sdedit_noise(seed: int, indices: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    """[B, *latent_shape] float32 N(0, I) noise, row b from (seed, ``indices[b]``) alone
    (:func:`~tokpost_jax.datagen.pairs.row_keys`)."""
    keys = row_keys(seed, NOISE_STREAM, indices)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape), jnp.float32))(keys)


def ode_steps(num_steps: int, sigma: float) -> int:
    """Steps for the path from t = 1 − σ to 0: the full schedule's share, at least one."""
    # round(): 20·(1 − 0.9) is 2.0000000000000004 in floats, which must be 2 steps, not 3.
    return max(1, math.ceil(round(num_steps * (1.0 - sigma), 9)))


def _sampling_settings(sampling: Any) -> dict[str, Any]:
    """The ODE settings as plain values: JSON for the manifest, static for jit."""
    raw = sampling.to_dict() if hasattr(sampling, "to_dict") else dict(sampling)
    unknown = sorted(set(raw) - set(_SAMPLING_FIELDS))
    missing = [k for k in _SAMPLING_FIELDS if k not in raw]
    if unknown or missing:
        raise ValueError(
            f"sampling needs {list(_SAMPLING_FIELDS)}; missing {missing}, unknown {unknown}"
        )
    if raw["method"] not in sampling_ode.METHODS:
        raise ValueError(
            f"sampling.method={raw['method']!r}; use one of {sampling_ode.METHODS}"
        )
    num_steps = raw["num_steps"]
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"sampling.num_steps must be an int >= 1, got {num_steps!r}")
    return {
        "method": str(raw["method"]),
        "num_steps": int(num_steps),
        "guidance": float(raw["guidance"]),
    }


def _model_variables(model: dif.LatentDiT, variables: Any, latent_shape, mesh, rules) -> Any:
    """Host LatentDiT variables placed with their training shardings; shape-checked first."""
    abstract = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, *latent_shape)),
        jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32),
    )
    return shd.place_host_params(
        dict(variables), abstract, mesh, rules,
        "model variables do not match config.model's LatentDiT on latent.shape (they must be "
        "{'params': ...} of this size)",
    )


class _SDEditJob(SubsetReader):
    """Records are subset images (real crop + label); the step encodes to the posterior mean,
    noises it to 1 − σ and integrates the flow model back to t = 0."""

    def __init__(
        self, vae, vae_params, model, model_vars, source, chosen, size, latent, sigma, seed,
        settings, mesh, rules, num_threads,
    ):
        super().__init__(source, chosen, size, model.num_classes, num_threads)
        self._vae = device_params(vae, vae_params, size, mesh, rules)
        shape, scale, shift = latent
        self._model = _model_variables(model, model_vars, shape, mesh, rules)
        t0 = 1.0 - sigma
        num_steps = ode_steps(settings["num_steps"], sigma)

        def step(vae_params: Any, model_vars: Any, batch: dict, start: jax.Array) -> dict:
            del start  # the noise is per image, not per batch
            mean, _ = vae.apply({"params": vae_params}, batch["pixels"], method="encode_moments")
            mean = mean.astype(jnp.float32)
            if t0 == 0.0:  # σ = 1: the real latent, bit for bit
                generated = mean
            else:
                x0 = dif.to_model_space(mean, scale, shift)
                eps = sdedit_noise(seed, batch["index"], shape)
                x_t = sampling_ode.noise_to(x0, eps, t0)
                x_gen = sampling_ode.integrate_from(
                    model, model_vars, x_t, batch["label"], t0, num_steps=num_steps,
                    method=settings["method"], guidance=settings["guidance"],
                )
                generated = mean + (x_gen - x0) / scale
            return {
                "generated": generated,
                "image": batch["image"],
                "label": batch["label"],
                "index": batch["index"],
                POSITION: batch[POSITION],
            }

        self._step = jax.jit(step, out_shardings=shd.batch_sharding(mesh, rules))

    def step(self, batch: dict[str, jax.Array], start: np.int32) -> dict[str, jax.Array]:
        return self._step(self._vae, self._model, batch, start)


def generate_sdedit_pairs(
    config: ml_collections.ConfigDict,
    vae_params: Any,
    model_variables: Any,
    out_dir: str | os.PathLike,
    *,
    split: str,
    num_images: int,
    sigma: float,
    seed: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    sampling: Mapping[str, Any] | None = None,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    metadata: Mapping[str, Any] | None = None,
    num_threads: int = 8,
) -> ShardsResult:
    """Writes `num_images` (generated latent, real image) pairs of ``config.data``'s `split`.

    `config` is a configs/diffusion.py config: its ``data`` are the source images, ``vae`` and
    ``latent`` the frozen KL-VAE and the latent normalisation, ``model`` the LatentDiT and
    ``sampling`` (method, num_steps, guidance) the ODE settings unless `sampling` is given.
    `vae_params` are host KL-VAE parameters (e.g. :func:`tokpost_jax.train.diffusion.
    load_vae_params`), `model_variables` the LatentDiT's ``{"params": ...}`` (e.g. its EMA
    parameters). Output goes to ``<out_dir>/train`` regardless of `split`. `batch_size` is
    global (a multiple of the hosts and of the batch shards of `mesh`). Only shards missing on
    disk are computed; σ, seed, the subset, the sampling settings, the batch size, the latent,
    the dtype and fingerprints of both parameter trees are pinned in the manifest, with
    `metadata`, so a rerun with other settings is refused.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, int | float | np.floating | np.integer):
        raise ValueError(f"sigma must be a number in [0, 1], got {sigma!r}")
    if not 0.0 <= float(sigma) <= 1.0:
        raise ValueError(f"sigma={sigma} must be in [0, 1] (1 − the SDEdit start time t)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    cfg = config
    settings = _sampling_settings(cfg.sampling if sampling is None else sampling)
    rules = shd.rules_tuple(rules)
    check_batch_size(batch_size, mesh, rules)
    lat = cfg.latent
    scale, shift = float(lat.scale), float(lat.shift)
    if not scale > 0:
        raise ValueError(f"latent.scale={lat.scale} must be > 0 (1 / latent std)")
    shape = tuple(int(d) for d in lat.shape)
    size = int(cfg.data.image_size)
    vae = build.latent_vae(cfg)
    made = build.latent_shape(vae, size)
    if made != shape:
        raise ValueError(
            f"latent.shape={shape} must be the VAE's latent of {size}² images, {made}"
        )
    model = build.diffusion(cfg)
    p = int(model.patch_size)
    if len(shape) != 3 or shape[0] % p or shape[1] % p:
        raise ValueError(
            f"latent.shape={shape} must be [h, w, C] with h and w multiples of the model's "
            f"patch size {p}"
        )
    source = pipeline.make_source(cfg.data, split)
    if len(source) >= 2**31:
        raise ValueError(f"{len(source)} source images do not fit int32 indices")
    chosen = choose_subset(len(source), int(num_images), int(seed))
    sigma = float(sigma)
    manifest_meta = {
        "producer": "tokpost_jax.datagen.sdedit_pairs (rerun the same call to finish it)",
        "kind": "sdedit",
        "dataset": cfg.data.name,
        "source_split": split,
        "source_size": len(source),
        "num_images": int(num_images),
        "seed": int(seed),
        "subset_fingerprint": subset_fingerprint(chosen),
        "sigma": sigma,
        "t_start": 1.0 - sigma,
        "ode_steps": ode_steps(settings["num_steps"], sigma),
        "sampling": settings,
        "batch_size": int(batch_size),
        "image_size": size,
        "latent_shape": list(shape),
        "latent_scale": scale,
        "latent_shift": shift,
        "generated_space": "vae (residual: posterior mean + (x_gen - x0) / scale)",
        "num_classes": int(model.num_classes),
        "dtype": str(jnp.dtype(cfg.dtype)),
        "vae_params_fingerprint": params_fingerprint(shd.strip_boxes(vae_params)),
        "model_params_fingerprint": params_fingerprint(shd.strip_boxes(model_variables)),
        **dict(metadata or {}),
    }
    fields = {
        "generated": FieldSpec(np.dtype(np.float32), shape),
        "image": FieldSpec(np.dtype(np.uint8), (size, size, 3)),
        "label": FieldSpec(np.dtype(np.int32), ()),
        "index": FieldSpec(np.dtype(np.int64), ()),
    }
    logging.info(
        "SDEdit pairs at σ=%g (%d ODE steps) from %d of %d images.",
        sigma, manifest_meta["ode_steps"], len(chosen), len(source),
    )

    def make_job() -> _SDEditJob:
        return _SDEditJob(
            vae, vae_params, model, model_variables, source, chosen, size, (shape, scale, shift),
            sigma, int(seed), settings, mesh, rules, num_threads,
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return produce_shards(
            files.join(out_dir, OUTPUT_SPLIT),
            num_records=len(chosen), records_per_shard=records_per_shard, fields=fields,
            metadata=manifest_meta, batch_size=batch_size, mesh=mesh, rules=rules,
            make_job=make_job, what=f"SDEdit pairs {cfg.data.name}/{split}", log_every=10,
        )
