"""EM distillation with an exact E-step, for worlds with a 2-D latent and exact data samples (``distill.estep: exact``).

The paper's objective is the forward KL at every noise level, E_sigma w(sigma) KL(p_t || q_t). With x_t drawn from the
teacher's p_t exactly (a data sample plus sigma noise) and

    log q_t(x_t) = log integral N(z; 0, I) N(x_t; g(z), sigma^2 I) dz

computed over z instead of sampled by a chain, its gradient is the E-step's K -> infinity limit with exact scores:
grad -log q_t(x_t) = -E_{q(z | x_t)}[J_g(z)^T (x_t - g(z))] / sigma^2, the posterior-weighted M-step gradient (the
Fisher identity). Weighted by w(sigma) it is what :func:`mct.emd.mstep_loss` follows in expectation when its (z_K,
eps_tilde) are exact draws of rho (see :func:`mct.estep_exact.exact_mstep_gradient`).

The z integral is an importance-sampling estimate over ``draws`` points per x_t, from a proposal built on a square z
grid (the midpoint rule's posterior over cells, each cell widened by g's spread over it so that a posterior narrower
than a cell still finds its cell, then uniform within the cell), mixed with the prior (``defensive``) so that every
weight N(z)/r(z) is at most 1/defensive. log q is then a log-mean-exp of exact terms, and its gradient is the
self-normalised posterior average of the per-draw M-step gradients (consistent in ``draws``, exact as the proposal
approaches the posterior).

The control variate (``control_variate``): the same objective on the student's own samples x'_t = g(z') + sigma eps'
(held fixed, at the same sigmas) is subtracted. Its expected gradient is zero for any generator,
E_{x' ~ q_t}[grad log q_t(x')] = grad integral q_t = 0, while it cancels most of the per-sample noise of the first term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mct.emd import MStepWeight, mstep_weight

LOG_2PI = math.log(2 * math.pi)


def _log_normal_2d(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """log N(x; mean, var I) in 2-D, broadcasting over leading dimensions (var broadcast likewise)."""
    return -0.5 * ((x - mean) ** 2).sum(-1) / var - LOG_2PI - torch.log(var)


@dataclass
class ExactEStepResult:
    """One exact E-step over a batch: the loss to backpropagate and what the log records."""

    loss: Tensor  # mean over the batch of w(sigma) (-log q_t(x_t) [+ log q_t(x'_t)])
    log_q: Tensor  # (B,) the estimate of log q_t at the teacher's x_t (detached)
    ess: Tensor  # (B,) effective sample size of the importance weights at the teacher's x_t, in [1, draws]

    def health(self) -> dict[str, float]:
        return {"estep_log_q": float(self.log_q.mean()), "estep_ess_median": float(self.ess.median()),
                "estep_ess_low_frac": float((self.ess < 2.0).float().mean())}


class GridProposal:
    """r(z | x_t) from g on a square grid of ``n`` x ``n`` cells over [-half_width, half_width]^2 (no gradients)."""

    def __init__(self, generator: nn.Module, labels: Tensor | None, n: int, half_width: float) -> None:
        p = next(iter(generator.parameters()))
        dtype, self.device = p.dtype, p.device
        self.n, self.half_width = n, half_width
        self.h = 2 * half_width / n
        axis = -half_width + self.h * (torch.arange(n, dtype=torch.float64, device=self.device) + 0.5)
        a, b = torch.meshgrid(axis, axis, indexing="ij")
        self.z = torch.stack([a.flatten(), b.flatten()], dim=1)  # (n*n, 2), row-major
        with torch.no_grad():
            g = generator(self.z.to(dtype), None if labels is None else labels[:1].expand(n * n, *labels.shape[1:]))
        self.g = g.double()
        gg = self.g.reshape(n, n, 2)
        # g's spread over a cell: its image is about the parallelogram with sides h J e1, h J e2 (central
        # differences, one-sided at the border); a quarter of the squared sides is a generous width.
        d0 = torch.gradient(gg, dim=0)[0]
        d1 = torch.gradient(gg, dim=1)[0]
        self.spread2 = ((d0**2).sum(-1) + (d1**2).sum(-1)).flatten() / 4
        self.log_prior_mass = -0.5 * (self.z**2).sum(1) - LOG_2PI + 2 * math.log(self.h)

    def cell_logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        """(B, n*n) unnormalised log masses of the cells: prior mass times the widened likelihood.

        In float32 through one matmul (|x - g|^2 = |x|^2 - 2 x.g + |g|^2): this is only the proposal, used
        consistently for drawing and for r(z), so its rounding changes the proposal, never the estimate's target."""
        xf, g = x.float(), self.g.float()
        var = sigma.float()[:, None] ** 2 + self.spread2.float()[None]
        sq = ((xf**2).sum(1)[:, None] - 2 * xf @ g.T + (g**2).sum(1)[None]).clamp_min(0)
        return self.log_prior_mass.float()[None] - 0.5 * sq / var - torch.log(var)

    def sample(self, x: Tensor, sigma: Tensor, draws: int, defensive: float, rng: torch.Generator | None
               ) -> tuple[Tensor, Tensor]:
        """``draws`` z per row of x (B, draws, 2) and their log importance weights log N(z; 0, I) - log r(z)."""
        b = x.shape[0]
        log_m = torch.log_softmax(self.cell_logits(x, sigma), dim=1)  # (B, n*n), float32
        cells = torch.multinomial(log_m.exp(), draws, replacement=True, generator=rng)  # (B, D)
        kw = {"generator": rng, "dtype": torch.float64, "device": self.device}
        z_cell = self.z[cells] + (torch.rand((b, draws, 2), **kw) - 0.5) * self.h
        z_prior = torch.randn((b, draws, 2), **kw)
        from_prior = torch.rand((b, draws), **kw) < defensive
        z = torch.where(from_prior[..., None], z_prior, z_cell)
        log_prior = -0.5 * (z**2).sum(-1) - LOG_2PI
        # r(z) = (1 - a) m_cell(z) / h^2 (inside the box) + a N(z; 0, I)
        idx = torch.floor((z + self.half_width) / self.h).long()
        inside = ((idx >= 0) & (idx < self.n)).all(-1)
        flat = (idx[..., 0].clamp(0, self.n - 1) * self.n + idx[..., 1].clamp(0, self.n - 1))
        log_cell = torch.gather(log_m, 1, flat).double() - 2 * math.log(self.h)
        log_cell = torch.where(inside, log_cell, torch.full_like(log_cell, -math.inf))
        log_r = torch.logaddexp(math.log1p(-defensive) + log_cell, math.log(defensive) + log_prior)
        return z, log_prior - log_r


