"""Exactness of the peers' generator losses (SiD, DMD2) on the linear-Gaussian world, and their identities.

Closed forms: data N(mu, Sigma), generator g(z) = A z + b, teacher and fake denoisers exact and linear in x_t
(the fake one frozen at the current A, b). With u = (z, n) ~ N(0, I_4), x_t = P u + b (P = [A, sigma I]) and every
quantity in the losses is affine in u, so a per-sample loss is a quadratic polynomial in u: its expectation is the
closed form of the moments, and Gauss-Hermite quadrature with 3 nodes per axis (exact to degree 5) computes the
implementation's expected gradient exactly. Tolerances are float64 round-off (1e-9 relative).
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch

from mct.diffusion import mean_abs_residual
from mct.dmd2 import DMD2Loss
from mct.emd import Generator, diff_instruct_loss
from mct.nets.mlp import build_mlp_denoiser
from mct.sid import SiDLoss
from mct.worlds.toy2d import GaussianDenoiser
from tests.linear_gaussian import LinearGenerator

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
A0 = torch.tensor([[0.5, 0.1], [0.0, 0.4]], dtype=torch.float64)
B0 = torch.tensor([-0.2, 0.4], dtype=torch.float64)


def _gain(cov: torch.Tensor, sigma: float) -> torch.Tensor:
    return cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(2, dtype=cov.dtype))


def _affine_parts(A: torch.Tensor, b: torch.Tensor, sigma: float):
    """(a0, Ma, B0, Mb): D_phi - D_psi = a0 + Ma u and D_phi - g = B0 + Mb u, with u = (z, n), the fake denoiser
    frozen at (A0, B0) = the generator's current parameters."""
    eye, zero = torch.eye(2, dtype=A.dtype), torch.zeros(2, 2, dtype=A.dtype)
    gp, gq = _gain(COV, sigma), _gain(A0 @ A0.T, sigma)
    P = torch.cat([A, sigma * eye], 1)
    c = (eye - gp) @ MU - (eye - gq) @ B0  # D_phi(x) - D_psi(x) = c + (G_p - G_q) x
    a0, Ma = c + (gp - gq) @ b, (gp - gq) @ P
    b_0, Mb = (eye - gp) @ MU + gp @ b - b, gp @ P - torch.cat([A, zero], 1)
    return a0, Ma, b_0, Mb


def _closed_form_grad(expected_loss) -> torch.Tensor:
    A, b = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    loss = expected_loss(A, b)
    gA, gb = torch.autograd.grad(loss, (A, b))
    return torch.cat([gA.flatten(), gb])


def _sid_expected(alpha: float, sigma: float):
    def f(A, b):
        a0, Ma, b_0, Mb = _affine_parts(A, b, sigma)
        return a0 @ b_0 + torch.trace(Ma.T @ Mb) - alpha * (a0 @ a0 + torch.trace(Ma.T @ Ma))
    return f


def _dmd2_expected(sigma: float):
    """E[1/2 mse(g, sg(g - grad))] has gradient E[J^T sg(D_psi - D_phi)] / dim: the surrogate -E[sg(a) . g] / 2."""
    def f(A, b):
        a0, Ma, _, _ = _affine_parts(A.detach(), b.detach(), sigma)
        g_mean, g_lin = b, torch.cat([A, torch.zeros(2, 2, dtype=A.dtype)], 1)
        return -(a0 @ g_mean + torch.trace(Ma.T @ g_lin)) / 2
    return f


