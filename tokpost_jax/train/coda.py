"""CODA training (coda.md §3–4): a frozen KL-VAE adapted by LoRA, with the multi-scale attention
quantizer, into a discrete tokenizer.

Only the leaves named by ``optim.trainable`` (default: every LoRA adapter and the quantizer)
train; gradients are taken with respect to those leaves alone, so the frozen VAE kernels cost no
weight-gradient work, and the optimizer state exists for them only. The generator side is
0.2·L1 + L2 + LPIPS + the adaptively weighted hinge GAN term, ramped over the whole run
(``gan.ramp="linear"``), plus the quantizer's VQ (weight 1) and entropy (0.05) losses; the
discriminator side is the GAN side's own step. The model is differentiated in two parts, encoder
+ quantizer and decoder, so the adaptive weight's reference parameter (a decoder LoRA ``up``
tensor) needs decoder-only backward passes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from tokpost_jax import data as data_lib
from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models.quantizer import code_usage
from tokpost_jax.train import accumulate, optim
from tokpost_jax.train.partition import Partition, param_at
from tokpost_jax.train.reconstruction import ReconstructionStage
from tokpost_jax.train.state import TrainState, step_rng, stream


def _put(host: Any, like: Any) -> Any:
    """Host arrays placed like the state's leaves (same sharding and dtype)."""
    return jax.tree.map(
        lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding), host, like
    )


