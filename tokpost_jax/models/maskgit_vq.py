"""MaskGIT's VQGAN tokenizer (google-research/maskgit ``nets/vqgan_tokenizer.py``) behind the
tokenizer interface.

Why its own file: the released ``tokenizer_imagenet{256,512}_checkpoint`` is a convolutional VQ
like LlamaGen's, but little of ``models/cnn_vq.py``'s LDM blocks carries over. The layout:

    images in [0, 1] → Encoder (bias-free conv_in; per level res blocks, then a 2×2 average pool
    between levels; ``num_res_blocks`` more res blocks at the lowest level; GroupNorm + swish;
    1×1 conv → d) → plain Euclidean VQ over K × d (no quant convs, no normalisation)
    → Decoder (conv_in with bias; res blocks; per level res blocks, then nearest ×2 and a 3×3
    conv; GroupNorm + swish; conv_out) → images in [0, 1].

Differences from the LDM blocks that matter for parity: no attention anywhere; res-block convs
have no bias; the encoder downsamples by average pooling (the release's ``conv_downsample`` is
False); the decoder has ``num_res_blocks`` (not +1) blocks per level and its upsampling conv
belongs to the level it leaves; and the official ``ResBlock``'s width-changing 1×1 shortcut is
applied to the block's *output*, not its input (``x + conv1x1(x)`` after the second conv) — kept
as released, since the weights were trained with it. GroupNorm is flax's (eps 1e-6).

The interface speaks [-1, 1] like every other family: :meth:`encode_features` maps images to
MaskGIT's [0, 1] and :meth:`decode_codes` maps its output back. Tokens are the h×w grid,
row-major. NHWC throughout; presets live in ``config_lib.MASKGIT_VQ_SIZES``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokpost_jax.models.interface import TokenizerInterface
from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.lora import LoRAConv
from tokpost_jax.models.perturbation import Perturbation, perturb_from_ranks
from tokpost_jax.models.quantizer import Quantized
from tokpost_jax.models.remat import remat as remat_module
from tokpost_jax.models.vit import logical

IMAGE_CHANNELS = 3
_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))


def _conv(features: int, kernel: int, name: str, dtype: Any, use_bias: bool = True,
          in_axis: str | None = None, out_axis: str | None = "embed") -> LoRAConv:
    """A stride-1 conv with flax's "SAME" padding, written out (1 for 3×3, 0 for 1×1)."""
    return LoRAConv(features, (kernel, kernel), padding=_PAD1 if kernel == 3 else _PAD0,
                    use_bias=use_bias, in_axis=in_axis, out_axis=out_axis, dtype=dtype,
                    name=name)


def _norm(groups: int, name: str, dtype: Any) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                        scale_init=logical(nn.initializers.ones, ("embed",)),
                        bias_init=logical(nn.initializers.zeros, ("embed",)), name=name)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2×2 mean with stride 2 (the official TF-style ``dsample`` on an even-sized map)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """norm → swish → conv (no bias) → norm → swish → conv (no bias), plus the official shortcut:
    when the width changes, a bias-free 1×1 ``shortcut`` of the block's output replaces the
    identity (``h + shortcut(h)``, as released)."""

    features: int
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g, dt = self.norm_groups, self.dtype
        h = _conv(self.features, 3, "conv1", dt, use_bias=False)(
            nn.swish(_norm(g, "norm1", dt)(x)))
        h = _conv(self.features, 3, "conv2", dt, use_bias=False)(
            nn.swish(_norm(g, "norm2", dt)(h)))
        residual = x
        if x.shape[-1] != self.features:
            residual = _conv(self.features, 1, "shortcut", dt, use_bias=False)(h)
        return h + residual


class _Blocks(nn.Module):
    """``num_blocks`` res blocks at one width (``block_j``), then an optional resampling."""

    features: int
    num_blocks: int
    norm_groups: int = 32
    resample: str | None = None  # "downsample" (avg pool) | "upsample" (nearest ×2 + conv)
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = remat_module(ResBlock, self.remat)
        for j in range(self.num_blocks):
            x = block(self.features, self.norm_groups, self.dtype, name=f"block_{j}")(x)
        if self.resample == "downsample":
            x = avg_pool2(x)
        elif self.resample == "upsample":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.features, 3, "upsample_conv", self.dtype)(x)
        return x


