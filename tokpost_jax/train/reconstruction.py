"""What every autoencoder stage shares (ViT VQ, its post-training, CODA, the KL-VAE): the
reconstruction loss, the quantizer's weighted losses, the GAN side, the latent-perturbation
schedule, the frozen networks, and the raw + EMA evaluation through the one reconstruction
evaluator.

A family's stage subclasses :class:`ReconstructionStage` and writes only its ``init`` and
``train_step`` (how its model is differentiated); everything a user configures the same way for
every family is here once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.convert.lpips_weights import load_lpips_params
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.models import build
from tokpost_jax.train import accumulate
from tokpost_jax.train.gan import GANSide
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.perturb_schedule import PerturbationSchedule
from tokpost_jax.train.state import stream


def steps_per_epoch(config: ml_collections.ConfigDict) -> float:
    """Steps per ``schedule_unit`` (1 for "step"; train-split size / batch for "epoch")."""
    if config.schedule_unit == "epoch":
        return data_lib.num_examples(config.data, config.data.train_split) / config.batch_size
    if config.schedule_unit == "step":
        return 1.0
    raise ConfigValueError("schedule_unit", config.schedule_unit, "'step' or 'epoch'")


class ReconstructionStage(Stage):
    """Builds the tokenizer, LPIPS, the GAN side, the perturbation schedule and the evaluators."""

    #: Batch field the encoder sees; the loss target is always ``batch["image"]``. Post-training
    #: feeds generated images here and keeps the real ones as targets.
    input_key = "image"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.accum_steps = accumulate.steps_from_config(config, mesh)
        self.model = self.build_model(config)
        self.lpips = build.lpips(config.loss)
        self.steps_per_epoch = steps_per_epoch(config)
        self.gan = (
            GANSide(config.gan, total_steps, self.steps_per_epoch, config.seed)
            if config.gan.enabled else None
        )
        self.quantizer_weights = dict(config.loss.get("quantizer_weights") or {})
        self.perturb = PerturbationSchedule(config, self.steps_per_epoch)
        self.evaluator = tokenizer_metrics.TokenizerEvaluator(self.model, lpips=self.lpips)
        self.fid_evaluator = None
        if config.fid_eval.every_steps:
            self.fid_evaluator = tokenizer_metrics.evaluator_from_config(
                config, self.model, mesh, shd.rules_tuple(config.sharding_rules),
                lpips=self.lpips,
            )

    def build_model(self, config: ml_collections.ConfigDict) -> Any:
        """The autoencoder this stage trains (default: the tokenizer ``model.kind`` names)."""
        return build.tokenizer(config)

    # ---- frozen networks -----------------------------------------------------------------------
    @functools.cache  # noqa: B019  (one stage per run; the files are read once)
    def frozen_params(self) -> dict:
        frozen: dict[str, Any] = {"lpips": load_lpips_params()}
        if self.gan is not None:
            frozen.update(self.gan.frozen_params())
        return frozen

    # ---- losses --------------------------------------------------------------------------------
    def quantizer_loss(self, q_losses: dict[str, jax.Array]) -> jax.Array:
        """Σ weight·loss over the quantizer's named losses (``loss.quantizer_weights``)."""
        if set(self.quantizer_weights) != set(q_losses):
            raise ConfigValueError(
                "loss.quantizer_weights", sorted(self.quantizer_weights),
                f"must name the quantizer's losses {sorted(q_losses)}",
            )
        return sum(self.quantizer_weights[name] * value for name, value in q_losses.items())

    def reconstruction_loss(
        self, recon: jax.Array, images: jax.Array, rng: jax.Array, frozen: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """l1·L1 + l2·L2 + lpips·LPIPS of the (unclamped) reconstruction; a zero weight skips
        its term entirely (no extra ops, so configs without it compute what they always did)."""
        lw = self.config.loss
        terms = {"l2_loss": jnp.mean(jnp.square(recon - images))}
        total = lw.l2_weight * terms["l2_loss"]
        if lw.get("l1_weight", 0.0):
            terms["l1_loss"] = jnp.mean(jnp.abs(recon - images))
            total = total + lw.l1_weight * terms["l1_loss"]
        terms["lpips_loss"] = jnp.zeros((), jnp.float32)
        if lw.lpips_weight:
            terms["lpips_loss"] = jnp.mean(
                self.lpips.apply(
                    {"params": frozen["lpips"]}, recon, images, deterministic=False,
                    rngs={"dropout": stream(rng, "lpips_dropout")},
                )
            )
            total = total + lw.lpips_weight * terms["lpips_loss"]
        return total, terms

    # ---- evaluation --------------------------------------------------------------------------
    @property
    def eval_data(self) -> ml_collections.ConfigDict:
        """Real images to evaluate on: ``config.eval_data`` when set (post-training trains on
        generated pairs but is judged on real images), else ``config.data``."""
        return self.config.get("eval_data") or self.config.data

    def evaluate(self, state: Any, step: int, frozen: Any) -> dict[str, EvalResult]:
        """Raw and EMA reconstruction quality over the eval split, in one pass over the data;
        rFID/pFID of the EMA weights when ``fid_eval`` is due."""
        cfg = self.config
        batch_sharding = shd.batch_sharding(self.mesh, shd.rules_tuple(cfg.sharding_rules))
        num_eval = self.eval_data.num_eval_examples or data_lib.num_examples(
            self.eval_data, self.eval_data.eval_split
        )
        # The grid samples a few images from every batch so it spans the split (often class-sorted).
        per_batch = -(-cfg.num_grid_images // -(-num_eval // cfg.eval_batch_size))
        batches = (
            shd.host_to_global(local, batch_sharding)
            for local in data_lib.eval_batches(
                self.eval_data,
                host_batch_size=cfg.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )
        runs = self.evaluator.run(
            {"val": state.params, "val_ema": state.ema_params}, batches, frozen["lpips"],
            keep_images=cfg.num_grid_images, keep_per_batch=per_batch,
        )
        originals = images_lib.to_uint8(runs["originals"].images)
        ncols = int(np.ceil(np.sqrt(max(len(originals), 1))))
        results = {}
        for name in ("val", "val_ema"):
            recon_u8 = images_lib.to_uint8(runs[name].images)
            grid = images_lib.make_grid(
                images_lib.interleave_rows(originals, recon_u8, ncols), ncols
            )
            results[name] = EvalResult(runs[name].scalars, {"reconstructions": grid})
        every = cfg.fid_eval.every_steps
        if self.fid_evaluator is not None and (step % every == 0 or step == self.total_steps):
            results["fid_ema"] = self.evaluate_fid(state.ema_params, frozen["lpips"])
        return results

    def evaluate_fid(self, params: Any, lpips_params: Any) -> EvalResult:
        """rFID, pFID (with its per-point FIDs and plot), PSNR, SSIM, LPIPS, usage of ``params``."""
        assert self.fid_evaluator is not None
        scalars, grid_fids = tokenizer_metrics.evaluate_split(
            self.fid_evaluator, self.config, params, lpips_params
        )
        images = {}
        if grid_fids and self.fid_evaluator.grid is not None:
            images["pfid_grid"] = tokenizer_metrics.pfid_plot(grid_fids, self.fid_evaluator.grid)
        return EvalResult({**scalars, **grid_fids}, images)
