"""Exact toy2d mode statistics against a 5x5 mixture with unequal weights; sampling throughput."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from mct.metrics.modes import mixture_log_prob, mode_statistics
from mct.metrics.speed import samples_per_second

STD = 0.2  # modes 2.0 apart = 10 std: overlaps are below 1e-10 and negligible for every check below


@pytest.fixture(scope="module")
def mixture() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    means = torch.cartesian_prod(coords, coords)  # (25, 2)
    w = 1.0 + torch.arange(25, dtype=torch.float64) % 7  # weights over a factor 7
    return means, w / w.sum()


def sample(means: torch.Tensor, weights: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(weights, n, replacement=True, generator=gen)
    return means[idx] + STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def test_mixture_log_prob_matches_scipy(mixture):
    means, weights = mixture
    x = sample(means, weights, 50, seed=1) + torch.randn(50, 2, generator=torch.Generator().manual_seed(2))
    expected = np.log(sum(w * multivariate_normal(m, STD**2 * np.eye(2)).pdf(x.numpy())
                          for m, w in zip(means.numpy(), weights.numpy(), strict=True)))
    np.testing.assert_allclose(mixture_log_prob(x, means, weights, STD).numpy(), expected, rtol=1e-10)


def test_samples_from_the_true_mixture(mixture):
    means, weights = mixture
    stats = mode_statistics(sample(means, weights, 20_000, seed=0), means, weights, STD)
    assert stats["modes_total"] == 25 and stats["modes_covered"] == 25
    assert stats["mode_tv"] < 0.03
    # P(|z| <= 3) for a 2-D standard normal is 1 - exp(-9/2) = 0.98889; binomial sd at N = 20k is 7.4e-4.
    assert stats["mode_precision"] > 0.98
    assert stats["mode_precision"] == pytest.approx(1 - math.exp(-4.5), abs=4 * 7.4e-4)
    # With negligible overlap the entropy is H(w) + log(2 pi e std^2); the sample NLL's sd is ~1.2 / sqrt(20k)
    # = 0.009 nats, so the tolerance 0.05 nats is > 5 sd.
    entropy = float(-(weights * weights.log()).sum()) + math.log(2 * math.pi * math.e * STD**2)
    assert stats["nll"] == pytest.approx(entropy, abs=0.05)


def test_missing_modes(mixture):
    """Removed modes have w_hat = 0 and contribute W (their total true weight) to sum |w_hat - w|. If every kept
    mode has w_hat >= w (here w_hat ~ w / (1 - W) = 1.32 w, so at 20k samples it always does), the kept modes
    contribute sum_kept (w_hat - w) = 1 - (1 - W) = W, hence TV = 0.5 * (W + W) = W exactly, not just
    approximately."""
    means, weights = mixture
    removed = torch.tensor([0, 6, 12, 18, 24])
    keep = torch.ones(25, dtype=torch.bool)
    keep[removed] = False
    w_removed = float(weights[removed].sum())
    x = sample(means[keep], weights[keep] / weights[keep].sum(), 20_000, seed=3)
    stats = mode_statistics(x, means, weights, STD)
    assert stats["modes_covered"] == 20
    assert stats["mode_tv"] == pytest.approx(w_removed, abs=1e-12)
    assert stats["mode_precision"] > 0.98


def test_far_away_samples(mixture):
    means, weights = mixture
    x = sample(means, weights, 1000, seed=4) + 100.0
    stats = mode_statistics(x, means, weights, STD)
    assert stats["mode_precision"] == 0.0 and stats["modes_covered"] == 0 and stats["mode_tv"] == 1.0
    assert stats["nll"] > 1e4


def test_coverage_threshold_is_relative_to_the_true_weight(mixture):
    """A mode holding less than coverage_fraction * w_m of the samples is not covered."""
    means, weights = mixture
    x = sample(means, weights, 4000, seed=5)
    nearest = torch.cdist(x, means).argmin(1)
    counts = torch.bincount(nearest, minlength=25)
    m = 3
    target = int(0.05 * float(weights[m]) * len(x))  # keep 5 % of mode m's expected share (< 10 %)
    drop = torch.nonzero(nearest == m).flatten()[target:]
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[drop] = False
    assert counts[m] > target > 0
    assert mode_statistics(x[keep], means, weights, STD)["modes_covered"] == 24
    assert mode_statistics(x[keep], means, weights, STD, coverage_fraction=0.01)["modes_covered"] == 25


def test_bad_mixture_is_rejected(mixture):
    means, weights = mixture
    with pytest.raises(ValueError, match="sum to 1"):
        mode_statistics(torch.zeros(3, 2), means, weights * 2, STD)
    with pytest.raises(ValueError, match="samples must be"):
        mode_statistics(torch.zeros(3, 3), means, weights, STD)


# --- throughput ----------------------------------------------------------------------------------------------


class FakeClock:
    """A clock that advances only when a fake sampler 'works': timing without sleeping, and exact."""

    def __init__(self) -> None:
        self.now = 100.0
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def sampler(self, seconds_per_batch: float):
        def fn(batch_size: int) -> torch.Tensor:
            self.calls += 1
            self.now += seconds_per_batch
            return torch.zeros(batch_size)

        return fn


def test_samples_per_second_of_a_known_rate():
    """Warm-up calls are not timed; the timed ones cost exactly 10 x 0.25 s on the fake clock for 10 x 8 samples."""
    clock = FakeClock()
    rate = samples_per_second(clock.sampler(0.25), batch_size=8, n_batches=10, warmup=3, clock=clock)
    assert clock.calls == 13
    assert rate == pytest.approx(8 / 0.25, rel=1e-12)


def test_samples_per_second_rejects_bad_arguments():
    clock = FakeClock()
    for bad in ({"batch_size": 0}, {"n_batches": 0}, {"warmup": -1}):
        with pytest.raises(ValueError, match="need batch_size"):
            samples_per_second(clock.sampler(1.0), **{"batch_size": 4, **bad}, clock=clock)
