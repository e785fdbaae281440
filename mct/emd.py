"""EM distillation (Mode-Covering Training): E-step samplers, noise cancellation, M-step and DSM losses.

Everything here is a pure function of tensors and modules (VE convention, alpha_t = 1; see docs/method.md):
  x_t = g(z) + sigma eps,  d = eps_psi(x_t) - eps_phi(x_t)  (score network minus teacher)
  grad_eps log rho = d - eps,  grad_z log rho = (1 / sigma) J_g(z)^T d - z            ("eps_z" space)
The M-step loss  -w(sigma) / sigma * <sg(eps_tilde), g(sg(z_K))>  has gradient -w/sigma J^T eps_tilde.
Diff-Instruct is not a second code path: it is K = 1, gamma_z = 0 with noise cancellation (see
:func:`diff_instruct_loss`, written independently, for the identity the tests check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mct.diffusion import Denoiser, append_dims, denoiser_eps, denoiser_score, dsm_loss

SamplingSpace = Literal["eps_z", "x_z", "eps", "x"]
SAMPLING_SPACES: tuple[str, ...] = ("eps_z", "x_z", "eps", "x")
MStepWeight = Literal["sigma", "one", "sigma2"]
MSTEP_WEIGHTS: tuple[str, ...] = ("sigma", "one", "sigma2")


@dataclass(frozen=True)
class LangevinConfig:
    """The E-step sampler. Step sizes are in units of the N(0, I) priors of eps and z, so one pair serves every
    noise level. In the x spaces the x step is gamma_eps * sigma^2, the same step measured in eps units."""

    K: int = 8
    gamma_eps: float = 0.1
    gamma_z: float = 0.01
    space: SamplingSpace = "eps_z"
    cancel_noise: bool = True
    cancel_initial: bool = True
    z_step_ref: float = 0.0  # > 0: z step gamma_z * sigma^2 / (sigma^2 + ref^2), see langevin_estep

    def __post_init__(self) -> None:
        if self.z_step_ref < 0:
            raise ValueError(f"z_step_ref must be >= 0, got {self.z_step_ref}")
        if self.K < 0:
            raise ValueError(f"K must be >= 0, got {self.K}")
        if self.gamma_eps < 0 or self.gamma_z < 0:
            raise ValueError("step sizes gamma_eps and gamma_z must be >= 0")
        if self.space not in SAMPLING_SPACES:
            raise ValueError(f"unknown sampling space {self.space!r}; expected one of {SAMPLING_SPACES}")

    @property
    def moves_z(self) -> bool:
        return self.space in ("eps_z", "x_z") and self.gamma_z > 0


@dataclass
class EStepResult:
    z: Tensor  # z_K
    eps: Tensor  # eps_K (for the x spaces: the implied (x_K - g(z_K)) / sigma)
    eps_tilde: Tensor  # eps_K - eta_K: the E-step's signal with the tracked pure noise removed
    eta: Tensor  # the tracked pure-noise part (zeros when cancellation is off)


class Generator(nn.Module):
    """One-step generator g(z) = D(sigma_init z, sigma_init, labels) around a copy of a teacher denoiser.

    With D the teacher, g maps the prior to the teacher's posterior mean at noise level sigma_init, which is where
    distillation starts (docs/method.md, The model). dim z = dim x.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float) -> None:
        super().__init__()
        if not sigma_init > 0:
            raise ValueError(f"sigma_init must be > 0, got {sigma_init}")
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=z.dtype, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, labels)


def _forward_for_vjp(generator: nn.Module, z: Tensor, labels: Tensor | None, need_vjp: bool):
    """g(z), plus the leaf z it was computed from when a VJP J_g(z)^T v will follow."""
    if not need_vjp:
        with torch.no_grad():
            return generator(z, labels), None
    z_leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        return generator(z_leaf, labels), z_leaf


def _vjp(g: Tensor, z_leaf: Tensor, v: Tensor) -> Tensor:
    # autograd.grad w.r.t. z only: no parameter gradient is computed or accumulated.
    (out,) = torch.autograd.grad(g, z_leaf, grad_outputs=v)
    return out