class ExactEStep:
    """The exact E-step's M-step objective (module docstring); defaults are the documented ``distill.exact_*`` keys.

    ``grid``: cells per axis of the proposal's z grid over [-half_width, half_width]^2; ``draws``: importance draws
    per x_t; ``defensive``: the prior's share of the proposal; ``control_variate``: subtract the objective on the
    student's own samples."""

    def __init__(self, grid: int = 64, half_width: float = 6.0, draws: int = 16, defensive: float = 0.1,
                 control_variate: bool = True, weight: MStepWeight = "sigma") -> None:
        if not 0.0 < defensive < 1.0:
            raise ValueError(f"defensive must be in (0, 1), got {defensive}")
        self.grid, self.half_width, self.draws, self.defensive = grid, half_width, draws, defensive
        self.control_variate, self.weight = control_variate, weight

    def log_marginal(self, generator: nn.Module, proposal: GridProposal, x: Tensor, sigma: Tensor,
                     labels: Tensor | None, rng: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(log q_t(x) estimate (B,), differentiable through g; the effective sample size (B,))."""
        z, log_w = proposal.sample(x, sigma, self.draws, self.defensive, rng)
        b, dtype = x.shape[0], next(iter(generator.parameters())).dtype
        lab = None if labels is None else labels.repeat_interleave(self.draws, 0)
        g = generator(z.reshape(b * self.draws, 2).to(dtype), lab).reshape(b, self.draws, 2).double()
        terms = log_w + _log_normal_2d(x.double()[:, None], g, sigma.double()[:, None] ** 2)  # (B, D)
        log_q = torch.logsumexp(terms, dim=1) - math.log(self.draws)
        p = torch.softmax(terms.detach(), dim=1)
        return log_q, 1.0 / (p**2).sum(1)

    def __call__(self, generator: nn.Module, x_t: Tensor, sigma: Tensor, labels: Tensor | None,
                 student_x_t: Tensor | None, rng: torch.Generator | None) -> ExactEStepResult:
        """The loss at the teacher's noisy samples ``x_t`` (B, 2) and, with the control variate, minus the same at
        the student's ``student_x_t`` (B, 2, held fixed), both at the per-row noise levels ``sigma`` (B,)."""
        proposal = GridProposal(generator, labels, self.grid, self.half_width)
        log_q, ess = self.log_marginal(generator, proposal, x_t, sigma, labels, rng)
        objective = -log_q
        if self.control_variate:
            if student_x_t is None:
                raise ValueError("the control variate needs the student's own noisy samples (student_x_t)")
            log_q_student, _ = self.log_marginal(generator, proposal, student_x_t.detach(), sigma, labels, rng)
            objective = objective + log_q_student
        w = mstep_weight(sigma.double(), self.weight)
        return ExactEStepResult(loss=(w * objective).mean().to(x_t.dtype), log_q=log_q.detach(), ess=ess)


def marginal_check(generator: nn.Module, estep: ExactEStep, x_t: Tensor, sigma: float,
                   rng: torch.Generator | None, log_p: Tensor | None = None) -> dict[str, float]:
    """How well the estimate of log q_t holds at one (small) sigma, against quadrature at two resolutions.

    ``quadrature`` uses :func:`mct.estep_exact.z_grid_for` (a spacing of sigma / max|J|, capped at 600 cells per
    axis); ``quadrature_coarse`` the grid of half that resolution; their gap bounds the quadrature's own error when the
    rule has converged. ``estimate`` is this module's importance-sampling value (its Jensen gap is the mean
    difference, negative in expectation). With ``log_p``, the teacher's exact log p_t at ``x_t`` (drawn from p_t), the
    record also has ``kl``: mean(log p_t - log q_t) by quadrature, the forward KL the method minimises, at this sigma
    (a Monte Carlo estimate over the points; how far the student's modes are from sharp at small sigma)."""
    from mct.estep_exact import Grid2D, StudentQuadrature, z_grid_for

    s = torch.full((x_t.shape[0],), float(sigma), dtype=torch.float64, device=x_t.device)
    with torch.no_grad():
        proposal = GridProposal(generator, None, estep.grid, estep.half_width)
        est, ess = estep.log_marginal(generator, proposal, x_t, s, None, rng)
        fine = z_grid_for(generator, sigma, half_width=estep.half_width)
        coarse = Grid2D(fine.center, fine.half_width, max(2, fine.n // 2))
        quad = StudentQuadrature(generator, fine).log_marginal(x_t, s)
        quad_coarse = StudentQuadrature(generator, coarse).log_marginal(x_t, s)
    kl = {} if log_p is None else {"kl": float((log_p.double() - quad).mean())}
    return {"sigma": float(sigma), "n_points": int(x_t.shape[0]), "quadrature_cells": fine.n, **kl,
            "log_q_quadrature": float(quad.mean()), "log_q_quadrature_coarse": float(quad_coarse.mean()),
            "quadrature_gap": float((quad - quad_coarse).abs().mean()),
            "log_q_estimate": float(est.mean()), "estimate_gap": float((est - quad).mean()),
            "estimate_abs_gap": float((est - quad).abs().mean()), "ess_median": float(ess.median())}


__all__ = ["ExactEStep", "ExactEStepResult", "GridProposal", "marginal_check"]
