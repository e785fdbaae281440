"""Closed-form oracles for the numerical pieces around the E-step: the teacher's Heun sampler, toy2d's exact mixture
denoiser, the EMA and the auxiliary score network's DSM loss. Tolerances are argued in each docstring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mct.diffusion import edm_heun_sample, edm_loss_weight
from mct.ema import ema_update
from mct.emd import score_dsm_loss
from mct.worlds.toy2d import GaussianDenoiser, MixtureDenoiser, grid_mixture
from tests.linear_gaussian import LinearGenerator

MU = torch.tensor([0.5, -0.3])
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]])
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


def _eig(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.eigh(cov.double())


# --- Heun sampler ------------------------------------------------------------------------------------------------
#
# For data N(m, C), C = U diag(lam) U^T, the exact denoiser is D(x, s) = m + C (C + s^2)^-1 (x - m), so in eigen-
# coordinates u = U^T (x - m) the probability-flow ODE dx/ds = (x - D) / s is du_i/ds = s u_i / (lam_i + s^2), solved by
# u_i(s) = u_i(s0) sqrt((lam_i + s^2) / (lam_i + s0^2)). The sampler starts at x = sigma_max z and ends with an Euler
# step from sigma_min to 0, which is x -> D(x, sigma_min): per coordinate a factor lam / (lam + sigma_min^2).


def _exact_map(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The ODE's exact solution from sigma_max to sigma_min, then the final step D(., sigma_min) (float64)."""
    lam, U = _eig(cov)
    u = (SIGMA_MAX * z.double() - mean.double()) @ U
    gain = torch.sqrt((lam + SIGMA_MIN**2) / (lam + SIGMA_MAX**2)) * lam / (lam + SIGMA_MIN**2)
    return mean.double() + (u * gain) @ U.T


def test_heun_two_steps_equal_the_algorithm_in_closed_form():
    """N = 2 is one Heun step sigma_max -> sigma_min and one Euler step to 0; for a linear denoiser every quantity of
    EDM's Algorithm 1 is a per-coordinate scalar: d(s) = s u / (lam + s^2). The sampler keeps its state in float64 but
    evaluates the denoiser in float32, so d(sigma_min) = (x - D(x)) / sigma_min carries a rounding error of about
    2^-24 |x| / sigma_min, multiplied by (sigma_max - sigma_min) / 2 in the Heun average. With sigma_max = 5,
    sigma_min = 0.5 and |x| <= 20 that is < 6e-8 * 20 * 5 = 6e-6; we allow 2e-5. (At EDM's 80 and 0.002 the same
    rounding is amplified 2e4-fold, so there the test below compares against the ODE's solution instead.)"""
    smax, smin = 5.0, 0.5
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    x, nfe = edm_heun_sample(GaussianDenoiser(MU, COV), z, None, num_steps=2, sigma_min=smin, sigma_max=smax)
    lam, U = _eig(COV)
    u = (smax * z.double() - MU.double()) @ U
    h = smin - smax
    d_cur = smax * u / (lam + smax**2)
    u_euler = u + h * d_cur
    d_next = smin * u_euler / (lam + smin**2)
    u_heun = u + h * 0.5 * (d_cur + d_next)
    expected = MU.double() + (u_heun * lam / (lam + smin**2)) @ U.T
    assert nfe == 3
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=2e-5)


def test_heun_converges_to_the_exact_ode_map_at_second_order():
    """Heun is a 2nd-order method: its global error is c / N^2 + o(1/N^2) on a fixed schedule family, so doubling the
    steps must divide the error by about 4. We measured 5.2, 4.5, 4.2 for N = 9 -> 18 -> 36 -> 72 (the o() term fades);
    we require every ratio in [3.5, 6] and the N = 72 error below 0.02 (measured 0.009, on outputs of size ~1)."""
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    exact = _exact_map(z, MU, COV)
    errors = {}
    for n in (9, 18, 36, 72):
        x, _ = edm_heun_sample(GaussianDenoiser(MU, COV), z, None, n, SIGMA_MIN, SIGMA_MAX)
        errors[n] = float((x.double() - exact).abs().max())
    ratios = [errors[n] / errors[2 * n] for n in (9, 18, 36)]
    assert all(3.5 < r < 6.0 for r in ratios), (errors, ratios)
    assert errors[72] < 0.02, errors


