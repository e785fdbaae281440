"""Exactness of the E-step and M-step on worlds whose answers are known in closed form."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mct.emd import (
    Generator,
    LangevinConfig,
    antithetic_start,
    diff_instruct_loss,
    langevin_estep,
    mstep_loss,
)
from mct.nets.mlp import build_mlp_denoiser
from mct.worlds.toy2d import GaussianDenoiser
from tests.linear_gaussian import LinearGenerator, estep_target_moments

MU = torch.tensor([0.5, -0.3])
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]])


def _moment_error(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    s = samples.double()
    return float(max((s.mean(0) - mean).abs().max(), (torch.cov(s.T) - cov).abs().max()))


def test_estep_chain_approaches_closed_form_target_as_K_grows():
    """With exact teacher and student scores, (eps_K, z_K) moments converge to those of rho_sigma.

    Tolerance: unadjusted Langevin with step 0.1 has an O(gamma) stationary bias; with 40k chains the Monte Carlo
    error of a covariance entry is about 0.01. We require the error at K=400 to be below 0.06 and at least 5x below
    the error of the start (the student's own joint), and the K sequence to shrink.
    """
    torch.manual_seed(0)
    gen = LinearGenerator(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), torch.tensor([-0.2, 0.4]))
    teacher, score = GaussianDenoiser(MU, COV), gen.exact_score_net()
    sigma_val, n = 0.7, 40_000
    mean, cov = estep_target_moments(MU, COV, gen.A.detach(), gen.b.detach(), sigma_val)
    sigma = torch.full((n,), sigma_val)
    errors = {}
    for K in (0, 10, 50, 400):
        rng = torch.Generator().manual_seed(1)
        z0, eps0 = torch.randn(n, 2, generator=rng), torch.randn(n, 2, generator=rng)
        cfg = LangevinConfig(K=K, gamma_eps=0.1, gamma_z=0.1, space="eps_z", cancel_noise=False)
        res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, rng)
        errors[K] = _moment_error(torch.cat([res.eps, res.z], 1), mean, cov)
    assert errors[400] < 0.06, errors
    assert errors[0] > 5 * errors[400], errors
    assert errors[0] > errors[10] > errors[50] > errors[400] * 0.9, errors


def test_x_z_space_reaches_the_same_target():
    """The (x, z) parameterisation samples the same rho; its chain must reach the same moments."""
    gen = LinearGenerator(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), torch.tensor([-0.2, 0.4]))
    teacher, score = GaussianDenoiser(MU, COV), gen.exact_score_net()
    sigma_val, n = 0.7, 40_000
    mean, cov = estep_target_moments(MU, COV, gen.A.detach(), gen.b.detach(), sigma_val)
    rng = torch.Generator().manual_seed(2)
    z0, eps0 = torch.randn(n, 2, generator=rng), torch.randn(n, 2, generator=rng)
    cfg = LangevinConfig(K=400, gamma_eps=0.1, gamma_z=0.1, space="x_z", cancel_noise=False)
    res = langevin_estep(gen, teacher, score, z0, eps0, torch.full((n,), sigma_val), None, cfg, rng)
    assert _moment_error(torch.cat([res.eps, res.z], 1), mean, cov) < 0.06


def test_estep_with_z_step_ref_approaches_the_same_target():
    """z_step_ref > 0 (every toy2d run uses 1.0) shrinks each chain's z step to gamma_z sigma^2 / (sigma^2 + ref^2),
    a constant per chain, so each chain is still plain Langevin for its own rho_sigma. Mirrors the K test above at
    sigma = 0.7 (z step 0.1 * 0.49 / 1.49 = 0.033): same tolerances (O(gamma) bias, ~0.01 Monte Carlo error with 40k
    chains). The z chain now relaxes at rate ~ step / 2 * (posterior precision >= 1.3) ~ 0.02 per step, so K = 400
    leaves exp(-8) of the start's error."""
    gen = LinearGenerator(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), torch.tensor([-0.2, 0.4]))
    teacher, score = GaussianDenoiser(MU, COV), gen.exact_score_net()
    sigma_val, n = 0.7, 40_000
    mean, cov = estep_target_moments(MU, COV, gen.A.detach(), gen.b.detach(), sigma_val)
    sigma = torch.full((n,), sigma_val)
    errors = {}
    for K in (0, 50, 400):
        rng = torch.Generator().manual_seed(1)
        z0, eps0 = torch.randn(n, 2, generator=rng), torch.randn(n, 2, generator=rng)
        cfg = LangevinConfig(K=K, gamma_eps=0.1, gamma_z=0.1, space="eps_z", cancel_noise=False, z_step_ref=1.0)
        res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, rng)
        errors[K] = _moment_error(torch.cat([res.eps, res.z], 1), mean, cov)
    assert errors[400] < 0.06, errors
    assert errors[0] > 5 * errors[400] and errors[0] > errors[50] > errors[400] * 0.9, errors


