"""The GAN side of a tokenizer stage: discriminator state and step, start gating, LeCAM, and the
adaptively weighted adversarial term of the generator (robustok.md §4; coda.md §3).

Any tokenizer stage (ViT VQ main training, post-training, CODA) owns one :class:`GANSide`. Its
:meth:`step` takes the reconstruction and d(rec loss)/d(recon) and returns the total image
cotangent ``g_rec + c·g_adv``, so the stage runs ONE backward pass of its model with it. The
adaptive weight λ = ‖∂L_rec/∂W‖ / (‖∂L_adv/∂W‖ + eps) needs the gradient w.r.t. one reference
parameter W (named by ``gan.adaptive_param``); the stage supplies ``reference_grad``, a map from
an image cotangent to ∂/∂W, which it can compute cheaply for its own architecture.

Under gradient accumulation (:mod:`tokpost_jax.train.accumulate`) :meth:`step` is its two
halves: :meth:`microbatch` per microbatch (G term and D gradients, with the step's
discriminator) and :meth:`update` once per step (one D optimizer update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from tokpost_jax import losses
from tokpost_jax.convert import dino
from tokpost_jax.models import build
from tokpost_jax.models import discriminator as disc_lib
from tokpost_jax.models.diffaug import diff_augment
from tokpost_jax.train import optim
from tokpost_jax.train.state import stream

ReferenceGrad = Callable[[jax.Array], Any]  # image cotangent [B, H, W, 3] → ∂/∂W


def gated(active: jax.Array, on: Any, off: Any) -> Any:
    """``on(None)`` if ``active`` else ``off(None)``, for the GAN's start step.

    On accelerators this is ``lax.cond``, which skips the discriminator's work before it starts.
    XLA:CPU runs conditional branches without its usual threading (measured 3.5x slower for the
    demo step), so there both branches are computed and selected: the same values, computed faster.
    """
    if jax.default_backend() != "cpu":
        return jax.lax.cond(active, on, off, None)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), on(None), off(None))


class GANSide:
    """Discriminator, its optimizer and schedule, and the generator's adversarial term.

    ``gan`` is the config's ``gan`` block: ``start`` (in the stage's schedule unit),
    ``weight``, ``adaptive_weight``, ``adaptive_max``, ``adaptive_eps``,
    ``adaptive_weight_groups``, ``ramp``, ``lecam_weight``, ``lecam_decay``, ``diffaug``,
    the discriminator fields and ``optim``.
    """

    def __init__(
        self,
        gan: ml_collections.ConfigDict,
        total_steps: int,
        steps_per_epoch: float,
        seed: int,
    ):
        self.cfg = gan
        self.seed = seed
        self.total_steps = total_steps
        self.disc = build.discriminator(gan)
        self.start = round(gan.start * steps_per_epoch)
        self.schedule = optim.lr_schedule(gan.optim, max(total_steps - self.start, 1))
        self.tx = optim.adamw(gan.optim, self.schedule)
        if gan.ramp not in ("none", "linear"):
            raise ValueError(f"gan.ramp must be 'none' or 'linear', got {gan.ramp!r}")

    # ---- state ---------------------------------------------------------------------------------
    def frozen_params(self) -> dict[str, Any]:
        """``{"disc_backbone": ...}`` for the DINO discriminator (a file, or random + a warning)."""
        if self.cfg.discriminator != "dino":
            return {}
        if self.cfg.dino_weights:
            backbone = dino.load_dino_backbone(self.cfg.dino_weights, depth=self.disc.num_blocks)
            logging.info("Discriminator backbone: DINO weights from %s.", self.cfg.dino_weights)
        else:
            size = self.cfg.dino_image_size
            variables = self.disc.init(
                jax.random.PRNGKey(self.seed + 1), jnp.zeros((1, size, size, 3))
            )
            backbone = nn.unbox(variables["params"])["backbone"]
            logging.warning("%s", disc_lib.random_backbone_notice())
        return {"disc_backbone": backbone}

    def init(self, rng: jax.Array, image_size: int) -> dict[str, Any]:
        """The stage's ``extra`` entries: discriminator params/opt state/spectral vectors, LeCAM."""
        variables = self.disc.init(rng, jnp.zeros((1, image_size, image_size, 3)))
        _, trainable = disc_lib.split_params(variables["params"])
        return {
            "disc": {
                "params": trainable,
                "opt_state": self.tx.init(trainable),
                "spectral": variables.get("spectral", {}),
            },
            "lecam": {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)},
        }

    def reuse(self, extra: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """``extra`` with the discriminator weights and LeCAM EMAs of another run (``source`` is
        that run's host ``extra``); the optimizer state stays fresh."""
        disc = dict(extra["disc"])
        for key in ("params", "spectral"):
            disc[key] = jax.tree.map(
                lambda new, old: jax.device_put(new, old.sharding).astype(old.dtype),
                source["disc"][key], disc[key],
            )
        lecam = jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding).astype(old.dtype),
            source["lecam"], extra["lecam"],
        )
        return {**extra, "disc": disc, "lecam": lecam}

    # ---- pieces ------------------------------------------------------------------------------
    def _apply(self, disc_params, spectral, images, key, frozen):
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
        return diff_augment(key, images) if self.cfg.diffaug else images

    def ramp(self, step: jax.Array) -> jax.Array:
        """Multiplier of the adversarial term: 1, or CODA's step / total_steps (whole run)."""
        if self.cfg.ramp == "linear":
            return step.astype(jnp.float32) / float(self.total_steps)
        return jnp.ones((), jnp.float32)

    def _adaptive(self, grad_rec: jax.Array, grad_adv: jax.Array, reference_grad: ReferenceGrad):
        """λ per sample [B]: one value for the batch, or one per contiguous group of samples (the
        official code computes λ from each GPU's own losses)."""
        g = self.cfg
        batch = grad_rec.shape[0]
        groups = int(g.adaptive_weight_groups)
        if not g.adaptive_weight:
            return jnp.ones((batch,), jnp.float32)
        if groups == 1:
            lam = losses.adaptive_weight(
                reference_grad(grad_rec), reference_grad(grad_adv),
                eps=g.adaptive_eps, max_value=g.adaptive_max,
            )
            return jnp.broadcast_to(lam, (batch,))
        if batch % groups:
            raise ValueError(
                f"gan.adaptive_weight_groups={groups} does not divide the batch of {batch}"
            )
        member = jnp.arange(batch) // (batch // groups)
        masks = (member[None] == jnp.arange(groups)[:, None]).astype(grad_rec.dtype)

        def one(mask: jax.Array) -> jax.Array:
            m = mask[:, None, None, None]
            return losses.adaptive_weight(
                reference_grad(grad_rec * m), reference_grad(grad_adv * m),
                eps=g.adaptive_eps, max_value=g.adaptive_max,
            )

        return jax.vmap(one)(masks)[member]

    # ---- the step ------------------------------------------------------------------------------
    def step(
        self,
        step: jax.Array,
        extra: dict[str, Any],
        rng: jax.Array,
        images: jax.Array,
        recon: jax.Array,
        grad_rec: jax.Array,
        reference_grad: ReferenceGrad,
        frozen: Any,
    ) -> tuple[jax.Array, jax.Array, dict[str, Any], dict[str, jax.Array]]:
        """(image cotangent g_rec + c·g_adv, the adversarial loss term c·L_adv, new ``extra``,
        metrics): :meth:`microbatch` on the whole batch, then :meth:`update`."""
        grad_out, adv_term, averaged, latest, metrics = self.microbatch(
            step, extra, rng, images, recon, grad_rec, reference_grad, frozen
        )
        extra, update_metrics = self.update(step, extra, averaged, latest)
        return grad_out, adv_term, extra, {**metrics, **update_metrics}

    def microbatch(
        self,
        step: jax.Array,
        extra: dict[str, Any],
        rng: jax.Array,
        images: jax.Array,
        recon: jax.Array,
        grad_rec: jax.Array,
        reference_grad: ReferenceGrad,
        frozen: Any,
    ) -> tuple[jax.Array, jax.Array, dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
        """One (micro)batch's generator term and discriminator gradients, both with the step's
        discriminator: (image cotangent, adversarial loss term, ``averaged`` — D gradients and
        the LeCAM EMAs updated with this batch's mean logits, to average over microbatches —,
        ``latest`` — the spectral-norm vectors, the same in every microbatch —, metrics).

        Per microbatch by design: λ (from this batch's gradients, per ``adaptive_weight_groups``
        contiguous groups of it) and the LeCAM term, which sees the EMAs updated with this
        batch's means; the EMAs kept are the average, i.e. updated with the global batch mean.
        """
        gan = self.cfg
        active = step >= self.start
        disc, lecam = extra["disc"], extra["lecam"]
        batch = recon.shape[0]

        def g_term(_):
            def adversarial(r):
                logits, spectral = self._apply(
                    disc["params"], disc["spectral"],
                    self._augment(stream(rng, "diffaug_g"), r), stream(rng, "disc_crop_g"), frozen,
                )
                return losses.hinge_g_loss(logits), (spectral, logits)

            (adv, (spectral, logits)), grad_adv = jax.value_and_grad(adversarial, has_aux=True)(
                recon
            )
            lam = self._adaptive(grad_rec, grad_adv, reference_grad)
            per_sample = -jnp.mean(logits.reshape(batch, -1).astype(jnp.float32), axis=1)
            return adv, grad_adv, lam, per_sample, spectral

        def g_off(_):
            zero = jnp.zeros((), jnp.float32)
            zeros = jnp.zeros((batch,), jnp.float32)
            return zero, jnp.zeros_like(recon), zeros, zeros, disc["spectral"]

        adv, grad_adv, lam, per_sample, spectral = gated(active, g_term, g_off)
        ramp = self.ramp(step)
        if int(gan.adaptive_weight_groups) == 1:
            # One λ: the same floating-point ops as a scalar weight (bitwise with earlier runs).
            coefficient = gan.weight * lam[0] * ramp
            grad_out = grad_rec + coefficient * grad_adv
            adv_term = coefficient * adv
        else:
            c = gan.weight * lam * ramp
            grad_out = grad_rec + c[:, None, None, None] * grad_adv
            adv_term = jnp.mean(c * per_sample)
        fake = jax.lax.stop_gradient(recon)

        def d_grads(_):
            def d_loss(disc_params):
                real_logits, spec = self._apply(
                    disc_params, spectral,
                    self._augment(stream(rng, "diffaug_real"), images),
                    stream(rng, "disc_crop_real"), frozen,
                )
                fake_logits, spec = self._apply(
                    disc_params, spec,
                    self._augment(stream(rng, "diffaug_fake"), fake),
                    stream(rng, "disc_crop_fake"), frozen,
                )
                ema_real, ema_fake = losses.update_lecam_ema(
                    lecam["real"], lecam["fake"], real_logits, fake_logits, gan.lecam_decay
                )
                hinge = losses.hinge_d_loss(real_logits, fake_logits)
                reg = losses.lecam_loss(real_logits, fake_logits, ema_real, ema_fake)
                loss = gan.weight * (hinge + gan.lecam_weight * reg)
                return loss, (
                    spec, ema_real, ema_fake, hinge, reg,
                    jnp.mean(real_logits), jnp.mean(fake_logits),
                )

            (_, aux), grads = jax.value_and_grad(d_loss, has_aux=True)(disc["params"])
            spec, ema_real, ema_fake, hinge, reg, real_mean, fake_mean = aux
            stats = jnp.stack([hinge, reg, real_mean, fake_mean])
            return grads, spec, {"real": ema_real, "fake": ema_fake}, stats

        def d_off(_):
            zeros = jax.tree.map(jnp.zeros_like, disc["params"])
            return zeros, spectral, lecam, jnp.zeros((4,), jnp.float32)

        grads, spec, new_lecam, stats = gated(active, d_grads, d_off)
        metrics = {
            "gan_g_loss": adv,
            "adaptive_weight": jnp.mean(lam),
            "disc_hinge": stats[0],
            "disc_lecam": stats[1],
            "logits_real": stats[2],
            "logits_fake": stats[3],
        }
        return grad_out, adv_term, {"grads": grads, "lecam": new_lecam}, {"spectral": spec}, metrics

    def update(
        self, step: jax.Array, extra: dict[str, Any], averaged: dict[str, Any],
        latest: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """The step's one discriminator update from :meth:`microbatch`'s (averaged) gradients;
        (new ``extra``, the per-step metrics)."""
        active = step >= self.start
        disc = extra["disc"]
        grads = averaged["grads"]

        def d_update(_):
            updates, opt_state = self.tx.update(grads, disc["opt_state"], disc["params"])
            return optax.apply_updates(disc["params"], updates), opt_state, averaged["lecam"]

        def d_off(_):
            return disc["params"], disc["opt_state"], extra["lecam"]

        params, opt_state, lecam = gated(active, d_update, d_off)
        new_disc = {"params": params, "opt_state": opt_state, "spectral": latest["spectral"]}
        metrics = {
            "gan_ramp": self.ramp(step),
            "disc_active": active.astype(jnp.float32),
            "disc_grad_norm": optim.global_norm(grads),
            "disc_lr": self.schedule(jnp.maximum(step - self.start, 0)),
        }
        return {**extra, "disc": new_disc, "lecam": lecam}, metrics