def test_heun_samples_a_gaussian_with_the_closed_form_moments():
    """1-D data N(m, s^2), m = 1.5, s = 0.5, 100k latents, N = 256 steps. The exact map x0 = m + k (sigma_max z - m)
    with k = s / sqrt(s^2 + sigma_max^2) (sigma_min's effect is < 1e-5 relative) gives mean m (1 - k) and variance
    k^2 sigma_max^2: the N(0, sigma_max^2) prior instead of p_{sigma_max} shifts the mean by k m = 0.0094, which is
    6 standard errors, so the test tells the closed form from the naive N(m, s^2). Standard errors: s / sqrt(n) =
    0.0016 (mean), s^2 sqrt(2 / n) = 0.0011 (variance); the discretisation error at N = 256 is about (72 / 256)^2 of
    the 2-D test's 0.009 < 1e-3 max per sample. Tolerance: 4 standard errors plus 1e-3."""
    m, s, n = 1.5, 0.5, 100_000
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    x, _ = edm_heun_sample(GaussianDenoiser(torch.tensor([m]), torch.tensor([[s * s]])), z, None, 256,
                           SIGMA_MIN, SIGMA_MAX)
    k = s / math.sqrt(s * s + SIGMA_MAX**2)
    mean, var = float(x.double().mean()), float(x.double().var())
    assert abs(mean - m * (1 - k)) < 4 * s / math.sqrt(n) + 1e-3, mean
    assert abs(var - (k * SIGMA_MAX) ** 2) < 4 * s * s * math.sqrt(2 / n) + 1e-3, var
    assert abs(mean - m) > 4 * s / math.sqrt(n)  # the naive target is rejected


# --- toy2d's exact mixture denoiser ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.7, 3.0])
def test_mixture_denoiser_is_tweedie_of_the_mixture_log_density(sigma):
    """Tweedie: E[x0 | x_sigma] = x + sigma^2 grad log p_sigma(x), with p_sigma the mixture convolved with
    N(0, sigma^2 I) (GaussianMixture.log_prob, differentiated by autograd in float64). The denoiser keeps its log-
    weights in float32 (relative rounding 2^-24 ~ 6e-8 on each responsibility's logit), which moves D by at most
    6e-8 times the spread of the means (4 here): we allow 1e-6 absolute."""
    mixture = grid_mixture(grid=3, spacing=2.0, std=0.3, weights="unequal")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(400, 2, generator=g, dtype=torch.float64) * 6 - 3).requires_grad_(True)  # modes and between
    (grad,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    tweedie = x.detach() + sigma**2 * grad
    den = MixtureDenoiser(mixture).double()
    got = den(x.detach(), torch.full((400,), sigma, dtype=torch.float64))
    torch.testing.assert_close(got, tweedie, rtol=0, atol=1e-6)


# --- EMA ---------------------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("count", torch.zeros(2, dtype=torch.float64))


def test_ema_after_n_updates_is_the_closed_form_average():
    """ema_n = d^n ema_0 + (1 - d) sum_{k=1..n} d^(n-k) theta_k for parameters; buffers are the model's latest. In
    float64, 50 lerps accumulate < 50 * 2^-53 relative error: 1e-12 is ample."""
    d, n = 0.9, 50
    model, ema = _Tiny(), _Tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    start = [p.detach().clone() for p in ema.parameters()]
    thetas = []
    for k in range(1, n + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            model.count.fill_(k)
        thetas.append([p.detach().clone() for p in model.parameters()])
        ema_update(ema, model, d)
    for i, p in enumerate(ema.parameters()):
        expected = d**n * start[i] + (1 - d) * sum(d ** (n - k) * thetas[k - 1][i] for k in range(1, n + 1))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ema.count, torch.full((2,), float(n), dtype=torch.float64))


# --- the score network's DSM loss --------------------------------------------------------------------------------


def _dsm_setup(n: int, sigma_val: float, seed: int):
    gen = LinearGenerator(torch.tensor([[0.8, 0.1], [0.0, 0.5]]), torch.tensor([0.3, -0.2])).double()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), sigma_val, dtype=torch.float64)
    return gen, z, noise, sigma


