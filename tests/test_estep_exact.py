"""The E-step's exact target by quadrature (mct.estep_exact) against closed forms and exact samples.

With a linear generator g(z) = A z + b and Gaussian data N(mu, Sigma), everything is Gaussian: q_t = N(b, A A^T +
sigma^2 I), q(z | x) = N(M (x - b), C) with C = (I + A^T A / sigma^2)^-1, M = C A^T / sigma^2, and rho's moments are
tests.linear_gaussian.estep_target_moments. The midpoint rule on a grid whose spacing is the posterior's width
has a relative error of about 2 exp(-2 pi^2) = 5e-9 for Gaussian integrands (Poisson summation), and the boxes
hold all but ~1e-8 of the mass; the tolerances below (1e-6 pointwise, 1e-5 for moments and gradients) leave a
factor of ~100 for float64 round-off over 1e4-1e5-term sums and the boxes' truncation.
"""

from __future__ import annotations

import math

import pytest
import torch

from mct.emd import mstep_loss
from mct.estep_exact import (
    Grid2D,
    QuadratureStudentDenoiser,
    StudentQuadrature,
    exact_estep_target,
    exact_mstep_gradient,
    student_marginal,
    student_posterior,
    tv_to_grid,
    z_grid_for,
)
from mct.worlds.toy2d import GaussianDenoiser, grid_mixture
from tests.linear_gaussian import LinearGenerator, estep_target_moments

A = torch.tensor([[0.9, 0.3], [-0.2, 0.6]])
B = torch.tensor([0.2, -0.1])
MU = torch.tensor([0.5, -0.3])
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]])
D64 = torch.float64


def gaussian_log_prob(mean: torch.Tensor, cov: torch.Tensor):
    def log_prob(x: torch.Tensor, sigma: float) -> torch.Tensor:
        P = cov.double() + sigma**2 * torch.eye(2, dtype=D64)
        d = x.double() - mean.double()
        return -0.5 * (d @ torch.linalg.inv(P) * d).sum(1) - 0.5 * torch.logdet(2 * math.pi * P)

    return log_prob


def _typical_x(sigma: float, n: int = 200) -> torch.Tensor:
    """Points where q_t and p_t have their mass (2-sigma-ish of both), not the far tails the boxes cut."""
    gen = torch.Generator().manual_seed(0)
    zq = torch.randn(n, 2, generator=gen, dtype=D64)
    xq = zq @ A.double().T + B.double() + sigma * torch.randn(n, 2, generator=gen, dtype=D64)
    xp = MU.double() + torch.randn(n, 2, generator=gen, dtype=D64) @ torch.linalg.cholesky(COV.double()).T
    return torch.cat([xq, xp])


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0])
def test_marginal_posterior_and_denoiser_match_the_linear_gaussian(sigma):
    gen = LinearGenerator(A.double(), B.double())
    # at sigma 1 some posteriors reach |z| ~ 5, where a +-6 box cuts 2e-6 of their mass
    zg = z_grid_for(gen, sigma, half_width=8.0 if sigma >= 1 else 6.0)
    x = _typical_x(sigma)
    S = (A @ A.T).double() + sigma**2 * torch.eye(2, dtype=D64)
    d = x - B.double()
    log_q = -0.5 * (d @ torch.linalg.inv(S) * d).sum(1) - 0.5 * torch.logdet(2 * math.pi * S)
    torch.testing.assert_close(student_marginal(gen, zg, x, sigma), log_q, atol=1e-6, rtol=0)

    post = student_posterior(gen, zg, x[:50], sigma)
    z = zg.points
    C = torch.linalg.inv(torch.eye(2, dtype=D64) + A.double().T @ A.double() / sigma**2)
    M = C @ A.double().T / sigma**2
    mean = post @ z
    torch.testing.assert_close(mean, (x[:50] - B.double()) @ M.T, atol=1e-6, rtol=0)
    cov = torch.einsum("bi,ij,ik->bjk", post, z, z) - mean[:, :, None] * mean[:, None, :]
    torch.testing.assert_close(cov, C.expand(50, 2, 2), atol=1e-6, rtol=0)

    den = QuadratureStudentDenoiser(gen, zg)
    s = torch.full((x.shape[0],), sigma, dtype=D64)
    ref = GaussianDenoiser(B.double(), (A @ A.T).double())(x, s)
    torch.testing.assert_close(den(x, s), ref, atol=1e-6, rtol=0)


