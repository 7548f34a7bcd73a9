"""TokenLayout: the flat coarse → fine order every consumer of token sequences shares."""

from __future__ import annotations

import numpy as np
import pytest

from tokpost_jax.models.layout import TokenLayout


def test_mar_pyramid_counts():
    layout = TokenLayout((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert layout.num_tokens == 680
    assert layout.offsets[:4] == (0, 1, 5, 14)
    assert layout.offsets[-1] == 680
    assert layout.side == 16
    scale = layout.scale_of_token()
    assert scale.shape == (680,) and scale[0] == 0 and scale[-1] == 9
    assert np.sum(scale == 6) == 64


def test_split_join_round_trip_and_row_major_order():
    layout = TokenLayout((1, 2, 3))
    tokens = np.arange(2 * 14).reshape(2, 14)
    grids = layout.split(tokens)
    assert [g.shape for g in grids] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    np.testing.assert_array_equal(grids[1][0], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(np.asarray(layout.join(grids)), tokens)


def test_single_scale_and_errors():
    assert TokenLayout.single(16).scales == (4,)
    with pytest.raises(ValueError, match="square"):
        TokenLayout.single(15)
    with pytest.raises(ValueError, match="positive"):
        TokenLayout(())
    with pytest.raises(ValueError, match="tokens for a layout"):
        TokenLayout((2,)).split(np.zeros((1, 5)))


def test_repeated_full_side_scales_get_distinct_names():
    layout = TokenLayout((1, 2, 4, 4, 4))
    assert layout.scale_names() == ("s1", "s2", "s4", "s4_2", "s4_3")
    assert layout.num_tokens == 1 + 4 + 48 and layout.side == 4
