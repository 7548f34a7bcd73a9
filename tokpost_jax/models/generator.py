"""RAR: a class-conditional autoregressive transformer over tokenizer indices (robustok.md §8).

Sequence = [cls, class token, t_1 … t_N] under a causal mask; the output at the class slot predicts
the first token and the last output is dropped. Training permutes the image tokens (and their
position embeddings) by a per-sample order; a second, "target-aware" position embedding tells each
slot which position it must predict next, so one network learns every order and samples in raster
order. Conditioning is adaLN-Zero with a per-slot condition = class embedding + step embedding.

Decoding is pure: :func:`init_cache` preallocates per-layer keys/values for all N + 2 slots,
:func:`prefill` writes the [cls, class] prefix and :func:`decode_step` writes one slot with
``lax.dynamic_update_slice``, so a sampler can run them inside ``lax.fori_loop``.

Class labels are class indices in ``[0, num_classes)``; ``null_class_id(num_classes)`` (==
``num_classes``) is the dropped / unconditional label. The model adds ``K + 1`` to reach the row of
the shared embedding table, so the null row is ``K + 1 + num_classes`` as in RAR.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokpost_jax.models.dropout import Dropout
from tokpost_jax.models.remat import remat as remat_module
from tokpost_jax.models.vit import constrain, logical

# RAR initialises every Linear / Embedding with a std-0.02 truncated normal (PyTorch truncates at
# ±2 absolute, i.e. not at all; flax's truncates at ±2σ and rescales to std 0.02).
INIT = nn.initializers.truncated_normal(0.02)
ZEROS = nn.initializers.zeros
LN_EPS = 1e-6
PREFIX = 2  # cls slot + class slot; image token j sits at slot j + 2

ACT = ("act_batch", "act_length", "act_embed")


class KVCache(NamedTuple):
    """Static-size decoding state: per-layer keys/values for all N + 2 slots, and the class row."""

    keys: tuple[jax.Array, ...]  # depth × [B, heads, N + 2, head_dim] (head-major)
    values: tuple[jax.Array, ...]
    cond: jax.Array  # [B, width] class-token embedding (the condition minus the step embedding)


def null_class_id(num_classes: int) -> int:
    """The label meaning "no class" (CFG's unconditional branch, label dropout)."""
    return num_classes


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_id: int) -> jax.Array:
    """Replaces each label by ``null_id`` with probability ``prob`` (classifier-free training)."""
    drop = jax.random.bernoulli(rng, prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_id, labels.dtype), labels)


def random_orders(rng: jax.Array, batch: int, n: int, prob_random: float | jax.Array) -> jax.Array:
    """[batch, n] int32 orders: a uniform random permutation w.p. ``prob_random``, else raster."""
    pick, perm = jax.random.split(rng)
    # argsort of iid uniforms is a uniform permutation, vectorised over the batch.
    perms = jnp.argsort(jax.random.uniform(perm, (batch, n)), axis=-1).astype(jnp.int32)
    use = jax.random.uniform(pick, (batch,)) < prob_random
    raster = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    return jnp.where(use[:, None], perms, raster)


def randomness_schedule(step: int | jax.Array, anneal_start: int, anneal_end: int) -> jax.Array:
    """RAR's random-order probability: 1 until ``anneal_start``, linear to 0 at ``anneal_end``."""
    step = jnp.asarray(step, jnp.float32)
    if anneal_end <= anneal_start:
        return jnp.where(step < anneal_start, 1.0, 0.0)
    return jnp.clip((anneal_end - step) / (anneal_end - anneal_start), 0.0, 1.0)


def permute_tokens(tokens: jax.Array, orders: jax.Array) -> jax.Array:
    """``out[b, j] = tokens[b, orders[b, j]]`` (works for trailing feature axes too)."""
    idx = orders.reshape(orders.shape + (1,) * (tokens.ndim - orders.ndim))
    return jnp.take_along_axis(tokens, idx, axis=1)


def _dense(features: int, names: tuple[str, str], dtype: Any, name: str, zero: bool = False):
    init = ZEROS if zero else INIT
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=logical(init, names),
        bias_init=logical(ZEROS, names[1:]),
        name=name,
    )


