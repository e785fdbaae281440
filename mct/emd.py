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

from mct.config import MSTEP_WEIGHTS, LangevinConfig
from mct.diffusion import Denoiser, append_dims, denoiser_eps, denoiser_score, dsm_loss

MStepWeight = Literal["sigma", "one", "sigma2"]


class ChainExplosionError(RuntimeError):
    """Too many E-step chains left the region where the sampler is stable (non-finite, or z moved past the guard)."""


@dataclass
class EStepResult:
    z: Tensor  # z_K
    eps: Tensor  # eps_K (for the x spaces: the implied (x_K - g(z_K)) / sigma)
    eps_tilde: Tensor  # eps_K - eta_K: the E-step's signal with the tracked pure noise removed
    eta: Tensor  # the tracked pure-noise part (zeros unless cancellation is 'linear')
    z_shift: Tensor  # (B,) RMS per coordinate of z_K - z_0, before any reset
    reset: Tensor  # (B,) bool: chains the guard reset to their start

    def health(self) -> dict[str, float]:
        """Chain health for the training log: z moves of the chains that were kept (an exploded chain's move would
        swamp the mean), the largest finite move of any chain, and the shares moved, reset and non-finite."""
        kept = self.z_shift[~self.reset]
        finite = self.z_shift[torch.isfinite(self.z_shift)]
        return {"z_move_rms": float(kept.mean()) if kept.numel() else math.nan,
                "z_move_max": float(finite.max()) if finite.numel() else math.nan,
                "z_moved_frac": float((self.z_shift > 1.0).float().mean()),
                "chains_reset_frac": float(self.reset.float().mean()),
                "chains_nonfinite": int((~torch.isfinite(self.z_shift)).sum())}


