"""RAR generator: KV cache vs full forward, causality, order/target-aware bookkeeping, helpers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.models import generator as gen

K, N, CLASSES = 64, 16, 10


def make_model(size: str = "micro", **kw) -> gen.RAR:
    return gen.RAR(
        codebook_size=kw.pop("codebook_size", K),
        num_tokens=kw.pop("num_tokens", N),
        num_classes=kw.pop("num_classes", CLASSES),
        **{**config_lib.rar(size), **kw},
    )


@functools.cache
def compiled_apply(model: gen.RAR):
    """One compiled forward per model (eager ops compile one by one: seconds on CPU)."""
    return jax.jit(model.apply, static_argnums=(4,))


def raster(batch: int, n: int = N) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


def _abstract(model: gen.RAR):
    return jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, model.num_tokens), jnp.int32),
        jnp.zeros(1, jnp.int32),
        raster(1, model.num_tokens),
    )


def random_variables(model: gen.RAR, std: float = 0.2, seed: int = 0):
    """Random variables from host numpy (compiling the real initialisers costs seconds on CPU);
    LayerNorm scales are centred on 1. Nothing is zero, unlike adaLN-Zero's init, which would make
    every block the identity and hide cross-slot bugs."""
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(_abstract(model)))[0]
    tree = jax.tree.structure(nn.unbox(_abstract(model)))
    leaves = []
    for path, leaf in flat:
        value = std * rng.standard_normal(leaf.shape).astype(np.float32)
        if getattr(path[-1], "key", None) == "scale":
            value += 1.0
        leaves.append(jnp.asarray(value))
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def micro():
    """Micro model with every parameter perturbed: adaLN-Zero would make each block the identity
    at init, which hides cross-slot bugs from every test below."""
    model = make_model()
    return model, random_variables(model)


def _batch(seed: int = 2, batch: int = 3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    tokens = jax.random.randint(k1, (batch, N), 0, K)
    labels = jax.random.randint(k2, (batch,), 0, CLASSES + 1)  # includes the null class
    return tokens, labels


def test_adaln_zero_init():
    model = make_model()
    params = nn.unbox(
        jax.jit(model.init)(
            jax.random.PRNGKey(0), jnp.zeros((1, N), jnp.int32), jnp.zeros(1, jnp.int32), raster(1)
        )
    )["params"]
    for name in [f"blocks_{i}" for i in range(model.depth)] + ["adaln_before_head"]:
        mod = params[name]["adaLN_modulation"]
        assert not np.any(mod["kernel"]) and not np.any(mod["bias"])
    assert params["embeddings"].shape == (K + 1 + CLASSES + 1, model.width)
    assert params["lm_head"]["kernel"].shape == (model.width, K)


def test_kv_cache_matches_full_forward(micro):
    model, variables = micro
    tokens, labels = _batch()
    full = compiled_apply(model)(variables, tokens, labels, raster(3))
    assert full.shape == (3, N, K) and full.dtype == jnp.float32
    step = jax.jit(lambda c, t, i: gen.decode_step(model, variables, c, t, i))
    logits, cache = jax.jit(lambda y: gen.prefill(model, variables, y))(labels)
    assert cache.keys[0].shape == (3, model.num_heads, N + 2, model.width // model.num_heads)
    cached = [logits]
    for j in range(N - 1):
        logits, cache = step(cache, tokens[:, j], j)
        cached.append(logits)
    np.testing.assert_allclose(np.stack(cached, 1), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_causality_raster_and_random_order(micro):
    """Output j (predicting the j-th token of the order) sees only the tokens before it."""
    model, variables = micro
    tokens, labels = _batch()
    orders = gen.random_orders(jax.random.PRNGKey(5), 3, N, 1.0)
    for order in (raster(3), orders):
        base = compiled_apply(model)(variables, tokens, labels, order)
        k = 6
        where = order[:, k]  # original position of the k-th token in this order
        changed = tokens.at[jnp.arange(3), where].set((tokens[jnp.arange(3), where] + 1) % K)
        out = compiled_apply(model)(variables, changed, labels, order)
        np.testing.assert_array_equal(np.asarray(out[:, : k + 1]), np.asarray(base[:, : k + 1]))
        assert np.all(np.abs(np.asarray(out - base))[:, k + 1 :].max(-1) > 0)


def _reference_forward(model, variables, tokens, labels, orders):
    """RAR's input layout written out slot by slot, then the model's own blocks and head."""
    p = jax.tree.map(np.asarray, variables["params"])
    emb, pos, tap, ts = (
        p[k] for k in ("embeddings", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
    )
    xs, cs = [], []
    for b in range(tokens.shape[0]):
        order = np.asarray(orders[b])
        cond = emb[K + 1 + int(labels[b])]
        seq = [p["cls_token"] + pos[0], cond + pos[1] + tap[2 + order[0]]]  # cls: no target pos
        for i in range(N):
            slot = emb[int(tokens[b, order[i]])] + pos[2 + order[i]]
            if i < N - 1:  # the last image slot predicts nothing
                slot = slot + tap[2 + order[i + 1]]
            seq.append(slot)
        xs.append(np.stack(seq))
        cs.append(cond[None] + ts[: N + 2])
    bound = model.bind(variables)
    x, c = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(cs))
    for block in bound.blocks:
        x, _ = block(x, c, True)
    return bound.lm_head(bound.final_layer(x[:, 1 : N + 1], c[:, 1 : N + 1]))


def test_permutation_and_target_aware_bookkeeping(micro):
    model, variables = micro
    tokens, labels = _batch(seed=7)
    orders = gen.random_orders(jax.random.PRNGKey(8), 3, N, 1.0)
    out = compiled_apply(model)(variables, tokens, labels, orders)
    ref = _reference_forward(model, variables, tokens, labels, orders)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # Output j's target is the j-th permuted token.
    np.testing.assert_array_equal(
        np.asarray(gen.permute_tokens(tokens, orders)),
        np.take_along_axis(np.asarray(tokens), np.asarray(orders), 1),
    )


def test_target_aware_rows_outside_image_positions_unused(micro):
    """Rows 0-1 (cls/class slots) and rows past N + 1 of the target-aware table are never read."""
    model, variables = micro
    tokens, labels = _batch()
    orders = gen.random_orders(jax.random.PRNGKey(3), 3, N, 1.0)
    base = compiled_apply(model)(variables, tokens, labels, orders)
    params = dict(variables["params"])
    tap = params["target_aware_pos_embed"]
    params["target_aware_pos_embed"] = tap.at[:2].add(5.0).at[N + 2 :].add(5.0)
    out = compiled_apply(model)({"params": params}, tokens, labels, orders)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_dropout_only_in_training(micro):
    model, variables = micro
    tokens, labels = _batch()
    a = compiled_apply(model)(
        variables, tokens, labels, raster(3), False, rngs={"dropout": jax.random.PRNGKey(0)}
    )
    b = compiled_apply(model)(variables, tokens, labels, raster(3), True)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_random_orders():
    ident = gen.random_orders(jax.random.PRNGKey(0), 8, N, 0.0)
    np.testing.assert_array_equal(np.asarray(ident), np.asarray(raster(8)))
    perm = np.asarray(gen.random_orders(jax.random.PRNGKey(0), 8, N, 1.0))
    assert perm.dtype == np.int32
    for row in perm:
        np.testing.assert_array_equal(np.sort(row), np.arange(N))
    assert not np.any(np.all(perm == np.arange(N), axis=1))
    mixed = np.asarray(gen.random_orders(jax.random.PRNGKey(1), 4000, 8, 0.25))
    frac = 1.0 - np.mean(np.all(mixed == np.arange(8), axis=1))
    assert abs(frac - 0.25 * (1 - 1 / 40320)) < 0.03


def test_randomness_schedule():
    values = [
        float(gen.randomness_schedule(s, 125_000, 187_500))
        for s in (0, 125_000, 156_250, 171_875, 187_500, 250_000)
    ]
    np.testing.assert_allclose(values, [1.0, 1.0, 0.5, 0.25, 0.0, 0.0], atol=1e-6)
    assert float(gen.randomness_schedule(10, 10, 10)) == 0.0


def test_drop_labels_rate():
    labels = jnp.full((100_000,), 3, jnp.int32)
    null = gen.null_class_id(1000)
    out = np.asarray(gen.drop_labels(jax.random.PRNGKey(0), labels, 0.1, null))
    assert set(np.unique(out)) == {3, null}
    assert abs(np.mean(out == null) - 0.1) < 0.005
    assert null == 1000  # embedding row K + 1 + 1000, RAR's none_condition_id


def _count(model: gen.RAR) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(_abstract(model))))


@pytest.mark.parametrize("size,expected", [("B", 261e6), ("L", 461e6)])
def test_param_counts(size, expected):
    model = make_model(size, codebook_size=4096, num_tokens=256, num_classes=1000)
    count = _count(model)
    # RAR's 261M / 461M were quoted for a 1024-entry codebook; 4096 adds ~4.7M / ~6.3M.
    assert abs(count / expected - 1) < 0.03, count
    dense = count - (4096 + 1 + 1000 + 1 + 2 * (256 + 1024) + 256 + 100) * model.width
    ratio = gen.flops_per_token(model) / (6 * dense)
    assert 1.0 < ratio < 1.1, ratio  # attention adds a few % at 258 slots


def test_fsdp_sharded_forward_matches(micro):
    """With the default rules on a data×fsdp mesh the forward runs sharded and agrees."""
    model, variables = micro
    tokens, labels = _batch(batch=8)
    orders = gen.random_orders(jax.random.PRNGKey(3), 8, N, 1.0)
    rules = config_lib.DEFAULT_SHARDING_RULES
    mesh = shd.make_mesh({"data": -1, "fsdp": 2})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = shd.logical_shardings(_abstract(model), mesh, rules)
        sharded = jax.device_put(variables, nn.unbox(shardings))
        assert sharded["params"]["embeddings"].sharding.spec == PartitionSpec(None, "fsdp")
        out = jax.jit(model.apply)(sharded, tokens, labels, orders)
    ref = compiled_apply(model)(variables, tokens, labels, orders)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_every_param_axis_has_a_sharding_rule(micro):
    model, _ = micro
    boxed = _abstract(model)
    known = {name for name, _ in config_lib.DEFAULT_SHARDING_RULES}
    specs = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    used = {name for spec in specs for name in spec if name is not None}
    assert used <= known, used - known
    assert {"vocab", "embed", "adaln", "head_dim"} <= used
