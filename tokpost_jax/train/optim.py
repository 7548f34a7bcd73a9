"""Optimizers and schedules from config: AdamW + warmup/cosine, clipping, EMA, decay masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameter-name fragments that never get weight decay (biases and norms are caught by ndim < 2).
NO_DECAY_NAMES: tuple[str, ...] = (
    "embed",
    "token",
    "cls",
    "pos",
    "level",
    "gamma",
    "norm",
    "embedding",
)


def lr_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_init_lr`` to ``lr``, cosine to ``min_lr`` at ``total_steps``."""
    warmup = int(optim_cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=float(optim_cfg.warmup_init_lr),
        peak_value=float(optim_cfg.lr),
        warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1),
        end_value=float(optim_cfg.min_lr),
    )


def _leaf_value(x: Any) -> Any:
    return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def weight_decay_mask(params: Any, exclude: Sequence[str] = NO_DECAY_NAMES) -> Any:
    """True for parameters that get weight decay: ndim ≥ 2 and no excluded name in their path."""

    def decide(path: tuple, leaf: Any) -> bool:
        name = "/".join(str(getattr(p, "key", p)) for p in path).lower()
        if isinstance(_leaf_value(leaf), optax.MaskedNode):  # owned by another transform (freezing)
            return False
        if _leaf_value(leaf).ndim < 2:
            return False
        return not any(fragment in name for fragment in exclude)

    return jax.tree_util.tree_map_with_path(
        decide, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )


def adamw(
    optim_cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    decay_mask: Any = weight_decay_mask,
) -> optax.GradientTransformation:
    """Global-norm clipping (when ``clip_grad_norm`` > 0) followed by AdamW."""
    parts = []
    if optim_cfg.clip_grad_norm and optim_cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_grad_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            weight_decay=float(optim_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def decay_everything(params: Any) -> Any:
    """A weight-decay mask that decays every leaf (CODA decays codebook, gains and biases too)."""
    return jax.tree.map(
        lambda x: not isinstance(_leaf_value(x), optax.MaskedNode), params,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata | optax.MaskedNode),
    )


def ema_decay(optim_cfg: ml_collections.ConfigDict, step: jax.Array, start_step: int) -> jax.Array:
    """The EMA decay after update ``step``: ``optim.ema_decay`` (a constant), or with
    ``optim.ema_schedule="coda"`` CODA's min(ema_decay, (⌊s/2⌋+1)/(⌊s/2⌋+10)), and a plain copy
    (decay 0) before ``start_step``."""
    schedule = optim_cfg.get("ema_schedule", "constant")
    if schedule == "constant":
        decay = jnp.asarray(optim_cfg.ema_decay, jnp.float32)
    elif schedule == "coda":
        half = (step // 2).astype(jnp.float32)
        decay = jnp.minimum(float(optim_cfg.ema_decay), (half + 1.0) / (half + 10.0))
    else:
        raise ValueError(f"optim.ema_schedule must be 'constant' or 'coda', got {schedule!r}")
    return jnp.where(step < start_step, 0.0, decay)


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """ema ← decay·ema + (1 − decay)·params, leafwise in the params' dtype."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def global_norm(tree: Any) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def apply_gradients(
    state: Any, grads: Any, tx: optax.GradientTransformation, ema_decay: float,
    schedule: optax.Schedule,
) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer update of a TrainState (params, opt_state, the EMA when ``ema_decay``,
    step + 1) and the update's metrics: lr, grad_norm, param_norm."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay) if ema_decay else state.ema_params
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
    )
    metrics = {
        "lr": schedule(state.step),
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
    }
    return new_state, metrics