class Encoder(nn.Module):
    """Images [B,H,W,3] in [0, 1] → features [B,H/2^(L−1),W/2^(L−1),d]."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    code_dim: int = 256
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, remat=self.remat)
        h = _conv(self.ch, 3, "conv_in", self.dtype, use_bias=False)(x)
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            h = _Blocks(self.ch * mult, self.num_res_blocks,
                        resample="downsample" if i != last else None, name=f"down_{i}", **kw)(h)
        h = _Blocks(self.ch * self.ch_mult[-1], self.num_res_blocks, name="mid", **kw)(h)
        h = nn.swish(_norm(self.norm_groups, "norm_out", self.dtype)(h))
        return _conv(self.code_dim, 1, "conv_out", self.dtype, in_axis="embed", out_axis=None)(h)


class Decoder(nn.Module):
    """Code vectors [B,h,w,d] → images [B,h·2^(L−1),w·2^(L−1),3] in [0, 1] (unclamped);
    ``up_i`` is level i (up_0 the full resolution), its ``upsample_conv`` after its blocks."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, remat=self.remat)
        top = self.ch * self.ch_mult[-1]
        h = _conv(top, 3, "conv_in", self.dtype)(z.astype(self.dtype))
        h = _Blocks(top, self.num_res_blocks, name="mid", **kw)(h)
        for i in reversed(range(len(self.ch_mult))):
            h = _Blocks(self.ch * self.ch_mult[i], self.num_res_blocks,
                        resample="upsample" if i != 0 else None, name=f"up_{i}", **kw)(h)
        h = nn.swish(_norm(self.norm_groups, "norm_out", self.dtype)(h))
        return _conv(IMAGE_CHANNELS, 3, "conv_out", self.dtype, in_axis="embed",
                     out_axis=None)(h)


