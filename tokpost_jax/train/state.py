"""The train state every stage shares, and named RNG streams."""

from __future__ import annotations

import zlib
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """``step`` counts completed updates; ``extra`` holds stage state (code usage, GAN state)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    extra: Any = None


def stream(rng: jax.Array, name: str) -> jax.Array:
    """A named, reproducible RNG stream (the name's CRC32 folded into the key)."""
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def step_rng(base: jax.Array, step: jax.Array) -> jax.Array:
    """Per-step key: streams derived from it depend only on (seed, step), so resume is exact."""
    return jax.random.fold_in(base, step)
