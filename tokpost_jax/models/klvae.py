"""The LDM KL-autoencoder (MAR ``kl16``, BFL FLUX VAE, CODA's ``vae.py``) as one Linen module.

Why this layout: MAR kl16, CODA and BFL's FLUX ``ae.safetensors`` share the LDM module tree, so the
parameter tree mirrors the torch state dict one to one (``encoder.down.0.block.1.conv1.weight`` is
``encoder/down_0/block_1/conv1/kernel``; diffusers is a key rename in ``convert/klvae.py``):

    encoder/{conv_in, down_i/{block_j/{norm1,conv1,norm2,conv2,nin_shortcut}, attn_j/{norm,q,k,v,
             proj_out}, downsample/conv}, mid/{block_1,attn_1,block_2}, norm_out, conv_out}
    quant_conv, post_quant_conv                       (when enabled)
    decoder/{conv_in, mid, up_i/{block_j, attn_j, upsample/conv}, norm_out, conv_out}
                                                      (up_0 is the full resolution, as in torch)

Ops follow LDM exactly: GroupNorm (eps 1e-6, float32 two-pass statistics), SiLU, explicit torch
padding, Downsample = pad (0,1,0,1) then a 3×3 stride-2 VALID conv, Upsample = nearest ×2 then a
3×3 conv, single-head attention through 1×1 convs with scale C^-½. Attention placement follows the
build-time ``resolution``, not the input size. Every conv is a :class:`LoRAConv` whose rank comes
from its torch-style qualified name (:func:`lora_rank_for`), so CODA's adapters sit where the
official ``build_peft_from_vae`` puts them. NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokpost_jax.models.lora import LoRAConv, lora_rank_for
from tokpost_jax.models.remat import remat as remat_module
from tokpost_jax.models.vit import logical

IMAGE_CHANNELS = 3
#: The top-level parameter groups of a KL-VAE (a GAN reference parameter lies under one of them).
PARAM_GROUPS = ("encoder", "quant_conv", "post_quant_conv", "decoder")
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp
_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))


class _Ctx(nn.Module):
    """Fields every VAE sub-module needs to build its convs and norms."""

    torch_name: str
    norm_groups: int = 32
    lora_rank: int = 0
    lora_patterns: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    remat: str = "none"  # policy of the res/attn blocks (models/remat.py)

    def conv(self, local: str, features: int, kernel: int = 3, strides: int = 1,
             padding: Sequence[tuple[int, int]] = _PAD1, in_axis: str | None = None,
             out_axis: str | None = "embed") -> LoRAConv:
        qualified = f"{self.torch_name}.{local}"
        return LoRAConv(
            features, (kernel, kernel), (strides, strides), padding,
            rank=lora_rank_for(qualified, self.lora_patterns, self.lora_rank),
            in_axis=in_axis, out_axis=out_axis, dtype=self.dtype, name=local,
        )

    def norm(self, name: str) -> nn.GroupNorm:
        return nn.GroupNorm(
            num_groups=self.norm_groups, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
            scale_init=logical(nn.initializers.ones, ("embed",)),
            bias_init=logical(nn.initializers.zeros, ("embed",)), name=name,
        )

    def child(self, local: str) -> dict[str, Any]:
        """Keyword arguments for a sub-module named ``local`` (torch name extended with it)."""
        return dict(torch_name=f"{self.torch_name}.{local}", norm_groups=self.norm_groups,
                    lora_rank=self.lora_rank, lora_patterns=self.lora_patterns, dtype=self.dtype,
                    remat=self.remat)

    def blocks(self) -> tuple[type[ResnetBlock], type[AttnBlock]]:
        """The res and attention block classes under this module's remat policy."""
        return remat_module(ResnetBlock, self.remat), remat_module(AttnBlock, self.remat)