def _codebook_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32
                   ) -> jax.Array:
    """The official init: variance scaling 1.0, fan-in, uniform."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")(key, shape, dtype)


class EuclideanVectorQuantizer(nn.Module):
    """Nearest code by squared Euclidean distance over a raw K × d codebook (MaskGIT's
    ``VectorQuantizer``), straight-through; losses as the project names them."""

    codebook_size: int
    code_dim: int
    commit_weight: float = 0.25

    def setup(self) -> None:
        self.codebook = self.param("codebook", logical(_codebook_init, ("codebook", "code")),
                                   (self.codebook_size, self.code_dim))

    def distances(self, z: jax.Array) -> jax.Array:
        """‖z − e_k‖² [..., K] for [..., d] features, expanded as the official code does."""
        book = self.codebook.astype(jnp.float32)
        z = z.astype(jnp.float32)
        return (jnp.sum(jnp.square(z), axis=-1, keepdims=True)
                - 2.0 * jnp.einsum("...d,kd->...k", z, book,
                                   precision=jax.lax.Precision.HIGHEST)
                + jnp.sum(jnp.square(book), axis=-1))

    def nearest(self, z: jax.Array) -> jax.Array:
        """argmin_k ‖z − e_k‖², int32 (ties go to the lower index, as ``jnp.argmin``)."""
        return jnp.argmin(self.distances(z), axis=-1).astype(jnp.int32)

    def ranks(self, z: jax.Array, k_max: int) -> jax.Array:
        """The k_max nearest codes of each [..., d] query by Euclidean distance, nearest first
        (``lax.top_k`` breaks ties to the lower index like argmin, so rank 0 is the token)."""
        if not 1 <= k_max <= self.codebook_size:
            raise ValueError(f"k_max={k_max} must be in [1, codebook size {self.codebook_size}]")
        _, idx = jax.lax.top_k(-jax.lax.stop_gradient(self.distances(z)), k_max)
        return idx.astype(jnp.int32)

    def __call__(self, z: jax.Array) -> Quantized:
        z = z.astype(jnp.float32)
        indices = self.nearest(z)
        z_q = self.lookup(indices)
        codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
        commit_loss = self.commit_weight * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
        quantized = z + jax.lax.stop_gradient(z_q - z)
        return Quantized(quantized, indices, z, {"codebook": codebook_loss, "commit": commit_loss})

    def lookup(self, indices: jax.Array) -> jax.Array:
        return jnp.take(self.codebook.astype(jnp.float32), indices, axis=0)


class MaskGITVQTokenizer(TokenizerInterface, nn.Module):
    """Encoder → Euclidean VQ → decoder; fields mirror ``config.model`` of
    ``configs/maskgit_vq.py`` (``image_size`` is ``data.image_size``, which sets the layout)."""

    image_size: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    code_dim: int = 256
    codebook_size: int = 1024
    norm_groups: int = 32  # flax GroupNorm's default, which the official model uses
    commit_weight: float = 0.25
    dtype: Any = jnp.float32
    remat: str = "none"  # the encoder's and decoder's res blocks (models/remat.py)

    def setup(self) -> None:
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the "
                             f"downsampling factor {self.downsample}")
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    norm_groups=self.norm_groups, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(code_dim=self.code_dim, **arch)
        self.decoder = Decoder(**arch)
        self.quantizer = EuclideanVectorQuantizer(self.codebook_size, self.code_dim,
                                                  self.commit_weight)

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
        """Images in [-1, 1] → continuous code-space features [B, L, d] (the VQ's input)."""
        del deterministic  # no dropout
        x = (images.astype(jnp.float32) + 1.0) * 0.5  # MaskGIT's [0, 1]
        z = self.encoder(x.astype(self.dtype)).astype(jnp.float32)
        return z.reshape(z.shape[0], -1, z.shape[-1])

    def decode_codes(self, codes: jax.Array, deterministic: bool = True) -> jax.Array:
        """Code vectors [B, L, d] (a square grid, row-major) → images in [-1, 1] (unclamped)."""
        del deterministic
        b, length, d = codes.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} tokens do not form a square grid")
        out = self.decoder(codes.reshape(b, side, side, d).astype(self.dtype))
        return out.astype(jnp.float32) * 2.0 - 1.0

    def encode(self, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] → token indices [B, L] (int32), deterministic."""
        return self.quantizer(self.encode_features(images)).indices

    def decode(self, indices: jax.Array) -> jax.Array:
        """Token indices [B, L] → images [B, H, W, 3], clamped to [-1, 1]."""
        return jnp.clip(self.decode_codes(self.quantizer.lookup(indices)), -1.0, 1.0)

    def codebook(self) -> jax.Array:
        """The raw codebook [K, d] (distances are Euclidean on it)."""
        return self.quantizer.codebook.astype(jnp.float32)

    def _perturbed(self, p: Perturbation, q: Quantized) -> jax.Array:
        """Decoder codes with tokens swapped among their Euclidean nearest codes (by the feature
        z or by the assigned code, ``p.neighbours``), straight-through to z as
        :func:`~tokpost_jax.models.perturbation.perturb_codes` does for unit codebooks (whose
        cosine ranking would be wrong for this raw codebook)."""
        if p.neighbours == "feature":
            query = q.features
        elif p.neighbours == "code":
            query = self.quantizer.lookup(q.indices)
        else:
            raise ValueError(f"neighbours must be 'feature' or 'code', got {p.neighbours!r}")
        indices, replaced = perturb_from_ranks(p, self.quantizer.ranks(query, p.delta_max))
        codes = self.quantizer.lookup(indices)
        perturbed = q.features + jax.lax.stop_gradient(codes - q.features)
        return jnp.where(replaced[..., None], perturbed, q.quantized)

    def __call__(
        self,
        images: jax.Array,
        deterministic: bool = True,
        perturbation: Perturbation | None = None,
    ) -> tuple[jax.Array, Quantized]:
        """Training forward: reconstruction (unclamped) and the quantizer outputs; a
        ``perturbation`` swaps tokens after the VQ losses are fixed (:meth:`_perturbed`)."""
        q = self.quantizer(self.encode_features(images, deterministic))
        codes = q.quantized
        if perturbation is not None:
            codes = self._perturbed(perturbation, q)
        self.sow("intermediates", "decoder_codes", codes)
        return self.decode_codes(codes, deterministic), q
