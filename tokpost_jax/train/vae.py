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

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.convert.lpips_weights import load_lpips_params
from tokpost_jax.metrics import reconstruction
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.models import build
from tokpost_jax.models.klvae import IMAGE_CHANNELS, gaussian_kl
from tokpost_jax.train import optim
from tokpost_jax.train.gan import GANSide
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.reconstruction import steps_per_epoch
from tokpost_jax.train.state import TrainState, step_rng, stream

#: The KL-VAE's top-level parameter groups (a GAN reference parameter lies under one of them).
PARAM_GROUPS = ("encoder", "quant_conv", "post_quant_conv", "decoder")


def get_path(tree: Any, path: str) -> Any:
    """The leaf at ``a/b/c``; a one-line error names ``gan.adaptive_param`` and the bad part."""
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"gan.adaptive_param={path!r} is not a parameter path ({key!r})")
        node = node[key]
    return node


class VAEStage(Stage):
    """Trains the KL-VAE ``config.model`` describes; evaluates raw and EMA reconstructions and
    the latent statistics CODA needs (``latent_std`` → its latent scale 1/latent_std)."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.model = build.vae(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self.lpips = build.lpips(config.loss)
        self.gan = (
            GANSide(config.gan, total_steps, steps_per_epoch(config), config.seed)
            if config.gan.enabled else None
        )
        if self.gan is not None:
            top = config.gan.adaptive_param.split("/")[0]
            if top not in PARAM_GROUPS:
                raise ConfigValueError(
                    "gan.adaptive_param", config.gan.adaptive_param,
                    "must be a KL-VAE parameter path, e.g. 'decoder/conv_out/kernel'",
                )
        if config.fid_eval.pfid:
            raise ConfigValueError(
                "fid_eval.pfid", True,
                "must be False: pFID perturbs discrete tokens and a KL-VAE has none",
            )
        self.evaluator = tokenizer_metrics.TokenizerEvaluator(self.model, lpips=self.lpips)
        self._latent_sums = jax.jit(self.latent_sums)
        self.fid_evaluator = None
        if config.fid_eval.every_steps:
            self.fid_evaluator = tokenizer_metrics.evaluator_from_config(
                config, self.model, mesh, shd.rules_tuple(config.sharding_rules),
                lpips=self.lpips,
            )

    # ---- frozen networks -----------------------------------------------------------------------
    @functools.cache  # noqa: B019  (one stage per run; the files are read once)
    def frozen_params(self) -> dict:
        frozen: dict[str, Any] = {"lpips": load_lpips_params()}  # the evaluator reports LPIPS
        if self.gan is not None:
            frozen.update(self.gan.frozen_params())
        return frozen

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
        return lambda image_grad: get_path(backward((image_grad, kl_zero))[0], path)

    def kl_per_pixel_weight(self) -> float:
        """``loss.kl_weight`` / (3HW): the weight of the per-image KL sum next to mean pixel
        losses (LDM weighs the summed KL against the *summed* pixel loss)."""
        size = self.config.data.image_size
        return float(self.config.loss.kl_weight) / (IMAGE_CHANNELS * size * size)

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        lw = self.config.loss
        rng = step_rng(rng, state.step)
        images = batch["image"]
        (recon, kl), backward, (_, mean, logvar) = jax.vjp(
            lambda p: self.forward(p, images, rng), state.params, has_aux=True
        )

        def reconstruction_loss(r: jax.Array):
            l1 = jnp.mean(jnp.abs(r - images))
            l2 = jnp.mean(jnp.square(r - images))
            lp = jnp.zeros((), jnp.float32)
            if lw.lpips_weight:
                lp = jnp.mean(
                    self.lpips.apply(
                        {"params": frozen["lpips"]}, r, images, deterministic=False,
                        rngs={"dropout": stream(rng, "lpips_dropout")},
                    )
                )
            total = lw.l1_weight * l1 + lw.l2_weight * l2 + lw.lpips_weight * lp
            return total, (l1, l2, lp)

        (rec, (l1, l2, lp)), grad_rec = jax.value_and_grad(reconstruction_loss, has_aux=True)(
            recon
        )
        kl_weight = self.kl_per_pixel_weight()
        metrics: dict[str, jax.Array] = {}
        grad_recon, total, extra = grad_rec, rec + kl_weight * kl, dict(state.extra)
        if self.gan is not None:
            ref = self.reference_grad(backward, jnp.zeros_like(kl))
            grad_recon, adv_term, extra, metrics = self.gan.step(
                state.step, extra, rng, images, recon, grad_rec, ref, frozen
            )
            total = total + adv_term

        (grads,) = backward((grad_recon, jnp.asarray(kl_weight, kl.dtype)))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema_params, params, self.config.optim.ema_decay)
        metrics.update(
            {
                "loss": total,
                "l1_loss": l1,
                "l2_loss": l2,
                "lpips_loss": lp,
                "kl_loss": kl,
                "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
                "posterior_std": jnp.mean(jnp.exp(0.5 * logvar)),
                "latent_std": jnp.std(mean),
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(params),
                "lr": self.schedule(state.step),
            }
        )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    # ---- evaluation ----------------------------------------------------------------------------
    def latent_sums(self, params: Any, images: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        """Masked sums over one eval batch of the posterior mean, its square and the posterior
        std e^(logvar/2), and the number of latent entries they cover."""
        mean, logvar = self.model.apply({"params": params}, images, method="encode_moments")
        m = jnp.broadcast_to(mask.astype(jnp.float32)[:, None, None, None], mean.shape)
        return {
            "mean": jnp.sum(mean * m),
            "square": jnp.sum(jnp.square(mean) * m),
            "std": jnp.sum(jnp.exp(0.5 * logvar) * m),
            "count": jnp.sum(m),
        }

    def _with_latent_sums(
        self, params: Mapping[str, Any], batches: Iterable[dict], sums: dict[str, list]
    ) -> Iterator[dict]:
        """``batches`` unchanged, recording each parameter set's :meth:`latent_sums` on the way
        (one pass over the eval split serves the evaluator and the latent statistics)."""
        for batch in batches:
            for name, p in params.items():
                sums[name].append(self._latent_sums(p, batch["image"], batch["mask"]))
            yield batch

    @staticmethod
    def latent_scalars(sums: list[dict[str, jax.Array]]) -> dict[str, float]:
        """``latent_mean``/``latent_std`` (over every channel and position of the posterior
        means) and ``posterior_std`` (the mean of e^(logvar/2)), accumulated in float64."""
        total = {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in sums[0]}
        n = max(total["count"], 1.0)
        mean = total["mean"] / n
        return {
            "latent_mean": mean,
            "latent_std": float(np.sqrt(max(total["square"] / n - mean**2, 0.0))),
            "posterior_std": total["std"] / n,
        }

    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        """Raw and EMA reconstruction quality and latent statistics over the eval split in one
        pass; rFID (and PSNR/SSIM/LPIPS on its images) of the EMA weights when ``fid_eval`` is
        due."""
        cfg = self.config
        data = cfg.data
        batch_sharding = shd.batch_sharding(self.mesh, shd.rules_tuple(cfg.sharding_rules))
        num_eval = data.num_eval_examples or data_lib.num_examples(data, data.eval_split)
        # The grid samples a few images from every batch so it spans the split (class-sorted).
        per_batch = -(-cfg.num_grid_images // -(-num_eval // cfg.eval_batch_size))
        params = {"val": state.params, "val_ema": state.ema_params}
        batches = (
            shd.host_to_global(local, batch_sharding)
            for local in data_lib.eval_batches(
                data,
                host_batch_size=cfg.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )
        sums: dict[str, list] = {name: [] for name in params}
        runs = self.evaluator.run(
            params, self._with_latent_sums(params, batches, sums), frozen["lpips"],
            keep_images=cfg.num_grid_images, keep_per_batch=per_batch,
        )
        originals = images_lib.to_uint8(runs["originals"].images)
        ncols = int(np.ceil(np.sqrt(max(len(originals), 1))))
        results = {}
        for name in params:
            recon_u8 = images_lib.to_uint8(runs[name].images)
            grid = images_lib.make_grid(
                images_lib.interleave_rows(originals, recon_u8, ncols), ncols
            )
            scalars = {**runs[name].scalars, **self.latent_scalars(sums[name])}
            results[name] = EvalResult(scalars, {"reconstructions": grid})
        every = cfg.fid_eval.every_steps
        if self.fid_evaluator is not None and (step % every == 0 or step == self.total_steps):
            scalars, _ = tokenizer_metrics.evaluate_split(
                self.fid_evaluator, cfg, state.ema_params, frozen["lpips"]
            )
            results["fid_ema"] = EvalResult(scalars)
        return results
