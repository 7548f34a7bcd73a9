"""RobusTok's ViT VQ tokenizer (robustok.md §2): latent-token encoder → L2 VQ → mask-token decoder.

Encoder input: [cls, patches] + pos  ++  latent tokens + the same 2-D pos, with a level embedding
(0 for image tokens, 1 for latents); its output is the last ``num_latent_tokens`` positions.
Decoder input: [cls, mask tokens] + pos  ++  [cls, projected codes] + pos, level 0/1; the mask-token
positions are read out and linearly mapped to pixel patches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.interface import TokenizerInterface
from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.perturbation import Perturbation, perturb_codes
from tokpost_jax.models.quantizer import L2VectorQuantizer, Quantized
from tokpost_jax.models.vit import (
    DENSE_INIT,
    TokenEmbeddings,
    Transformer,
    constrain,
    logical,
    patchify,
    unpatchify,
)


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = round(np.sqrt(num_tokens))
    if side * side != num_tokens:
        raise ValueError(f"num_latent_tokens={num_tokens} must be a square number")
    return side, side


class _LatentViT(nn.Module):
    """Sizes shared by the encoder and the decoder, and their transformer."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_latent_tokens: int
    drop_path: float = 0.0
    layerscale_init: float | None = None
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # models/remat.py policy of the transformer blocks

    def transformer(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.drop_path,
            self.layerscale_init,
            dtype=self.dtype,
            remat=self.remat,
            name="transformer",
        )(x, deterministic)


