"""Latent diffusion training (rectified flow, models/diffusion.py) on a frozen KL-VAE's latents.

Each batch of images is encoded by the frozen VAE inside the step (a posterior sample, as DiT and
SiT train, or the mean: ``latent.sample_posterior``) and normalised to the model's units
``(z − shift)·scale``; the loss is the flow-matching MSE with label dropout for CFG. The VAE is a
frozen network of the stage (:meth:`DiffusionStage.frozen_params`): never trained, never in the
checkpoints, replicated on the mesh. Evaluation samples with the ODE sampler, decodes with that
VAE and computes gFID through the one generation evaluator.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.models import build
from tokpost_jax.models import diffusion as dif
from tokpost_jax.train import accumulate, optim
from tokpost_jax.train.generator import sample_results
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.state import TrainState, step_rng, stream


def load_vae_params(config: ml_collections.ConfigDict) -> Any:
    """The frozen KL-VAE's parameters from ``config.vae_init`` (a VAE run or a weights file)."""
    from tokpost_jax.convert import klvae as klvae_convert

    if not config.get("vae_init"):
        raise ConfigValueError(
            "vae_init", None, "must name the frozen KL-VAE (a configs/klvae.py run directory or "
            "a weights file such as MAR's kl16.safetensors): a flow model on a random VAE's "
            "latents generates nothing meaningful",
        )
    params, _ = klvae_convert.load_vae(config.vae_init, config.vae)
    return params


class DiffusionStage(Stage):
    """Trains LatentDiT on VAE latents of ``config.data``; evaluates samples and gFID."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        lat = config.latent
        if not float(lat.scale) > 0:
            raise ConfigValueError("latent.scale", lat.scale, "must be > 0 (1 / latent std)")
        self.accum_steps = accumulate.steps_from_config(config, mesh)
        self.model = build.diffusion(config)
        self.vae = build.latent_vae(config)
        self.latent_shape = tuple(int(d) for d in lat.shape)
        check_latent_shape(config, self.vae)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)

    def init(self, rng: jax.Array) -> TrainState:
        params = self.model.init(
            {"params": rng}, jnp.zeros((1, *self.latent_shape)), jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32),
        )["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra={},
        )

    @functools.cache  # noqa: B019  (one stage per run; the VAE file is read once)
    def frozen_params(self) -> dict:
        return {"vae": load_vae_params(self.config)}

    # ---- step ----------------------------------------------------------------------------------
    def encode(self, vae_params: Any, images: jax.Array, rng: jax.Array) -> jax.Array:
        """Model-space latents [B, h, w, C] of ``images`` (no gradient: the VAE is frozen)."""
        variables = {"params": vae_params}
        mean, logvar = self.vae.apply(variables, images, method="encode_moments")
        z = mean
        if self.config.latent.sample_posterior:
            z = self.vae.apply(
                variables, mean, logvar, stream(rng, "posterior"), method="sample_posterior"
            )
        lat = self.config.latent
        return jax.lax.stop_gradient(dif.to_model_space(z, float(lat.scale), float(lat.shift)))

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update from ``grad_accum_steps`` microbatches (train/accumulate.py)."""
        cfg = self.config
        rng = step_rng(rng, state.step)
        mean, _ = accumulate.accumulate(
            lambda mb, key: self.microbatch(state.params, frozen["vae"], mb, key), batch, rng,
            self.accum_steps,
        )
        new_state, update_metrics = optim.apply_gradients(
            state, mean["grads"], self.tx, cfg.optim.ema_decay, self.schedule
        )
        return new_state, {**mean["metrics"], **update_metrics}

    def microbatch(
        self, params: Any, vae_params: Any, batch: dict, rng: jax.Array
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One microbatch's flow-matching gradients (its own t, ε and label dropout)."""
        cfg = self.config
        x0 = self.encode(vae_params, batch["image"], rng)
        f = cfg.flow

        def loss_fn(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            return dif.flow_matching_loss(
                lambda q, x, t, y: self.model.apply({"params": q}, x, t, y), p, x0,
                batch["label"], stream(rng, "flow"), time_sampling=f.time_sampling,
                logit_mean=float(f.logit_mean), logit_std=float(f.logit_std),
                label_dropout=float(cfg.label_dropout), num_classes=self.model.num_classes,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # The loss of the noisier half of the path next to the cleaner half: the model learns
        # the coarse (t near 1) velocity first.
        high = aux["t"] >= 0.5
        per = aux["per_sample"]
        metrics = {
            "loss": loss,
            "loss_t_low": jnp.sum(jnp.where(high, 0.0, per)) / jnp.maximum(jnp.sum(~high), 1),
            "loss_t_high": jnp.sum(jnp.where(high, per, 0.0)) / jnp.maximum(jnp.sum(high), 1),
            "latent_std": jnp.std(x0),
        }
        return {"grads": grads, "metrics": metrics}, {}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluator(self, vae_params: Any) -> Any:
        """The gFID evaluator, built on first use with the frozen VAE as the decoder."""
        if getattr(self, "_evaluator", None) is None:
            from tokpost_jax.metrics import generation

            self._evaluator = generation.diffusion_evaluator_from_config(
                self.config, self.model, vae_params, self.mesh
            )
        return self._evaluator

    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        params = state.ema_params if self.config.optim.ema_decay else state.params
        return sample_results(
            self.config, self.evaluator(frozen["vae"]), params, step, self.total_steps
        )


def check_latent_shape(config: ml_collections.ConfigDict, vae: Any) -> None:
    """``latent.shape`` must be what the VAE makes of ``data.image_size`` images."""
    size = int(config.data.image_size)
    shape = build.latent_shape(vae, size)
    if shape != tuple(int(d) for d in config.latent.shape):
        raise ConfigValueError(
            "latent.shape", tuple(config.latent.shape),
            f"must be the VAE's latent of {size}² images, {shape}",
        )
