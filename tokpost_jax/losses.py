"""Adversarial and contrastive losses of the RobusTok objective (robustok.md §4), as pure functions.

All functions reduce with means in float32 and are jit/grad friendly. Conventions follow the
reference: hinge GAN with LeCAM regularisation (EMAs of the mean logits, treated as constants),
the taming/VQGAN adaptive weight, and CLIP's symmetric InfoNCE.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "adaptive_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "info_nce",
    "lecam_loss",
    "update_lecam_ema",
]


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in jax.tree.leaves(tree)))


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss ``0.5·(mean relu(1 − real) + mean relu(1 + fake))``."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Generator hinge loss ``−mean(fake)``."""
    return -jnp.mean(_f32(fake_logits))


def lecam_loss(
    real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array, ema_fake: jax.Array
) -> jax.Array:
    """LeCAM regulariser ``mean(relu(real − ema_fake)²) + mean(relu(ema_real − fake)²)``.

    The EMAs are constants (stop-gradient), as the reference stores them as Python floats. The
    reference updates the EMAs with the current logits *before* computing this term.
    """
    ema_real = jax.lax.stop_gradient(_f32(ema_real))
    ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
    reg_real = jnp.mean(jnp.square(jax.nn.relu(_f32(real_logits) - ema_fake)))
    reg_fake = jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(fake_logits))))
    return reg_real + reg_fake


def update_lecam_ema(
    ema_real: jax.Array,
    ema_fake: jax.Array,
    real_logits: jax.Array,
    fake_logits: jax.Array,
    decay: float = 0.999,
) -> tuple[jax.Array, jax.Array]:
    """``ema ← decay·ema + (1 − decay)·mean(logits)`` for real and fake; starts from 0 (reference).

    Returns the new ``(ema_real, ema_fake)`` as stop-gradient float32 scalars.
    """
    mean_real = jax.lax.stop_gradient(jnp.mean(_f32(real_logits)))
    mean_fake = jax.lax.stop_gradient(jnp.mean(_f32(fake_logits)))
    new_real = decay * _f32(ema_real) + (1.0 - decay) * mean_real
    new_fake = decay * _f32(ema_fake) + (1.0 - decay) * mean_fake
    return jax.lax.stop_gradient(new_real), jax.lax.stop_gradient(new_fake)


def adaptive_weight(
    rec_grad: Any, adv_grad: Any, eps: float = 1e-4, max_value: float = 1e4
) -> jax.Array:
    """VQGAN adaptive GAN weight ``clip(‖rec_grad‖ / (‖adv_grad‖ + eps), 0, max_value)``, detached.

    ``rec_grad`` and ``adv_grad`` are the gradients of the reconstruction (+ perceptual) loss and
    of the generator adversarial loss w.r.t. the decoder's last-layer kernel (arrays or pytrees;
    the norm is the global L2 norm over all leaves). The trainer computes them.
    """
    rec_norm, adv_norm = _global_norm(rec_grad), _global_norm(adv_grad)
    weight = jnp.clip(rec_norm / (adv_norm + eps), 0.0, max_value)
    return jax.lax.stop_gradient(weight)


def info_nce(student: jax.Array, teacher: jax.Array, logit_scale: float = 1.0) -> jax.Array:
    """Symmetric CLIP-style InfoNCE between paired rows of two [N, d] sets.

    ``logits = logit_scale · student @ teacherᵀ``; row i's positive is column i. Returns the mean of
    the cross-entropies in both directions. No feature normalisation (RobusTok: ``clip_norm``
    false, logit scale 1). For the global-batch loss, gather both sets across devices first.
    """
    s, t = _f32(student), _f32(teacher)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"info_nce needs two [N, d] arrays of one shape, got {s.shape}, {t.shape}")
    logits = logit_scale * (s @ t.T)
    labels = jnp.arange(s.shape[0])
    loss_s = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (loss_s + loss_t)
