"""RAR sampler: CFG schedule, cache vs recomputation, teacher forcing, seeds, filtering."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import config_lib
from tokpost_jax.models import generator as gen
from tokpost_jax.sampling import cfg_scale, filter_logits, sample

K, N, CLASSES, B = 64, 16, 10, 4
SETTINGS = dict(guidance=3.0, power=1.15, temperature=1.0)


@pytest.fixture(scope="module")
def micro():
    """Micro model with random variables drawn on the host (compiling the real initialisers costs
    seconds on CPU). Nothing is zero, so the blocks are not adaLN-Zero's identity, and std 0.3
    makes the logits sharp enough that seeds and CFG visibly matter."""
    model = gen.RAR(codebook_size=K, num_tokens=N, num_classes=CLASSES, **config_lib.rar("micro"))
    orders = jnp.arange(N, dtype=jnp.int32)[None]
    shapes = nn.unbox(
        jax.eval_shape(
            model.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, N), jnp.int32),
            jnp.zeros(1, jnp.int32),
            orders,
        )
    )
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(
            0.3 * rng.standard_normal(x.shape, np.float32)
            + (getattr(path[-1], "key", None) == "scale")
        ),
        shapes,
    )
    labels = jnp.arange(B, dtype=jnp.int32) % CLASSES
    truth = jax.random.randint(jax.random.PRNGKey(2), (B, N), 0, K)
    return model, variables, labels, truth


def test_cfg_scale_schedule():
    # N = 256, g = 6, p = 1.15 (RobusTok RAR-B):
    #   step 0:   (0/256)^p = 0            → cos 0 = 1              → 1
    #   step 128: 0.5^1.15 = 0.4506252     → cos(π·0.4506) = 0.1544941 → 1 + 2.5·0.8455059
    #   step 255: (255/256)^1.15 = 0.99551 → cos = −0.9999005      → 1 + 2.5·1.9999005
    #   step 256: 1                        → cos π = −1             → g
    got = [float(cfg_scale(s, 256, 6.0, 1.15)) for s in (0, 128, 255, 256)]
    np.testing.assert_allclose(got, [1.0, 3.1137647, 5.9997512, 6.0], rtol=1e-6)
    # RAR-L (g = 6.75, p = 1.01) at a quarter: (0.25)^1.01 = 0.2465582, cos = 0.7147111.
    np.testing.assert_allclose(float(cfg_scale(64, 256, 6.75, 1.01)), 1.8202056, rtol=1e-6)
    assert float(cfg_scale(100, 256, 1.0, 2.0)) == 1.0


def test_cache_and_recompute_agree(micro):
    model, variables, labels, _ = micro
    rng = jax.random.PRNGKey(3)
    cached = sample(model, variables, labels, rng, **SETTINGS)
    full = sample(model, variables, labels, rng, **SETTINGS, use_cache=False)
    assert cached.shape == (B, N) and cached.dtype == jnp.int32
    assert np.all((np.asarray(cached) >= 0) & (np.asarray(cached) < K))
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


def test_seeds(micro):
    model, variables, labels, _ = micro
    a = sample(model, variables, labels, jax.random.PRNGKey(4), **SETTINGS)
    b = sample(model, variables, labels, jax.random.PRNGKey(4), **SETTINGS)
    c = sample(model, variables, labels, jax.random.PRNGKey(5), **SETTINGS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.5


def test_teacher_forcing(micro):
    model, variables, labels, truth = micro
    rng = jax.random.PRNGKey(6)
    ones = jnp.ones((B, N), bool)
    forced = sample(
        model, variables, labels, rng, **SETTINGS, teacher_tokens=truth, teacher_mask=ones
    )
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(truth))
    plain = sample(model, variables, labels, rng, **SETTINGS)
    none = sample(
        model, variables, labels, rng, **SETTINGS, teacher_tokens=truth, teacher_mask=~ones
    )
    np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))
    # σ = 0.7: forced positions hold the truth; the rest see a mixed prefix and differ from plain.
    mask = jax.random.bernoulli(jax.random.PRNGKey(7), 0.7, (B, N))
    mixed = np.asarray(
        sample(model, variables, labels, rng, **SETTINGS, teacher_tokens=truth, teacher_mask=mask)
    )
    m = np.asarray(mask)
    np.testing.assert_array_equal(mixed[m], np.asarray(truth)[m])
    assert np.any(mixed[~m] != np.asarray(plain)[~m])


def test_guidance_one_shortcut_matches_cfg_batch(micro):
    """g = 1 as a Python number skips the null branch; as an array it runs CFG with s ≡ 1."""
    model, variables, labels, _ = micro
    rng = jax.random.PRNGKey(8)
    kw = dict(power=1.0, temperature=1.0)
    short = sample(model, variables, labels, rng, guidance=1.0, **kw)
    full = sample(model, variables, labels, rng, guidance=jnp.float32(1.0), **kw)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(full))
    guided = sample(model, variables, labels, rng, guidance=jnp.float32(8.0), **kw)
    assert np.any(np.asarray(guided) != np.asarray(short))


def test_top_k_one_is_greedy(micro):
    model, variables, labels, _ = micro
    a = sample(model, variables, labels, jax.random.PRNGKey(0), **SETTINGS, top_k=1)
    b = sample(model, variables, labels, jax.random.PRNGKey(1), **SETTINGS, top_k=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    neg = jnp.finfo(jnp.float32).min
    np.testing.assert_array_equal(np.asarray(filter_logits(logits)), np.asarray(logits))
    top2 = np.asarray(filter_logits(logits, top_k=2))
    assert np.all(top2[0, [1, 3]] == neg) and np.all(top2[0, [0, 2]] > neg)
    # Nucleus 0.75: 0.5 (ahead 0) and 0.3 (ahead 0.5) stay; 0.15 (ahead 0.8) goes.
    nucleus = np.asarray(filter_logits(logits, top_p=0.75))
    assert np.all(nucleus[0, [1, 3]] == neg) and np.all(nucleus[0, [0, 2]] > neg)
    assert np.sum(np.asarray(filter_logits(logits, top_p=1e-6)) > neg) == 1
