"""A class-conditional latent diffusion transformer (DiT / SiT style) and its flow-matching loss.

Why: the SDEdit variant of decoder post-training (robustok.md §9.4) needs a generator on a
continuous tokenizer's latents. This is that generator: a KL-VAE latent [B, h, w, C] is cut into
p×p patches (a linear patch embedding, as DiT's stride-p conv), fixed 2-D sin-cos positions are
added (DiT / SiT: a function of the grid, so any latent size works and they are not
parameters), and the RAR generator's adaLN-Zero :class:`~tokpost_jax.models.generator.Block` runs
with bidirectional attention (``causal=False``). The condition is one vector per image: an MLP of
a sinusoidal timestep embedding plus a class embedding whose extra row ``num_classes``
(:func:`~tokpost_jax.models.generator.null_class_id`) is the dropped label of classifier-free
guidance. A zero-initialised adaLN final layer and linear head give the velocity, unpatchified
back to [B, h, w, C] (float32).

Convention (rectified flow, as SiT's linear interpolant): t = 0 is data, t = 1 is noise,
``x_t = (1 − t)·x0 + t·ε``, and the network predicts the velocity ``dx_t/dt = ε − x0``. Velocity
prediction is chosen over ε- or v-prediction because its target is bounded at both ends (ε-
prediction is ill-posed at t → 0, x0-prediction at t → 1) and because the sampler is then a
plain ODE in t (``tokpost_jax/sampling_ode.py``), which SDEdit enters at any t0 with a given
latent.

Differences from DiT's blocks, inherited from the reused RAR block: per-head QK-LayerNorm, affine
pre-norms, exact GELU and std-0.02 truncated-normal initialisation (DiT: xavier-uniform). They
add ~0.2% parameters at SiT-B size and change nothing in the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax.models.generator import (
    ACT,
    INIT,
    Block,
    FinalLayer,
    _dense,
    drop_labels,
    null_class_id,
)
from tokpost_jax.models.remat import remat as remat_module
from tokpost_jax.models.vit import constrain, logical

TIME_SAMPLINGS = ("uniform", "logit_normal")

#: ``apply(params, x_t [B,h,w,C], t [B], labels [B]) -> velocity [B,h,w,C]``.
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """[B] times → [B, dim] ``[cos(t·f_i), sin(t·f_i)]`` with f_i = max_period^(−i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim {dim} must be even")
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """[grid_h·grid_w, dim] fixed positions: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = pos[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([one_d(rows.reshape(-1)), one_d(cols.reshape(-1))], axis=1)
    return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[B, h, w, C] → [B, (h/p)(w/p), p·p·C], patches in raster order."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"latent {h}×{w} is not divisible by patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """Inverse of :func:`patchify`: [B, N, p·p·C] → [B, h, w, C]."""
    b, _, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class LatentDiT(nn.Module):
    """Velocity field v(x_t, t, y) on [B, h, w, C] latents (channels inferred from the input).

    ``time_scale`` multiplies t ∈ [0, 1] before the sinusoidal embedding, so its frequencies
    resolve the unit interval as DiT's integer timesteps 0…999 do. Labels are class indices in
    ``[0, num_classes]``; ``num_classes`` is the null (unconditional) class.
    """

    num_classes: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    freq_dim: int = 256
    time_scale: float = 1000.0
    dtype: Any = jnp.float32
    remat: str = "none"  # the blocks' policy (models/remat.py); the parameters are unchanged

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by {self.num_heads} heads")
        if x.ndim != 4:
            raise ValueError(f"expected a [B, h, w, C] latent, got shape {x.shape}")
        batch, h, w, _ = x.shape
        p = self.patch_size
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        tokens = patchify(x.astype(self.dtype), p)
        out_dim = tokens.shape[-1]
        pos = jnp.asarray(sincos_2d(h // p, w // p, self.width), self.dtype)
        hidden = _dense(self.width, ("patch", "embed"), self.dtype, "patch_embed")(tokens) + pos
        hidden = constrain(hidden, ACT)

        temb = timestep_embedding(t * self.time_scale, self.freq_dim).astype(self.dtype)
        temb = _dense(self.width, (None, "mlp"), self.dtype, "t_embed_1")(temb)
        temb = _dense(self.width, ("mlp", "embed"), self.dtype, "t_embed_2")(nn.silu(temb))
        table = self.param(
            "class_embed", logical(INIT, ("vocab", "embed")), (self.num_classes + 1, self.width)
        )
        cond = (temb + table[labels].astype(self.dtype))[:, None]  # [B, 1, W]: one per image

        # (self, x, c, deterministic, ...): the flag is static under remat.
        block = remat_module(Block, self.remat, static_argnums=(3,))
        for i in range(self.depth):
            hidden, _ = block(
                self.num_heads, self.mlp_dim, 0.0, 0.0, self.dtype, causal=False,
                name=f"blocks_{i}",
            )(hidden, cond, True)
        hidden = FinalLayer(self.dtype, name="final_layer")(hidden, cond)
        out = _dense(out_dim, ("embed", "patch"), self.dtype, "head", zero=True)(hidden)
        out = constrain(out.astype(jnp.float32), ("act_batch", "act_length", None))
        return unpatchify(out, p, h, w)


def to_model_space(z: jax.Array, scale: float, shift: float) -> jax.Array:
    """A VAE latent in the flow model's units, ``(z − shift)·scale`` (LDM's scale_factor): the
    model sees roughly unit-variance latents whatever the VAE's own scale."""
    return (jnp.asarray(z, jnp.float32) - shift) * scale


