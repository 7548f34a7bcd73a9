"""RobusTok latent perturbation: neighbours, rates, batch selection, schedule, gradients, shapes."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokpost_jax.models.perturbation import (
    Perturbation,
    nearest_code_ranks,
    perturb_codes,
    perturb_from_ranks,
    perturb_indices,
    perturbation_schedule,
    selected_samples,
)
from tokpost_jax.models.quantizer import L2VectorQuantizer
from tokpost_jax.models.tokenizer import Tokenizer

K, D, DELTA_MAX = 256, 16, 100
PAPER = dict(alpha0=1.0, delta0=100, anneal_start=40, anneal_end=120, end_ratio=0.5)
# Distances are compared to a float64 brute force; float32 similarities agree to ~1e-6.
DIST_TOL = 1e-5


@pytest.fixture(scope="module")
def vq():
    quantizer = L2VectorQuantizer(codebook_size=K, code_dim=D)
    params = nn.unbox(quantizer.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, D))))
    codebook = quantizer.apply(params, method="normalized_codebook")
    return quantizer, params, codebook


# Two token-grid shapes for all tests, so each jitted or eager op compiles at most twice.
SMALL, BIG = (16, 64), (128, 256)


def _quantize(vq, shape, seed=1):
    quantizer, params, _ = vq
    z = jax.random.normal(jax.random.PRNGKey(seed), (*shape, D))
    return quantizer.apply(params, z)


def _np_dist(features, codebook):
    f = np.asarray(features, np.float64)
    c = np.asarray(codebook, np.float64)
    return ((f[..., None, :] - c) ** 2).sum(-1)  # [B, L, K]


def _rank_of(indices, ranks):
    """Position of each chosen index within its top-k list ([B, L])."""
    hit = np.asarray(ranks) == np.asarray(indices)[..., None]
    assert hit.any(-1).all()
    return hit.argmax(-1)


def _p(key, *, alpha, delta, beta=1.0, delta_max=DELTA_MAX, **kw):
    return Perturbation(rng=key, alpha=alpha, delta=delta, beta=beta, delta_max=delta_max, **kw)


def _pi(key, q, codebook, **kw):
    return perturb_indices(_p(key, **kw), q.features, codebook)


# Jitted with every array an argument: closed-over arrays become constants that XLA would
# constant-fold through top_k, which is very slow on CPU. β is static (a sample count).
@functools.partial(jax.jit, static_argnames="beta")
def _pi_traced(key, features, codebook, alpha, delta, beta):
    return perturb_indices(_p(key, alpha=alpha, delta=delta, beta=beta), features, codebook)


def test_nearest_code_ranks_match_brute_force(vq):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    ranks = np.asarray(nearest_code_ranks(q.features, codebook, DELTA_MAX))
    assert ranks.shape == (*SMALL, DELTA_MAX) and ranks.dtype == np.int32
    dist = _np_dist(q.features, codebook)
    got = np.take_along_axis(dist, ranks, -1)
    want = np.sort(dist, -1)[..., :DELTA_MAX]
    np.testing.assert_allclose(got, want, atol=DIST_TOL)  # the same set, in ascending order
    np.testing.assert_array_equal(ranks[..., 0], np.asarray(q.indices))  # rank 0 = clean token
    with pytest.raises(ValueError, match="k_max"):
        nearest_code_ranks(q.features, codebook, K + 1)


@pytest.mark.parametrize("delta", [2, 7, 50, 100])
def test_replaced_tokens_are_among_delta_nearest(vq, delta):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    idx, replaced = _pi_traced(jax.random.PRNGKey(delta), q.features, codebook, 1.0, delta, 1.0)
    idx, replaced = np.asarray(idx), np.asarray(replaced)
    dist = _np_dist(q.features, codebook)
    chosen = np.take_along_axis(dist, idx[..., None], -1)[..., 0]
    delta_th = np.sort(dist, -1)[..., delta - 1]
    assert (chosen <= delta_th + DIST_TOL).all()
    clean = np.asarray(q.indices)
    np.testing.assert_array_equal(replaced, idx != clean)
    if delta > 1:
        assert replaced.mean() > 0.3


@pytest.mark.parametrize(
    ("alpha", "delta", "beta"), [(1.0, 100, 0.1), (0.6, 5, 0.5), (0.3, 2, 1.0)]
)
def test_replacement_fraction_matches_binomial(vq, alpha, delta, beta):
    """Fraction of changed tokens ≈ β·α·(1 − 1/δ) (r = 0 is allowed, as in the official code).

    The ⌊β·B⌋·L selected tokens change independently with p = α·(1 − 1/δ): the count is
    Binomial(n, p); we allow 5 binomial standard deviations.
    """
    _, _, codebook = vq
    batch, length = BIG
    q = _quantize(vq, BIG, seed=2)
    _, replaced = _pi_traced(jax.random.PRNGKey(3), q.features, codebook, alpha, delta, beta)
    n = math.floor(beta * batch) * length
    p = alpha * (1.0 - 1.0 / delta)
    count = int(np.asarray(replaced).sum())
    assert abs(count - n * p) <= 5.0 * math.sqrt(n * p * (1.0 - p))
    expected_fraction = beta * alpha * (1.0 - 1.0 / delta)
    assert abs(count / (batch * length) - expected_fraction) < 0.02


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.0, 1.0)])
def test_zero_alpha_or_beta_is_identity(vq, alpha, beta):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    key = jax.random.PRNGKey(4)
    for a in (alpha, jnp.float32(alpha)):  # Python and traced α
        idx, replaced = _pi_traced(key, q.features, codebook, a, 100, beta)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(q.indices))
        assert not np.asarray(replaced).any()
        codes = perturb_codes(_p(key, alpha=a, delta=100, beta=beta), q, codebook)
        assert np.array_equal(np.asarray(codes), np.asarray(q.quantized))  # bitwise


def test_only_first_beta_fraction_of_batch_changes(vq):
    _, _, codebook = vq
    batch = SMALL[0]
    q = _quantize(vq, SMALL)
    key = jax.random.PRNGKey(5)
    clean = np.asarray(q.indices)

    def changed_rows(beta, group_size=0):
        idx, replaced = _pi(key, q, codebook, alpha=1.0, delta=100, beta=beta,
                            group_size=group_size)
        idx, replaced = np.asarray(idx), np.asarray(replaced)
        np.testing.assert_array_equal(replaced, idx != clean)
        return replaced.any(-1)

    n = math.floor(0.37 * batch)  # 5
    want = np.arange(batch) < n
    np.testing.assert_array_equal(changed_rows(0.37), want)
    # The reference's per-GPU selection: ⌊β·G⌋ = 2 of each group of G = 4 samples.
    np.testing.assert_array_equal(changed_rows(0.5, group_size=4), np.arange(batch) % 4 < 2)
    with pytest.raises(ValueError, match="group_size=3"):
        changed_rows(0.5, group_size=3)


def test_selection_is_a_sample_count_not_a_device_count():
    """The paper's batch: 96 of 1024 perturbed with groups of 128, whatever the mesh; a 256-way
    data-parallel pod selects exactly the same samples (the bug this replaces grouped by shards
    and perturbed 0 samples on ≥ 128 shards)."""
    sel = np.asarray(selected_samples(1024, 0.1, group_size=128))
    assert sel.sum() == 96
    np.testing.assert_array_equal(sel.reshape(8, 128)[:, :12], True)
    assert np.asarray(selected_samples(1024, 0.1)).sum() == 102  # one group: ⌊0.1·1024⌋


def test_codes_are_straight_through_and_untouched_tokens_are_bitwise_clean(vq):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    key = jax.random.PRNGKey(6)
    p = _p(key, alpha=0.5, delta=10, beta=0.5)
    codes = np.asarray(perturb_codes(p, q, codebook))
    idx, replaced = (np.asarray(a) for a in perturb_indices(p, q.features, codebook))
    assert 0 < replaced.mean() < 0.5
    np.testing.assert_allclose(codes, np.asarray(codebook)[idx], atol=1e-6)
    assert np.array_equal(codes[~replaced], np.asarray(q.quantized)[~replaced])
    # The shared rank path (CODA uses it with its assignment logits) gives the same indices.
    ranks = nearest_code_ranks(q.features, codebook, DELTA_MAX)
    idx_r, rep_r = perturb_from_ranks(p, ranks)
    np.testing.assert_array_equal(np.asarray(idx_r), idx)
    np.testing.assert_array_equal(np.asarray(rep_r), replaced)


def test_gradients_flow_straight_through(vq):
    """d Σ(codes·w)/dz (and d/d codebook) equal those of the clean straight-through path."""
    quantizer, params, _ = vq
    z = jax.random.normal(jax.random.PRNGKey(7), (*SMALL, D))
    w = jax.random.normal(jax.random.PRNGKey(8), (*SMALL, D))
    key = jax.random.PRNGKey(9)

    def loss(params, z, perturbed):
        q = quantizer.apply(params, z)
        if perturbed:
            codebook = quantizer.apply(params, method="normalized_codebook")
            codes = perturb_codes(_p(key, alpha=1.0, delta=20, delta_max=20), q, codebook)
        else:
            codes = q.quantized
        return jnp.sum(codes * w)

    assert loss(params, z, True) != loss(params, z, False)  # most tokens really are replaced
    g_pert = jax.grad(loss, argnums=(0, 1))(params, z, True)
    g_clean = jax.grad(loss, argnums=(0, 1))(params, z, False)
    for a, b in zip(jax.tree.leaves(g_pert), jax.tree.leaves(g_clean), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(g_pert[1])).sum() > 0


def test_changing_delta_does_not_recompile_and_is_respected(vq):
    _, _, codebook = vq
    q = _quantize(vq, BIG, seed=10)
    traces = []

    def fn(key, features, codebook, alpha, delta):
        traces.append(1)
        return perturb_indices(_p(key, alpha=alpha, delta=delta), features, codebook)

    jitted = jax.jit(fn)
    ranks = nearest_code_ranks(q.features, codebook, DELTA_MAX)
    for delta in (100, 57, 3):
        idx, replaced = jitted(jax.random.PRNGKey(11), q.features, codebook, jnp.float32(1.0),
                               jnp.int32(delta))
        rank = _rank_of(idx, ranks)
        assert rank.max() == delta - 1  # 32768 draws: every rank < δ is hit with near certainty
        np.testing.assert_array_equal(np.asarray(replaced), rank > 0)
    assert len(traces) == 1
    assert jitted._cache_size() == 1


def test_out_of_range_delta_is_rejected_or_clipped(vq):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    key = jax.random.PRNGKey(12)
    with pytest.raises(ValueError, match="delta"):
        _pi(key, q, codebook, alpha=1.0, delta=DELTA_MAX + 1, beta=1.0)
    # A traced δ beyond delta_max is clipped to it rather than indexing out of the top-k.
    idx, _ = _pi_traced(key, q.features, codebook, 1.0, jnp.int32(1000), 1.0)
    ranks = nearest_code_ranks(q.features, codebook, DELTA_MAX)
    assert _rank_of(idx, ranks).max() < DELTA_MAX


def test_deterministic_per_key_and_keys_differ(vq):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    kw = dict(alpha=0.5, delta=50, beta=1.0)
    a1, _ = _pi(jax.random.PRNGKey(13), q, codebook, **kw)
    a2, _ = _pi(jax.random.PRNGKey(13), q, codebook, **kw)
    b, _ = _pi(jax.random.PRNGKey(14), q, codebook, **kw)
    folded, _ = _pi(jax.random.fold_in(jax.random.PRNGKey(13), 1), q, codebook, **kw)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert (np.asarray(a1) != np.asarray(b)).mean() > 0.2
    assert (np.asarray(a1) != np.asarray(folded)).mean() > 0.2


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharding_the_batch_does_not_change_draws(vq):
    _, _, codebook = vq
    q = _quantize(vq, SMALL)
    key = jax.random.PRNGKey(15)

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(q.features, NamedSharding(mesh, PartitionSpec("data")))
    idx_s, rep_s = _pi_traced(key, sharded, codebook, 0.7, 30, 0.5)
    idx_1, rep_1 = _pi_traced(key, q.features, codebook, 0.7, 30, 0.5)
    assert len(idx_s.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(idx_s), np.asarray(idx_1))
    np.testing.assert_array_equal(np.asarray(rep_s), np.asarray(rep_1))


def test_schedule_values():
    def at(progress):
        alpha, delta = perturbation_schedule(progress, **PAPER)
        assert alpha.dtype == jnp.float32 and delta.dtype == jnp.int32
        return float(alpha), int(delta)

    assert at(0) == (1.0, 100)  # before the anneal
    assert at(39.9) == (1.0, 100)
    assert at(40) == (1.0, 100)
    assert at(41) == (pytest.approx(0.99375), 99)  # ⌊99.375⌋
    assert at(48) == (pytest.approx(0.95), 95)  # 0.95·100 is exactly 95 in float64
    assert at(80) == (pytest.approx(0.75), 75)  # mid-anneal
    assert at(120) == (0.5, 50)  # end
    assert at(200) == (0.5, 50)  # after
    # Traced progress (float32) agrees with the float64 path at every epoch.
    traced = jax.jit(jax.vmap(lambda p: perturbation_schedule(p, **PAPER)))
    epochs = np.arange(0, 201)
    alphas, deltas = traced(jnp.asarray(epochs, jnp.float32))
    for e, a, d in zip(epochs, np.asarray(alphas), np.asarray(deltas), strict=True):
        want_a, want_d = at(int(e))
        assert d == want_d
        assert a == pytest.approx(want_a, abs=1e-6)
    # In steps, and δ never drops below 1.
    steps = dict(PAPER, anneal_start=40 * 1251, anneal_end=120 * 1251)
    assert int(perturbation_schedule(jnp.float32(80 * 1251), **steps)[1]) == 75
    assert int(perturbation_schedule(500, **dict(PAPER, delta0=1))[1]) == 1
    with pytest.raises(ValueError, match="anneal_end"):
        perturbation_schedule(0, **dict(PAPER, anneal_end=40))


@pytest.mark.slow  # ~10 s of ViT compilation on 2 CPU cores
def test_perturbation_in_tokenizer_keeps_vq_losses_clean():
    """End to end: the perturbation changes the reconstruction but not the VQ/commit losses."""
    vit = dict(width=32, depth=1, num_heads=2, mlp_dim=64, drop_path=0.0, layerscale_init=None)
    model = Tokenizer(image_size=32, patch_size=8, num_latent_tokens=16, codebook_size=64,
                      code_dim=8, encoder=vit, decoder=vit)
    images = jax.random.uniform(jax.random.PRNGKey(16), (4, 32, 32, 3), minval=-1, maxval=1)
    params = jax.jit(lambda k, x: nn.unbox(model.init(k, x)))(jax.random.PRNGKey(17), images)

    @jax.jit
    def both(params, images, key):
        pert = _p(key, alpha=1.0, delta=16, delta_max=16)
        return model.apply(params, images), model.apply(params, images, perturbation=pert)

    (rec_clean, q_clean), (rec_pert, q_pert) = both(params, images, jax.random.PRNGKey(18))
    for name in ("codebook", "commit"):
        assert float(q_pert.losses[name]) == float(q_clean.losses[name])
    assert not np.allclose(np.asarray(rec_pert), np.asarray(rec_clean))


def test_a_configuration_that_perturbs_nothing_is_refused():
    """⌊β·G⌋ = 0 with perturbation on would silently train without the method."""
    import ml_collections

    from tokpost_jax.config_checks import ConfigValueError
    from tokpost_jax.train.perturb_schedule import PerturbationSchedule

    def config(batch, beta, group):
        return ml_collections.ConfigDict(dict(batch_size=batch, perturbation=dict(
            enabled=True, beta=beta, group_size=group, alpha0=1.0, delta0=4, anneal_start=0,
            anneal_end=10, end_ratio=0.5, exclude_clean=False, neighbours="feature")))

    PerturbationSchedule(config(1024, 0.1, 128), 1.0)  # the paper: 12 of each 128
    with pytest.raises(ConfigValueError, match=r"0 samples per group of 8"):
        PerturbationSchedule(config(64, 0.1, 8), 1.0)
    with pytest.raises(ConfigValueError, match="must divide batch_size=64"):
        PerturbationSchedule(config(64, 0.1, 48), 1.0)