def _linear_target(sigma: float):
    gen = LinearGenerator(A.double(), B.double())
    reach = 7 * math.sqrt(float(torch.linalg.eigvalsh(COV.double()).max()) + sigma**2)
    xg = Grid2D((float(MU[0]), float(MU[1])), reach, math.ceil(2 * reach / sigma))
    return gen, exact_estep_target(gen, gaussian_log_prob(MU, COV), sigma, xg, z_grid_for(gen, sigma))


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_exact_target_moments_match_closed_form(sigma):
    """(eps, z) moments of the quadrature's rho against estep_target_moments (eps = (x - A z - b) / sigma)."""
    gen, tgt = _linear_target(sigma)
    mean_xz, cov_xz = tgt.moments()
    eye, zero = torch.eye(2, dtype=D64), torch.zeros(2, 2, dtype=D64)
    L = torch.cat([torch.cat([eye / sigma, -A.double() / sigma], 1), torch.cat([zero, eye], 1)], 0)
    shift = torch.cat([-B.double() / sigma, torch.zeros(2, dtype=D64)])
    mean, cov = estep_target_moments(MU, COV, A, B, sigma)
    torch.testing.assert_close(L @ mean_xz + shift, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(L @ cov_xz @ L.T, cov, atol=1e-5, rtol=0)
    assert tgt.rho_z_edge_mass < 1e-6 and abs(tgt.p_x_box_mass - 1) < 1e-8


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_exact_mstep_gradient_matches_closed_form(sigma):
    """Weight 'sigma': grad_A = -(1/sigma) E[(x - A z - b) z^T], grad_b = -(1/sigma) E[x - A z - b] under rho."""
    gen, tgt = _linear_target(sigma)
    eye = torch.eye(2, dtype=D64)
    # closed-form (x, z) moments: x ~ N(mu, P), z | x ~ N(M (x - b), C)
    P = COV.double() + sigma**2 * eye
    C = torch.linalg.inv(eye + A.double().T @ A.double() / sigma**2)
    M = C @ A.double().T / sigma**2
    mx, mz = MU.double(), M @ (MU.double() - B.double())
    exz = P @ M.T + torch.outer(mx, mz)
    ezz = M @ P @ M.T + C + torch.outer(mz, mz)
    r = mx - A.double() @ mz - B.double()  # E[x - A z - b]
    grad_A = -(exz - A.double() @ ezz - torch.outer(B.double(), mz)) / sigma
    grad_b = -r / sigma
    got = exact_mstep_gradient(gen, tgt)
    torch.testing.assert_close(got, torch.cat([grad_A.flatten(), grad_b]), atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 1e-2  # the target differs from the student: not 0 = 0


class _TanhGenerator(torch.nn.Module):
    """A small fixed nonlinear generator: g(z) = 1.2 z + 0.5 tanh(W z + c) V / sqrt(8) + offset."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.inner = torch.nn.Linear(2, 8).double()
        self.outer = torch.nn.Linear(8, 2, bias=False).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=D64))

    def forward(self, z, labels=None):
        offset = torch.tensor([0.6, -0.4], dtype=z.dtype)  # off the data, so the gradient stands out of the noise
        return 1.2 * z + 0.5 * self.outer(torch.tanh(self.inner(z))) / math.sqrt(8) + offset


def test_quadrature_gradient_matches_monte_carlo_with_exact_samples():
    """Nonlinear g, 3x3 mixture, sigma 0.3: x ~ p_t exactly, z ~ q(z | x) on the z grid, then mct.emd.mstep_loss's
    gradient averaged over 40 batches of 200. The quadrature must lie within 4.5 standard errors in every coordinate
    (about 1 in 1e5 per coordinate by chance if the estimate is unbiased and nearly normal) and its relative L2
    distance must be below 3 times the Monte Carlo noise level sqrt(trace Cov / batches) / |exact|."""
    torch.manual_seed(0)
    sigma = 0.3
    gen = _TanhGenerator()
    mix = grid_mixture(grid=3, spacing=1.0, std=0.1, weights="unequal")
    quad = StudentQuadrature(gen, z_grid_for(gen, sigma, half_width=4.5, n_min=40))
    reach = 1.0 + 6 * math.sqrt(0.01 + sigma**2)
    tgt = exact_estep_target(quad, mix.log_prob, sigma, Grid2D((0.0, 0.0), reach, math.ceil(2 * reach / sigma)))
    exact = exact_mstep_gradient(gen, tgt)
    rng = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(40):
        x = mix.sample(200, rng).double() + sigma * torch.randn(200, 2, generator=rng, dtype=D64)
        z = quad.sample_posterior(x, sigma, rng)
        eps = (x - gen(z).detach()) / sigma
        gen.zero_grad()
        mstep_loss(gen, z, eps, torch.full((200,), sigma, dtype=D64), None).backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    assert float(((mean - exact).abs() / se).max()) < 4.5
    noise = float(torch.sqrt(g.var(0).sum() / g.shape[0]) / exact.norm())
    assert float((mean - exact).norm() / exact.norm()) < 3 * noise
    assert noise < 0.2  # the check has power: MC noise is small against the gradient


def test_pruned_denoiser_equals_the_full_sum():
    """Pruning (hash of g, radius 9 sigma, bound-checked) leaves the denoiser unchanged to float64 round-off."""
    gen = _TanhGenerator()
    quad = StudentQuadrature(gen, Grid2D((0.0, 0.0), 5.0, 160))
    rng = torch.Generator().manual_seed(2)
    x = torch.cat([gen(torch.randn(300, 2, generator=rng, dtype=D64)).detach(),
                   4 * torch.randn(100, 2, generator=rng, dtype=D64)])  # some far from the student's support
    for sigma in (0.05, 0.2):
        full = quad.posterior_mean_g(x, sigma, prune=False)
        torch.testing.assert_close(quad._pruned_mean_g(x.double(), sigma), full, atol=1e-10, rtol=0)


def test_tv_to_grid_counts_bins_and_the_outside():
    grid = Grid2D((0.0, 0.0), 1.0, 2)  # four unit cells
    masses = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D64)
    pts = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], dtype=D64)
    assert tv_to_grid(pts, grid, masses) == pytest.approx(0.0)
    assert tv_to_grid(pts[:1].expand(4, 2), grid, masses) == pytest.approx(0.75)
    assert tv_to_grid(torch.tensor([[5.0, 0.0]] * 4, dtype=D64), grid, masses) == pytest.approx(1.0)
    fine = Grid2D((0.0, 0.0), 1.0, 4)
    torch.testing.assert_close(fine.bin_masses(torch.full((16,), 1 / 16, dtype=D64), 2), masses)