class ResnetBlock(_Ctx):
    """norm → SiLU → conv → norm → SiLU → conv, plus a 1×1 ``nin_shortcut`` when widths differ."""

    features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv("conv1", self.features)(nn.silu(self.norm("norm1")(x)))
        h = self.conv("conv2", self.features)(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = self.conv("nin_shortcut", self.features, kernel=1, padding=_PAD0)(x)
        return x + h


class AttnBlock(_Ctx):
    """Single-head spatial self-attention with 1×1-conv q/k/v/proj_out and a residual."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm("norm")(x)
        q, k, v = (self.conv(n, c, kernel=1, padding=_PAD0)(h).reshape(b, hh * ww, c)
                   for n in ("q", "k", "v"))
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * c**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hh, ww, c)
        return x + self.conv("proj_out", c, kernel=1, padding=_PAD0)(out)


class Downsample(_Ctx):
    """LDM's asymmetric downsample: zero-pad right/bottom by one, then 3×3 stride 2, VALID."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv("conv", x.shape[-1], strides=2, padding=_PAD0)(x)


class Upsample(_Ctx):
    """Nearest-neighbour ×2 (torch ``interpolate(mode='nearest')``), then a 3×3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv("conv", x.shape[-1])(x)


class Mid(_Ctx):
    """block_1 → attn_1 → block_2 at the lowest resolution."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        res, attn = self.blocks()
        x = res(features=c, name="block_1", **self.child("block_1"))(x)
        x = attn(name="attn_1", **self.child("attn_1"))(x)
        return res(features=c, name="block_2", **self.child("block_2"))(x)


class _Level(_Ctx):
    """One resolution level: res blocks (each followed by attention if enabled), then resampling."""

    features: int = 0
    num_blocks: int = 1
    attention: bool = False
    resample: str | None = None  # "downsample" | "upsample" | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch names: <level>.block.j / <level>.attn.j; Flax names: block_j / attn_j.
        res, attn = self.blocks()
        for j in range(self.num_blocks):
            x = res(features=self.features, name=f"block_{j}", **self.child(f"block.{j}"))(x)
            if self.attention:
                x = attn(name=f"attn_{j}", **self.child(f"attn.{j}"))(x)
        if self.resample == "downsample":
            x = Downsample(name="downsample", **self.child("downsample"))(x)
        elif self.resample == "upsample":
            x = Upsample(name="upsample", **self.child("upsample"))(x)
        return x


class Encoder(_Ctx):
    """Image [B,H,W,3] → moments-before-quant_conv [B,H/2^(L−1),W/2^(L−1),2z] (z without
    ``double_z``: the VQ encoders of the same layout, e.g. LlamaGen's, emit one latent)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv("conv_in", self.ch)(x)
        res, last = self.resolution, len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            h = _Level(features=self.ch * mult, num_blocks=self.num_res_blocks,
                       attention=res in self.attn_resolutions,
                       resample="downsample" if i != last else None,
                       name=f"down_{i}", **self.child(f"down.{i}"))(h)
            res = res // 2 if i != last else res
        h = Mid(name="mid", **self.child("mid"))(h)
        h = nn.silu(self.norm("norm_out")(h))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return self.conv("conv_out", out, in_axis="embed", out_axis=None)(h)


class Decoder(_Ctx):
    """Latent [B,h,w,z] → image [B,h·2^(L−1),w·2^(L−1),3]; ``up_i`` as in torch (up_0: full)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        levels = len(self.ch_mult)
        h = self.conv("conv_in", self.ch * self.ch_mult[-1])(z.astype(self.dtype))
        h = Mid(name="mid", **self.child("mid"))(h)
        res = self.resolution // 2 ** (levels - 1)
        for i in reversed(range(levels)):
            h = _Level(features=self.ch * self.ch_mult[i], num_blocks=self.num_res_blocks + 1,
                       attention=res in self.attn_resolutions,
                       resample="upsample" if i != 0 else None,
                       name=f"up_{i}", **self.child(f"up.{i}"))(h)
            res = res * 2 if i != 0 else res
        h = nn.silu(self.norm("norm_out")(h))
        return self.conv("conv_out", IMAGE_CHANNELS, in_axis="embed", out_axis=None)(h)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, e^logvar) ‖ N(0, 1)) summed per image (LDM's ``posterior.kl()``), [B]."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))


class KLVAE(nn.Module):
    """LDM KL-VAE; presets in ``config_lib.KLVAE_SIZES``, built with :func:`build_klvae`.

    Methods (call with ``apply(..., method=...)``): :meth:`encode_moments`, :meth:`decode`,
    :meth:`sample_posterior` (noise from the ``"posterior"`` rng stream), :meth:`kl` and
    :meth:`reconstruct`.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    resolution: int = 256
    enc_attn_resolutions: tuple[int, ...] = (16,)
    dec_attn_resolutions: tuple[int, ...] = ()
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    norm_groups: int = 32
    lora_rank: int = 0
    lora_patterns: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    remat: str = "none"  # the encoder's and decoder's res/attn blocks (models/remat.py)

    def setup(self) -> None:
        shared = dict(norm_groups=self.norm_groups, lora_rank=self.lora_rank,
                      lora_patterns=tuple(self.lora_patterns), dtype=self.dtype,
                      remat=self.remat)
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    z_channels=self.z_channels, resolution=self.resolution)
        self.encoder = Encoder(torch_name="encoder", attn_resolutions=tuple(
            self.enc_attn_resolutions), **arch, **shared)
        self.decoder = Decoder(torch_name="decoder", attn_resolutions=tuple(
            self.dec_attn_resolutions), **arch, **shared)
        z = self.z_channels
        if self.use_quant_conv:
            self.quant_conv = self._latent_conv("quant_conv", 2 * z)
        if self.use_post_quant_conv:
            self.post_quant_conv = self._latent_conv("post_quant_conv", z)

    def _latent_conv(self, name: str, features: int) -> LoRAConv:
        rank = lora_rank_for(name, self.lora_patterns, self.lora_rank)
        return LoRAConv(features, (1, 1), padding=_PAD0, rank=rank, out_axis=None,
                        dtype=self.dtype)

    def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B,H,W,3] → (mean, logvar), each [B,h,w,z] float32, logvar clamped."""
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = h[..., : self.z_channels], h[..., self.z_channels :]
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent [B,h,w,z] → images [B,H,W,3] float32 (not clipped)."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def sample_posterior(self, mean: jax.Array, logvar: jax.Array,
                         rng: jax.Array | None = None) -> jax.Array:
        """mean + e^(logvar/2)·ε, ε ~ N(0, 1) from ``rng`` or else the ``"posterior"`` stream."""
        key = self.make_rng("posterior") if rng is None else rng
        eps = jax.random.normal(key, mean.shape, jnp.float32)
        return mean + jnp.exp(0.5 * logvar) * eps

    def kl(self, mean: jax.Array, logvar: jax.Array) -> jax.Array:
        """LDM's per-image KL sum against N(0, 1), [B]."""
        return gaussian_kl(mean, logvar)

    def reconstruct(self, images: jax.Array) -> tuple[jax.Array, None]:
        """(clipped decode of the posterior mean, None): the evaluators' interface of a
        continuous tokenizer (no token indices)."""
        recon, _, _ = self(images)
        return jnp.clip(recon, -1.0, 1.0), None

    def __call__(self, x: jax.Array, sample: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction of ``x`` from the posterior mean (or a sample): (recon, mean, logvar)."""
        mean, logvar = self.encode_moments(x)
        z = self.sample_posterior(mean, logvar) if sample else mean
        return self.decode(z), mean, logvar


def build_klvae(cfg: Mapping[str, Any] | Any, **overrides: Any) -> KLVAE:
    """A :class:`KLVAE` from a ``config_lib.klvae(...)`` ConfigDict (lists become tuples)."""
    fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields.update(overrides)
    known = set(KLVAE.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"KLVAE config has unknown fields {unknown}; known: {sorted(known)}")
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    return KLVAE(**fields)