def antithetic_start(z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pairs for antithetic cancellation: the first half of the batch, then its mirror (same z_0, sigma, labels,
    negated eps_0). Each chain is still a sample of the student's joint, so the batch mean stays unbiased."""
    b = z0.shape[0]
    if b % 2:
        raise ValueError(f"antithetic noise cancellation needs an even batch, got {b}")
    h = b // 2

    def twice(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.cat([t[:h], t[:h]])

    return twice(z0), torch.cat([eps0[:h], -eps0[:h]]), twice(sigma), twice(labels)


def _draw(shape: torch.Size, like: Tensor, rng: torch.Generator | None, mirrored: bool) -> Tensor:
    """Standard normal noise; ``mirrored``: the second half of the batch is the negated first half."""
    if not mirrored:
        return torch.randn(shape, generator=rng, device=like.device, dtype=like.dtype)
    half = torch.randn((shape[0] // 2, *shape[1:]), generator=rng, device=like.device, dtype=like.dtype)
    return torch.cat([half, -half])


def jacobian_top_eigenvalue(generator: nn.Module, z: Tensor, labels: Tensor | None, iters: int,
                            rng: torch.Generator | None = None) -> Tensor:
    """Per chain, the largest eigenvalue of J_g(z)^T J_g(z) by power iteration (a JVP and a VJP per iteration; the
    JVP by double backward, so any twice-differentiable network works). Returns shape (B,). Chains are independent
    because the generator maps each sample on its own."""
    z_leaf = z.detach().requires_grad_(True)
    v = torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
    lam = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    with torch.enable_grad():
        g = generator(z_leaf, labels)
        for _ in range(iters):
            v = v / append_dims(v.flatten(1).norm(dim=1).clamp_min(1e-30), z.ndim)
            u = torch.zeros_like(g, requires_grad=True)
            (jt_u,) = torch.autograd.grad(g, z_leaf, grad_outputs=u, create_graph=True)
            (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=v)  # J v
            lam = jv.detach().flatten(1).pow(2).sum(1)  # Rayleigh quotient v^T J^T J v, |v| = 1
            (v,) = torch.autograd.grad(g, z_leaf, grad_outputs=jv.detach(), retain_graph=True)  # J^T J v
            v = v.detach()
    return lam


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


def z_step_size(cfg: LangevinConfig, generator: nn.Module, z0: Tensor, sigma: Tensor, labels: Tensor | None,
                rng: torch.Generator | None, mirrored: bool) -> Tensor | float:
    """Each chain's z step (broadcastable to z), fixed for the whole chain: see :class:`LangevinConfig`."""
    s2 = append_dims(sigma, z0.ndim) ** 2
    if cfg.z_step == "curvature":
        h = z0.shape[0] // 2 if mirrored else z0.shape[0]
        lam = jacobian_top_eigenvalue(generator, z0[:h], None if labels is None else labels[:h], cfg.z_power_iters,
                                      rng)
        lam = torch.cat([lam, lam]) if mirrored else lam
        return cfg.gamma_z / (1.0 + append_dims(lam, z0.ndim) / s2)
    if cfg.z_step_ref > 0:
        return cfg.gamma_z * s2 / (s2 + cfg.z_step_ref**2)
    return cfg.gamma_z


def langevin_estep(generator: nn.Module, teacher: Denoiser, score_net: Denoiser, z0: Tensor, eps0: Tensor,
                   sigma: Tensor, labels: Tensor | None, cfg: LangevinConfig,
                   rng: torch.Generator | None = None) -> EStepResult:
    """K steps of Langevin MCMC on the E-step target rho_t(x_t, z), started from the student's own sample.

    Injected noises n_k (for eps or x) and m_k (for z) are drawn from ``rng`` in that order at every step whatever
    the space, so runs that differ only in their switches see the same random numbers. With antithetic cancellation
    the batch must come from :func:`antithetic_start` and the second half's noises mirror the first half's.
    Linear noise cancellation tracks eta_0 = eps_0 (or 0), eta_{k+1} = (1 - g_e/2) eta_k + sqrt(g_e) n_k.
    """
    s = append_dims(sigma, z0.ndim)
    ge = cfg.gamma_eps
    moves_z = cfg.moves_z
    cancel = cfg.resolved_cancel
    mirrored = cancel == "antithetic"
    if mirrored:
        h = z0.shape[0] // 2
        if z0.shape[0] % 2 or not (torch.equal(z0[:h], z0[h:]) and torch.equal(eps0[:h], -eps0[h:])):
            raise ValueError("antithetic cancellation: the batch must be pairs from antithetic_start(...)")
    gz = z_step_size(cfg, generator, z0, sigma, labels, rng, mirrored) if moves_z else 0.0
    x_space = cfg.space in ("x", "x_z")
    z, eps = z0.detach(), eps0.detach()
    eta = eps.clone() if (cancel == "linear" and cfg.cancel_initial) else torch.zeros_like(eps)
    eta0 = eta.clone()
    x = None
    for _ in range(cfg.K):
        n = _draw(eps.shape, eps, rng, mirrored)
        m = _draw(z.shape, z, rng, mirrored)
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
        if cancel == "linear":
            eta = (1.0 - 0.5 * ge) * eta + math.sqrt(ge) * n
    if x_space and x is not None:
        with torch.no_grad():
            eps = (x - generator(z, labels)) / s
    eps = eps.detach()
    z = z.detach()
    z_shift = (z - z0).flatten(1).pow(2).mean(1).sqrt()
    bad = ~(torch.isfinite(z).flatten(1).all(1) & torch.isfinite(eps).flatten(1).all(1)) | ~(z_shift <= cfg.z_guard)
    if mirrored:
        h = bad.shape[0] // 2
        bad = (bad[:h] | bad[h:]).repeat(2)  # reset both members of a pair: the pair's noise stays cancelled
    if bool(bad.any()):
        frac = float(bad.float().mean())
        if frac > cfg.max_reset_fraction:
            raise ChainExplosionError(
                f"E-step: {frac:.1%} of chains exploded (non-finite, or z moved more than z_guard={cfg.z_guard} per "
                f"coordinate; max move {float(z_shift.nan_to_num(math.inf).max()):.3g}), above max_reset_fraction="
                f"{cfg.max_reset_fraction}. Lower gamma_z, or use z_step: curvature.")
        keep = append_dims(~bad, z.ndim)
        z, eps, eta = torch.where(keep, z, z0), torch.where(keep, eps, eps0), torch.where(keep, eta, eta0)
    eps_tilde = eps - eta if cancel == "linear" else eps
    return EStepResult(z=z, eps=eps, eps_tilde=eps_tilde, eta=eta, z_shift=z_shift, reset=bad)


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