def langevin_estep(generator: nn.Module, teacher: Denoiser, score_net: Denoiser, z0: Tensor, eps0: Tensor,
                   sigma: Tensor, labels: Tensor | None, cfg: LangevinConfig,
                   rng: torch.Generator | None = None) -> EStepResult:
    """K steps of Langevin MCMC on the E-step target rho_t(x_t, z), started from the student's own sample.

    Injected noises n_k (for eps or x) and m_k (for z) are drawn from ``rng`` in that order at every step whatever
    the space, so runs that differ only in their switches see the same random numbers.
    Noise cancellation tracks eta_0 = eps_0 (or 0), eta_{k+1} = (1 - g_e/2) eta_k + sqrt(g_e) n_k.

    The z posterior's precision grows like |J|^2 / sigma^2, so a constant z step is unstable at small sigma;
    ``z_step_ref`` > 0 shrinks each chain's z step by sigma^2 / (sigma^2 + ref^2). A per-chain constant step is
    still exact Langevin for that chain, so the target is unchanged.
    """
    s = append_dims(sigma, z0.ndim)
    ge = cfg.gamma_eps
    gz = cfg.gamma_z * s**2 / (s**2 + cfg.z_step_ref**2) if cfg.z_step_ref > 0 else cfg.gamma_z
    moves_z = cfg.moves_z
    x_space = cfg.space in ("x", "x_z")
    z, eps = z0.detach(), eps0.detach()
    eta = eps.clone() if (cfg.cancel_noise and cfg.cancel_initial) else torch.zeros_like(eps)
    x = None
    for _ in range(cfg.K):
        n = torch.randn(eps.shape, generator=rng, device=eps.device, dtype=eps.dtype)
        m = torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
        g, z_leaf = _forward_for_vjp(generator, z, labels, moves_z)
        if x_space:
            if x is None:
                x = g.detach() + s * eps
            eps_implied = (x - g.detach()) / s
            with torch.no_grad():
                d = denoiser_eps(score_net, x, sigma, labels) - denoiser_eps(teacher, x, sigma, labels)
            # x moves with step gamma_eps sigma^2 on grad_x log rho = (d - eps_implied) / sigma (eps units);
            # z sees the likelihood coupling: grad_z = J^T (x - g) / sigma^2 - z.
            x = x + s * (0.5 * ge * (d - eps_implied) + math.sqrt(ge) * n)
            cotangent = eps_implied
        else:
            x_t = g.detach() + s * eps
            with torch.no_grad():
                d = denoiser_eps(score_net, x_t, sigma, labels) - denoiser_eps(teacher, x_t, sigma, labels)
            eps = eps + 0.5 * ge * (d - eps) + math.sqrt(ge) * n
            cotangent = d
        if moves_z:
            grad_z = _vjp(g, z_leaf, cotangent) / s - z
            z = (z + 0.5 * gz * grad_z + gz**0.5 * m).detach()
        if cfg.cancel_noise:
            eta = (1.0 - 0.5 * ge) * eta + math.sqrt(ge) * n
    if x_space and x is not None:
        with torch.no_grad():
            eps = (x - generator(z, labels)) / s
    eps = eps.detach()
    return EStepResult(z=z.detach(), eps=eps, eps_tilde=eps - eta if cfg.cancel_noise else eps, eta=eta)


def mstep_weight(sigma: Tensor, kind: MStepWeight) -> Tensor:
    """w(sigma) of the M-step. 'sigma' makes the per-sample gradient -J^T eps_tilde, unit-free across levels."""
    if kind == "sigma":
        return sigma
    if kind == "one":
        return torch.ones_like(sigma)
    if kind == "sigma2":
        return sigma**2
    raise ValueError(f"unknown M-step weighting {kind!r}; expected one of {MSTEP_WEIGHTS}")


def mstep_loss(generator: nn.Module, z: Tensor, eps_tilde: Tensor, sigma: Tensor, labels: Tensor | None,
               weight: MStepWeight = "sigma") -> Tensor:
    """L_gen = mean_b -w(sigma)/sigma <sg(eps_tilde), g(sg(z_K))>; d/dtheta = -w/sigma J_theta^T eps_tilde."""
    g = generator(z.detach(), labels)
    coef = mstep_weight(sigma, weight) / sigma
    return -(coef * (eps_tilde.detach() * g).flatten(1).sum(1)).mean()


def diff_instruct_loss(generator: nn.Module, teacher: Denoiser, score_net: Denoiser, z: Tensor, eps: Tensor,
                       sigma: Tensor, labels: Tensor | None, weight: MStepWeight = "sigma") -> Tensor:
    """Diff-Instruct / VSD (reverse KL) surrogate, written in scores: grad = w J^T (s_psi - s_phi)(x_t)."""
    g = generator(z, labels)
    x_t = g.detach() + append_dims(sigma, z.ndim) * eps
    with torch.no_grad():
        direction = denoiser_score(score_net, x_t, sigma, labels) - denoiser_score(teacher, x_t, sigma, labels)
    w = mstep_weight(sigma, weight)
    return (w * (direction * g).flatten(1).sum(1)).mean()


def score_dsm_loss(score_net: Denoiser, generator: nn.Module, z: Tensor, sigma: Tensor, labels: Tensor | None,
                   noise: Tensor, sigma_data: float) -> Tensor:
    """DSM of the auxiliary score network on fresh generator samples (generator held fixed)."""
    with torch.no_grad():
        x0 = generator(z, labels)
    return dsm_loss(score_net, x0, sigma, labels, noise, sigma_data)
