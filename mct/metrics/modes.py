"""Exact statistics of samples against a known isotropic Gaussian mixture (the toy2d world).

Each sample is assigned to its nearest mode; it counts as *near* that mode when it lies within
``radius_stds * std`` of it (3 std holds 1 - exp(-9/2) = 98.9 % of a 2-D Gaussian's mass).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _check_mixture(means: Tensor | np.ndarray, weights: Tensor | np.ndarray, std: float) -> tuple[Tensor, Tensor]:
    means = torch.as_tensor(means, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if means.ndim != 2 or weights.shape != (means.shape[0],):
        raise ValueError(f"means must be (M, D) and weights (M,), got {tuple(means.shape)} and "
                         f"{tuple(weights.shape)}")
    if bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-5:
        raise ValueError(f"weights must be non-negative and sum to 1 (sum is {float(weights.sum())})")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return means, weights / weights.sum()


def _check_samples(x: Tensor | np.ndarray, dim: int) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise ValueError(f"samples must be (N >= 1, {dim}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or inf")
    return x


def mixture_log_prob(x: Tensor | np.ndarray, means: Tensor | np.ndarray, weights: Tensor | np.ndarray,
                     std: float) -> Tensor:
    """log sum_m w_m N(x; mu_m, std^2 I), float64, shape (N,)."""
    means, weights = _check_mixture(means, weights, std)
    x = _check_samples(x, means.shape[1])
    d2 = torch.cdist(x, means, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, M)
    log_norm = -0.5 * means.shape[1] * math.log(2 * math.pi * std**2)
    return torch.logsumexp(torch.log(weights)[None] - 0.5 * d2 / std**2, dim=1) + log_norm


def mode_statistics(samples: Tensor | np.ndarray, means: Tensor | np.ndarray, weights: Tensor | np.ndarray,
                    std: float, radius_stds: float = 3.0, coverage_fraction: float = 0.1) -> dict[str, float]:
    """Mode coverage, mode-weight total variation, precision and NLL of ``samples`` under the true mixture.

    modes_covered: modes m with count_m / N >= coverage_fraction * w_m and count_m >= 1, where count_m is the
        number of near samples assigned to m (so a zero-weight mode counts only when it receives samples).
    mode_tv: 0.5 * sum_m |w_hat_m - w_m| with w_hat_m = count_m / (number of near samples); 1.0 (the maximum)
        when no sample is near any mode, since then w_hat is undefined.
    mode_precision: fraction of samples near some mode.
    nll: -mean log p(x) under the true mixture, in nats.
    """
    means, weights = _check_mixture(means, weights, std)
    x = _check_samples(samples, means.shape[1])
    if radius_stds <= 0 or coverage_fraction < 0:
        raise ValueError(f"need radius_stds > 0 and coverage_fraction >= 0, got {radius_stds}, {coverage_fraction}")
    dist = torch.cdist(x, means, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    nearest_dist, nearest = dist.min(dim=1)
    near = nearest_dist <= radius_stds * std
    counts = torch.bincount(nearest[near], minlength=len(means)).double()
    n, n_near = x.shape[0], int(near.sum())
    covered = (counts >= 1) & (counts / n >= coverage_fraction * weights)
    tv = 0.5 * float((counts / n_near - weights).abs().sum()) if n_near > 0 else 1.0
    return {
        "modes_total": len(means),
        "modes_covered": int(covered.sum()),
        "mode_tv": tv,
        "mode_precision": n_near / n,
        "nll": float(-mixture_log_prob(x, means, weights, std).mean()),
    }
