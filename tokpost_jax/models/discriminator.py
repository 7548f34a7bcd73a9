"""GAN discriminators: RobusTok's DinoDisc (frozen DINO ViT-S/16 + SN heads) and a PatchGAN.

DinoDisc (robustok.md §4; StyleGAN-T / VAR lineage)
---------------------------------------------------

``images`` (NHWC, [-1, 1]) → ImageNet normalisation → 224×224 input (with prob. 0.5 a random
224 crop when both sides exceed 224, else a resize) → frozen ViT-S/16 → 5 token maps (the
patch embedding after the position embedding, and the outputs of blocks 2, 5, 8, 11, 0-based), each
``patch tokens + cls`` → one trainable head per map → logits ``[B, 5·196]``.

Head (token-wise along the sequence axis, channels last)::

    SNConv1d(k=1) → BNLocal → LReLU(0.2)
    x + [SNConv1d(k=9, circular) → BNLocal → LReLU(0.2)], then × 1/√2
    SNConv1d(k=1) → 1 channel

Parameter tree (``variables["params"]``)::

    backbone/                      frozen DINO ViT (see load_dino_backbone for the layout)
      patch_embed/{kernel [p·p·3, D], bias}, cls_token [1,1,D], pos_embed [1,1+N,D]
      blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}   (vit.Block, timm names)
    heads/head_{t}/                trainable, t = 0..len(taps)
      conv_in/{kernel [1,D,D], bias}, norm_in/{scale, bias},
      res_conv/{kernel [9,D,D], bias}, res_norm/{scale, bias}, logits/{kernel [1,D,1], bias}

Mutable state (``variables["spectral"]``, same sub-paths as the convs): ``u`` [out] and ``v``
[in·k], the spectral-norm power-iteration vectors (torch ``weight_u`` / ``weight_v``).

Freezing the backbone (what the trainer must do)
------------------------------------------------

* With ``freeze_backbone=True`` (default) the module reads the backbone parameters through
  ``stop_gradient`` (``nn.map_variables``), so gradients w.r.t. ``params["backbone"]`` are exact
  zeros and XLA never computes them. Gradients w.r.t. the *input images* still flow through the
  backbone (the generator step needs them).
* The optimizer must additionally leave the backbone untouched (AdamW's weight decay would
  otherwise shrink it): use :func:`param_labels` with ``optax.multi_transform({"trainable": adamw,
  "frozen": optax.set_to_zero()}, param_labels(params))``, or optimise only ``params["heads"]``
  (:func:`split_params` / :func:`merge_params`). Only the top-level ``backbone`` subtree is
  frozen; :class:`PatchDiscriminator` has none, so the same code path trains all of it.
* Weight decay: head names avoid the fragments of ``train.optim.NO_DECAY_NAMES`` (only the 1-D
  ``norm_in``/``res_norm`` match), so ``weight_decay_mask`` decays every head kernel; pass a mask
  of your own to also decay biases / BN affines as a plain torch ``AdamW(disc.parameters())``
  would.
* Pretrained weights: ``params["backbone"] = load_dino_backbone(path)`` (plain arrays, matching the
  unboxed layout). Without a file the backbone stays randomly initialised; the trainer should log
  :func:`random_backbone_notice`.

Training mode, state and RNG
----------------------------

``apply(variables, images, train=True, key=key, mutable=["spectral"])`` runs one power iteration
per spectral-norm conv and returns the updated ``u``/``v``; with ``train=False`` the stored vectors
are used as they are (torch eval semantics) and nothing needs to be mutable. Torch updates the
vectors on *every* train-mode forward (real and fake of the D step and the G step); to mimic it,
thread the returned state through each call. BN-local always uses the statistics of the current
batch (it has no running statistics and ignores ``train``, like the reference). ``key`` drives the
random crop (one coin and one offset for the whole batch, as torch's ``random.random()`` and
``RandomCrop``); ``key=None`` always resizes.

BN-local groups: ``G = ceil(B / 8)`` groups of ``B / G`` consecutive samples (the reference's
``view(G, -1, ...)``; B must be divisible by G). Under ``jit`` with a batch-sharded input, ``B`` is
the global batch, so keep the per-device batch a multiple of 8 for the groups to match the
reference's per-GPU groups, and do not mix real and fake samples in one group (call the
discriminator on each, or concatenate two multiples of 8).

Resize: torch's ``F.interpolate(mode='area')`` (downscaling) and ``mode='bicubic'`` (upscaling,
``align_corners=False``, a = −0.75) are reproduced exactly as separable resampling matrices
instead of ``jax.image.resize`` (whose antialiased linear/cubic kernels differ from torch's
adaptive average pooling); see :func:`tokpost_jax.models.resize.torch_resize_matrix`.

Known deviation: ``vit.Block`` uses the exact GELU (DINO's own training activation); the reference
``SABlockNoDrop`` uses the tanh approximation, a difference of < 1e-3 per activation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.resize import resize_like_torch
from tokpost_jax.models.vit import Block, logical, patchify

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchNormLocal",
    "DinoBackbone",
    "DinoDiscriminator",
    "DinoHead",
    "PatchDiscriminator",
    "SpectralConv",
    "count_params",
    "merge_params",
    "param_labels",
    "random_backbone_notice",
    "split_params",
    "trainable_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE = "backbone"
HEADS = "heads"
SPECTRAL = "spectral"

# ------------------------------------------------------------------------------------------------
# Building blocks


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """torch ``F.normalize``: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _torch_uniform(bound: float) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SpectralConv(nn.Module):
    """N-d convolution (channels last) with torch's ``spectral_norm`` (1 power iteration, dim 0).

    ``kernel`` is ``[*kernel_size, in, out]``. The power iteration runs on the torch-layout
    matrix ``W = kernel → [out, in·prod(k)]``; ``u`` [out] and ``v`` [in·prod(k)] live in the
    ``"spectral"`` collection. ``update_stats=True`` (training): ``v ← normalize(Wᵀu)``,
    ``u ← normalize(Wv)`` with W detached, stored unless initialising; ``σ = uᵀ W v`` (gradient
    through W only) and the kernel is divided by σ. ``update_stats=False``: σ from the stored
    u, v. Init is torch's default conv init (uniform ±1/√fan_in for kernel and bias).
    ``padding`` is ``"VALID"``/``"SAME"`` or explicit pairs; ``circular=True`` wraps
    ``kernel_size // 2`` on each side of every spatial axis first.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "VALID"
    circular: bool = False
    spectral_norm: bool = True
    eps: float = 1e-12
    kernel_axes: Sequence[str | None] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        ksize = tuple(self.kernel_size)
        nd = len(ksize)
        in_ch = x.shape[-1]
        fan_in = in_ch * math.prod(ksize)
        bound = 1.0 / math.sqrt(fan_in)
        axes = tuple(self.kernel_axes) if self.kernel_axes is not None else (None,) * (nd + 2)
        kernel = self.param(
            "kernel", logical(_torch_uniform(bound), axes), (*ksize, in_ch, self.features)
        )
        bias = self.param("bias", logical(_torch_uniform(bound), (None,)), (self.features,))

        if self.spectral_norm:
            kernel = kernel / self._sigma(kernel, update_stats)

        if self.circular:
            pads = [(0, 0)] + [(k // 2, k // 2) for k in ksize] + [(0, 0)]
            x = jnp.pad(x, pads, mode="wrap")
        spatial = "DHW"[-nd:] if nd <= 3 else None
        if spatial is None:
            raise ValueError("SpectralConv supports 1 to 3 spatial dimensions")
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=tuple(self.strides) if self.strides is not None else (1,) * nd,
            padding=self.padding if isinstance(self.padding, str) else tuple(self.padding),
            dimension_numbers=dn,
        )
        return y + bias.astype(self.dtype)

    def _sigma(self, kernel: jax.Array, update_stats: bool) -> jax.Array:
        nd = kernel.ndim - 2
        # torch weight [out, in, *k] flattened to [out, in·prod(k)]
        w = jnp.transpose(kernel, (nd + 1, nd, *range(nd))).reshape(self.features, -1)
        w = w.astype(jnp.float32)
        u_var = self.variable(
            SPECTRAL, "u",
            lambda: _l2_normalize(jax.random.normal(self.make_rng("params"), (w.shape[0],)),
                                  self.eps))
        v_var = self.variable(
            SPECTRAL, "v",
            lambda: _l2_normalize(jax.random.normal(self.make_rng("params"), (w.shape[1],)),
                                  self.eps))
        u, v = u_var.value, v_var.value
        if update_stats:
            w_const = jax.lax.stop_gradient(w)
            v = _l2_normalize(w_const.T @ u, self.eps)
            u = _l2_normalize(w_const @ v, self.eps)
            if not self.is_initializing():
                u_var.value, v_var.value = u, v
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        return jnp.dot(u, w @ v)


class BatchNormLocal(nn.Module):
    """BatchNorm over "virtual batches": statistics per group of ``virtual_batch`` samples.

    Input ``[B, L, C]``; ``G = ceil(B / virtual_batch)`` groups of ``B / G`` consecutive samples;
    per group and channel the mean / biased variance over (samples, length); then the affine
    ``scale``/``bias``. Always uses the current batch (no running statistics). Computed in float32.
    """

    virtual_batch: int = 8
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, c = x.shape
        groups = -(-b // self.virtual_batch)
        if b % groups:
            raise ValueError(
                f"BatchNormLocal: batch {b} does not split into {groups} equal groups "
                f"(ceil({b}/{self.virtual_batch})); use a batch divisible by {groups}")
        scale = self.param("scale", logical(nn.initializers.ones, (None,)), (c,))
        bias = self.param("bias", logical(nn.initializers.zeros, (None,)), (c,))
        xg = x.astype(jnp.float32).reshape(groups, b // groups, length, c)
        mean = xg.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, length, c)
        return y * scale + bias


class DinoHead(nn.Module):
    """One DinoDisc head on a token map ``[B, L, D]`` → logits ``[B, L]`` (module docstring)."""

    kernel_size: int = 9
    virtual_batch: int = 8
    norm_eps: float = 1e-6
    spectral_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        width = x.shape[-1]

        def conv(features: int, k: int, name: str) -> SpectralConv:
            return SpectralConv(
                features, (k,), circular=True, spectral_norm=self.spectral_norm,
                kernel_axes=(None, "embed", None), dtype=self.dtype, name=name)

        h = conv(width, 1, "conv_in")(x, update_stats)
        h = BatchNormLocal(self.virtual_batch, self.norm_eps, name="norm_in")(h)
        h = nn.leaky_relu(h, 0.2)
        r = conv(width, self.kernel_size, "res_conv")(h, update_stats)
        r = BatchNormLocal(self.virtual_batch, self.norm_eps, name="res_norm")(r)
        r = nn.leaky_relu(r, 0.2)
        h = (r + h) * (1.0 / math.sqrt(2.0))
        out = conv(1, 1, "logits")(h, update_stats)
        return out[..., 0].astype(jnp.float32)


class DinoHeads(nn.Module):
    """``num_maps`` independent heads; logits concatenated map after map → ``[B, num_maps·L]``."""

    num_maps: int
    kernel_size: int = 9
    virtual_batch: int = 8
    norm_eps: float = 1e-6
    spectral_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array], update_stats: bool = False) -> jax.Array:
        if len(maps) != self.num_maps:
            raise ValueError(f"expected {self.num_maps} token maps, got {len(maps)}")
        logits = [
            DinoHead(self.kernel_size, self.virtual_batch, self.norm_eps, self.spectral_norm,
                     self.dtype, name=f"head_{t}")(m, update_stats)
            for t, m in enumerate(maps)
        ]
        return jnp.concatenate([lg.reshape(lg.shape[0], -1) for lg in logits], axis=1)


class DinoBackbone(nn.Module):
    """DINO ViT (timm layout, no dropout) returning the tapped token maps ``patch + cls``.

    Input: ImageNet-normalised NHWC images of ``image_size``. Output: ``1 + len(taps)`` arrays
    ``[B, (image_size/patch)², width]``: the embedding after the position embedding, then the
    output of each block in ``taps`` (0-based). Only blocks ``0..max(taps)`` are built; the final
    LayerNorm is never used by DinoDisc and is not built.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    num_heads: int = 6
    mlp_dim: int = 1536
    taps: Sequence[int] = (2, 5, 8, 11)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        b, h, w, _ = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"backbone input must be {self.image_size}², got {h}×{w}")
        grid = self.image_size // self.patch_size
        tokens = nn.Dense(
            self.width,
            kernel_init=logical(nn.initializers.lecun_normal(), ("patch", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(patchify(x.astype(jnp.float32), self.patch_size))
        cls = self.param("cls_token", logical(nn.initializers.normal(1e-6), (None, None, "embed")),
                         (1, 1, self.width))
        pos = self.param("pos_embed",
                         logical(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
                         (1, 1 + grid * grid, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), tokens], axis=1) + pos

        def readout(t: jax.Array) -> jax.Array:
            return (t[:, 1:].astype(jnp.float32) + t[:, :1].astype(jnp.float32))

        maps = [readout(x)]
        x = x.astype(self.dtype)
        taps = set(self.taps)
        for i in range(max(self.taps) + 1):
            x = Block(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"blocks_{i}")(x)
            if i in taps:
                maps.append(readout(x))
        return maps


def _stop_gradient_tree(tree: Any) -> Any:
    return jax.tree.map(jax.lax.stop_gradient, tree)


class DinoDiscriminator(nn.Module):
    """RobusTok's DinoDisc: frozen DINO ViT-S/16 + one spectral-norm head per token map.

    ``__call__(images, train=False, key=None) -> [B, (1 + len(taps))·(image_size/patch)²]``.
    Defaults are the reference (ViT-S/16 at 224, taps 2/5/8/11, head kernel 9, BN groups of 8,
    eps 1e-6). Small configurations (e.g. width 32, 32 px, patch 8) work for tests.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    num_heads: int = 6
    mlp_dim: int = 1536
    taps: Sequence[int] = (2, 5, 8, 11)
    head_kernel_size: int = 9
    virtual_batch: int = 8
    norm_eps: float = 1e-6
    spectral_norm: bool = True
    freeze_backbone: bool = True
    crop_prob: float = 0.5
    dtype: Any = jnp.float32

    @property
    def num_blocks(self) -> int:
        """Blocks the backbone runs (``max(taps) + 1``); pass as ``depth`` to the converter."""
        return max(self.taps) + 1

    @property
    def num_maps(self) -> int:
        return 1 + len(self.taps)

    def preprocess(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
        """[-1, 1] NHWC → ImageNet-normalised ``image_size``² (random crop with prob. 0.5, else
        resize: torch 'area' when downscaling, 'bicubic' otherwise; decided by the height)."""
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        x = images.astype(jnp.float32) * jnp.asarray(0.5 / std, jnp.float32) + jnp.asarray(
            (0.5 - mean) / std, jnp.float32)
        b, h, w, c = x.shape
        size = self.image_size
        resized = resize_like_torch(x, (size, size), "area" if h > size else "bicubic")
        if key is None or not (h > size and w > size):
            return resized
        k_coin, k_i, k_j = jax.random.split(key, 3)
        i = jax.random.randint(k_i, (), 0, h - size + 1)
        j = jax.random.randint(k_j, (), 0, w - size + 1)
        cropped = jax.lax.dynamic_slice(x, (0, i, j, 0), (b, size, size, c))
        coin = jax.random.uniform(k_coin, ()) < self.crop_prob
        return jnp.where(coin, cropped, resized)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 key: jax.Array | None = None) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
        if min(self.taps) < 0:
            raise ValueError(f"taps must be 0-based block indices, got {tuple(self.taps)}")
        backbone_cls = DinoBackbone
        if self.freeze_backbone:
            backbone_cls = nn.map_variables(
                DinoBackbone, "params", trans_in_fn=_stop_gradient_tree, init=True,
                variables=False)
        maps = backbone_cls(
            self.image_size, self.patch_size, self.width, self.num_heads, self.mlp_dim,
            tuple(self.taps), self.dtype, name=BACKBONE,
        )(self.preprocess(images, key))
        return DinoHeads(
            self.num_maps, self.head_kernel_size, self.virtual_batch, self.norm_eps,
            self.spectral_norm, self.dtype, name=HEADS,
        )(maps, update_stats=train)


class PatchDiscriminator(nn.Module):
    """Small PatchGAN for tiny CPU configurations: NHWC [-1, 1] → logits ``[B, N]``.

    ``num_layers`` × [SNConv 4×4 stride 2 (pad 1) → GroupNorm (not on the first) → LReLU(0.2)],
    channels ``channels·2^i`` capped at ``8·channels``, then SNConv 3×3 stride 1 (pad 1) → 1
    channel; N = (H / 2^num_layers)·(W / 2^num_layers). Same call signature and state handling as
    :class:`DinoDiscriminator` (``key`` is unused; ``"spectral"`` is the mutable collection when
    ``spectral_norm``); it has no frozen part.
    """

    channels: int = 64
    num_layers: int = 2
    groups: int = 8
    spectral_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 key: jax.Array | None = None) -> jax.Array:
        del key
        if images.ndim != 4:
            raise ValueError(f"expected NHWC images, got shape {images.shape}")
        x = images.astype(jnp.float32)
        for i in range(self.num_layers):
            ch = self.channels * min(2**i, 8)
            x = SpectralConv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                             spectral_norm=self.spectral_norm, dtype=self.dtype,
                             name=f"conv_{i}")(x, train)
            if i > 0:
                x = nn.GroupNorm(num_groups=math.gcd(self.groups, ch), epsilon=1e-5,
                                 dtype=jnp.float32, name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        x = SpectralConv(1, (3, 3), padding=((1, 1), (1, 1)), spectral_norm=self.spectral_norm,
                         dtype=self.dtype, name="logits")(x, train)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Parameter bookkeeping for the trainer


def trainable_mask(params: Mapping[str, Any]) -> Any:
    """Pytree of bools like ``params``: False under the top-level ``backbone`` subtree."""
    return {k: jax.tree.map(lambda _, t=(k != BACKBONE): t, v,
                            is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
            for k, v in params.items()}


def param_labels(params: Mapping[str, Any]) -> Any:
    """``"frozen"`` / ``"trainable"`` labels for ``optax.multi_transform``."""
    return jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params))


def split_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(frozen, trainable): ``({"backbone": ...}, everything else)``; frozen is ``{}`` if absent."""
    frozen = {k: v for k, v in params.items() if k == BACKBONE}
    trainable = {k: v for k, v in params.items() if k != BACKBONE}
    return frozen, trainable


def merge_params(frozen: Mapping[str, Any], trainable: Mapping[str, Any]) -> dict:
    """Inverse of :func:`split_params`."""
    return {**dict(trainable), **dict(frozen)}


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly boxed or abstract) parameter tree."""
    leaves = jax.tree.leaves(tree)
    return int(sum(math.prod(getattr(x, "shape", ())) for x in leaves))


def random_backbone_notice() -> str:
    """Line for the trainer to log when no DINO weights file is configured."""
    return ("DinoDiscriminator: no DINO ViT-S/16 weights given (e.g. "
            "dino_deitsmall16_pretrain.pth); the frozen backbone is RANDOMLY initialised, so "
            "its features are not DINO's and the GAN signal will differ from RobusTok's. "
            "Set the discriminator weights path to fix.")
