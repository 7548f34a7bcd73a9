"""L2 VQ: nearest code by cosine, straight-through gradients, loss values, usage statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax.models.quantizer import L2VectorQuantizer, code_usage, l2_normalize


@pytest.fixture(scope="module")
def quantizer_and_params():
    q = L2VectorQuantizer(codebook_size=32, code_dim=8)
    params = nn.unbox(q.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 8))))
    return q, params


def test_nearest_code_equals_brute_force(quantizer_and_params):
    q, params = quantizer_and_params
    z = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 8))
    out = q.apply(params, z)
    codebook = np.asarray(params["params"]["embedding"], np.float64)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    zn = np.asarray(z, np.float64)
    zn /= np.linalg.norm(zn, axis=-1, keepdims=True)
    dist = ((zn[..., None, :] - codebook[None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.indices), dist.argmin(-1))
    np.testing.assert_allclose(np.asarray(out.quantized), codebook[dist.argmin(-1)], atol=1e-6)


def test_straight_through_gradient_is_identity_through_normalisation(quantizer_and_params):
    q, params = quantizer_and_params
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8))
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 8))
    grad_q = jax.grad(lambda z: jnp.sum(q.apply(params, z).quantized * w))(z)
    grad_n = jax.grad(lambda z: jnp.sum(l2_normalize(z) * w))(z)
    np.testing.assert_allclose(np.asarray(grad_q), np.asarray(grad_n), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(grad_q)).sum() > 0


def test_loss_values_on_hand_case():
    q = L2VectorQuantizer(codebook_size=2, code_dim=2, commit_weight=0.25)
    params = {
        "params": {"embedding": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    }  # rows normalised at use
    z = jnp.array([[[3.0, 4.0]]])  # → (0.6, 0.8), nearest code (0, 1)
    out = q.apply(params, z)
    assert int(out.indices[0, 0]) == 1
    sq = (0.6 - 0.0) ** 2 + (0.8 - 1.0) ** 2  # 0.4, averaged over the 2 dims
    np.testing.assert_allclose(float(out.losses["codebook"]), sq / 2, rtol=1e-6)
    np.testing.assert_allclose(float(out.losses["commit"]), 0.25 * sq / 2, rtol=1e-6)
    # Codebook loss moves the code, commit loss moves the feature.
    g_code = jax.grad(lambda p: q.apply(p, z).losses["codebook"])(params)["params"]["embedding"]
    g_feat = jax.grad(lambda z: q.apply(params, z).losses["codebook"])(z)
    assert np.abs(np.asarray(g_code)).sum() > 0 and np.abs(np.asarray(g_feat)).sum() == 0


def test_usage_statistics():
    stats = code_usage(jnp.array([[0, 0, 1, 1]]), codebook_size=4)
    np.testing.assert_allclose(float(stats["codebook_usage"]), 0.5)
    np.testing.assert_allclose(float(stats["codebook_perplexity"]), 2.0, rtol=1e-6)
    uniform = code_usage(jnp.arange(8), codebook_size=8)
    np.testing.assert_allclose(float(uniform["codebook_perplexity"]), 8.0, rtol=1e-5)


def test_lookup_matches_forward(quantizer_and_params):
    q, params = quantizer_and_params
    z = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 8))
    out = q.apply(params, z)
    np.testing.assert_allclose(
        np.asarray(q.apply(params, out.indices, method=L2VectorQuantizer.lookup)),
        np.asarray(out.quantized),
        atol=1e-6,
    )
