"""Tokenizer main training (robustok.md §3–6): one stage; each term of the objective is a switch.

Generator side: L2 + LPIPS reconstruction, VQ/commit, an adaptively weighted hinge GAN term, and the
semantic InfoNCE regulariser; the latent perturbation sits between the quantizer (whose losses stay
clean) and the decoder. Discriminator side: hinge + LeCAM on DiffAugment-ed real and detached
reconstructions, with its own optimizer. G step, then D step, inside one jitted function.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import losses
from tokpost_jax import sharding as shd
from tokpost_jax.convert import timm_vit
from tokpost_jax.metrics import reconstruction
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.models import discriminator as disc_lib
from tokpost_jax.models import perturbation
from tokpost_jax.models.diffaug import diff_augment
from tokpost_jax.models.lpips import LPIPS, load_lpips_params
from tokpost_jax.models.quantizer import (
    code_usage,
    restart_dead_codes,
    update_code_usage,
)
from tokpost_jax.models.teacher import ViTTeacher
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.models.vit import patchify
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


def build_discriminator(gan: ml_collections.ConfigDict) -> nn.Module:
    if gan.discriminator == "dino":
        return disc_lib.DinoDiscriminator(image_size=gan.dino_image_size)
    if gan.discriminator == "patch":
        return disc_lib.PatchDiscriminator(channels=gan.patch_channels, num_layers=gan.patch_layers)
    raise ValueError(f"gan.discriminator must be 'dino' or 'patch', got {gan.discriminator!r}")


def gated(active: jax.Array, on: Any, off: Any) -> Any:
    """``on(None)`` if ``active`` else ``off(None)``, for the GAN's start step.

    On accelerators this is ``lax.cond``, which skips the discriminator's work before it starts.
    XLA:CPU runs conditional branches without its usual threading (measured 3.5x slower for the
    demo step), so there both branches are computed and selected: the same values, computed faster.
    """
    if jax.default_backend() != "cpu":
        return jax.lax.cond(active, on, off, None)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), on(None), off(None))


def to_pixel_kernel_grad(features: jax.Array, image_grad: jax.Array, patch: int) -> jax.Array:
    """d(loss)/d(to_pixel kernel) from the layer input and d(loss)/d(images): featuresᵀ·patches."""
    return jnp.einsum("bnh,bnp->hp", features, patchify(image_grad, patch))


class TokenizerStage(Stage):
    """Trains the ViT VQ tokenizer; evaluates raw and EMA reconstructions on the eval split."""

    #: Batch field the encoder sees; the loss target is always ``batch["image"]``. Post-training
    #: feeds generated images here and keeps the real ones as targets.
    input_key = "image"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.model = build_tokenizer(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self.lpips = LPIPS()
        if config.schedule_unit == "epoch":
            self.steps_per_epoch = (
                data_lib.num_examples(config.data, config.data.train_split) / config.batch_size
            )
        elif config.schedule_unit == "step":
            self.steps_per_epoch = 1.0
        else:
            raise ValueError(
                f"schedule_unit must be 'step' or 'epoch', not {config.schedule_unit!r}"
            )
        self.gan = config.gan
        if self.gan.enabled:
            self.disc = build_discriminator(self.gan)
            self.disc_start = round(self.gan.start * self.steps_per_epoch)
            self.disc_schedule = optim.lr_schedule(
                self.gan.optim, max(total_steps - self.disc_start, 1)
            )
            self.disc_tx = optim.adamw(self.gan.optim, self.disc_schedule)
        sem = config.semantic
        self.semantic_weight = config.loss.semantic_weight if sem.teacher_weights else 0.0
        if config.loss.semantic_weight and not sem.teacher_weights:
            logging.warning(
                "Semantic regulariser OFF: loss.semantic_weight=%g but no "
                "semantic.teacher_weights file was given (a DINOv2 ViT state dict); training "
                "runs with semantic weight 0.",
                config.loss.semantic_weight,
            )
        if self.semantic_weight:
            t = sem.teacher
            self.teacher = ViTTeacher(
                image_size=config.data.image_size,
                patch_size=sem.teacher_patch_size,
                width=t.width,
                depth=t.depth,
                num_heads=t.num_heads,
                mlp_dim=t.mlp_dim,
                layerscale_init=t.layerscale_init,
            )
        pert = config.perturbation
        self.perturb_groups = (
            shd.batch_split_size(mesh, shd.rules_tuple(config.sharding_rules))
            if pert.per_device_selection
            else 1
        )
        self._eval_fn = None
        self.fid_evaluator = None
        if config.fid_eval.every_steps:
            self.fid_evaluator = tokenizer_metrics.evaluator_from_config(
                config, self.model, mesh, shd.rules_tuple(config.sharding_rules),
                lpips=self.lpips,
            )

    # ---- frozen networks -----------------------------------------------------------------------
    @functools.cache  # noqa: B019  (one stage per run; the files are read once)
    def frozen_params(self) -> dict:
        frozen: dict[str, Any] = {"lpips": load_lpips_params()}
        if self.gan.enabled and self.gan.discriminator == "dino":
            if self.gan.dino_weights:
                backbone = disc_lib.load_dino_backbone(
                    self.gan.dino_weights, depth=self.disc.num_blocks
                )
                logging.info("Discriminator backbone: DINO weights from %s.", self.gan.dino_weights)
            else:
                size = self.gan.dino_image_size
                variables = self.disc.init(
                    jax.random.PRNGKey(self.config.seed + 1), jnp.zeros((1, size, size, 3))
                )
                backbone = nn.unbox(variables["params"])["backbone"]
                logging.warning("%s", disc_lib.random_backbone_notice())
            frozen["disc_backbone"] = backbone
        if self.semantic_weight:
            size = self.config.data.image_size
            params = nn.unbox(
                self.teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
            )
            report = timm_vit.load_vit_init(
                self.config.semantic.teacher_weights, params["params"], "encoder"
            )
            frozen["teacher"] = report.params
            logging.info(
                "Semantic teacher from %s (kept fresh: %s).",
                self.config.semantic.teacher_weights,
                ", ".join(report.kept) or "none",
            )
        return frozen

    # ---- state -------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        k_model, k_disc = jax.random.split(rng)
        params = self.model.init({"params": k_model}, jnp.zeros((1, size, size, 3)))["params"]
        k = self.config.model.codebook_size
        extra: dict[str, Any] = {"code_usage": jnp.zeros((k,), jnp.float32)}
        if self.gan.enabled:
            variables = self.disc.init(k_disc, jnp.zeros((1, size, size, 3)))
            _, trainable = disc_lib.split_params(variables["params"])
            extra["disc"] = {
                "params": trainable,
                "opt_state": self.disc_tx.init(trainable),
                "spectral": variables.get("spectral", {}),
            }
            extra["lecam"] = {
                "real": jnp.zeros((), jnp.float32),
                "fake": jnp.zeros((), jnp.float32),
            }
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra=extra,
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
    def progress(self, step: jax.Array) -> jax.Array:
        """Training progress in ``schedule_unit`` (steps, or fractional epochs)."""
        return step.astype(jnp.float32) / self.steps_per_epoch

    def perturbation_values(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.config.perturbation
        return perturbation.perturbation_schedule(
            self.progress(step),
            alpha0=p.alpha0,
            delta0=p.delta0,
            anneal_start=p.anneal_start,
            anneal_end=p.anneal_end,
            end_ratio=p.end_ratio,
        )

    def latent_hook(self, step: jax.Array, rng: jax.Array):
        p = self.config.perturbation
        if not p.enabled:
            return None
        alpha, delta = self.perturbation_values(step)
        return perturbation.make_latent_hook(
            stream(rng, "perturbation"),
            alpha=alpha,
            delta=delta,
            beta=p.beta,
            delta_max=p.delta0,
            num_groups=self.perturb_groups,
            exclude_clean=p.exclude_clean,
            neighbours=p.neighbours,
        )

    def _disc_apply(self, disc_params, spectral, images, key, frozen):
        full = disc_lib.merge_params(
            {"backbone": frozen["disc_backbone"]} if "disc_backbone" in frozen else {}, disc_params
        )
        logits, variables = self.disc.apply(
            {"params": full, "spectral": spectral},
            images,
            train=True,
            key=key,
            mutable=["spectral"],
        )
        return logits, variables["spectral"]

    def _augment(self, key: jax.Array, images: jax.Array) -> jax.Array:
        return diff_augment(key, images) if self.gan.diffaug else images

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        cfg, lw = self.config, self.config.loss
        rng = step_rng(rng, state.step)
        images = batch["image"]
        inputs = batch[self.input_key]
        hook = self.latent_hook(state.step, rng)

        def forward(params):
            (recon, q), inter = self.model.apply(
                {"params": params},
                inputs,
                deterministic=False,
                latent_hook=hook,
                rngs={"dropout": stream(rng, "dropout")},
                mutable=["intermediates"],
            )
            inter = inter["intermediates"]
            features = jax.lax.stop_gradient(inter["vit_decoder"]["to_pixel_input"][0])
            semantic = jnp.zeros((), jnp.float32)
            if self.semantic_weight:
                codes = inter["decoder_codes"][0] if cfg.semantic.student_perturbed else q.quantized
                teacher = jax.lax.stop_gradient(
                    self.teacher.apply({"params": frozen["teacher"]}, inputs)
                )
                target = self.model.apply(
                    {"params": params}, teacher, method=Tokenizer.project_to_code
                )
                semantic = losses.info_nce(
                    jnp.mean(codes, axis=1), target, cfg.semantic.logit_scale
                )
            vq = q.codebook_loss + q.commit_loss
            return (recon, lw.vq_weight * vq + self.semantic_weight * semantic), (
                q,
                features,
                semantic,
            )

        (recon, side_loss), backward, (q, features, semantic) = jax.vjp(
            forward, state.params, has_aux=True
        )

        def reconstruction_loss(r):
            l2 = jnp.mean(jnp.square(r - images))
            lp = jnp.zeros((), jnp.float32)
            if lw.lpips_weight:
                lp = jnp.mean(self.lpips.apply({"params": frozen["lpips"]}, r, images))
            return lw.l2_weight * l2 + lw.lpips_weight * lp, (l2, lp)

        (rec, (l2, lp)), grad_rec = jax.value_and_grad(reconstruction_loss, has_aux=True)(recon)
        metrics: dict[str, jax.Array] = {}
        grad_recon, total = grad_rec, rec + side_loss
        extra = dict(state.extra)
        if self.gan.enabled:
            grad_recon, total, extra, metrics = self._gan_steps(
                state, rng, images, recon, features, grad_rec, total, frozen
            )

        (grads,) = backward((grad_recon, jnp.ones_like(side_loss)))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = self.apply_updates(state.params, updates)
        params, extra, restarted = self.maybe_restart_codes(state, extra, params, q, rng)
        ema = self.update_ema(state.ema_params, params)
        metrics.update(
            {
                "loss": total,
                "l2_loss": l2,
                "lpips_loss": lp,
                "semantic_loss": semantic,
                "codebook_loss": q.codebook_loss,
                "commit_loss": q.commit_loss,
                "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
                **code_usage(q.indices, cfg.model.codebook_size),
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(params),
                "lr": self.schedule(state.step),
                "codes_restarted": restarted,
            }
        )
        if cfg.perturbation.enabled:
            metrics["perturb_alpha"], metrics["perturb_delta"] = self.perturbation_values(
                state.step
            )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    def _gan_steps(self, state, rng, images, recon, features, grad_rec, total, frozen):
        """Adds the adaptive adversarial term to d(loss)/d(recon), then one D update."""
        gan, patch = self.gan, self.config.model.patch_size
        active = state.step >= self.disc_start
        disc = state.extra["disc"]
        lecam = state.extra["lecam"]

        def g_term(_):
            def adversarial(r):
                logits, spectral = self._disc_apply(
                    disc["params"],
                    disc["spectral"],
                    self._augment(stream(rng, "diffaug_g"), r),
                    stream(rng, "disc_crop_g"),
                    frozen,
                )
                return losses.hinge_g_loss(logits), spectral

            (adv, spectral), grad_adv = jax.value_and_grad(adversarial, has_aux=True)(recon)
            if gan.adaptive_weight:
                lam = losses.adaptive_weight(
                    to_pixel_kernel_grad(features, grad_rec, patch),
                    to_pixel_kernel_grad(features, grad_adv, patch),
                    max_value=gan.adaptive_max,
                )
            else:
                lam = jnp.ones((), jnp.float32)
            return adv, grad_adv, lam, spectral

        def g_off(_):
            zero = jnp.zeros((), jnp.float32)
            return zero, jnp.zeros_like(recon), zero, disc["spectral"]

        adv, grad_adv, lam, spectral = gated(active, g_term, g_off)
        coefficient = gan.weight * lam
        fake = jax.lax.stop_gradient(recon)

        def d_update(_):
            def d_loss(disc_params):
                real_logits, spec = self._disc_apply(
                    disc_params,
                    spectral,
                    self._augment(stream(rng, "diffaug_real"), images),
                    stream(rng, "disc_crop_real"),
                    frozen,
                )
                fake_logits, spec = self._disc_apply(
                    disc_params,
                    spec,
                    self._augment(stream(rng, "diffaug_fake"), fake),
                    stream(rng, "disc_crop_fake"),
                    frozen,
                )
                ema_real, ema_fake = losses.update_lecam_ema(
                    lecam["real"], lecam["fake"], real_logits, fake_logits, gan.lecam_decay
                )
                hinge = losses.hinge_d_loss(real_logits, fake_logits)
                reg = losses.lecam_loss(real_logits, fake_logits, ema_real, ema_fake)
                loss = gan.weight * (hinge + gan.lecam_weight * reg)
                return loss, (
                    spec,
                    ema_real,
                    ema_fake,
                    hinge,
                    reg,
                    jnp.mean(real_logits),
                    jnp.mean(fake_logits),
                )

            (_, aux), d_grads = jax.value_and_grad(d_loss, has_aux=True)(disc["params"])
            spec, ema_real, ema_fake, hinge, reg, real_mean, fake_mean = aux
            updates, opt_state = self.disc_tx.update(d_grads, disc["opt_state"], disc["params"])
            new_disc = {
                "params": optax.apply_updates(disc["params"], updates),
                "opt_state": opt_state,
                "spectral": spec,
            }
            stats = jnp.stack([hinge, reg, real_mean, fake_mean, optim.global_norm(d_grads)])
            return new_disc, {"real": ema_real, "fake": ema_fake}, stats

        def d_off(_):
            return disc, lecam, jnp.zeros((5,), jnp.float32)

        new_disc, new_lecam, stats = gated(active, d_update, d_off)
        extra = {**state.extra, "disc": new_disc, "lecam": new_lecam}
        metrics = {
            "gan_g_loss": adv,
            "adaptive_weight": lam,
            "disc_active": active.astype(jnp.float32),
            "disc_hinge": stats[0],
            "disc_lecam": stats[1],
            "logits_real": stats[2],
            "logits_fake": stats[3],
            "disc_grad_norm": stats[4],
            "disc_lr": self.disc_schedule(jnp.maximum(state.step - self.disc_start, 0)),
        }
        return grad_rec + coefficient * grad_adv, total + coefficient * adv, extra, metrics

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return optax.apply_updates(params, updates)

    def update_ema(self, ema: Any, params: Any) -> Any:
        return optim.ema_update(ema, params, self.config.optim.ema_decay)

    def maybe_restart_codes(
        self, state: TrainState, extra: dict, params: Any, q, rng: jax.Array
    ) -> tuple[Any, dict, jax.Array]:
        """Tracks code usage and, every ``dead_code_restart.every_steps``, re-seeds dead codes."""
        cfg = self.config.dead_code_restart
        usage = update_code_usage(state.extra["code_usage"], q.indices, cfg.usage_decay)
        if not cfg.every_steps:
            return params, {**extra, "code_usage": usage}, jnp.zeros((), jnp.int32)
        emb = params["quantizer"]["embedding"]
        new_emb, new_usage, n = restart_dead_codes(
            stream(rng, "code_restart"), emb, usage, q.features, cfg.min_usage
        )
        due = (state.step + 1) % cfg.every_steps == 0
        emb = jnp.where(due, new_emb, emb)
        usage = jnp.where(due, new_usage, usage)
        params = {**params, "quantizer": {**params["quantizer"], "embedding": emb}}
        return params, {**extra, "code_usage": usage}, jnp.where(due, n, 0).astype(jnp.int32)

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_batch(self, params: Any, batch: dict, lpips_params: Any) -> dict[str, jax.Array]:
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
            "lpips_sum": jnp.sum(self.lpips.apply({"params": lpips_params}, recon, images) * mask),
            "count": jnp.sum(mask),
            "code_counts": counts,
            "recon": recon,
        }

    def _eval_both(self, params: Any, ema_params: Any, batch: dict, lpips: Any) -> dict[str, dict]:
        return {
            "val": self._eval_batch(params, batch, lpips),
            "val_ema": self._eval_batch(ema_params, batch, lpips),
        }

    @property
    def eval_data(self) -> ml_collections.ConfigDict:
        """Real images to evaluate on: ``config.eval_data`` when set (post-training trains on
        generated pairs but is judged on real images), else ``config.data``."""
        return self.config.get("eval_data") or self.config.data

    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        """Raw and EMA reconstruction quality over the eval split, in one pass over the data."""
        cfg = self.config
        batch_sharding = shd.batch_sharding(self.mesh, shd.rules_tuple(cfg.sharding_rules))
        if self._eval_fn is None:
            self._eval_fn = jax.jit(self._eval_both)
        num_eval = self.eval_data.num_eval_examples or data_lib.num_examples(
            self.eval_data, self.eval_data.eval_split
        )
        # The grid samples a few images from every batch so it spans the split (often class-sorted).
        per_batch = -(-cfg.num_grid_images // -(-num_eval // cfg.eval_batch_size))
        totals: dict[str, dict[str, np.ndarray]] = {"val": {}, "val_ema": {}}
        shown: list[np.ndarray] = []
        recons: dict[str, list[np.ndarray]] = {"val": [], "val_ema": []}
        for local in data_lib.eval_batches(
            self.eval_data,
            host_batch_size=cfg.eval_batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            batch = shd.host_to_global(local, batch_sharding)
            outs = self._eval_fn(state.params, state.ema_params, batch, frozen["lpips"])
            for name, out in outs.items():
                for key in ("psnr_sum", "mse_sum", "lpips_sum", "count", "code_counts"):
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
                valid = np.flatnonzero(np.asarray(gathered["mask"], bool))
                keep = valid[np.linspace(0, len(valid) - 1, min(per_batch, len(valid))).astype(int)]
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
                "lpips": float(tot["lpips_sum"] / count),
                "codebook_usage": float(np.mean(tot["code_counts"] > 0)),
                "codebook_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
                "num_images": float(tot["count"]),
            }
            recon_u8 = images_lib.to_uint8(np.concatenate(recons[name])[:n])
            grid = images_lib.make_grid(
                images_lib.interleave_rows(originals, recon_u8, ncols), ncols
            )
            results[name] = EvalResult(scalars, {"reconstructions": grid})
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
