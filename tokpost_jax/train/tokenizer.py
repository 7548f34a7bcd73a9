"""ViT VQ tokenizer main training (robustok.md §3–6): one stage; each term of the objective is a
switch.

Generator side: L2 + LPIPS reconstruction, the quantizer's named losses, an adaptively weighted
hinge GAN term (:mod:`tokpost_jax.train.gan`) and the semantic InfoNCE regulariser; the latent
perturbation sits between the quantizer (whose losses stay clean) and the decoder. The
discriminator side is the GAN side's own step. G step, then D step, inside one jitted function,
with one backward pass of the tokenizer.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from tokpost_jax import losses
from tokpost_jax.convert import timm_vit
from tokpost_jax.metrics import reconstruction
from tokpost_jax.models import build
from tokpost_jax.models.quantizer import code_usage, restart_dead_codes, update_code_usage
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.models.vit import patchify
from tokpost_jax.train import accumulate, optim
from tokpost_jax.train.partition import param_at
from tokpost_jax.train.reconstruction import ReconstructionStage
from tokpost_jax.train.state import TrainState, step_rng, stream

#: The ViT decoder's output layer: its input is sown, so d/dW is exact from one einsum.
TO_PIXEL_KERNEL = "vit_decoder/to_pixel/kernel"


def to_pixel_kernel_grad(features: jax.Array, image_grad: jax.Array, patch: int) -> jax.Array:
    """d(loss)/d(to_pixel kernel) from the layer input and d(loss)/d(images): featuresᵀ·patches."""
    return jnp.einsum("bnh,bnp->hp", features, patchify(image_grad, patch))


class TokenizerStage(ReconstructionStage):
    """Trains the ViT VQ tokenizer; evaluates raw and EMA reconstructions on the eval split."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
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
            self.teacher = build.semantic_teacher(config)

    # ---- frozen networks -----------------------------------------------------------------------
    @functools.cache  # noqa: B019  (one stage per run; the files are read once)
    def frozen_params(self) -> dict:
        frozen = dict(super().frozen_params())
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
        extra: dict[str, Any] = {
            "code_usage": jnp.zeros((self.model.codebook_size,), jnp.float32)
        }
        if self.gan is not None:
            extra.update(self.gan.init(k_disc, size))
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
        indices, features = accumulate.join(per["indices"]), accumulate.join(per["features"])
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = self.apply_updates(state.params, updates)
        params, extra, restarted = self.maybe_restart_codes(
            state, extra, params, indices, features, rng
        )
        ema = self.update_ema(state.ema_params, params)
        metrics.update(
            {
                **code_usage(indices, self.model.codebook_size),
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(params),
                "lr": self.schedule(state.step),
                "codes_restarted": restarted,
            }
        )
        if self.perturb.enabled:
            metrics["perturb_alpha"], metrics["perturb_delta"] = self.perturb.values(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    def microbatch(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One microbatch's gradients with one backward pass of the tokenizer: (averaged —
        grads, D gradients, mean metrics —, per microbatch — indices, features, spectral)."""
        cfg = self.config
        images = batch["image"]
        inputs = batch[self.input_key]
        pert = self.perturb.at(state.step, rng)

        def forward(params):
            (recon, q), inter = self.model.apply(
                {"params": params},
                inputs,
                deterministic=False,
                perturbation=pert,
                rngs={"dropout": stream(rng, "dropout")},
                mutable=["intermediates"],
            )
            inter = inter["intermediates"]
            # The ViT decoder sows its output layer's input; other families (cnn_vq) do not.
            sown = inter.get("vit_decoder", {}).get("to_pixel_input")
            features = None if sown is None else jax.lax.stop_gradient(sown[0])
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
            side = self.quantizer_loss(q.losses) + self.semantic_weight * semantic
            return (recon, side), (q, features, semantic)

        (recon, side_loss), backward, (q, features, semantic) = jax.vjp(
            forward, state.params, has_aux=True
        )

        (rec, rec_terms), grad_rec = jax.value_and_grad(
            lambda r: self.reconstruction_loss(r, images, rng, frozen), has_aux=True
        )(recon)
        metrics: dict[str, jax.Array] = {}
        grad_recon, total = grad_rec, rec + side_loss
        averaged: dict[str, Any] = {}
        per_micro: dict[str, Any] = {"indices": q.indices, "features": q.features}
        if self.gan is not None:
            side_zero = jnp.zeros_like(side_loss)

            def reference_grad(image_grad: jax.Array) -> jax.Array:
                path = self.gan.cfg.adaptive_param
                if path == TO_PIXEL_KERNEL and features is not None:
                    return to_pixel_kernel_grad(features, image_grad, cfg.model.patch_size)
                (g,) = backward((image_grad, side_zero))  # any parameter: one more backward
                return param_at(g, path, what="gan.adaptive_param")

            grad_recon, adv_term, averaged["disc"], per_micro["disc"], metrics = (
                self.gan.microbatch(
                    state.step, state.extra, rng, images, recon, grad_rec, reference_grad, frozen
                )
            )
            total = total + adv_term

        (averaged["grads"],) = backward((grad_recon, jnp.ones_like(side_loss)))
        averaged["metrics"] = {
            **metrics,
            "loss": total,
            **rec_terms,
            "semantic_loss": semantic,
            **{f"{name}_loss": value for name, value in q.losses.items()},
            "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
        }
        return averaged, per_micro

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return optax.apply_updates(params, updates)

    def update_ema(self, ema: Any, params: Any) -> Any:
        return optim.ema_update(ema, params, self.config.optim.ema_decay)

    def maybe_restart_codes(
        self, state: TrainState, extra: dict, params: Any, indices: jax.Array,
        features: jax.Array, rng: jax.Array,
    ) -> tuple[Any, dict, jax.Array]:
        """Tracks code usage and, every ``dead_code_restart.every_steps``, re-seeds dead codes
        (from the whole batch's ``indices`` and quantizer ``features``)."""
        cfg = self.config.dead_code_restart
        usage = update_code_usage(state.extra["code_usage"], indices, cfg.usage_decay)
        if not cfg.every_steps:
            return params, {**extra, "code_usage": usage}, jnp.zeros((), jnp.int32)
        def restart(emb, usage):
            new_emb, new_usage, n = restart_dead_codes(
                stream(rng, "code_restart"), emb, usage, features, cfg.min_usage
            )
            return new_emb, new_usage, n.astype(jnp.int32)

        def keep(emb, usage):
            return emb, usage, jnp.zeros((), jnp.int32)

        # A branch, not a select of both: the restart runs only on the steps it is due
        # (performance.md measured the computed-then-discarded select at ~10% of the demo
        # tokenizer step on CPU).
        due = (state.step + 1) % cfg.every_steps == 0
        emb, usage, n = jax.lax.cond(
            due, restart, keep, params["quantizer"]["embedding"], usage
        )
        params = {**params, "quantizer": {**params["quantizer"], "embedding": emb}}
        return params, {**extra, "code_usage": usage}, n
