"""Tokenizer main training stage: L2 reconstruction + VQ/commit losses, EMA, reconstruction eval.

The RobusTok objective (perturbation, LPIPS, GAN, semantic loss) extends
:meth:`TokenizerStage.losses`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.convert import timm_vit
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models.quantizer import (
    Quantized,
    code_usage,
    restart_dead_codes,
    update_code_usage,
)
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.train import optim
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.state import TrainState, step_rng, stream


def build_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The Tokenizer module described by ``config.model`` at ``config.data.image_size``."""
    m = config.model
    if config.data.image_size % m.patch_size:
        raise ValueError(
            f"image_size {config.data.image_size} is not a multiple of patch_size {m.patch_size}"
        )
    return Tokenizer(
        image_size=config.data.image_size,
        patch_size=m.patch_size,
        num_latent_tokens=m.num_latent_tokens,
        codebook_size=m.codebook_size,
        code_dim=m.code_dim,
        encoder=m.encoder.to_dict(),
        decoder=m.decoder.to_dict(),
        commit_weight=m.commit_weight,
        dtype=jnp.dtype(config.dtype),
    )


class TokenizerStage(Stage):
    """Trains the ViT VQ tokenizer; evaluates raw and EMA reconstructions on the eval split."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.model = build_tokenizer(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self._eval_fn = None

    # ---- state -------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        params = self.model.init({"params": rng}, jnp.zeros((1, size, size, 3)))["params"]
        k = self.config.model.codebook_size
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra={"code_usage": jnp.zeros((k,), jnp.float32)},
        )

    def load_pretrained(self, state: TrainState) -> TrainState:
        """ViT initialisation from timm/DINOv2 files (``model.encoder_init`` / ``decoder_init``)."""
        params, reports = timm_vit.apply_config_inits(self.config.model, state.params)
        for part, report in reports.items():
            logging.info(
                "Initialised the %s from %s; kept fresh: %s",
                part,
                self.config.model.get(f"{part}_init"),
                ", ".join(report.kept) or "none",
            )
        return state.replace(params=params, ema_params=params) if reports else state

    # ---- step --------------------------------------------------------------------------------
    def losses(
        self, params: Any, batch: dict, rng: jax.Array
    ) -> tuple[jax.Array, tuple[dict, Quantized]]:
        """Total loss, its logged parts, and the quantizer outputs for one batch."""
        images = batch["image"]
        recon, q = self.model.apply(
            {"params": params},
            images,
            deterministic=False,
            rngs={"dropout": stream(rng, "dropout")},
        )
        l2 = jnp.mean(jnp.square(recon - images))
        vq = q.codebook_loss + q.commit_loss
        loss = self.config.loss.l2_weight * l2 + self.config.loss.vq_weight * vq
        aux = {
            "l2_loss": l2,
            "codebook_loss": q.codebook_loss,
            "commit_loss": q.commit_loss,
            "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
            **code_usage(q.indices, self.config.model.codebook_size),
        }
        return loss, (aux, q)

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = step_rng(rng, state.step)
        (loss, (aux, q)), grads = jax.value_and_grad(self.losses, has_aux=True)(
            state.params, batch, rng
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, extra, restarted = self.maybe_restart_codes(state, params, q, rng)
        ema = optim.ema_update(state.ema_params, params, self.config.optim.ema_decay)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": optim.global_norm(grads),
            "param_norm": optim.global_norm(params),
            "lr": self.schedule(state.step),
            "codes_restarted": restarted,
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    def maybe_restart_codes(
        self, state: TrainState, params: Any, q: Quantized, rng: jax.Array
    ) -> tuple[Any, dict, jax.Array]:
        """Tracks code usage and, every ``dead_code_restart.every_steps``, re-seeds dead codes."""
        cfg = self.config.dead_code_restart
        usage = update_code_usage(state.extra["code_usage"], q.indices, cfg.usage_decay)
        if not cfg.every_steps:
            return params, {**state.extra, "code_usage": usage}, jnp.zeros((), jnp.int32)
        emb = params["quantizer"]["embedding"]
        new_emb, new_usage, n = restart_dead_codes(
            stream(rng, "code_restart"), emb, usage, q.features, cfg.min_usage
        )
        due = (state.step + 1) % cfg.every_steps == 0
        emb = jnp.where(due, new_emb, emb)
        usage = jnp.where(due, new_usage, usage)
        params = {**params, "quantizer": {**params["quantizer"], "embedding": emb}}
        return params, {**state.extra, "code_usage": usage}, jnp.where(due, n, 0).astype(jnp.int32)

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_batch(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        """Sums over the unmasked images of one eval batch, plus the (clamped) reconstructions."""
        images = batch["image"]
        recon, q = self.model.apply({"params": params}, images, deterministic=True)
        recon = jnp.clip(recon, -1.0, 1.0)
        mask = batch["mask"].astype(jnp.float32)
        k = self.config.model.codebook_size
        counts = jnp.zeros((k,), jnp.float32).at[q.indices].add(mask[:, None])
        return {
            "psnr_sum": jnp.sum(reconstruction.psnr_per_image(recon, images) * mask),
            "mse_sum": jnp.sum(reconstruction.mse_per_image(recon, images) * mask),
            "count": jnp.sum(mask),
            "code_counts": counts,
            "recon": recon,
        }

    def _eval_both(self, params: Any, ema_params: Any, batch: dict) -> dict[str, dict]:
        return {
            "val": self._eval_batch(params, batch),
            "val_ema": self._eval_batch(ema_params, batch),
        }

    def evaluate(self, state: TrainState, step: int) -> dict[str, EvalResult]:
        """Raw and EMA reconstruction quality over the eval split, in one pass over the data."""
        cfg = self.config
        batch_sharding = shd.batch_sharding(self.mesh, shd.rules_tuple(cfg.sharding_rules))
        if self._eval_fn is None:
            self._eval_fn = jax.jit(self._eval_both)
        num_eval = cfg.data.num_eval_examples or data_lib.num_examples(
            cfg.data, cfg.data.eval_split
        )
        # The grid samples a few images from every batch so it spans the split (often class-sorted).
        per_batch = -(-cfg.num_grid_images // -(-num_eval // cfg.eval_batch_size))
        totals: dict[str, dict[str, np.ndarray]] = {"val": {}, "val_ema": {}}
        shown: list[np.ndarray] = []
        recons: dict[str, list[np.ndarray]] = {"val": [], "val_ema": []}
        for local in data_lib.eval_batches(
            cfg.data,
            host_batch_size=cfg.eval_batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            batch = shd.host_to_global(local, batch_sharding)
            outs = self._eval_fn(state.params, state.ema_params, batch)
            for name, out in outs.items():
                for key in ("psnr_sum", "mse_sum", "count", "code_counts"):
                    value = np.asarray(jax.device_get(out[key]), np.float64)
                    totals[name][key] = totals[name].get(key, 0) + value
            if sum(len(x) for x in shown) < cfg.num_grid_images:
                gathered = multihost_utils.process_allgather(
                    {
                        "image": batch["image"],
                        "mask": batch["mask"],
                        **{name: out["recon"] for name, out in outs.items()},
                    },
                    tiled=True,
                )
                keep = np.flatnonzero(np.asarray(gathered["mask"], bool))[:per_batch]
                shown.append(np.asarray(gathered["image"])[keep])
                for name in recons:
                    recons[name].append(np.asarray(gathered[name])[keep])
        n = cfg.num_grid_images
        originals = images_lib.to_uint8(np.concatenate(shown)[:n])
        ncols = int(np.ceil(np.sqrt(max(len(originals), 1))))
        results = {}
        for name, tot in totals.items():
            count = max(tot["count"], 1.0)
            probs = tot["code_counts"] / max(tot["code_counts"].sum(), 1.0)
            nz = probs[probs > 0]
            scalars = {
                "psnr": float(tot["psnr_sum"] / count),
                "mse": float(tot["mse_sum"] / count),
                "codebook_usage": float(np.mean(tot["code_counts"] > 0)),
                "codebook_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
                "num_images": float(tot["count"]),
            }
            recon_u8 = images_lib.to_uint8(np.concatenate(recons[name])[:n])
            grid = images_lib.make_grid(
                images_lib.interleave_rows(originals, recon_u8, ncols), ncols
            )
            results[name] = EvalResult(scalars, {"reconstructions": grid})
        return results
