"""Resize matrices vs torch ``F.interpolate`` (golden fixture), for every (H, s) CODA uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokpost_jax.models.resize import resize_like_torch, torch_resize_matrix

FIXTURE = Path(__file__).parent / "fixtures" / "coda_quantizer_golden.npz"
MAR = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
FLUX = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PAIRS = [(16, s) for s in MAR] + [(32, s) for s in FLUX] + [(4, s) for s in (1, 2, 3)]
PAIRS += [(6, s) for s in (1, 3, 4, 5)]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files if k.startswith("resize/")}


def test_fixture_covers_both_released_pyramids(golden):
    for h, s in PAIRS:
        assert f"resize/area/{h}/{s}" in golden and f"resize/bicubic/{h}/{s}" in golden


@pytest.mark.parametrize("h,s", PAIRS)
def test_area_matrix_equals_torch(golden, h, s):
    pool = torch_resize_matrix(h, s, "area")
    x = golden[f"resize/area/{h}/in"]
    want = golden[f"resize/area/{h}/{s}"]
    np.testing.assert_allclose(pool @ x @ pool.T, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,s", PAIRS)
def test_bicubic_matrix_equals_torch(golden, h, s):
    up = torch_resize_matrix(s, h, "bicubic")
    y = golden[f"resize/bicubic/{h}/{s}/in"]
    np.testing.assert_allclose(up @ y @ up.T, golden[f"resize/bicubic/{h}/{s}"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,s", [(16, 5), (16, 13), (32, 24), (6, 4)])
def test_resize_like_torch_float32(golden, h, s):
    """The jnp path (float32 matrices, HIGHEST einsums) agrees with torch to float32 rounding."""
    x = golden[f"resize/area/{h}/in"].astype(np.float32)[None, :, :, None]
    out = np.asarray(resize_like_torch(x, (s, s), "area"))[0, :, :, 0]
    np.testing.assert_allclose(out, golden[f"resize/area/{h}/{s}"], rtol=0, atol=2e-6)
    y = golden[f"resize/bicubic/{h}/{s}/in"].astype(np.float32)[None, :, :, None]
    out = np.asarray(resize_like_torch(y, (h, h), "bicubic"))[0, :, :, 0]
    np.testing.assert_allclose(out, golden[f"resize/bicubic/{h}/{s}"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("h", [4, 6, 16, 32])
def test_same_size_is_exactly_the_identity(h):
    """CODA's last scale (s = H) pools and upsamples by the identity, bit for bit."""
    for mode in ("area", "bicubic"):
        np.testing.assert_array_equal(torch_resize_matrix(h, h, mode), np.eye(h))


def test_overlapping_area_windows_and_constant_broadcast():
    # 16 → 5: windows [floor(16i/5), ceil(16(i+1)/5)) overlap, e.g. rows 0 and 1 share cell 3.
    pool = torch_resize_matrix(16, 5, "area")
    assert pool[0, 3] == pool[1, 3] == 0.25
    np.testing.assert_allclose(pool.sum(1), 1.0, atol=1e-15)
    # 1 → H bicubic broadcasts one value (all taps clamp onto the single input cell).
    np.testing.assert_allclose(torch_resize_matrix(1, 16, "bicubic"), np.ones((16, 1)), atol=1e-15)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown resize mode 'bilinear'"):
        torch_resize_matrix(4, 2, "bilinear")
