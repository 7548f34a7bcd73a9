"""Tests for the host-side FID statistics (tokpost_jax.metrics.fid)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg

from tokpost_jax.metrics import fid as fid_mod
from tokpost_jax.metrics.fid import (
    FeatureStats,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
    stats_frechet_distance,
)


def _direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: FID written out directly from whole-array numpy statistics."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift + 3.0


# ---------------------------------------------------------------- FeatureStats


def test_feature_stats_streaming_with_masks_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 16)) * 2.0 + 50.0  # large mean: exercises the stable update
    st = FeatureStats()
    s = 0
    for size in (1, 7, 30, 2, 63):
        chunk = x[s : s + size]
        # Pad every batch to a static 64 rows with garbage and mask the padding out.
        padded = np.concatenate([chunk, np.full((64 - size, 16), 1e6)])
        mask = np.arange(64) < size
        st.update(padded, mask=mask)
        s += size
    assert s == 103 and st.count == 103
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_merge_associative():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 8)) + i for i, n in enumerate((5, 17, 40))]
    a, b, c = (FeatureStats().update(p) for p in parts)
    left = FeatureStats().merge(a).merge(b).merge(c)  # (a + b) + c
    bc = FeatureStats().merge(b).merge(c)
    right = FeatureStats().merge(a).merge(bc)  # a + (b + c)
    whole = np.concatenate(parts)
    for st in (left, right):
        assert st.count == whole.shape[0]
        np.testing.assert_allclose(st.mean, whole.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.cov, np.cov(whole, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(left.cov, right.cov, rtol=1e-12, atol=1e-14)


def test_feature_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    pool = FeatureStats().update(rng.normal(size=(20, 6)))
    spatial = FeatureStats().update(rng.normal(size=(20, 3, 2)))  # flattened to 6-d rows
    path = tmp_path / "ref.npz"
    pool.to_npz(path, spatial=spatial)
    with np.load(path) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
        assert z["sigma"].shape == (6, 6)
    p2, s2 = FeatureStats.from_npz(path)
    assert s2 is not None and p2.count == 20
    np.testing.assert_array_equal(p2.mean, pool.mean)
    np.testing.assert_allclose(p2.cov, pool.cov, rtol=1e-15)
    np.testing.assert_allclose(s2.cov, spatial.cov, rtol=1e-15)
    # Reloaded stats (count stored) can keep accumulating.
    extra = rng.normal(size=(5, 6))
    p2.update(extra)
    assert p2.count == 25


def test_feature_stats_from_adm_npz_without_count(tmp_path):
    path = tmp_path / "adm.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    pool, spatial = FeatureStats.from_npz(path)
    assert spatial is None
    np.testing.assert_array_equal(pool.cov, np.eye(3))
    with pytest.raises(ValueError):
        FeatureStats().update(np.ones((3, 3))).merge(pool)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_matches_direct_scipy():
    x, y = _gauss(400, 12, 0), _gauss(300, 12, 1, shift=0.3)
    sx, sy = FeatureStats().update(x), FeatureStats().update(y)
    got = stats_frechet_distance(sx, sy)
    np.testing.assert_allclose(got, _direct_fid(x, y), rtol=1e-9)


def test_frechet_identity_symmetry_and_mean_shift():
    x, y = _gauss(500, 10, 3), _gauss(500, 10, 4)
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    scale = np.trace(s)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * scale
    mu_y, s_y = y.mean(0), np.cov(y, rowvar=False)
    np.testing.assert_allclose(
        frechet_distance(mu, s, mu_y, s_y), frechet_distance(mu_y, s_y, mu, s), rtol=1e-8
    )
    d = [frechet_distance(mu, s, mu + t, s) for t in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(d))
    np.testing.assert_allclose(d[-1], 4.0 * 10, rtol=1e-6)  # ||shift||^2 with equal covs


def test_frechet_singular_covariances_finite():
    x, y = _gauss(8, 32, 5), _gauss(8, 32, 6)  # rank <= 7 covariances in 32 dims
    val = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(val)


def test_frechet_eps_fallback_path(monkeypatch):
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a)
        if len(calls) == 1:
            return np.full_like(a, np.nan)
        return real_sqrtm(a)

    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 2.0, 3.0])
    val = frechet_distance(np.zeros(3), s, np.zeros(3), s)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(3)) @ (s + 1e-6 * np.eye(3)))
    # ADM's value here is -2 d eps = -6e-6 (offset on both sides); round-off, so reported as 0.
    assert val == 0.0


def test_frechet_rejects_significant_imaginary(monkeypatch):
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets():
    x = np.random.default_rng(7).normal(size=(200, 5))
    assert precision_recall(x, x, batch=37) == (1.0, 1.0)


def test_precision_recall_far_away():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(200, 5))
    fake = rng.normal(size=(150, 5)) + 100.0
    assert precision_recall(real, fake, batch=64) == (0.0, 0.0)


def test_precision_recall_tight_subcluster():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(500, 4))
    fake = rng.normal(size=(300, 4)) * 0.05  # tight cluster at the centre of the real cloud
    p, r = precision_recall(real, fake, batch=128)
    assert p > 0.99
    assert r < 0.2


# ---------------------------------------------------------------- KID


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(600, 16))
    b = rng.normal(size=(600, 16))
    c = rng.normal(size=(600, 16)) + 1.0
    same = kid(a, b, num_subsets=20, subset_size=200)
    shifted = kid(a, c, num_subsets=20, subset_size=200)
    # Two finite samples of one distribution differ a little; a unit mean shift is ~600x larger.
    assert abs(same) < 0.05
    assert shifted > 1.0
    assert abs(same) < 0.01 * shifted
    # subset_size larger than the sets is clipped rather than failing.
    assert np.isfinite(kid(a[:50], c[:40], num_subsets=3, subset_size=1000))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.full((100, 10), 0.1), splits=10)
    np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
    assert std < 1e-12
    # Constant logits are the same uniform prediction after softmax.
    mean_l, _ = inception_score(np.zeros((100, 10)), splits=10, from_logits=True)
    np.testing.assert_allclose(mean_l, 1.0, rtol=1e-12)


def test_inception_score_one_hot_even_is_num_classes():
    c = 8
    probs = np.tile(np.eye(c), (10 * 3, 1))  # each contiguous split holds every class 3 times
    mean, std = inception_score(probs, splits=10)
    np.testing.assert_allclose(mean, c, rtol=1e-12)
    assert std < 1e-9
    # Very confident logits behave like the one-hot probabilities.
    mean_l, _ = inception_score(probs * 50.0, splits=10)
    np.testing.assert_allclose(mean_l, c, rtol=1e-6)


# ---------------------------------------------------------------- refusing bad statistics


def _stats(n: int = 50, d: int = 6, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    x = _gauss(n, d, seed)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("where", ["mu1", "sigma1", "mu2", "sigma2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_frechet_refuses_non_finite_inputs(method, where, bad):
    mu, s = _stats()
    args = {"mu1": mu.copy(), "sigma1": s.copy(), "mu2": mu + 0.1, "sigma2": s.copy()}
    args[where][(0,) * args[where].ndim] = bad  # one bad entry (sigma stays symmetric)
    with pytest.raises(fid_mod.StatisticsError, match=f"{where}: 1 of .* not finite"):
        frechet_distance(method=method, **args)


def _not_psd(d: int = 6) -> np.ndarray:
    """Symmetric, positive diagonal, two negative eigenvalues: no covariance looks like this."""
    a = np.random.default_rng(0).normal(size=(d, d))
    s = a @ a.T
    s -= np.eye(d) * np.linalg.eigvalsh(s)[2]
    assert np.diagonal(s).min() > 0 and np.linalg.eigvalsh(s)[0] < -0.5
    return s


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_refuses_non_psd_covariance(method):
    # Before the check, "eigh" returned 0.23 for this pair and "sqrtm" a bare ValueError.
    mu, s = _stats()
    with pytest.raises(fid_mod.StatisticsError, match="sigma2: not positive semi-definite"):
        frechet_distance(mu, s, mu, _not_psd(), method=method)
    with pytest.raises(fid_mod.StatisticsError, match="sigma1: negative variance"):
        frechet_distance(mu, -s, mu, s, method=method)
    asym = s.copy()
    asym[0, 1] += 0.5
    with pytest.raises(fid_mod.StatisticsError, match="sigma1: not symmetric"):
        frechet_distance(mu, asym, mu, s, method=method)


def test_frechet_refuses_mismatched_shapes():
    mu, s = _stats(d=6)
    with pytest.raises(fid_mod.StatisticsError, match=r"sigma2: shape \(6, 6\) does not fit mu2"):
        frechet_distance(mu, s, mu[:4], s)
    mu4, s4 = _stats(d=4)
    with pytest.raises(fid_mod.StatisticsError, match="feature dims differ: 6 vs 4"):
        frechet_distance(mu, s, mu4, s4)


def test_check_moments_accepts_float32_rounded_and_singular_covariances():
    x = _gauss(8, 32, 12)  # rank-7 covariance in 32 dims
    s = np.cov(x, rowvar=False)
    mu32, s32 = fid_mod.check_moments(x.mean(0).astype(np.float32), s.astype(np.float32))
    assert s32.dtype == np.float64 and np.linalg.eigvalsh(s32)[0] < 0  # round-off negatives
    assert np.isfinite(frechet_distance(mu32, s32, x.mean(0), s))
    fid_mod.check_moments(np.zeros(3), np.zeros((3, 3)))  # constant features: a valid covariance


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_of_identical_singular_stats_is_exactly_zero(method):
    # Without the clamp these are ~-1e-6 (float64 round-off of Tr sqrtm on a singular product).
    for seed in range(4):
        x = _gauss(8, 32, seed)
        mu, s = x.mean(0), np.cov(x, rowvar=False)
        assert frechet_distance(mu, s, mu, s, method=method) == 0.0


def test_frechet_round_off_band_is_clamped_and_below_it_refused(monkeypatch):
    """Scale sqrtm's output so the result lands at a chosen multiple of the tolerance."""
    s = np.diag([1.0, 2.0, 3.0])
    tol = fid_mod.frechet_tolerance(s, s)
    # FID(x, x) with Tr covmean scaled by (1 + t) is -2 t Tr(s).
    real_sqrtm = scipy.linalg.sqrtm
    for factor, ok in ((0.5, True), (2.0, False)):
        t = factor * tol / (2 * np.trace(s))
        monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda a, t=t: real_sqrtm(a) * (1 + t))
        if ok:
            assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == 0.0
        else:
            with pytest.raises(fid_mod.StatisticsError, match="below the round-off tolerance"):
                frechet_distance(np.zeros(3), s, np.zeros(3), s)