def _quadrature_grad(loss_fn, sigma: float) -> torch.Tensor:
    """sum_nodes w_node * grad loss(u_node): the implementation's exact expected gradient (module docstring)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)  # probabilists' Hermite: weight exp(-u^2 / 2)
    weights = weights / weights.sum()
    gen = LinearGenerator(A0, B0)
    teacher, fake = GaussianDenoiser(MU, COV), gen.exact_score_net()
    total = torch.zeros(6, dtype=torch.float64)
    for idx in itertools.product(range(3), repeat=4):
        u = torch.tensor([nodes[i] for i in idx], dtype=torch.float64)
        w = float(np.prod([weights[i] for i in idx]))
        gen.zero_grad()
        loss_fn(gen, teacher, fake, u[None, :2], u[None, 2:], torch.tensor([sigma], dtype=torch.float64),
                None).backward()
        total += w * torch.cat([gen.A.grad.flatten(), gen.b.grad])
    return total


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.2])
@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_sid_expected_gradient_matches_closed_form(alpha, sigma):
    """SiD (unnormalised): the gradient flows through x_t into both denoisers; its expectation is the derivative
    of the closed-form expected loss (through A and b in P, b and the teacher's input, the fake frozen)."""
    got = _quadrature_grad(SiDLoss(alpha=alpha, normalize=False), sigma)
    want = _closed_form_grad(_sid_expected(alpha, sigma))
    assert want.abs().max() > 1e-3  # not 0 = 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_dmd2_expected_gradient_matches_closed_form(sigma):
    """DMD2 (unnormalised): no gradient through the denoisers; E[J^T (D_psi - D_phi)] / dim in closed form."""
    got = _quadrature_grad(DMD2Loss(normalize=False), sigma)
    want = _closed_form_grad(_dmd2_expected(sigma))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", [SiDLoss(normalize=False), DMD2Loss(normalize=False)], ids=["sid", "dmd2"])
def test_gradient_vanishes_when_the_student_is_the_teacher(loss):
    """At A A^T = Sigma, b = mu the fake denoiser is the teacher's: D_phi - D_psi = 0 at every x_t, so both losses
    have zero gradient for every sample (exact, not on average)."""
    gen = LinearGenerator(torch.linalg.cholesky(COV), MU)
    teacher, fake = GaussianDenoiser(MU, COV), gen.exact_score_net()
    z, n = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    sigma = torch.exp(torch.randn(64, dtype=torch.float64))
    loss(gen, teacher, fake, z, n, sigma, None).backward()
    assert float(torch.cat([gen.A.grad.flatten(), gen.b.grad]).abs().max()) < 1e-12


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    gen = Generator(build_mlp_denoiser(hidden=32, depth=2), sigma_init=2.0).double()
    teacher, fake = build_mlp_denoiser(hidden=32, depth=2).double(), build_mlp_denoiser(hidden=32, depth=2).double()
    z, n = torch.randn(128, 2, dtype=torch.float64), torch.randn(128, 2, dtype=torch.float64)
    return gen, teacher, fake, z, n, torch.exp(torch.randn(128, dtype=torch.float64))


def _grads(module: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    module.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def test_dmd2_without_normalisation_is_diff_instruct_with_sigma_squared_weight():
    """Diff-Instruct's gradient w(sigma) J^T (s_psi - s_phi) with w = sigma^2 is J^T (D_psi - D_phi) per sample;
    DMD2's unnormalised mean over batch and dim gives the same divided by dim (= 2). Exact, any networks."""
    gen, teacher, fake, z, n, sigma = _nets()
    g_dmd2 = _grads(gen, DMD2Loss(normalize=False)(gen, teacher, fake, z, n, sigma, None))
    g_di = _grads(gen, diff_instruct_loss(gen, teacher, fake, z, n, sigma, None, weight="sigma2"))
    assert g_di.abs().max() > 1e-4
    torch.testing.assert_close(2 * g_dmd2, g_di, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss_cls", [SiDLoss, DMD2Loss], ids=["sid", "dmd2"])
def test_normalisation_divides_each_sample_by_the_teachers_denoising_error(loss_cls):
    """Per sample, the normalised gradient is the unnormalised one divided by w = mean |g - D_phi(x_t)| (held
    fixed). Checked one sample at a time against w computed here."""
    gen, teacher, fake, z, n, sigma = _nets(1)
    for i in range(4):
        zi, ni, si = z[i:i + 1], n[i:i + 1], sigma[i:i + 1]
        with torch.no_grad():
            g = gen(zi)
            w = float((g - teacher(g + si[:, None] * ni, si)).abs().mean())
        normed = _grads(gen, loss_cls(normalize=True)(gen, teacher, fake, zi, ni, si, None))
        plain = _grads(gen, loss_cls(normalize=False)(gen, teacher, fake, zi, ni, si, None))
        torch.testing.assert_close(normed * w, plain, rtol=1e-10, atol=1e-13)


def test_sid_authors_form_equals_the_papers_form():
    """<a, (D_phi - g) - alpha a> = (1 - alpha)|a|^2 + <a, D_psi - g> with a = D_phi - D_psi: the code's loss (the
    authors') and the paper's, at alpha = 1.2 and at alpha = 0 (where it is <a, D_phi - g>). Exact, any networks."""
    gen, teacher, fake, z, n, sigma = _nets(2)
    for alpha in (0.0, 1.2):
        got = SiDLoss(alpha=alpha, normalize=False)(gen, teacher, fake, z, n, sigma, None)
        g = gen(z)
        x_t = g + sigma[:, None] * n
        a = teacher(x_t, sigma) - fake(x_t, sigma)
        paper = ((1 - alpha) * a.pow(2).sum(1) + (a * (fake(x_t, sigma) - g)).sum(1)).mean()
        torch.testing.assert_close(got, paper, rtol=1e-12, atol=1e-14)


def test_mean_abs_residual_is_floored_and_detached():
    x0 = torch.zeros(3, 2, requires_grad=True)
    d = torch.tensor([[0.0, 0.0], [1.0, -3.0], [2.0, 2.0]])
    w = mean_abs_residual(x0, d)
    assert not w.requires_grad
    torch.testing.assert_close(w.flatten(), torch.tensor([1e-5, 2.0, 2.0]))


@pytest.mark.parametrize("loss", [SiDLoss(), DMD2Loss()], ids=["sid", "dmd2"])
def test_training_fits_linear_generator_to_gaussian_data(loss):
    """With the exact teacher and the exact fake denoiser of the current student, each method drives A A^T -> Sigma
    and b -> mu: 1000 Adam steps (batch 512) from a start off by > 0.3; tolerance 0.05 per entry."""
    torch.manual_seed(0)
    gen = LinearGenerator(torch.tensor([[0.3, 0.0], [0.0, 0.3]]), torch.zeros(2))
    teacher = GaussianDenoiser(MU.float(), COV.float())
    opt = torch.optim.Adam(gen.parameters(), lr=0.02, betas=(0.0, 0.99))
    rng = torch.Generator().manual_seed(0)
    for _ in range(1000):
        z, n = torch.randn(512, 2, generator=rng), torch.randn(512, 2, generator=rng)
        sigma = torch.exp(torch.randn(512, generator=rng) * 0.8 - 0.5)
        opt.zero_grad()
        loss(gen, teacher, gen.exact_score_net(), z, n, sigma, None).backward()
        opt.step()
    A, b = gen.A.detach(), gen.b.detach()
    torch.testing.assert_close(A @ A.T, COV.float(), atol=0.05, rtol=0)
    torch.testing.assert_close(b, MU.float(), atol=0.05, rtol=0)


# --- DMD's regression loss (an option of DMD2): teacher noise-image pairs -----------------------------------------

def _ode_map(sigma_max: float = 80.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's probability-flow map from x_T = sigma_max z to sigma = 0 on N(mu, Sigma), as y = A* z + b*:
    x(sigma) - mu = (Sigma + sigma^2 I)^(1/2) (Sigma + sigma_max^2 I)^(-1/2) (x_T - mu) (all functions of Sigma)."""
    w, V = torch.linalg.eigh(COV)
    T = V @ torch.diag(w.sqrt() / (w + sigma_max**2).sqrt()) @ V.T
    return sigma_max * T, MU - T @ MU


def _pairs(steps: int, count: int = 2000, seed: int = 0):
    from mct.dmd2 import RegressionPairs

    return RegressionPairs(count=count, steps=steps).make(GaussianDenoiser(MU.float(), COV.float()), (2,),
                                                           lambda n, rng, device: None, seed, torch.device("cpu"))


def test_regression_pairs_follow_the_teachers_probability_flow():
    """The pairs are the teacher's Heun solution of its PF-ODE: on the Gaussian, against the closed-form map, the
    error is below 2e-3 at 256 steps and falls as steps^-2 (Heun is second order: 64 -> 256 steps divides it by
    about 16; accepted 10 to 25). Labels are None for an unconditional world; the same seed makes the same pairs."""
    A_star, b_star = _ode_map()
    errs = {}
    for steps in (64, 256):
        z, labels, y = _pairs(steps)
        assert labels is None and z.shape == y.shape == (2000, 2)
        errs[steps] = float((y.double() - (z.double() @ A_star.T + b_star)).abs().max())
    assert errs[256] < 2e-3
    assert 10 < errs[64] / errs[256] < 25
    z2, _, y2 = _pairs(256)
    assert torch.equal(z, z2) and torch.equal(y, y2)
    assert not torch.equal(_pairs(256, seed=1)[0], z)


def test_regression_alone_drives_the_generator_to_the_teachers_noise_to_data_map():
    """DMDRegression with the fake denoiser equal to the teacher (DMD2's gradient is then exactly 0) is the
    regression alone: 1000 Adam steps (lr 0.01, batch 256) take a linear generator from A = 0.3 I, b = 0 to the
    teacher's ODE map of its own pairs (Heun's 18 steps are a linear map here, so the pairs are exactly affine in z
    and A*, b* are their least-squares fit). The gradient has no noise at the optimum, so it converges to float32
    round-off (errors 2e-7 to 6e-7 over seeds 1, 2, 5); tolerance 1e-4 per entry, against a start off by more
    than 0.3."""
    from mct.dmd2 import RegressionPairs
    from mct.methods import DMDRegression, FakeScoreLoss, Networks

    class _World:  # what the method reads of a world: an unconditional one's labels
        def draw_labels(self, n, rng, device):
            return None

    torch.manual_seed(0)
    gen = LinearGenerator(torch.tensor([[0.3, 0.0], [0.0, 0.3]]), torch.zeros(2))
    teacher = GaussianDenoiser(MU.float(), COV.float())
    method = DMDRegression(FakeScoreLoss(DMD2Loss()), RegressionPairs(count=2048, steps=18), weight=1.0, seed=3)
    nets = Networks(gen, gen, teacher, teacher, _World())
    opt = torch.optim.Adam(gen.parameters(), lr=0.01)
    rng = torch.Generator().manual_seed(0)
    for _ in range(1000):
        z, n = torch.randn(256, 2, generator=rng), torch.randn(256, 2, generator=rng)
        sigma = torch.exp(torch.randn(256, generator=rng) * 0.8 - 0.5)
        opt.zero_grad()
        out = method(nets, z, n, sigma, None, rng, contextlib.nullcontext)
        out.loss.backward()
        opt.step()
    zp, _, yp = method._made
    X = torch.cat([zp.double(), torch.ones(len(zp), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(X, yp.double()).solution  # (3, 2): [A^T; b]
    torch.testing.assert_close(gen.A.detach().double(), coef[:2].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(gen.b.detach().double(), coef[2], atol=1e-4, rtol=0)
    assert out.health["regression_loss"] < 1e-8
