"""Closed-form linear-Gaussian world used by the exactness tests: data N(mu, Sigma), generator g(z) = A z + b."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mct.worlds.toy2d import GaussianDenoiser


class LinearGenerator(nn.Module):
    def __init__(self, A: Tensor, b: Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return z @ self.A.T + self.b

    def exact_score_net(self) -> GaussianDenoiser:
        """The student's marginal is N(b, A A^T): its exact denoiser plays the converged score network."""
        A, b = self.A.detach(), self.b.detach()
        return GaussianDenoiser(b, A @ A.T)


def estep_target_moments(mu: Tensor, cov: Tensor, A: Tensor, b: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of (eps, z) under rho_sigma(x, z) = p_sigma(x) q(z | x), eps = (x - A z - b) / sigma.

    x ~ N(mu, cov + sigma^2 I); the student's posterior z | x ~ N(M (x - b), C) with C = (I + A^T A / sigma^2)^-1 and
    M = C A^T / sigma^2.
    """
    d = mu.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    A, b, mu, cov = A.double(), b.double(), mu.double(), cov.double()
    P = cov + sigma**2 * eye
    C = torch.linalg.inv(eye + A.T @ A / sigma**2)
    M = C @ A.T / sigma**2
    mean_xz = torch.cat([mu, M @ (mu - b)])
    cov_xz = torch.cat([torch.cat([P, P @ M.T], 1), torch.cat([M @ P, M @ P @ M.T + C], 1)], 0)
    zero = torch.zeros(d, d, dtype=torch.float64)
    L = torch.cat([torch.cat([eye / sigma, -A / sigma], 1), torch.cat([zero, eye], 1)], 0)
    shift = torch.cat([-b / sigma, torch.zeros(d, dtype=torch.float64)])
    return L @ mean_xz + shift, L @ cov_xz @ L.T
