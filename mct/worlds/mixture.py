"""Gaussian mixtures and Gaussians with their exact denoisers: the math of the toy2d world (mct.worlds.toy2d) and
of the exactness tests.

Because p_sigma = sum_k w_k N(mu_k, (s^2 + sigma^2) I) is known in closed form, the teacher's score is exact
and distillation error is isolated from teacher error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GaussianMixture:
    means: Tensor  # (M, 2)
    weights: Tensor  # (M,), sums to 1
    std: float  # isotropic width of every component

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.weights.shape != (self.means.shape[0],):
            raise ValueError("means must be (M, D) and weights (M,)")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if abs(float(self.weights.sum()) - 1.0) > 1e-5 or bool((self.weights < 0).any()):
            raise ValueError("weights must be non-negative and sum to 1")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator)
        return self.means[idx] + self.std * noise

    def data_std(self) -> float:
        """Overall standard deviation per coordinate (EDM's sigma_data for this world)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        var = (self.weights[:, None] * (self.means - mean) ** 2).sum(0).mean() + self.std**2
        return float(var.sqrt())

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance, exactly, in float64: sum_m w_m mu_m, sum_m w_m (mu_m mu_m^T + s^2 I) - mu mu^T."""
        means, w = self.means.double(), self.weights.double() / self.weights.double().sum()
        mu = (w[:, None] * means).sum(0)
        cov = (w[:, None, None] * means[:, :, None] * means[:, None, :]).sum(0) + self.std ** 2 * torch.eye(
            means.shape[1], dtype=torch.float64)
        return mu, cov - torch.outer(mu, mu)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_sigma(x) of the mixture convolved with N(0, sigma^2 I)."""
        var = self.std**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2
        var = var.reshape(-1, 1) if var.ndim else var
        d2 = ((x[:, None, :] - self.means[None].to(x)) ** 2).sum(-1)  # (B, M)
        log_n = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * torch.pi * var)
        return torch.logsumexp(torch.log(self.weights.to(x))[None] + log_n, dim=1)


def grid_mixture(grid: int = 5, spacing: float = 1.0, std: float = 0.05, weights: str = "unequal") -> GaussianMixture:
    """A grid x grid lattice centred at 0. With level l = (i + 2 j) mod 5, every row and column holds every level:
    'unequal' weights are proportional to 1 + l / 2 (a factor 3 between modes), 'skewed' to 25^(l / 4) (a factor 25:
    the small modes are where mode-seeking visibly drops mass)."""
    coords = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2) * spacing
    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    means = torch.stack([coords[ii.flatten()], coords[jj.flatten()]], dim=1)
    if weights == "equal":
        w = torch.ones(grid * grid)
    elif weights == "unequal":
        w = 1.0 + ((ii + 2 * jj) % 5).flatten().float() / 2.0
    elif weights == "skewed":
        w = 25.0 ** (((ii + 2 * jj) % 5).flatten().float() / 4.0)
    else:
        raise ValueError(f"weights must be 'equal', 'unequal' or 'skewed', got {weights!r}")
    return GaussianMixture(means=means, weights=w / w.sum(), std=float(std))


class MixtureDenoiser(nn.Module):
    """Exact denoiser E[x0 | x_sigma] of a Gaussian mixture: responsibilities times per-component posteriors.

    With r_k(x) = posterior of component k given x_sigma, E[x0|x] = sum_k r_k (mu_k + s^2 / (s^2 + sigma^2) (x - mu_k)).
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        self.register_buffer("log_weights", torch.log(mixture.weights.clamp_min(1e-30)))
        self.std = mixture.std

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        var = self.std**2 + sigma.to(x.dtype).reshape(-1, 1) ** 2  # (B, 1)
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (B, M)
        resp = torch.softmax(self.log_weights[None] - 0.5 * d2 / var, dim=1)  # (B, M)
        shrink = self.std**2 / var  # (B, 1)
        post = self.means[None] + shrink[:, :, None] * (x[:, None, :] - self.means[None])  # (B, M, D)
        return (resp[:, :, None] * post).sum(1)


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(mean, cov): E[x0|x] = mean + cov (cov + sigma^2 I)^-1 (x - mean).

    With cov = U diag(lam) U^T the gain is U diag(lam / (lam + sigma^2)) U^T, applied per sample in the eigenbasis.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        lam, U = torch.linalg.eigh(cov.double())
        self.register_buffer("mean", mean.clone())
        self.register_buffer("eigvals", lam.clamp_min(0).to(cov.dtype))
        self.register_buffer("eigvecs", U.to(cov.dtype))

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        s2 = sigma.to(x.dtype).reshape(-1, 1) ** 2
        coords = (x - self.mean) @ self.eigvecs  # (B, D) in the eigenbasis
        return self.mean + (coords * self.eigvals / (self.eigvals + s2)) @ self.eigvecs.T