@pytest.mark.parametrize("sigma_val", [0.1, 0.6, 2.5])
def test_score_dsm_loss_of_the_exact_denoiser_has_its_closed_form(sigma_val):
    """The student's marginal is N(b, C), C = A A^T; with the exact denoiser the error D(x_t) - x0 is N(0, P),
    P = sigma^2 C (C + sigma^2)^-1 (the posterior covariance), so E[loss] = w(sigma) tr P with EDM's weight w. ||e||^2
    has variance 2 tr P^2, so the batch mean of n = 200k has standard error w sqrt(2 tr P^2 / n); we allow 5."""
    n, sigma_data = 200_000, 0.5
    gen, z, noise, sigma = _dsm_setup(n, sigma_val, seed=0)
    C = (gen.A @ gen.A.T).detach()
    exact = GaussianDenoiser(gen.b.detach(), C)
    loss = float(score_dsm_loss(exact, gen, z, sigma, None, noise, sigma_data))
    lam, _ = _eig(C)
    post = sigma_val**2 * lam / (lam + sigma_val**2)  # eigenvalues of P
    w = float(edm_loss_weight(torch.tensor(sigma_val, dtype=torch.float64), sigma_data))
    expected, stderr = w * float(post.sum()), w * math.sqrt(2 * float((post**2).sum()) / n)
    assert abs(loss - expected) < 5 * stderr, (loss, expected, stderr)


def test_score_dsm_loss_is_minimised_by_the_exact_denoiser():
    """A denoiser of the wrong mean, b + delta, errs by the constant (I - G) delta with G = C (C + sigma^2)^-1, so its
    expected loss exceeds the exact one by w |(I - G) delta|^2 (the cross term has mean 0 because E[x0 | x_t] is the
    exact denoiser). With the same z and noise for both, the difference's standard error is
    2 w sqrt(delta^T (I - G) P (I - G) delta / n); we allow 5 and require the excess to be positive."""
    n, sigma_val, sigma_data = 200_000, 0.6, 0.5
    gen, z, noise, sigma = _dsm_setup(n, sigma_val, seed=1)
    b, C = gen.b.detach(), (gen.A @ gen.A.T).detach()
    delta = torch.tensor([0.2, -0.1], dtype=torch.float64)
    exact = float(score_dsm_loss(GaussianDenoiser(b, C), gen, z, sigma, None, noise, sigma_data))
    shifted = float(score_dsm_loss(GaussianDenoiser(b + delta, C), gen, z, sigma, None, noise, sigma_data))
    eye = torch.eye(2, dtype=torch.float64)
    resid = (eye - C @ torch.linalg.inv(C + sigma_val**2 * eye)) @ delta
    P = sigma_val**2 * C @ torch.linalg.inv(C + sigma_val**2 * eye)
    w = float(edm_loss_weight(torch.tensor(sigma_val, dtype=torch.float64), sigma_data))
    expected = w * float(resid @ resid)
    stderr = 2 * w * math.sqrt(float(resid @ P @ resid) / n)
    assert shifted > exact
    assert abs((shifted - exact) - expected) < 5 * stderr, (shifted - exact, expected, stderr)
