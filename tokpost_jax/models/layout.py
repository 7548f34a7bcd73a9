"""Where each token of a tokenizer sits: one order for every consumer of token sequences.

A tokenizer emits a pyramid of square token grids, coarse → fine (CODA-MAR: sides
1, 2, 3, 4, 5, 6, 8, 10, 13, 16, i.e. 680 tokens); the ViT VQ tokenizer is the one-scale case
(a 16×16 grid). Flat sequences [B, L] list the scales in that order, each row-major. Pretokenize,
the generator, the teacher-forcing mask, decoding and pFID all read positions from this one
object, so no stage re-derives the order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Square scales, coarse → fine; ``scales[k]`` is the side of scale k's token grid."""

    scales: tuple[int, ...]

    def __post_init__(self) -> None:
        scales = tuple(int(s) for s in self.scales)
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"a token layout needs positive scale sides, got {self.scales}")
        object.__setattr__(self, "scales", scales)

    @classmethod
    def single(cls, num_tokens: int) -> TokenLayout:
        """The one-scale layout of a square grid of ``num_tokens`` tokens."""
        side = math.isqrt(int(num_tokens))
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not form a square grid")
        return cls((side,))

    @property
    def side(self) -> int:
        """Side of the finest grid."""
        return self.scales[-1]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tokens per scale."""
        return tuple(s * s for s in self.scales)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Flat position of each scale's first token (and ``num_tokens`` last)."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)]))

    def scale_names(self) -> tuple[str, ...]:
        """Metric names of the scales: ``s<side>``, and ``s<side>_<n>`` for the n-th repeat of a
        side (a pyramid may end in several residual steps at the full latent side)."""
        seen: dict[int, int] = {}
        names = []
        for s in self.scales:
            seen[s] = seen.get(s, 0) + 1
            names.append(f"s{s}" if seen[s] == 1 else f"s{s}_{seen[s]}")
        return tuple(names)

    def scale_of_token(self) -> np.ndarray:
        """[L] int32: the scale index of every flat position."""
        return np.repeat(np.arange(self.num_scales, dtype=np.int32), self.sizes)

    def split(self, tokens: jax.Array) -> list[jax.Array]:
        """[..., L] → per scale [..., s, s] (row-major)."""
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"{tokens.shape[-1]} tokens for a layout of {self.num_tokens}")
        o = self.offsets
        lead = tokens.shape[:-1]
        return [
            tokens[..., o[k] : o[k + 1]].reshape(*lead, s, s) for k, s in enumerate(self.scales)
        ]

    def join(self, grids: Sequence[jax.Array]) -> jax.Array:
        """Per scale [..., s, s] → [..., L]."""
        if len(grids) != self.num_scales:
            raise ValueError(f"{len(grids)} grids for a layout of {self.num_scales} scales")
        flat = []
        for grid, s in zip(grids, self.scales, strict=True):
            if tuple(grid.shape[-2:]) != (s, s):
                raise ValueError(f"grid of shape {grid.shape} at a scale of side {s}")
            flat.append(grid.reshape(*grid.shape[:-2], s * s))
        return jnp.concatenate(flat, axis=-1)

    def to_json(self) -> dict:
        return {"scales": list(self.scales)}
