"""Improved precision/recall on point sets whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mct.metrics.precision_recall import knn_radii, precision_recall


def blob(n: int, center: float, dim: int = 8, seed: int = 0) -> np.ndarray:
    """n points in the unit cube around (center, ..., center): every k-NN radius is < sqrt(dim) < 3."""
    return center + np.random.default_rng(seed).uniform(-0.5, 0.5, size=(n, dim))


def brute_force(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, with full numpy distance matrices."""

    def radii(a):
        d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(q, ref):
        d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
        return (d <= radii(ref)[None]).any(1).mean()

    return float(inside(gen, real)), float(inside(real, gen))


def test_identical_sets_give_one_one():
    x = blob(200, 0.0)
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_far_apart_sets_give_zero_zero():
    assert precision_recall(blob(100, 0.0), blob(100, 100.0, seed=1), k=3) == (0.0, 0.0)


def test_partial_overlap_gives_the_fractions_by_construction():
    """real = R1 (30 pts at 0) + R2 (10 pts at 100); gen = R1 shifted by 1e-4 + G3 (20 pts at -100).
    Radii are < 3 within each blob while blobs are 100 apart, so exactly G1 is inside the real manifold
    (precision 30/50) and exactly R1 is inside the generated one (recall 30/40)."""
    r1, r2, g3 = blob(30, 0.0, seed=0), blob(10, 100.0, seed=1), blob(20, -100.0, seed=2)
    real = np.concatenate([r1, r2])
    gen = np.concatenate([r1 + 1e-4, g3])
    assert precision_recall(real, gen, k=3) == (pytest.approx(30 / 50, abs=1e-12), pytest.approx(30 / 40, abs=1e-12))


def test_lattice_boundaries_and_symmetry():
    """real: x = 0..19 on a line (k=3 radii: 3 at both ends, 2 inside). Gen points at known distances:
    x=-2.5 (2.5 <= 3 from x=0: in), x=-3.5 (out), x=21.5 (in), x=22.5 (out), x=10.5 (in), (10, 2.5) (2.5 > 2
    from x=10, sqrt(7.25) > 2 from x=9 and 11: out) -> precision 3/6. Swapping the roles swaps the outputs."""
    real = np.stack([np.arange(20.0), np.zeros(20)], axis=1)
    gen = np.array([[-2.5, 0], [-3.5, 0], [21.5, 0], [22.5, 0], [10.5, 0], [10.0, 2.5]])
    np.testing.assert_allclose(knn_radii(torch.tensor(real), k=3).numpy(), [3, 2] + [2] * 16 + [2, 3])
    p, r = precision_recall(real, gen, k=3)
    assert p == 0.5
    assert precision_recall(gen, real, k=3) == (r, p)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_computation_equals_the_definition(chunk):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(150, 5))
    gen = rng.normal(size=(120, 5)) * 1.3 + 0.4
    assert precision_recall(real, gen, k=3, chunk=chunk) == brute_force(real, gen, k=3)
    assert precision_recall(real, gen, k=5, chunk=chunk) == brute_force(real, gen, k=5)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.random.rand(3, 2), np.random.rand(3, 2), k=3)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((10, 2), np.nan), np.zeros((10, 2)))
