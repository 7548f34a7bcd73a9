"""Frozen semantic teacher for RobusTok's InfoNCE regulariser: a plain ViT's final-norm cls feature.

Parameter names match :class:`~tokpost_jax.models.tokenizer.ViTEncoder` (``embeddings``,
``patch_embed``, ``transformer``) so the timm/DINOv2 importer fills it like the encoder.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.vit import TokenEmbeddings, Transformer, patchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTTeacher(nn.Module):
    """[-1, 1] images → ImageNet-normalised → ViT → LayerNorm'd cls token [B, width]."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    layerscale_init: float | None = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        x = (images.astype(jnp.float32) + 1.0) * 0.5
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
        grid = self.image_size // self.patch_size
        emb = TokenEmbeddings(self.width, grid * grid, levels=False, name="embeddings")
        tokens = nn.Dense(self.width, name="patch_embed")(patchify(x, self.patch_size))
        cls = jnp.broadcast_to(emb.cls_token, (x.shape[0], 1, self.width))
        pos = jnp.concatenate([emb.pos_embed[0, :1], emb.grid_pos((grid, grid))])
        x = jnp.concatenate([cls, tokens], axis=1) + pos[None]
        x = Transformer(
            self.depth, self.num_heads, self.mlp_dim, 0.0, self.layerscale_init, name="transformer"
        )(x, True)
        return x[:, 0]