def test_z_step_ref_chains_at_different_sigmas_each_reach_their_own_target():
    """One batch, two noise levels (0.7 and 2.0, 20k chains each): with z_step_ref = 1 their z steps differ 2.4-fold
    (0.033 and 0.080), and each half must match its own closed-form rho_sigma within 0.06 as above (Monte Carlo error
    ~0.015 with 20k chains). Smaller sigmas mix slowly in eps (its conditional variance grows like 1 / sigma^2), which
    is why the levels are not smaller."""
    gen = LinearGenerator(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), torch.tensor([-0.2, 0.4]))
    teacher, score = GaussianDenoiser(MU, COV), gen.exact_score_net()
    half = 20_000
    sigma = torch.cat([torch.full((half,), 0.7), torch.full((half,), 2.0)])
    rng = torch.Generator().manual_seed(3)
    z0, eps0 = torch.randn(2 * half, 2, generator=rng), torch.randn(2 * half, 2, generator=rng)
    cfg = LangevinConfig(K=400, gamma_eps=0.1, gamma_z=0.1, space="eps_z", cancel_noise=False, z_step_ref=1.0)
    res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, rng)
    joint = torch.cat([res.eps, res.z], 1)
    for part, s in ((slice(0, half), 0.7), (slice(half, None), 2.0)):
        mean, cov = estep_target_moments(MU, COV, gen.A.detach(), gen.b.detach(), s)
        assert _moment_error(joint[part], mean, cov) < 0.06, s


def test_x_only_equals_eps_only_with_sigma_scaled_steps():
    """With z fixed, the x chain at step gamma sigma^2 is the eps chain written in other coordinates (exact)."""
    torch.manual_seed(0)
    net = build_mlp_denoiser(hidden=32, depth=2)
    gen = Generator(build_mlp_denoiser(hidden=32, depth=2), sigma_init=2.0)
    score = build_mlp_denoiser(hidden=32, depth=2)
    z0, eps0, sigma = torch.randn(64, 2), torch.randn(64, 2), torch.rand(64) + 0.1
    out = {}
    for space in ("eps", "x"):
        cfg = LangevinConfig(K=5, gamma_eps=0.2, gamma_z=0.3, space=space)
        out[space] = langevin_estep(gen, net, score, z0, eps0, sigma, None, cfg, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["x"].eps, out["eps"].eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["x"].eps_tilde, out["eps"].eps_tilde, rtol=1e-4, atol=1e-5)
    assert torch.equal(out["x"].z, z0)


def _param_grads(module: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    module.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters()])


