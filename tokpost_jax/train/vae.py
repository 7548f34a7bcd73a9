"""KL-VAE training (coda_design.md §1.5): the project's own VAE for CODA, since no pretrained VAE
weights exist offline.

Objective (LDM's autoencoder): ``l1·L1 + l2·L2 + lpips·LPIPS + kl·Σ_latent KL / (3HW)`` on a
decode of a posterior *sample*, plus the adaptively weighted GAN term of :mod:`train.gan`. The
pixel losses are means, so dividing the per-image KL sum by 3HW keeps LDM's ratio of summed KL to
summed pixel loss: with kl = 1e-6 the posterior std stays small and the latent nearly
deterministic, as CODA's VAEs are. One ``jax.vjp`` of the model, as in the tokenizer stage; the
GAN's reference gradient comes from that same backward (:meth:`VAEStage.reference_grad`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models import build
from tokpost_jax.models.klvae import IMAGE_CHANNELS, PARAM_GROUPS, gaussian_kl
from tokpost_jax.train import accumulate, optim
from tokpost_jax.train.partition import param_at
from tokpost_jax.train.reconstruction import ReconstructionStage
from tokpost_jax.train.state import TrainState, step_rng, stream


class VAEStage(ReconstructionStage):
    """Trains the KL-VAE ``config.model`` describes; evaluates raw and EMA reconstructions and
    the latent statistics CODA needs (``latent_std`` → its latent scale 1/latent_std)."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        if config.gan.enabled and config.gan.adaptive_param.split("/")[0] not in PARAM_GROUPS:
            raise ConfigValueError(
                "gan.adaptive_param", config.gan.adaptive_param,
                "must be a KL-VAE parameter path, e.g. 'decoder/conv_out/kernel'",
            )
        if config.fid_eval.pfid:
            raise ConfigValueError(
                "fid_eval.pfid", True,
                "must be False: pFID perturbs discrete tokens and a KL-VAE has none",
            )
        super().__init__(config, total_steps, mesh)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)

    def build_model(self, config: ml_collections.ConfigDict) -> Any:
        return build.vae(config)

    # ---- state ---------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        k_model, k_disc = jax.random.split(rng)
        params = self.model.init({"params": k_model}, jnp.zeros((1, size, size, 3)))["params"]
        extra = self.gan.init(k_disc, size) if self.gan is not None else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra=extra,
        )

    # ---- step ----------------------------------------------------------------------------------
    def forward(
        self, params: Any, images: jax.Array, rng: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
        """((decode of a posterior sample, mean per-image KL sum), (z, mean, logvar))."""
        variables = {"params": params}
        mean, logvar = self.model.apply(variables, images, method="encode_moments")
        z = self.model.apply(
            variables, mean, logvar, stream(rng, "posterior"), method="sample_posterior"
        )
        recon = self.model.apply(variables, z, method="decode")
        kl = jnp.mean(gaussian_kl(mean, logvar))
        return (recon, kl), (jax.lax.stop_gradient(z), mean, logvar)

    def reference_grad(
        self, backward: Callable[[Any], tuple[Any]], kl_zero: jax.Array
    ) -> Callable[[jax.Array], jax.Array]:
        """Image cotangent → ∂/∂W of ``gan.adaptive_param`` W, from the step's own backward.

        XLA keeps only the part of that backward that reaches W, run on the residuals the
        forward saved: for the decoder's ``conv_out`` kernel λ's two calls cost ~1% of the demo
        step (benchmarks/klvae_step.py: GAN 351 ms, GAN with a fixed weight 348 ms, batch 32 on
        2 CPU cores), where a VJP of the decode restricted to W cost 25% more (409 ms: it runs
        the decoder forward again).
        """
        path = self.config.gan.adaptive_param
        return lambda image_grad: param_at(
            backward((image_grad, kl_zero))[0], path, what="gan.adaptive_param"
        )

    def kl_per_pixel_weight(self) -> float:
        """``loss.kl_weight`` / (3HW): the weight of the per-image KL sum next to mean pixel
        losses (LDM weighs the summed KL against the *summed* pixel loss)."""
        size = self.config.data.image_size
        return float(self.config.loss.kl_weight) / (IMAGE_CHANNELS * size * size)

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update from ``grad_accum_steps`` microbatches (train/accumulate.py)."""
        rng = step_rng(rng, state.step)
        mean, per = accumulate.accumulate(
            lambda mb, r: self.microbatch(state, mb, r, frozen), batch, rng, self.accum_steps
        )
        grads, metrics, extra = mean["grads"], dict(mean["metrics"]), dict(state.extra)
        if self.gan is not None:
            extra, gan_metrics = self.gan.update(
                state.step, extra, mean["disc"], accumulate.last(per["disc"])
            )
            metrics.update(gan_metrics)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = self.apply_updates(state.params, updates)
        ema = self.update_ema(state.ema_params, params)
        metrics.update(
            {
                "latent_std": jnp.std(accumulate.join(per["mean"])),  # over the whole batch
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(params),
                "lr": self.schedule(state.step),
            }
        )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return optax.apply_updates(params, updates)

    def update_ema(self, ema: Any, params: Any) -> Any:
        return optim.ema_update(ema, params, self.config.optim.ema_decay)

    def microbatch(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One microbatch's gradients with one backward pass: (averaged, per microbatch)."""
        images, inputs = batch["image"], batch[self.input_key]
        (recon, kl), backward, (_, mean, logvar) = jax.vjp(
            lambda p: self.forward(p, inputs, rng), state.params, has_aux=True
        )

        (rec, rec_terms), grad_rec = jax.value_and_grad(
            lambda r: self.reconstruction_loss(r, images, rng, frozen), has_aux=True
        )(recon)
        kl_weight = self.kl_per_pixel_weight()
        metrics: dict[str, jax.Array] = {}
        grad_recon, total = grad_rec, rec + kl_weight * kl
        averaged: dict[str, Any] = {}
        per_micro: dict[str, Any] = {"mean": mean}
        if self.gan is not None:
            ref = self.reference_grad(backward, jnp.zeros_like(kl))
            grad_recon, adv_term, averaged["disc"], per_micro["disc"], metrics = (
                self.gan.microbatch(
                    state.step, state.extra, rng, images, recon, grad_rec, ref, frozen
                )
            )
            total = total + adv_term

        (averaged["grads"],) = backward((grad_recon, jnp.asarray(kl_weight, kl.dtype)))
        averaged["metrics"] = {
            **metrics,
            "loss": total,
            **rec_terms,
            "kl_loss": kl,
            "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
            "posterior_std": jnp.mean(jnp.exp(0.5 * logvar)),
        }
        return averaged, per_micro