def test_frechet_tolerance_scale_for_inception_statistics():
    # Documented: ~5e-3 for 2048-d pool statistics with Tr(sigma) ~ 220 (measured on real
    # photos), +2 d eps after ADM's offset fallback; FID(x, x) there measures ~ -1e-4.
    s = np.eye(2048) * (220.0 / 2048)
    assert 4e-3 < fid_mod.frechet_tolerance(s, s) < 6e-3
    with_offset = fid_mod.frechet_tolerance(s, s, offset=fid_mod.FID_EPS)
    np.testing.assert_allclose(with_offset - fid_mod.frechet_tolerance(s, s), 2 * 2048 * 1e-6)


def test_feature_stats_refuse_too_few_rows_and_bad_moments(tmp_path):
    one = FeatureStats().update(np.ones((1, 4)))
    with pytest.raises(fid_mod.StatisticsError, match="at least 2 feature rows, got 1"):
        _ = one.cov
    with pytest.raises(fid_mod.StatisticsError, match="no features"):
        _ = FeatureStats().mean
    with pytest.raises(fid_mod.StatisticsError, match="count: 1 samples"):
        FeatureStats.from_moments(np.zeros(3), np.eye(3), count=1)
    path = tmp_path / "nan.npz"
    np.savez(path, mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(fid_mod.StatisticsError, match="mu: 1 of 2 values are not finite"):
        FeatureStats.from_npz(path)