@pytest.mark.parametrize("weight", ["sigma", "one", "sigma2"])
def test_diff_instruct_identity(weight):
    """K=1, gamma_z=0, cancellation of eps_0 and n_0: grad = gamma_eps / 2 * Diff-Instruct's grad (float tol)."""
    torch.manual_seed(0)
    gen = Generator(build_mlp_denoiser(hidden=64, depth=3), sigma_init=2.5)
    teacher = build_mlp_denoiser(hidden=64, depth=3)
    score = build_mlp_denoiser(hidden=64, depth=3)
    z0, eps0, sigma = torch.randn(256, 2), torch.randn(256, 2), torch.exp(torch.randn(256))
    gamma = 0.37
    cfg = LangevinConfig(K=1, gamma_eps=gamma, gamma_z=0.0, space="eps_z", cancel_noise=True, cancel_initial=True)
    res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, torch.Generator().manual_seed(5))
    g_emd = _param_grads(gen, mstep_loss(gen, res.z, res.eps_tilde, sigma, None, weight))
    g_di = _param_grads(gen, diff_instruct_loss(gen, teacher, score, z0, eps0, sigma, None, weight))
    assert g_di.abs().max() > 1e-4  # the identity is not 0 = 0
    torch.testing.assert_close(g_emd, 0.5 * gamma * g_di, rtol=1e-4, atol=1e-7)


def test_identity_breaks_without_cancellation():
    """Without cancellation the K=1 update carries eps_0 and n_0, so it is not the Diff-Instruct direction."""
    torch.manual_seed(0)
    gen = Generator(build_mlp_denoiser(hidden=32, depth=2), sigma_init=2.5)
    teacher, score = build_mlp_denoiser(hidden=32, depth=2), build_mlp_denoiser(hidden=32, depth=2)
    z0, eps0, sigma = torch.randn(128, 2), torch.randn(128, 2), torch.exp(torch.randn(128))
    cfg = LangevinConfig(K=1, gamma_eps=0.3, gamma_z=0.0, cancel_noise=False)
    res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, torch.Generator().manual_seed(5))
    g_emd = _param_grads(gen, mstep_loss(gen, res.z, res.eps_tilde, sigma, None))
    g_di = _param_grads(gen, diff_instruct_loss(gen, teacher, score, z0, eps0, sigma, None))
    assert (g_emd - 0.15 * g_di).abs().max() > 2 * (0.15 * g_di).abs().max()


def _gradient_samples(cfg: LangevinConfig, seeds: range) -> torch.Tensor:
    torch.manual_seed(0)
    gen = Generator(build_mlp_denoiser(hidden=32, depth=2), sigma_init=2.0)
    teacher, score = build_mlp_denoiser(hidden=32, depth=2), build_mlp_denoiser(hidden=32, depth=2)
    grads = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        z0, eps0 = torch.randn(64, 2, generator=rng), torch.randn(64, 2, generator=rng)
        sigma = torch.full((64,), 0.8)
        res = langevin_estep(gen, teacher, score, z0, eps0, sigma, None, cfg, rng)
        grads.append(_param_grads(gen, mstep_loss(gen, res.z, res.eps_tilde, sigma, None)))
    return torch.stack(grads)


@pytest.mark.parametrize("gamma_z", [0.0, 0.02])
def test_noise_cancellation_lowers_variance_keeps_mean(gamma_z):
    """Across 300 seeds: total gradient variance drops by > 10x with cancellation; the means agree within
    4 standard errors per coordinate (z fixed: eta_K is independent of z_K, so the means are equal exactly;
    gamma_z > 0 couples them weakly and the check is statistical)."""
    base = LangevinConfig(K=4, gamma_eps=0.2, gamma_z=gamma_z, space="eps_z", cancel_scheme="linear")
    on = _gradient_samples(base, range(300))
    off = _gradient_samples(dataclasses.replace(base, cancel_noise=False), range(300))
    assert on.var(0).sum() * 10 < off.var(0).sum()
    stderr = torch.sqrt(off.var(0) / 300 + on.var(0) / 300)
    z = (on.mean(0) - off.mean(0)).abs() / stderr.clamp_min(1e-12)
    assert float((z > 4).float().mean()) < 0.01, float(z.max())


