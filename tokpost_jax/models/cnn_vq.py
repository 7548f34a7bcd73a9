"""A CNN VQ tokenizer of the taming/LlamaGen layout behind the tokenizer interface.

Why: LlamaGen's released ``vq_ds16_c2i.pt`` (VQ-16) is a convolutional VQGAN, a third-party
tokenizer whose rFID / pFID the project measures next to its own. The layout:

    images → Encoder (conv_in, levels of res blocks with attention at the lowest level only,
    asymmetric-pad stride-2 downsampling, mid block/attn/block, GroupNorm + swish, conv_out → z)
    → quant_conv (1×1, z → d) → l2-normalised VQ over K × d → post_quant_conv (1×1, d → z)
    → Decoder (mirror, nearest ×2 + conv upsampling) → images.

The encoder and decoder are ``models/klvae.py``'s LDM blocks (the same ops: GroupNorm eps 1e-6,
SiLU, single-head 1×1-conv attention with scale C^-½); attention sits at the lowest-resolution
level of both, whatever the input size. The quantizer is :class:`L2VectorQuantizer`
(argmax cosine = LlamaGen's argmin of the normalised squared distance). Tokens are the h×w grid,
row-major: one square scale. NHWC throughout; presets live in ``config_lib.CNN_VQ_SIZES``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokpost_jax.models.interface import TokenizerInterface
from tokpost_jax.models.klvae import Decoder, Encoder
from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.lora import LoRAConv
from tokpost_jax.models.perturbation import Perturbation, perturb_codes
from tokpost_jax.models.quantizer import L2VectorQuantizer, Quantized

_PAD0 = ((0, 0), (0, 0))


class CNNVQTokenizer(TokenizerInterface, nn.Module):
    """Encoder → quant_conv → L2 VQ → post_quant_conv → decoder; fields mirror ``config.model``
    of ``configs/cnn_vq.py`` (``image_size`` is ``data.image_size``, which sets the layout)."""

    image_size: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    code_dim: int = 8
    norm_groups: int = 32  # LlamaGen: 32 (its Normalize is fixed)
    commit_weight: float = 0.25
    dtype: Any = jnp.float32
    remat: str = "none"  # the encoder's and decoder's res/attn blocks (models/remat.py)

    def setup(self) -> None:
        levels = len(self.ch_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} is not a multiple of the "
                             f"downsampling factor {2 ** (levels - 1)}")
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    z_channels=self.z_channels, resolution=self.image_size,
                    # the lowest level (klvae places attention by build-time resolution)
                    attn_resolutions=(self.image_size // 2 ** (levels - 1),),
                    norm_groups=self.norm_groups, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(torch_name="encoder", double_z=False, **arch)
        self.decoder = Decoder(torch_name="decoder", **arch)
        self.quant_conv = LoRAConv(self.code_dim, (1, 1), padding=_PAD0, out_axis=None,
                                   dtype=jnp.float32)
        self.post_quant_conv = LoRAConv(self.z_channels, (1, 1), padding=_PAD0, out_axis=None,
                                        dtype=self.dtype)
        self.quantizer = L2VectorQuantizer(self.codebook_size, self.code_dim, self.commit_weight)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout((self.image_size // self.downsample,))

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    # ---- the tokenizer interface ---------------------------------------------------------------
    def encode_features(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Continuous code-space features z, [B, L, d] (quant_conv output, before normalising)."""
        del deterministic  # no dropout (LlamaGen's dropout_p is 0)
        h = self.encoder(images.astype(self.dtype)).astype(jnp.float32)
        z = self.quant_conv(h)
        return z.reshape(z.shape[0], -1, z.shape[-1])

    def project_to_code(self, features: jax.Array) -> jax.Array:
        """The z → d projection (quant_conv) on [..., z] features (the semantic loss's target)."""
        shape = features.shape
        flat = features.reshape(-1, 1, 1, shape[-1]).astype(jnp.float32)
        return self.quant_conv(flat).reshape(*shape[:-1], self.code_dim)

    def decode_codes(self, codes: jax.Array, deterministic: bool = True) -> jax.Array:
        """Unit code vectors [B, L, d] (a square grid, row-major) → images (unclamped)."""
        del deterministic
        b, length, d = codes.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} tokens do not form a square grid")
        z = self.post_quant_conv(codes.reshape(b, side, side, d).astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] → token indices [B, L] (int32), deterministic."""
        return self.quantizer(self.encode_features(images)).indices

    def decode(self, indices: jax.Array) -> jax.Array:
        """Token indices [B, L] → images [B, H, W, 3], clamped to [-1, 1]."""
        return jnp.clip(self.decode_codes(self.quantizer.lookup(indices)), -1.0, 1.0)

    def codebook(self) -> jax.Array:
        """The l2-normalised codebook [K, d]."""
        return self.quantizer.normalized_codebook()

    def __call__(
        self,
        images: jax.Array,
        deterministic: bool = True,
        perturbation: Perturbation | None = None,
    ) -> tuple[jax.Array, Quantized]:
        """Training forward: reconstruction (unclamped) and the quantizer outputs; a
        ``perturbation`` swaps tokens after the VQ losses are fixed (neighbours by feature or by
        code, :func:`perturb_codes`)."""
        q = self.quantizer(self.encode_features(images, deterministic))
        codes = q.quantized
        if perturbation is not None:
            codes = perturb_codes(perturbation, q, self.codebook())
        self.sow("intermediates", "decoder_codes", codes)
        return self.decode_codes(codes, deterministic), q