class CODAStage(ReconstructionStage):
    """Trains LoRA + the CODA quantizer on a frozen VAE; evaluates raw and EMA reconstructions."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        if config.model.get("kind") != "coda":
            raise ConfigValueError("model.kind", config.model.get("kind"), "must be 'coda'")
        super().__init__(config, total_steps, mesh)
        o = config.optim
        self.partition = Partition(
            tuple(o.trainable), must_freeze=tuple(o.must_freeze), what="optim.trainable"
        )
        self.schedule = optim.lr_schedule(o, total_steps)
        mask = optim.decay_everything if o.decay_mask == "all" else optim.weight_decay_mask
        self.tx = optim.adamw(o, self.schedule, decay_mask=mask)
        self.ema_start = round(o.ema_start * self.steps_per_epoch)

    # ---- state ---------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        k_model, k_disc = jax.random.split(rng)
        params = self.model.init({"params": k_model}, jnp.zeros((1, size, size, 3)))["params"]
        trainable, _ = self.partition.split(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(trainable),
            ema_params=params,
            extra=self.gan.init(k_disc, size) if self.gan is not None else {},
        )

    def load_pretrained(self, state: TrainState) -> TrainState:
        """The VAE (``model.vae_init``: a file or a VAE workdir) or a released CODA tokenizer
        (``model.coda_init``), then the latent normalisation (``model.latent_scale``: a number,
        or "auto" = 1/std of the posterior means of ``model.latent_stats_images`` train images).
        """
        from tokpost_jax.convert import klvae as klvae_convert

        m = self.config.model
        params = jax.device_get(state.params)
        if m.get("coda_init"):
            vae, quant, report = klvae_convert.load_coda(m.coda_init, m.vae)
            params = {**params, "vae": vae, "quantizer": quant}
            logging.info("CODA tokenizer from %s (%s layout).", m.coda_init, report.layout)
        elif m.get("vae_init"):
            vae, report = klvae_convert.load_vae(m.vae_init, m.vae, init_params=params["vae"])
            params = {**params, "vae": vae}
            logging.info(
                "VAE from %s (%s layout); LoRA adapters %s.", m.vae_init, report.layout,
                "fresh" if report.fresh_lora else "from the file",
            )
        else:
            logging.warning(
                "CODA: no model.vae_init / model.coda_init: the frozen VAE is RANDOM, so the "
                "tokenizer adapts an untrained autoencoder (fine for tests, not for results)."
            )
        scale, shift = m.latent_scale, float(m.latent_shift)
        if not scale:
            scale = 1.0 / self.latent_std(params, shift)
            logging.info("CODA latent scale: auto = %.6g (1 / posterior-mean std).", scale)
        z = params["latent_scale"].shape
        params = {
            **params,
            "latent_scale": np.full(z, float(scale), np.float32),
            "latent_shift": np.full(z, shift, np.float32),
        }
        placed = _put(params, state.params)
        return state.replace(params=placed, ema_params=_put(params, state.ema_params))

    def latent_std(self, params: Any, shift: float) -> float:
        """Std of (posterior mean − shift) over the first train images (ADM center crops)."""
        cfg = self.config
        n = int(cfg.model.latent_stats_images)
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
        data_cfg.eval_split, data_cfg.num_eval_examples = data_cfg.train_split, n
        fn = jax.jit(
            lambda p, x: self.model.apply(
                {"params": p}, x, method=lambda mdl, x: mdl.vae.encode_moments(x)[0]
            )
        )
        total, total_sq, count = 0.0, 0.0, 0
        for local in data_lib.eval_batches(
            data_cfg, host_batch_size=min(cfg.eval_batch_size, n), process_index=0,
            process_count=1,
        ):
            keep = np.asarray(local["mask"], bool)
            mean = np.asarray(fn(params, local["image"]), np.float64)[keep] - shift
            total, total_sq = total + mean.sum(), total_sq + (mean**2).sum()
            count += mean.size
        var = total_sq / count - (total / count) ** 2
        return float(np.sqrt(max(var, 1e-12)))

    # ---- step --------------------------------------------------------------------------------
    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of the trainable leaves from ``grad_accum_steps`` microbatches."""
        rng = step_rng(rng, state.step)
        trainable, fixed = self.partition.split(state.params)
        mean, per = accumulate.accumulate(
            lambda mb, r: self.microbatch(state, trainable, fixed, mb, r, frozen), batch, rng,
            self.accum_steps,
        )
        grads, metrics, extra = mean["grads"], dict(mean["metrics"]), dict(state.extra)
        if self.gan is not None:
            extra, gan_metrics = self.gan.update(
                state.step, extra, mean["disc"], accumulate.last(per["disc"])
            )
            metrics.update(gan_metrics)
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        decay = optim.ema_decay(self.config.optim, state.step, self.ema_start)
        ema_trainable, ema_fixed = self.partition.split(state.ema_params)
        ema = Partition.merge(optim.ema_update(ema_trainable, new_trainable, decay), ema_fixed)
        metrics.update(
            {
                **code_usage(accumulate.join(per["indices"]), self.model.codebook_size),
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(new_trainable),
                "lr": self.schedule(state.step),
                "ema_decay": decay,
            }
        )
        if self.perturb.enabled:
            metrics["perturb_alpha"], metrics["perturb_delta"] = self.perturb.values(state.step)
        new_state = state.replace(
            step=state.step + 1, params=Partition.merge(new_trainable, fixed),
            opt_state=opt_state, ema_params=ema, extra=extra,
        )
        return new_state, metrics

    def microbatch(
        self, state: TrainState, trainable: Any, fixed: Any, batch: dict, rng: jax.Array,
        frozen: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One microbatch's gradients of the trainable leaves: (averaged, per microbatch).

        The quantizer's entropy takes its batch distribution over this microbatch (in
        ``model.quantizer.entropy_groups`` groups of it), as the official code does per GPU and
        accumulation step.
        """
        images, inputs = batch["image"], batch[self.input_key]
        pert = self.perturb.at(state.step, rng)
        merge = Partition.merge

        def encode(t):
            f_dec, q = self.model.apply(
                {"params": merge(t, fixed)}, inputs, False, pert, method="quantize",
                rngs={"posterior": stream(rng, "posterior")},
            )
            return (f_dec, self.quantizer_loss(q.losses)), q

        (f_dec, side), enc_vjp, q = jax.vjp(encode, trainable, has_aux=True)

        def decode(t, f):
            return self.model.apply({"params": merge(t, fixed)}, f, method="decode_latent")

        recon, dec_vjp = jax.vjp(decode, trainable, f_dec)
        (rec, rec_terms), grad_rec = jax.value_and_grad(
            lambda r: self.reconstruction_loss(r, images, rng, frozen), has_aux=True
        )(recon)
        grad_recon, total, metrics = grad_rec, rec + side, {}
        averaged: dict[str, Any] = {}
        per_micro: dict[str, Any] = {"indices": q.indices}
        if self.gan is not None:
            path = self.gan.cfg.adaptive_param

            def reference_grad(image_grad: jax.Array) -> jax.Array:
                return param_at(dec_vjp(image_grad)[0], path, what="gan.adaptive_param")

            grad_recon, adv_term, averaged["disc"], per_micro["disc"], metrics = (
                self.gan.microbatch(
                    state.step, state.extra, rng, images, recon, grad_rec, reference_grad, frozen
                )
            )
            total = total + adv_term
        g_dec, g_f = dec_vjp(grad_recon)
        (g_enc,) = enc_vjp((g_f, jnp.ones_like(side)))
        averaged["grads"] = jax.tree.map(jnp.add, g_enc, g_dec)
        names = self.model.layout.scale_names()
        averaged["metrics"] = {
            **metrics,
            "loss": total,
            **rec_terms,
            **{f"{name}_loss": value for name, value in q.losses.items()},
            **{
                f"{stat}_{name}": q.per_scale[stat][k]
                for stat in ("vq", "residual_rms", "entropy_batch")
                for k, name in enumerate(names)
            },
            "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
        }
        return averaged, per_micro