class ViTEncoder(_LatentViT):
    """Patches plus learnable latent tokens through one bidirectional ViT; returns the latents."""

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        batch = images.shape[0]
        grid = self.image_size // self.patch_size
        emb = TokenEmbeddings(self.width, grid * grid, name="embeddings")
        patches = nn.Dense(
            self.width,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), ("patch", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(patchify(images.astype(self.dtype), self.patch_size))
        cls = jnp.broadcast_to(emb.cls_token, (batch, 1, self.width)).astype(self.dtype)
        image_tokens = jnp.concatenate([cls, patches], axis=1) + emb.pos_embed.astype(self.dtype)

        latent_grid = _square_grid(self.num_latent_tokens)
        latent_tokens = self.param(
            "latent_tokens",
            logical(nn.initializers.normal(1e-6), ("latent", "embed")),
            (self.num_latent_tokens, self.width),
        )
        latents = latent_tokens + emb.grid_pos(latent_grid)
        latents = jnp.broadcast_to(latents[None], (batch, *latents.shape)).astype(self.dtype)

        x = jnp.concatenate(
            [
                image_tokens + emb.level_embed[0].astype(self.dtype),
                latents + emb.level_embed[1].astype(self.dtype),
            ],
            axis=1,
        )
        x = self.transformer(x, deterministic)
        return x[:, -self.num_latent_tokens :]


class ViTDecoder(_LatentViT):
    """Mask tokens attend to the projected codes; their outputs become pixel patches."""

    @nn.compact
    def __call__(self, latents: jax.Array, deterministic: bool = True) -> jax.Array:
        batch = latents.shape[0]
        grid = self.image_size // self.patch_size
        num_patches = grid * grid
        emb = TokenEmbeddings(self.width, num_patches, name="embeddings")
        mask_token = self.param(
            "mask_token",
            logical(nn.initializers.normal(1e-6), (None, None, "embed")),
            (1, 1, self.width),
        )
        cls = jnp.broadcast_to(emb.cls_token, (batch, 1, self.width)).astype(self.dtype)
        masks = jnp.broadcast_to(mask_token, (batch, num_patches, self.width)).astype(self.dtype)
        image_part = jnp.concatenate([cls, masks], axis=1) + emb.pos_embed.astype(self.dtype)

        latent_pos = jnp.concatenate(
            [emb.pos_embed[0, :1], emb.grid_pos(_square_grid(self.num_latent_tokens))], axis=0
        )
        latent_part = jnp.concatenate([cls, latents.astype(self.dtype)], axis=1)
        latent_part = latent_part + latent_pos[None].astype(self.dtype)

        x = jnp.concatenate(
            [
                image_part + emb.level_embed[0].astype(self.dtype),
                latent_part + emb.level_embed[1].astype(self.dtype),
            ],
            axis=1,
        )
        x = self.transformer(x, deterministic)
        features = x[:, 1 : 1 + num_patches].astype(jnp.float32)
        # The adaptive GAN weight needs d(loss)/d(to_pixel kernel) = featuresᵀ · d(loss)/d(pixels).
        self.sow("intermediates", "to_pixel_input", features)
        pixels = nn.Dense(
            self.patch_size * self.patch_size * 3,
            dtype=jnp.float32,
            kernel_init=logical(DENSE_INIT, ("embed", "patch")),
            bias_init=logical(nn.initializers.zeros, ("patch",)),
            name="to_pixel",
        )(features)
        return unpatchify(pixels, self.patch_size, (grid, grid))


class Tokenizer(TokenizerInterface, nn.Module):
    """Encoder → quant projection (width→d) → L2 VQ → post-quant projection (d→width) → decoder.

    Attributes mirror ``config.model`` (see ``configs/tokenizer.py``); ``encoder`` and ``decoder``
    are dicts of ViT sizes (width, depth, num_heads, mlp_dim, drop_path, layerscale_init).

    The tokenizer interface (:mod:`tokpost_jax.models.interface`); apply its methods with
    ``method=``. The ViT tokenizer's layout is one square scale.
    """

    image_size: int
    patch_size: int
    num_latent_tokens: int
    codebook_size: int
    code_dim: int
    encoder: dict
    decoder: dict
    commit_weight: float = 0.25
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # both ViTs' blocks (models/remat.py); the parameters are unchanged

    def setup(self) -> None:
        common = dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_latent_tokens=self.num_latent_tokens,
            dtype=self.dtype,
            remat=self.remat,
        )
        self.vit_encoder = ViTEncoder(**common, **self.encoder)
        self.quant_conv = nn.Dense(
            self.code_dim,
            kernel_init=logical(DENSE_INIT, ("embed", "code")),
            bias_init=logical(nn.initializers.zeros, ("code",)),
        )
        self.quantizer = L2VectorQuantizer(self.codebook_size, self.code_dim, self.commit_weight)
        self.post_quant_conv = nn.Dense(
            self.decoder["width"],
            kernel_init=logical(DENSE_INIT, ("code", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
        )
        self.vit_decoder = ViTDecoder(**common, **self.decoder)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.single(self.num_latent_tokens)

    @property
    def latent_grid(self) -> tuple[int, int]:
        return _square_grid(self.num_latent_tokens)

    def encode_features(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Continuous code-space features z, [B, L, d] (before normalisation)."""
        latents = self.vit_encoder(images, deterministic)
        return self.quant_conv(latents.astype(jnp.float32))

    def project_to_code(self, features: jax.Array) -> jax.Array:
        """The shared width→d projection, also applied to teacher features by the semantic loss."""
        return self.quant_conv(features)

    def decode_codes(self, codes: jax.Array, deterministic: bool = True) -> jax.Array:
        """Unit code vectors [B, L, d] → images [B, H, W, 3] (unclamped)."""
        return self.vit_decoder(self.post_quant_conv(codes), deterministic)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] → token indices [B, L] (int32), deterministic."""
        return self.quantizer(self.encode_features(images, True)).indices

    def decode(self, indices: jax.Array) -> jax.Array:
        """Token indices [B, L] → images [B, H, W, 3], clamped to [-1, 1]."""
        return jnp.clip(self.decode_codes(self.quantizer.lookup(indices), True), -1.0, 1.0)

    def codebook(self) -> jax.Array:
        """The l2-normalised codebook [K, d]."""
        return self.quantizer.normalized_codebook()

    def __call__(
        self,
        images: jax.Array,
        deterministic: bool = True,
        perturbation: Perturbation | None = None,
    ) -> tuple[jax.Array, Quantized]:
        """Training forward: reconstruction (unclamped) and the quantizer outputs.

        ``perturbation`` swaps tokens after the quantizer's losses are fixed, so it never changes
        the VQ/commit losses (robustok.md §4).
        """
        q = self.quantizer(self.encode_features(images, deterministic))
        codes = q.quantized
        if perturbation is not None:
            codes = perturb_codes(perturbation, q, self.codebook())
        self.sow("intermediates", "decoder_codes", codes)  # the semantic loss's student
        return self.decode_codes(codes, deterministic), q
