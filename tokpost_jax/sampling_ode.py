"""Deterministic ODE sampling from a latent flow model (models/diffusion.py), with CFG.

The flow runs from noise (t = 1) to data (t = 0): ``dx/dt = v(x, t, y)``, integrated on the uniform
grid ``t_i = t0 + (t1 − t0)·i/N`` with Euler (N evaluations) or Heun (2N: Euler predictor,
trapezoidal corrector). Classifier-free guidance runs the conditional and the null-class copies as
one 2B batch and mixes them as ``v_u + g·(v_c − v_u)``.

Two entry points, both jitted with static shapes: :func:`sample` starts from fresh noise at
t0 = 1; :func:`integrate_from` starts from a given latent at any t0 (SDEdit: a real latent noised
to t0 = 1 − σ). t0 = 0 is a step of length zero, so the input comes back bit for bit. Nothing is
random after the starting noise, so a seed fixes the samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tokpost_jax.models.diffusion import LatentDiT, interpolate
from tokpost_jax.models.generator import null_class_id

METHODS = ("euler", "heun")

Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t [B]) -> dx/dt


def integrate(
    velocity: Velocity,
    x: jax.Array,
    t0: float | jax.Array,
    *,
    num_steps: int,
    method: str = "heun",
    t1: float | jax.Array = 0.0,
) -> jax.Array:
    """x(t1) from x(t0) = ``x`` by ``num_steps`` Euler/Heun steps; t0 is a scalar or per-sample [B].

    Pure and traceable (a ``lax.fori_loop``); the caller jits it.
    """
    if method not in METHODS:
        raise ValueError(f"ODE method {method!r}; use one of {METHODS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    batch = x.shape[0]
    t0 = jnp.broadcast_to(jnp.asarray(t0, jnp.float32), (batch,))
    t1 = jnp.broadcast_to(jnp.asarray(t1, jnp.float32), (batch,))
    shape = (batch,) + (1,) * (x.ndim - 1)
    x = x.astype(jnp.float32)

    def time(i: jax.Array) -> jax.Array:
        return t0 + (t1 - t0) * (i / num_steps)

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        t_now, t_next = time(i), time(i + 1)
        dt = (t_next - t_now).reshape(shape)
        v = velocity(x, t_now).astype(jnp.float32)
        if method == "euler":
            return x + dt * v
        v_next = velocity(x + dt * v, t_next).astype(jnp.float32)
        return x + dt * (0.5 * (v + v_next))

    return jax.lax.fori_loop(0, num_steps, step, x)


def guided_velocity(
    model: LatentDiT, params: Any, labels: jax.Array, guidance: float | jax.Array, use_cfg: bool
) -> Velocity:
    """v(x, t) for class ``labels``; with ``use_cfg`` one 2B pass (labels, then the null class)
    mixed as ``v_u + g·(v_c − v_u)``."""
    labels = jnp.asarray(labels, jnp.int32)
    if not use_cfg:
        return lambda x, t: model.apply(params, x, t, labels)
    null = jnp.full_like(labels, null_class_id(model.num_classes))
    both = jnp.concatenate([labels, null])
    guidance = jnp.asarray(guidance, jnp.float32)

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        cond, uncond = jnp.split(out, 2)
        return uncond + guidance * (cond - uncond)

    return velocity


def _uses_cfg(guidance: float | jax.Array) -> bool:
    # A Python 1 skips the null-class pass (g = 1 is the conditional velocity); anything else,
    # traced values included, runs both.
    return not (isinstance(guidance, int | float) and guidance == 1)


def integrate_from(
    model: LatentDiT,
    params: Any,
    latent: jax.Array,
    labels: jax.Array,
    t0: float | jax.Array,
    *,
    num_steps: int,
    method: str = "heun",
    guidance: float | jax.Array = 1.0,
) -> jax.Array:
    """The latent at t = 0 reached from ``latent`` at time ``t0`` (scalar or [B] in [0, 1]).

    SDEdit: ``latent = noise_to(x0, ε, 1 − σ)``; σ = 1 (t0 = 0) returns ``latent`` unchanged.
    ``params`` are the model's variables (``{"params": ...}``).
    """
    if method not in METHODS:
        raise ValueError(f"ODE method {method!r}; use one of {METHODS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return _integrate_from(
        model, params, jnp.asarray(latent, jnp.float32), jnp.asarray(labels, jnp.int32),
        jnp.asarray(t0, jnp.float32), jnp.asarray(guidance, jnp.float32),
        num_steps=int(num_steps), method=method, use_cfg=_uses_cfg(guidance),
    )


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "method", "use_cfg"))
def _integrate_from(
    model: LatentDiT,
    params: Any,
    latent: jax.Array,
    labels: jax.Array,
    t0: jax.Array,
    guidance: jax.Array,
    *,
    num_steps: int,
    method: str,
    use_cfg: bool,
) -> jax.Array:
    velocity = guided_velocity(model, params, labels, guidance, use_cfg)
    return integrate(velocity, latent, t0, num_steps=num_steps, method=method)


def noise_to(x0: jax.Array, noise: jax.Array, t: float | jax.Array) -> jax.Array:
    """A clean latent moved to time t (scalar or [B]) on the training path: (1 − t)·x0 + t·ε."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x0.shape[0],))
    return interpolate(jnp.asarray(x0, jnp.float32), noise, t)


def sample(
    model: LatentDiT,
    params: Any,
    labels: jax.Array,
    rng: jax.Array,
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    method: str = "heun",
    guidance: float | jax.Array = 1.0,
) -> jax.Array:
    """[B, h, w, C] latents for class ``labels`` ([B]; ``num_classes`` = unconditional) from
    N(0, I) noise drawn with ``rng`` at t0 = 1."""
    labels = jnp.asarray(labels, jnp.int32)
    noise = jax.random.normal(rng, (labels.shape[0], *latent_shape), jnp.float32)
    return integrate_from(
        model, params, noise, labels, 1.0, num_steps=num_steps, method=method, guidance=guidance
    )
