"""toy2d mixtures: the weight schemes are what their docstrings promise."""

from __future__ import annotations

import pytest
import torch

from mct.worlds.toy2d import grid_mixture


@pytest.mark.parametrize(("weights", "ratio"), [("equal", 1.0), ("unequal", 3.0), ("skewed", 25.0)])
def test_weight_schemes_span_their_ratio_with_every_level_in_every_row_and_column(weights, ratio):
    mix = grid_mixture(grid=5, spacing=1.0, std=0.05, weights=weights)
    w = mix.weights.reshape(5, 5)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(w.max() / w.min()) == pytest.approx(ratio, rel=1e-5)
    levels = torch.unique(w)
    for line in (*w, *w.T):  # each row and each column holds each level once (a Latin square of levels)
        assert torch.equal(torch.sort(line).values, levels) or len(levels) == 1


def test_unknown_weight_scheme_is_refused():
    with pytest.raises(ValueError, match="skewed"):
        grid_mixture(weights="lopsided")
