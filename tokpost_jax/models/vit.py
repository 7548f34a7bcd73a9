"""Pre-LN ViT blocks with logical partitioning, shared by the tokenizer encoder and decoder.

Parameter names follow timm's layout loosely (``qkv``, ``proj``, ``fc1``, ``fc2``, ``ls1``) so that
the weight converter can map a timm / DINOv2 state dict onto them one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.remat import remat as remat_module

Initializer = Callable[..., jax.Array]


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """Annotates a parameter initializer with logical axis names (resolved by config rules)."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, tuple(names))


# Fan-scaled (big_vision's ViT choice): a fixed std of 0.02 is calibrated for width ~768 and starves
# narrow ViTs of signal, so that at init every latent token carries the same feature.
DENSE_INIT = nn.initializers.xavier_uniform()


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample (timm: rescaled by 1/keep)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2 initialises it to 1e-5)."""

    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", logical(nn.initializers.constant(self.init_value), ("embed",)), (x.shape[-1],)
        )
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(
            3 * width,
            dtype=self.dtype,
            kernel_init=logical(DENSE_INIT, ("embed", "qkv")),
            bias_init=logical(nn.initializers.zeros, ("qkv",)),
            name="qkv",
        )(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)
        out = out.reshape(batch, length, width)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(DENSE_INIT, ("heads_merged", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(out)


class Mlp(nn.Module):
    """Two-layer GELU MLP (exact GELU, as in timm ViTs)."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            kernel_init=logical(DENSE_INIT, ("embed", "mlp")),
            bias_init=logical(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = nn.gelu(h, approximate=False)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(DENSE_INIT, ("mlp", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(h)


def layer_norm(name: str, dtype: jnp.dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6 (timm ViT / DINOv2) and annotated scale/bias."""
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Block(nn.Module):
    """Pre-LN transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    layerscale_init: float | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = Attention(self.num_heads, dtype=self.dtype, name="attn")(
            layer_norm("norm1", self.dtype)(x)
        )
        if self.layerscale_init is not None:
            h = LayerScale(self.layerscale_init, name="ls1")(h)
        x = x + DropPath(self.drop_path)(h, deterministic)
        h = Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
        if self.layerscale_init is not None:
            h = LayerScale(self.layerscale_init, name="ls2")(h)
        x = x + DropPath(self.drop_path)(h, deterministic)
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class Transformer(nn.Module):
    """A stack of blocks with a linearly increasing drop-path rate and a final LayerNorm.

    ``remat`` (:mod:`tokpost_jax.models.remat`) recomputes each block in the backward pass.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    layerscale_init: float | None = None
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
        block = remat_module(Block, self.remat, static_argnums=(2,))  # (self, x, deterministic)
        for i in range(self.depth):
            x = block(
                self.num_heads,
                self.mlp_dim,
                drop_path=float(rates[i]),
                layerscale_init=self.layerscale_init,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, deterministic)
        return layer_norm("norm", self.dtype)(x)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] → [B, (H/p)·(W/p), p·p·C], row-major over the patch grid."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(
    tokens: jax.Array, patch: int, grid: tuple[int, int], channels: int = 3
) -> jax.Array:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * patch, gw * patch, channels)


def resize_grid_embedding(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resamples a [N, D] row-major square-grid embedding to ``grid`` (bicubic)."""
    n, d = pos.shape
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    img = pos.reshape(side, side, d)
    return jax.image.resize(img, (*grid, d), method="bicubic").reshape(grid[0] * grid[1], d)


class TokenEmbeddings(nn.Module):
    """cls token, learned position embedding over the patch grid, and optionally a level embedding.

    The tokenizer uses two levels (image tokens 0, latent tokens 1); a plain ViT uses none.
    """

    width: int
    num_patches: int
    levels: bool = True

    def setup(self) -> None:
        self.cls_token = self.param(
            "cls_token",
            logical(nn.initializers.normal(1e-6), (None, None, "embed")),
            (1, 1, self.width),
        )
        self.pos_embed = self.param(
            "pos_embed",
            logical(DENSE_INIT, (None, None, "embed")),
            (1, 1 + self.num_patches, self.width),
        )
        if self.levels:
            self.level_embed = self.param(
                "level_embed",
                logical(
                    nn.initializers.truncated_normal(np.sqrt(1.0 / (3 * self.width))),
                    (None, "embed"),
                ),
                (2, self.width),
            )

    def grid_pos(self, grid: tuple[int, int]) -> jax.Array:
        """[G, D] position embedding of the patch grid, resampled if the latent grid differs."""
        return resize_grid_embedding(self.pos_embed[0, 1:], grid)
