"""Tokenizer main training stage: L2 reconstruction + VQ/commit losses, EMA, reconstruction eval.

The RobusTok objective (perturbation, LPIPS, GAN, semantic loss) extends :meth:`TokenizerStage.losses`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models.quantizer import code_usage
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.train import optim
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.state import TrainState, step_rng, stream


def build_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The Tokenizer module described by ``config.model`` at ``config.data.image_size``."""
    m = config.model
    if config.data.image_size % m.patch_size:
        raise ValueError(f"image_size {config.data.image_size} is not a multiple of patch_size "
                         f"{m.patch_size}")
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

    def __init__(self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh):
        super().__init__(config, total_steps, mesh)
        self.model = build_tokenizer(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self._eval_fn = None

    # ---- state -------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        params = self.model.init({"params": rng}, jnp.zeros((1, size, size, 3)))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), ema_params=params)

    # ---- step --------------------------------------------------------------------------------
    def losses(self, params: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Total loss and its parts for one batch (the generator side of the objective)."""
        images = batch["image"]
        recon, q = self.model.apply({"params": params}, images, deterministic=False,
                                    rngs={"dropout": stream(rng, "dropout")})
        l2 = jnp.mean(jnp.square(recon - images))
        vq = q.codebook_loss + q.commit_loss
        loss = self.config.loss.l2_weight * l2 + self.config.loss.vq_weight * vq
        aux = {"l2_loss": l2, "codebook_loss": q.codebook_loss, "commit_loss": q.commit_loss,
               "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
               **code_usage(q.indices, self.config.model.codebook_size)}
        return loss, aux

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = step_rng(rng, state.step)
        (loss, aux), grads = jax.value_and_grad(self.losses, has_aux=True)(state.params, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema_params, params, self.config.optim.ema_decay)
        metrics = {"loss": loss, **aux, "grad_norm": optim.global_norm(grads),
                   "param_norm": optim.global_norm(params), "lr": self.schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        return new_state, metrics

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_batch(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        images = batch["image"]
        recon, q = self.model.apply({"params": params}, images, deterministic=True)
        recon = jnp.clip(recon, -1.0, 1.0)
        mask = batch["mask"].astype(jnp.float32)
        k = self.config.model.codebook_size
        counts = jnp.zeros((k,), jnp.float32).at[q.indices].add(mask[:, None])
        return {"psnr_sum": jnp.sum(reconstruction.psnr_per_image(recon, images) * mask),
                "mse_sum": jnp.sum(reconstruction.mse_per_image(recon, images) * mask),
                "count": jnp.sum(mask), "code_counts": counts, "recon": recon}

    def evaluate(self, state: TrainState, step: int) -> dict[str, EvalResult]:
        cfg = self.config
        rules = shd.rules_tuple(cfg.sharding_rules)
        batch_sharding = shd.batch_sharding(self.mesh, rules)
        if self._eval_fn is None:
            self._eval_fn = jax.jit(self._eval_batch)
        results = {}
        for name, params in (("val", state.params), ("val_ema", state.ema_params)):
            totals: dict[str, np.ndarray] = {}
            shown, recons = [], []
            for local in data_lib.eval_batches(
                    cfg.data, host_batch_size=cfg.eval_batch_size // jax.process_count(),
                    process_index=jax.process_index(), process_count=jax.process_count()):
                batch = shd.host_to_global(local, batch_sharding)
                out = self._eval_fn(params, batch)
                for key in ("psnr_sum", "mse_sum", "count", "code_counts"):
                    totals[key] = totals.get(key, 0) + np.asarray(jax.device_get(out[key]), np.float64)
                if sum(len(s) for s in shown) < cfg.num_grid_images:
                    gathered = multihost_utils.process_allgather(
                        {"image": batch["image"], "mask": batch["mask"], "recon": out["recon"]},
                        tiled=True)
                    keep = np.asarray(gathered["mask"], bool)
                    shown.append(np.asarray(gathered["image"])[keep])
                    recons.append(np.asarray(gathered["recon"])[keep])
            count = max(totals["count"], 1.0)
            probs = totals["code_counts"] / max(totals["code_counts"].sum(), 1.0)
            nz = probs[probs > 0]
            scalars = {
                "psnr": float(totals["psnr_sum"] / count),
                "mse": float(totals["mse_sum"] / count),
                "codebook_usage": float(np.mean(totals["code_counts"] > 0)),
                "codebook_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
                "num_images": float(totals["count"]),
            }
            n = cfg.num_grid_images
            originals = images_lib.to_uint8(np.concatenate(shown)[:n])
            recon_u8 = images_lib.to_uint8(np.concatenate(recons)[:n])
            ncols = int(np.ceil(np.sqrt(max(len(originals), 1))))
            grid = images_lib.make_grid(images_lib.interleave_rows(originals, recon_u8, ncols), ncols)
            results[name] = EvalResult(scalars, {"reconstructions": grid})
        return results