@pytest.mark.parametrize("scheme", ["linear", "antithetic"])
def test_emd_training_fits_linear_generator_to_gaussian_data(scheme):
    """EMD (K=8, eps_z, cancellation) with exact teacher and score drives A A^T -> Sigma and b -> mu. With a linear g
    both cancellation schemes are unbiased (J is constant, so eta_K cannot correlate with it).

    Tolerance 0.05 absolute per entry after 800 Adam steps (batch 512); the start is off by > 0.3.
    """
    torch.manual_seed(0)
    gen = LinearGenerator(torch.tensor([[0.3, 0.0], [0.0, 0.3]]), torch.zeros(2))
    teacher = GaussianDenoiser(MU, COV)
    opt = torch.optim.Adam(gen.parameters(), lr=0.02, betas=(0.0, 0.99))
    rng = torch.Generator().manual_seed(0)
    cfg = LangevinConfig(K=8, gamma_eps=0.3, gamma_z=0.1, space="eps_z", cancel_scheme=scheme)
    for _ in range(800):
        z0, eps0 = torch.randn(512, 2, generator=rng), torch.randn(512, 2, generator=rng)
        sigma = torch.exp(torch.randn(512, generator=rng) * 0.8 - 0.5)
        if cfg.antithetic:
            z0, eps0, sigma, _ = antithetic_start(z0, eps0, sigma, None)
        res = langevin_estep(gen, teacher, gen.exact_score_net(), z0, eps0, sigma, None, cfg, rng)
        opt.zero_grad()
        mstep_loss(gen, res.z, res.eps_tilde, sigma, None).backward()
        opt.step()
    A, b = gen.A.detach(), gen.b.detach()
    torch.testing.assert_close(A @ A.T, COV, atol=0.05, rtol=0)
    torch.testing.assert_close(b, MU, atol=0.05, rtol=0)


def test_curvature_z_step_reaches_the_same_target():
    """With z_step 'curvature' each chain keeps one step gamma_z / (1 + lambda / sigma^2) for its whole run, so it is
    plain Langevin for rho and must reach the closed-form moments like the constant step (same 0.06 tolerance as
    above: O(gamma) discretisation bias plus ~0.01 Monte Carlo error with 40k chains). gamma_z = 0.5 in units of the
    posterior's width; at sigma = 0.3 the constant step 0.5 would be unstable (precision 1 + 0.4^2/0.09 ~ 2.8)."""
    gen = LinearGenerator(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), torch.tensor([-0.2, 0.4]))
    teacher, score = GaussianDenoiser(MU, COV), gen.exact_score_net()
    sigma_val, n = 0.3, 40_000
    mean, cov = estep_target_moments(MU, COV, gen.A.detach(), gen.b.detach(), sigma_val)
    rng = torch.Generator().manual_seed(4)
    z0, eps0 = torch.randn(n, 2, generator=rng), torch.randn(n, 2, generator=rng)
    cfg = LangevinConfig(K=300, gamma_eps=0.1, gamma_z=0.5, space="eps_z", cancel_noise=False, z_step="curvature")
    res = langevin_estep(gen, teacher, score, z0, eps0, torch.full((n,), sigma_val), None, cfg, rng)
    assert _moment_error(torch.cat([res.eps, res.z], 1), mean, cov) < 0.06


def test_jacobian_top_eigenvalue_matches_svd():
    """Power iteration on J^T J (JVP by double backward) against the exact per-sample Jacobian's largest singular
    value squared, for a nonlinear MLP generator. Power iteration converges like (s2/s1)^(2 iters); this random MLP's
    two singular values are within a few percent of each other (the slow case), so we run 300 iterations, require
    1e-3 relative on 95% of the samples, and never above the exact value (a Rayleigh quotient cannot exceed it)."""
    from mct.emd import jacobian_top_eigenvalue

    torch.manual_seed(0)
    gen = Generator(build_mlp_denoiser(hidden=32, depth=2), sigma_init=2.0)
    z = torch.randn(64, 2)
    lam = jacobian_top_eigenvalue(gen, z, None, iters=300, rng=torch.Generator().manual_seed(0))
    jac = torch.func.vmap(torch.func.jacrev(lambda v: gen(v[None], None)[0]))(z)  # (B, 2, 2)
    exact = torch.linalg.matrix_norm(jac, ord=2) ** 2
    rel = (lam - exact).abs() / exact
    assert float((rel < 1e-3).float().mean()) >= 0.95, rel
    assert bool((lam <= exact * (1 + 1e-5)).all())
