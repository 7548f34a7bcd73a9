"""Rematerialisation of a model's repeated blocks (ViT blocks, RAR blocks, KL-VAE res/attn blocks).

Why: at paper sizes the activations a block keeps for its backward pass, not the parameters,
decide how many images fit on a chip. A remat policy trades them for recomputation; the
parameter tree is unchanged (same module names), so checkpoints load either way. The modules
only take the policy name; whether to use it is the config's choice (``model.remat``).

Policies:
  none   keep everything (no remat; the default).
  full   keep only each block's inputs and recompute the whole block in the backward pass
         (~1 extra forward of the blocks).
  dots   keep the outputs of matrix multiplies without batch dimensions (the Dense layers)
         and recompute the rest (attention scores, norms, GELU). Convolutions are not dots, so
         for the conv KL-VAE "dots" is close to "full".
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "full", "dots")


def remat(
    module: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()
) -> type[nn.Module]:
    """``module`` wrapped by ``nn.remat`` under ``policy`` (``module`` itself for "none").

    ``static_argnums`` counts ``self`` as 0 (flax's convention): Python flags such as
    ``deterministic`` must be static.
    """
    if policy == "none":
        return module
    if policy == "full":
        return nn.remat(module, static_argnums=tuple(static_argnums))
    if policy == "dots":
        return nn.remat(
            module,
            policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            static_argnums=tuple(static_argnums),
        )
    raise ValueError(f"remat policy {policy!r}; use one of {REMAT_POLICIES}")