def to_vae_space(x: jax.Array, scale: float, shift: float) -> jax.Array:
    """Inverse of :func:`to_model_space`: a model-space latent as the VAE decoder's input."""
    return jnp.asarray(x, jnp.float32) / scale + shift


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 − t)·x0 + t·ε`` with per-sample t [B] (t = 0: data, t = 1: noise)."""
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * noise


def sample_times(
    rng: jax.Array, batch: int, schedule: str, logit_mean: float = 0.0, logit_std: float = 1.0
) -> jax.Array:
    """[batch] training times: ``uniform`` on [0, 1), or ``logit_normal`` (SD3):
    t = sigmoid(m + s·n), n ~ N(0, 1), which spends more samples in the middle of the path."""
    if schedule == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if schedule == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    raise ValueError(f"time sampling {schedule!r}; use one of {TIME_SAMPLINGS}")


def flow_matching_loss(
    model_apply: ApplyFn,
    params: Any,
    x0_latent: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    label_dropout: float = 0.0,
    num_classes: int | None = None,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rectified-flow loss ``mean ‖v_θ(x_t, t, y) − (ε − x0)‖²`` over batch and latent elements.

    ``rng`` draws t (unless ``t`` is given), ε (unless ``noise`` is given) and the label dropout
    (``label_dropout`` > 0 replaces labels by the null class ``num_classes`` for CFG training).
    Returns the loss and ``{"per_sample": [B] MSE, "t": [B]}`` for logging (e.g. loss per t-bin).
    """
    batch = x0_latent.shape[0]
    x0 = x0_latent.astype(jnp.float32)
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    if t is None:
        t = sample_times(k_t, batch, time_sampling, logit_mean, logit_std)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    if noise is None:
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if label_dropout > 0:
        if num_classes is None:
            raise ValueError("label_dropout needs num_classes (the null class id)")
        labels = drop_labels(k_drop, labels, label_dropout, null_class_id(num_classes))
    pred = model_apply(params, interpolate(x0, noise, t), t, labels)
    err = jnp.square(pred.astype(jnp.float32) - (noise - x0))
    per_sample = err.reshape(batch, -1).mean(axis=-1)
    return per_sample.mean(), {"per_sample": per_sample, "t": t}
