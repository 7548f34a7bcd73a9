"""RobusTok's latent perturbation as a training schedule, shared by every tokenizer stage.

The config's ``perturbation`` block (β, α₀, δ₀, the anneal window, the neighbours, the group
size) becomes one :class:`~tokpost_jax.models.perturbation.Perturbation` per step, with its own
rng stream; α and δ are annealed in the stage's schedule unit without recompiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.models import perturbation
from tokpost_jax.train.state import stream


class PerturbationSchedule:
    """``config.perturbation`` over training; ``steps_per_unit`` converts steps to the unit of
    ``anneal_start``/``anneal_end`` (1 for steps, steps per epoch for epochs)."""

    def __init__(self, config: ml_collections.ConfigDict, steps_per_unit: float):
        self.cfg = p = config.get("perturbation")
        self.steps_per_unit = steps_per_unit
        if not self.enabled:
            return
        # Groups are counted within a microbatch (train/accumulate.py).
        k = config.get("grad_accum_steps", 1)
        micro = config.batch_size // k
        group = p.group_size or micro
        if micro % group:
            what = f" / grad_accum_steps={k} = {micro}" if k > 1 else ""
            raise ConfigValueError(
                "perturbation.group_size", p.group_size,
                f"must divide batch_size={config.batch_size}{what} (0: the whole "
                f"{'micro' if k > 1 else ''}batch is one group)",
            )
        if perturbation.samples_per_group(p.beta, group) == 0:
            raise ConfigValueError(
                "perturbation.beta", p.beta,
                f"selects ⌊β·{group}⌋ = 0 samples per group of {group} "
                f"(perturbation.group_size={p.group_size}), so the perturbation would never act; "
                "raise beta or group_size, or set perturbation.enabled=False",
            )

    @property
    def enabled(self) -> bool:
        """Configured and on (a continuous autoencoder's config has no perturbation block)."""
        return self.cfg is not None and bool(self.cfg.enabled)

    def values(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(α, δ) at ``step``."""
        p = self.cfg
        return perturbation.perturbation_schedule(
            step.astype(jnp.float32) / self.steps_per_unit,
            alpha0=p.alpha0,
            delta0=p.delta0,
            anneal_start=p.anneal_start,
            anneal_end=p.anneal_end,
            end_ratio=p.end_ratio,
        )

    def at(self, step: jax.Array, rng: jax.Array) -> perturbation.Perturbation | None:
        """This step's perturbation (its own rng stream), or None when disabled."""
        if not self.enabled:
            return None
        p = self.cfg
        alpha, delta = self.values(step)
        return perturbation.Perturbation(
            rng=stream(rng, "perturbation"),
            alpha=alpha,
            delta=delta,
            beta=p.beta,
            delta_max=p.delta0,
            group_size=p.group_size,
            exclude_clean=p.exclude_clean,
            neighbours=p.neighbours,
        )