def _layer_norm(name: str, dtype: Any, axis_name: str = "embed") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones, (axis_name,)),
        bias_init=logical(ZEROS, (axis_name,)),
        name=name,
    )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Causal MHA with qkv bias and per-head QK-LayerNorm.

    Without a cache it attends causally within ``x``. With a cache ``(keys, values)`` of length S,
    ``x`` holds the slots ``index … index + L − 1``: their keys/values are written into the cache
    and each query attends to cache slots up to its own, so prefill and decode share one path.
    ``causal=False`` drops the mask (every slot sees every slot): the bidirectional attention of
    the latent diffusion transformer (models/diffusion.py), which has no cache.
    """

    num_heads: int
    dropout: float
    attn_dropout: float
    dtype: Any
    causal: bool = True
    dropout_bits: int = 32  # models/dropout.py: 32 is flax's nn.Dropout

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal attention")
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = _dense(3 * width, ("embed", "qkv"), self.dtype, "qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = _layer_norm("q_norm", self.dtype, "head_dim")(q)
        k = _layer_norm("k_norm", self.dtype, "head_dim")(k)
        heads = ("act_batch", "act_length", "act_heads", None)
        q, k, v = (constrain(t, heads) for t in (q, k, v))
        query_pos = jnp.arange(length)
        if cache is None:
            keys, values = k, v
            key_pos = jnp.arange(length)
            q_spec, kv_spec = "bqhd", "bkhd"
        else:
            # The cache is head-major [B, H, S, D]: the attention einsums read it as stored. A
            # slot-major cache made XLA copy-transpose all of it in every layer at every decode
            # step (~40% of the sampler's time on CPU).
            q_spec, kv_spec = "bhqd", "bhkd"
            q = q.transpose(0, 2, 1, 3)
            start = (0, 0, index, 0)
            keys, values = (
                jax.lax.dynamic_update_slice(c, t.transpose(0, 2, 1, 3).astype(c.dtype), start)
                for c, t in zip(cache, (k, v), strict=True)
            )
            cached = ("act_batch", "act_heads", "act_length", None)
            keys, values = constrain(keys, cached), constrain(values, cached)
            query_pos = query_pos + index
            key_pos = jnp.arange(keys.shape[2])
        scores = jnp.einsum(f"{q_spec},{kv_spec}->bhqk", q, keys.astype(q.dtype))
        scores = scores.astype(jnp.float32) * head_dim**-0.5
        if self.causal:
            mask = key_pos[None, :] <= query_pos[:, None]
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = Dropout(self.attn_dropout, self.dropout_bits)(probs, deterministic)
        out = jnp.einsum(
            f"bhqk,{kv_spec}->bqhd", probs.astype(self.dtype), values.astype(self.dtype)
        )
        out = out.reshape(batch, length, width)
        out = _dense(width, ("heads_merged", "embed"), self.dtype, "proj")(out)
        return Dropout(self.dropout, self.dropout_bits)(out, deterministic), (keys, values)


class Block(nn.Module):
    """Pre-LN block with adaLN-Zero: 6 modulation vectors (shift/scale/gate ×2) per slot.

    ``c`` is [B, L, W] (one condition per slot) or [B, 1, W] (one per sequence, as in DiT);
    ``causal`` is the attention's (False: bidirectional).
    """

    num_heads: int
    mlp_dim: int
    dropout: float
    attn_dropout: float
    dtype: Any
    causal: bool = True
    dropout_bits: int = 32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        deterministic: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        width = x.shape[-1]
        # Zero-initialised so every block starts as the identity (DiT's adaLN-Zero).
        mod = _dense(6 * width, ("embed", "adaln"), self.dtype, "adaLN_modulation", zero=True)(
            nn.silu(c)
        )
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = _modulate(_layer_norm("norm1", self.dtype)(x), shift_a, scale_a)
        h, kv = Attention(
            self.num_heads, self.dropout, self.attn_dropout, self.dtype, self.causal,
            self.dropout_bits, name="attn",
        )(h, deterministic, cache, index)
        x = x + gate_a * h
        h = _modulate(_layer_norm("norm2", self.dtype)(x), shift_m, scale_m)
        h = _dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(h)
        h = nn.gelu(h, approximate=False)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        h = Dropout(self.dropout, self.dropout_bits)(h, deterministic)
        h = _dense(width, ("mlp", "embed"), self.dtype, "fc2")(h)
        h = Dropout(self.dropout, self.dropout_bits)(h, deterministic)
        x = x + gate_m * h
        return constrain(x, ACT), kv


class FinalLayer(nn.Module):
    """Non-affine LN modulated by (scale, shift) from the condition; zero-initialised."""

    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        mod = _dense(2 * width, ("embed", "adaln"), self.dtype, "adaLN_modulation", zero=True)(
            nn.silu(c)
        )
        scale, shift = jnp.split(mod, 2, axis=-1)  # RAR's order: scale first
        norm = nn.LayerNorm(
            epsilon=LN_EPS, use_scale=False, use_bias=False, dtype=self.dtype, name="norm_final"
        )
        return _modulate(norm(x), shift, scale)


class RAR(nn.Module):
    """Randomized-order autoregressive generator (RAR-B/L with the §8 recipe).

    ``extra_positions`` / ``extra_timesteps`` keep RAR's table lengths (N + 1024, N + 100): the
    extra rows are never read, but the shapes (and parameter counts) match upstream checkpoints.
    ``scale_of_token`` (a multi-scale tokenizer's layout, one scale index per flat position; empty:
    off) adds a learned per-scale embedding, zero at init, to the position embedding of every
    image slot: an ablation for coarse → fine pyramids, not part of RAR.
    """

    codebook_size: int
    num_tokens: int
    num_classes: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.1
    attn_dropout: float = 0.1
    dtype: Any = jnp.float32
    extra_positions: int = 1024
    extra_timesteps: int = 100
    scale_of_token: tuple[int, ...] = ()
    remat: str = "none"  # the blocks' policy (models/remat.py); the parameters are unchanged
    dropout_bits: int = 32  # random bits per dropout mask element (models/dropout.py)

    def setup(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by {self.num_heads} heads")
        if self.extra_positions < PREFIX or self.extra_timesteps < PREFIX:
            raise ValueError("position / timestep tables need at least N + 2 rows")
        vocab = self.codebook_size + 1 + self.num_classes + 1
        w = self.width
        self.embeddings = self.param("embeddings", logical(INIT, ("vocab", "embed")), (vocab, w))
        self.cls_token = self.param("cls_token", logical(ZEROS, ("embed",)), (w,))
        n_pos = self.num_tokens + self.extra_positions
        self.pos_embed = self.param("pos_embed", logical(INIT, (None, "embed")), (n_pos, w))
        self.target_aware_pos_embed = self.param(
            "target_aware_pos_embed", logical(INIT, (None, "embed")), (n_pos, w)
        )
        if self.scale_of_token:
            if len(self.scale_of_token) != self.num_tokens:
                raise ValueError(
                    f"scale_of_token has {len(self.scale_of_token)} entries for "
                    f"{self.num_tokens} tokens"
                )
            self.scale_embed = self.param(
                "scale_embed", logical(ZEROS, (None, "embed")), (max(self.scale_of_token) + 1, w)
            )
        self.timesteps_embeddings = self.param(
            "timesteps_embeddings",
            logical(INIT, (None, "embed")),
            (self.num_tokens + self.extra_timesteps, w),
        )
        # (self, x, c, deterministic, ...): the flag is static under remat.
        block = remat_module(Block, self.remat, static_argnums=(3,))
        self.blocks = [
            block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                self.attn_dropout,
                self.dtype,
                dropout_bits=self.dropout_bits,
                name=f"blocks_{i}",
            )
            for i in range(self.depth)
        ]
        self.final_layer = FinalLayer(self.dtype, name="adaln_before_head")
        self.lm_head = _dense(self.codebook_size, ("embed", "vocab"), self.dtype, "lm_head")

    def _positions(self) -> jax.Array:
        """The position table, with the per-scale embedding on the image slots when enabled."""
        if not self.scale_of_token:
            return self.pos_embed
        scale = self.scale_embed[jnp.asarray(self.scale_of_token)]
        return self.pos_embed.at[PREFIX : PREFIX + self.num_tokens].add(scale)

    def _class_embedding(self, labels: jax.Array) -> jax.Array:
        return self.embeddings[labels + self.codebook_size + 1]

    def _head(self, x: jax.Array, c: jax.Array) -> jax.Array:
        logits = self.lm_head(self.final_layer(x, c)).astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        labels: jax.Array,
        orders: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Training forward: [B, N, K] logits; output j predicts ``tokens[b, orders[b, j]]``."""
        batch, n = tokens.shape
        if n != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {n}")
        cond = self._class_embedding(labels)  # [B, W]
        image = self.embeddings[permute_tokens(tokens, orders)]  # [B, N, W]
        pos = self._positions()
        cls = jnp.broadcast_to(self.cls_token + pos[0], (batch, 1, self.width))
        x = jnp.concatenate([cls, (cond + pos[1])[:, None], image + pos[PREFIX + orders]], axis=1)
        # Slot i (class slot, image slots 1..N-1) is told the position of the token it predicts.
        target = self.target_aware_pos_embed[PREFIX + orders]  # [B, N, W]
        zero = jnp.zeros((batch, 1, self.width), target.dtype)
        x = x + jnp.concatenate([zero, target, zero], axis=1)
        c = cond[:, None] + self.timesteps_embeddings[: n + PREFIX]
        x = constrain(x, ACT)
        for block in self.blocks:
            x, _ = block(x, c, deterministic)
        return self._head(x[:, 1 : n + 1], c[:, 1 : n + 1])

    def _run_cached(
        self, x: jax.Array, c: jax.Array, cache: KVCache, slot: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        keys, values = [], []
        x = constrain(x, ACT)
        for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
            x, (k, v) = block(x, c, True, (k, v), slot)
            keys.append(k)
            values.append(v)
        logits = self._head(x[:, -1:], c[:, -1:])[:, 0]
        return logits, KVCache(tuple(keys), tuple(values), cache.cond)

    def prefill(self, labels: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Writes the [cls, class] prefix (raster order); returns logits [B, K] for token 0."""
        batch = labels.shape[0]
        cond = self._class_embedding(labels)
        pos = self._positions()
        cls = jnp.broadcast_to(self.cls_token + pos[0], (batch, self.width))
        cls_slot = cond + pos[1] + self.target_aware_pos_embed[PREFIX]
        x = jnp.stack([cls, cls_slot], axis=1)
        c = cond[:, None] + self.timesteps_embeddings[:PREFIX]
        return self._run_cached(x, c, cache._replace(cond=cond), 0)

    def decode(
        self, token: jax.Array, index: jax.Array | int, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Feeds image token ``index`` (raster); returns logits [B, K] for token ``index + 1``."""
        slot = index + PREFIX
        x = self.embeddings[token] + self._positions()[slot]
        # Target-aware embedding of the next position (raster: index + 1); none after the last.
        nxt = jnp.minimum(slot + 1, self.target_aware_pos_embed.shape[0] - 1)
        has_next = index < self.num_tokens - 1
        x = x + jnp.where(has_next, self.target_aware_pos_embed[nxt], 0.0)
        c = cache.cond + self.timesteps_embeddings[slot]
        return self._run_cached(x[:, None], c[:, None], cache, slot)


def init_cache(model: RAR, batch: int, dtype: Any | None = None) -> KVCache:
    """Zero caches for N + 2 slots in the compute dtype (keys/values are stored post QK-norm)."""
    dtype = model.dtype if dtype is None else dtype
    shape = (batch, model.num_heads, model.num_tokens + PREFIX, model.width // model.num_heads)
    keys = tuple(jnp.zeros(shape, dtype) for _ in range(model.depth))
    values = tuple(jnp.zeros(shape, dtype) for _ in range(model.depth))
    return KVCache(keys, values, jnp.zeros((batch, model.width), jnp.float32))


def prefill(model: RAR, variables: Any, labels: jax.Array) -> tuple[jax.Array, KVCache]:
    """Fresh cache with the [cls, class] prefix written; logits [B, K] for the first token."""
    cache = init_cache(model, labels.shape[0])
    return model.apply(variables, labels, cache, method=RAR.prefill)


def decode_step(
    model: RAR, variables: Any, cache: KVCache, token: jax.Array, index: jax.Array | int
) -> tuple[jax.Array, KVCache]:
    """Appends raster token ``index`` ([B] ints); returns (logits [B, K] for index + 1, cache)."""
    return model.apply(variables, token, index, cache, method=RAR.decode)


def flops_per_token(model: RAR) -> float:
    """Training FLOPs per image token: 6·(matmul params)·slots + causal-agnostic attention.

    Per sequence of S = N + 2 slots: 6·S·(10W² + 2WM) per layer (qkv, proj, adaLN 6W, MLP) +
    6·S·2W² (final adaLN) + 6·N·W·K (head, N outputs) + 12·S²·W per layer (QKᵀ and AV, forward and
    backward, counting the full square as the usual MFU convention does), divided by N.
    """
    n, w, m, k = model.num_tokens, model.width, model.mlp_dim, model.codebook_size
    s = n + PREFIX
    per_slot = model.depth * (10 * w * w + 2 * w * m) + 2 * w * w
    total = 6 * s * per_slot + 6 * n * w * k + 12 * model.depth * s * s * w
    return total / n
