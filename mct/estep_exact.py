"""The E-step's exact target for a 2-D generator, by quadrature on grids (the yardstick of the E-step sampler).

VE convention (alpha = 1). A student g: R^2 -> R^2 with z ~ N(0, I) and x_t = g(z) + sigma eps has
  q_t(x)     = integral N(z; 0, I) N(x; g(z), sigma^2 I) dz              (student marginal)
  q(z | x)   proportional to N(z; 0, I) N(x; g(z), sigma^2 I)            (student posterior)
and the E-step targets rho(x, z) = p_t(x) q(z | x): the teacher's marginal in x, the student's posterior in z.
Everything below replaces the z integral by the midpoint rule on a square z grid (in float64, through
log-sum-exp) and the x integral by the midpoint rule on a square x grid weighted by the exact p_t.

Why the midpoint rule converges fast here: in z the integrand is locally a Gaussian of width about
sigma / |J_g(z)|, and for a Gaussian of width s the rule's relative error is about 2 exp(-2 pi^2 s^2 / h^2)
(Poisson summation) -- 3e-9 at h = s, 7e-3 at h = 2 s. So a z spacing h_z <~ sigma / max |J| is enough, and
:func:`z_grid_for` picks it from the generator's largest Jacobian norm on the grid. The same holds in x with
h_x <~ sigma, since p_t, q_t and N(x; g, sigma^2) are all smooth on the scale sigma. Box truncation is the
other error: the z box must hold the prior and the posterior's mass (:attr:`ExactTarget.rho_z_edge_mass`
reports what rho puts on the outermost ring of cells), the x box the mass of p_t.

Pieces (torch only; nothing here knows a world beyond the target's ``log_prob(x, sigma)``):
  :class:`Grid2D`                    square cell-centred grids, their edges and nested coarse bins
  :class:`StudentQuadrature`         g on a z grid; log q_t(x), q(z | x), E_q[g(z) | x]
  :class:`QuadratureStudentDenoiser` the exact student denoiser E_q[g(z) | x_t] as a drop-in score network
  :func:`exact_estep_target`         rho on grids: p_t masses on the x grid, rho_z and E_rho[x | z] on the z grid
  :func:`exact_mstep_gradient`       the M-step's gradient at the exact target (the chain's K -> inf, ideal value)
  :func:`tv_to_grid`                 total variation between samples and grid masses on nested coarse bins
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mct.emd import MStepWeight, mstep_weight

LOG_2PI = math.log(2 * math.pi)
_CHUNK_ELEMENTS = 2_000_000  # pairs per block in the (x, z) sums: 16 MB of float64 per buffer
PRUNE_RADIUS = 9.0  # in units of sigma: cells whose g is farther from x than this are left out (see posterior_mean_g)
PRUNE_TOL = 1e-10
PRUNE_MIN_CELLS = 20_000  # below this the whole grid is cheaper than the hash look-ups


@dataclass(frozen=True)
class Grid2D:
    """n x n cells of the square [c0 - r, c0 + r] x [c1 - r, c1 + r]; points are the cell centres (row-major in
    axis 0 then axis 1, like ``torch.meshgrid(..., indexing="ij")``)."""

    center: tuple[float, float]
    half_width: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 2 or not self.half_width > 0:
            raise ValueError(f"need n >= 2 and half_width > 0, got n={self.n}, half_width={self.half_width}")

    @property
    def h(self) -> float:
        return 2 * self.half_width / self.n

    @property
    def cell_area(self) -> float:
        return self.h**2

    def axis(self, i: int) -> Tensor:
        lo = self.center[i] - self.half_width
        return lo + self.h * (torch.arange(self.n, dtype=torch.float64) + 0.5)

    def edges(self, i: int) -> Tensor:
        lo = self.center[i] - self.half_width
        return lo + self.h * torch.arange(self.n + 1, dtype=torch.float64)

    @property
    def points(self) -> Tensor:
        a, b = torch.meshgrid(self.axis(0), self.axis(1), indexing="ij")
        return torch.stack([a.flatten(), b.flatten()], dim=1)

    def coarsen(self, factor: int) -> Grid2D:
        """The grid of bins each holding factor x factor cells of this one (``factor`` must divide n)."""
        if self.n % factor:
            raise ValueError(f"factor {factor} does not divide n={self.n}")
        return Grid2D(self.center, self.half_width, self.n // factor)

    def bin_masses(self, masses: Tensor, factor: int) -> Tensor:
        """Sum per-cell masses (n*n,) into the bins of :meth:`coarsen` (flattened the same way)."""
        m = self.n // factor
        return masses.reshape(m, factor, m, factor).sum((1, 3)).flatten()


def generator_on_grid(generator: nn.Module, z: Tensor, chunk: int = 65_536) -> Tensor:
    """g(z) in float64 for every grid point (the generator runs in its own dtype, without gradients)."""
    p = next(iter(generator.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    out = []
    with torch.no_grad():
        for i in range(0, z.shape[0], chunk):
            out.append(generator(z[i:i + chunk].to(dtype), None).double())
    return torch.cat(out)


def jacobian_norms(generator: nn.Module, z: Tensor, chunk: int = 65_536) -> Tensor:
    """Spectral norm of J_g(z) per point (two VJPs give the rows of the 2x2 Jacobian)."""
    p = next(iter(generator.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    out = []
    for i in range(0, z.shape[0], chunk):
        zl = z[i:i + chunk].to(dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            g = generator(zl, None)
            rows = [torch.autograd.grad(g[:, k].sum(), zl, retain_graph=k == 0)[0] for k in range(2)]
        J = torch.stack(rows, dim=1).double()  # (b, 2, 2): J[b, k, :] = d g_k / d z
        out.append(torch.linalg.matrix_norm(J, ord=2))
    return torch.cat(out)


def z_grid_for(generator: nn.Module, sigma: float, half_width: float = 6.0, cells_per_width: float = 1.0,
               n_min: int = 64, n_max: int = 600, probe: int = 200, multiple_of: int = 2) -> Grid2D:
    """A z grid whose spacing is ``sigma / (cells_per_width * max|J|)`` (max over a probe grid), n in [n_min, n_max].

    At cells_per_width = 1 the local Gaussian's width is about one cell, where the midpoint rule's error is of order
    exp(-2 pi^2) (see the module docstring); at 0.6 (benchmarks/estep_fidelity.py) about exp(-2 pi^2 0.36) = 1e-3,
    and only where |J| is largest. ``n_max`` caps the cost; a convergence check (n against 2n, as the benchmark's
    --convergence does) says whether the grid is fine enough.
    """
    jmax = float(jacobian_norms(generator, Grid2D((0.0, 0.0), half_width, probe).points).max())
    h = sigma / (cells_per_width * max(jmax, 1e-6))
    n = int(min(max(math.ceil(2 * half_width / h), n_min), n_max))
    return Grid2D((0.0, 0.0), half_width, -(-n // multiple_of) * multiple_of)


class StudentQuadrature:
    """The student's marginal and posterior by the midpoint rule on ``z_grid`` (g evaluated once, float64)."""

    def __init__(self, generator: nn.Module, z_grid: Grid2D) -> None:
        self.z_grid = z_grid
        self.z = z_grid.points
        self.g = generator_on_grid(generator, self.z)
        # log of the prior's mass on each cell (midpoint rule): log N(z_i) + log h^2
        self.log_w = -0.5 * (self.z**2).sum(1) - LOG_2PI + math.log(z_grid.cell_area)
        self._g_sq_half = 0.5 * (self.g**2).sum(1)
        self._index: dict = {}

    def _logits(self, x: Tensor, s2: Tensor, idx: Tensor | None = None) -> Tensor:
        """log w_i + log N(x; g_i, s^2) up to the per-row constant -|x|^2 / (2 s^2) - log(2 pi s^2), over the cells
        ``idx`` (all by default)."""
        g, log_w, gsq = (self.g, self.log_w, self._g_sq_half) if idx is None else \
            (self.g[idx], self.log_w[idx], self._g_sq_half[idx])
        if bool((s2 == s2[0]).all()):  # one noise level: a single fused matmul
            return torch.addmm(log_w - gsq / s2[0], x / s2[0], g.T)
        return log_w[None] + (x @ g.T - gsq[None]) / s2[:, None]

    def _chunks(self, x: Tensor, sigma: Tensor | float):
        x = x.double()
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        step = max(1, _CHUNK_ELEMENTS // self.z.shape[0])
        for i in range(0, x.shape[0], step):
            xi, s2 = x[i:i + step], s[i:i + step] ** 2
            yield i, xi, s2, self._logits(xi, s2)

    def log_marginal(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log q_t(x) (B,) in float64."""
        out = []
        for _, xi, s2, logits in self._chunks(x, sigma):
            const = -0.5 * (xi**2).sum(1) / s2 - torch.log(2 * math.pi * s2)
            out.append(torch.logsumexp(logits, dim=1) + const)
        return torch.cat(out)

    def posterior(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """q(z_i | x) as masses over the grid cells, (B, n*n), rows sum to 1."""
        return torch.cat([torch.softmax(logits, dim=1) for *_, logits in self._chunks(x, sigma)])

    def posterior_mean_g(self, x: Tensor, sigma: Tensor | float, prune: bool = True) -> Tensor:
        """E_q[g(z) | x] (B, 2) in float64: the student's exact denoiser.

        With ``prune`` and one sigma for the batch, each x sums only over the cells whose g lies within
        R = PRUNE_RADIUS * sigma of it (found through a hash of g on square x cells); a query is redone over the
        whole grid unless the bound on what was left out, exp(-(R^2 - |x|^2) / (2 sigma^2)) * (prior mass <= 1), is
        below PRUNE_TOL times the mass kept. So pruning changes the result by a relative 1e-10 at most.
        """
        x = x.double()
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        if not (prune and x.shape[0] and self.z.shape[0] >= PRUNE_MIN_CELLS and bool((s == s[0]).all())):
            return self._full_mean_g(x, s)
        return self._pruned_mean_g(x, float(s[0]))

    def _full_mean_g(self, x: Tensor, s: Tensor) -> Tensor:
        return torch.cat([torch.softmax(logits, dim=1) @ self.g for *_, logits in self._chunks(x, s)])

    def _cell_index(self, sigma: float):
        """g hashed on square x cells of side R / 2 (cached per sigma): sorted order and CSR row starts."""
        key = round(sigma, 12)
        if key not in self._index:
            side = PRUNE_RADIUS * sigma / 2
            lo = self.g.min(0).values - 1e-9
            shape = (((self.g.max(0).values - lo) / side).floor().long() + 1).tolist()
            cell = ((self.g - lo) / side).floor().long()
            flat = cell[:, 0] * shape[1] + cell[:, 1]
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=shape[0] * shape[1])
            starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            self._index[key] = (side, lo, shape, order, starts, {})
        return self._index[key]

    def _candidates(self, index, cx: int, cy: int) -> Tensor:
        """Grid cells whose g is in the 5 x 5 block of x cells around (cx, cy): every g within R of the block's centre
        cell."""
        side, lo, shape, order, starts, cache = index
        if (cx, cy) not in cache:
            parts = []
            y0, y1 = max(cy - 2, 0), min(cy + 2, shape[1] - 1)
            for ix in range(max(cx - 2, 0), min(cx + 2, shape[0] - 1) + 1):
                if y0 <= y1:
                    a, b = int(starts[ix * shape[1] + y0]), int(starts[ix * shape[1] + y1 + 1])
                    parts.append(order[a:b])
            cache[(cx, cy)] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return cache[(cx, cy)]

    def _pruned_mean_g(self, x: Tensor, sigma: float) -> Tensor:
        side, lo, shape, *_ = index = self._cell_index(sigma)
        s2 = torch.full((1,), sigma**2, dtype=torch.float64)
        # cells beyond 2 of the box have no candidates: clamp them to 3 outside, so the key below stays unique
        cell = ((x - lo) / side).floor().clamp(-3, max(shape) + 2).long()
        key = (cell[:, 0] + 3) * (shape[1] + 6) + cell[:, 1] + 3
        order = torch.argsort(key)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        out = torch.empty_like(x)
        redo = []
        pos = 0
        bound_log = -0.5 * (PRUNE_RADIUS**2 - (x**2).sum(1) / sigma**2)  # log of the left-out bound, per query
        for n in counts.tolist():
            q = order[pos:pos + n]
            pos += n
            cx, cy = (int(v) for v in cell[q[0]])
            cand = self._candidates(index, cx, cy)
            if cand.numel() == 0:
                redo.append(q)
                continue
            logits = self._logits(x[q], s2.expand(n), cand)
            lse = torch.logsumexp(logits, dim=1)
            ok = bound_log[q] - lse < math.log(PRUNE_TOL)
            out[q] = torch.exp(logits - lse[:, None]) @ self.g[cand]
            if not bool(ok.all()):
                redo.append(q[~ok])
        if redo:
            r = torch.cat(redo)
            out[r] = self._full_mean_g(x[r], torch.full((r.numel(),), sigma, dtype=torch.float64))
        return out

    def sample_posterior(self, x: Tensor, sigma: Tensor | float, rng: torch.Generator | None = None,
                         jitter: bool = False) -> Tensor:
        """z ~ q(z | x) on the grid (cell centres; ``jitter`` spreads each uniformly over its cell)."""
        idx = torch.cat([torch.multinomial(torch.softmax(logits, dim=1), 1, generator=rng).squeeze(1)
                         for *_, logits in self._chunks(x, sigma)])
        z = self.z[idx]
        if jitter:
            z = z + (torch.rand(z.shape, generator=rng, dtype=z.dtype) - 0.5) * self.z_grid.h
        return z


def student_marginal(generator: nn.Module, z_grid: Grid2D, x: Tensor, sigma: Tensor | float) -> Tensor:
    """log q_t(x) by quadrature on ``z_grid`` (float64)."""
    return StudentQuadrature(generator, z_grid).log_marginal(x, sigma)


def student_posterior(generator: nn.Module, z_grid: Grid2D, x: Tensor, sigma: Tensor | float) -> Tensor:
    """q(z | x) as cell masses on ``z_grid``, (B, n*n) float64."""
    return StudentQuadrature(generator, z_grid).posterior(x, sigma)


class QuadratureStudentDenoiser(nn.Module):
    """D(x, sigma) = E_q[g(z) | x_t = x]: the exact student denoiser, a drop-in for the E-step's score network.

    It is a snapshot: g is evaluated on the grid when the module is built (rebuild it after the generator changes).
    Computed in float64; returned in the input's dtype.
    """

    def __init__(self, generator: nn.Module | StudentQuadrature, z_grid: Grid2D | None = None) -> None:
        super().__init__()
        self.quad = generator if isinstance(generator, StudentQuadrature) else StudentQuadrature(generator, z_grid)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.quad.posterior_mean_g(x, sigma).to(x.dtype)


LogProb = Callable[[Tensor, float], Tensor]  # log p_t(x) of the teacher at noise level sigma, e.g. GaussianMixture


@dataclass
class ExactTarget:
    """rho(x, z) = p_t(x) q(z | x) at one sigma, on an x grid and a z grid (all float64)."""

    sigma: float
    x_grid: Grid2D
    z_grid: Grid2D
    p_x: Tensor  # (Nx,) masses of p_t on the x cells (normalised over the box)
    log_q_x: Tensor  # (Nx,) log q_t at the x cell centres
    rho_z: Tensor  # (Nz,) masses of rho's z marginal on the z cells
    mean_x_given_z: Tensor  # (Nz, 2) E_rho[x | z] (the prior mean g(z) where rho_z is 0)
    g: Tensor  # (Nz, 2) g at the z cell centres
    p_x_box_mass: float  # integral of p_t over the x box before normalisation (quadrature): 1 - truncation

    @property
    def rho_z_edge_mass(self) -> float:
        """rho's z mass on the outermost ring of z cells: large values mean the z box is too small."""
        n = self.z_grid.n
        m = self.rho_z.reshape(n, n)
        inner = m[1:-1, 1:-1].sum()
        return float(m.sum() - inner)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean (4,) and covariance (4, 4) of (x, z) under rho."""
        x, z = self.x_grid.points, self.z_grid.points
        mx, mz = self.p_x @ x, self.rho_z @ z
        exx = (self.p_x[:, None] * x).T @ x
        exz = (self.rho_z[:, None] * self.mean_x_given_z).T @ z
        ezz = (self.rho_z[:, None] * z).T @ z
        second = torch.cat([torch.cat([exx, exz], 1), torch.cat([exz.T, ezz], 1)], 0)
        mean = torch.cat([mx, mz])
        return mean, second - torch.outer(mean, mean)


def exact_estep_target(generator: nn.Module | StudentQuadrature, log_prob: LogProb, sigma: float, x_grid: Grid2D,
                       z_grid: Grid2D | None = None) -> ExactTarget:
    """rho on grids: p_j = p_t(x_j) h_x^2 (normalised), q(z_i | x_j) by :class:`StudentQuadrature`, and
    rho_z(i) = sum_j p_j q(z_i | x_j), rho_z(i) E_rho[x | z_i] = sum_j p_j q(z_i | x_j) x_j.

    ``generator`` may be a prepared :class:`StudentQuadrature` (then ``z_grid`` is ignored).
    """
    quad = generator if isinstance(generator, StudentQuadrature) else StudentQuadrature(generator, z_grid)
    x = x_grid.points
    log_p = log_prob(x, sigma).double() + math.log(x_grid.cell_area)
    box_mass = float(torch.logsumexp(log_p, 0).exp())
    p_x = torch.softmax(log_p, 0)
    nz = quad.z.shape[0]
    rho_z = torch.zeros(nz, dtype=torch.float64)
    sx = torch.zeros(nz, 2, dtype=torch.float64)
    log_q = []
    for i, xi, s2, logits in quad._chunks(x, sigma):
        lse = torch.logsumexp(logits, dim=1)
        log_q.append(lse - 0.5 * (xi**2).sum(1) / s2 - torch.log(2 * math.pi * s2))
        post = torch.exp(logits - lse[:, None])  # q(z_i | x_j), rows sum to 1
        pj = p_x[i:i + xi.shape[0]]
        rho_z += pj @ post
        sx += post.T @ (pj[:, None] * xi)
    safe = rho_z.clamp_min(1e-300)[:, None]
    mean_x = torch.where(rho_z[:, None] > 0, sx / safe, quad.g)
    return ExactTarget(sigma=float(sigma), x_grid=x_grid, z_grid=quad.z_grid, p_x=p_x, log_q_x=torch.cat(log_q),
                       rho_z=rho_z, mean_x_given_z=mean_x, g=quad.g, p_x_box_mass=box_mass)


def _flat_grad(module: nn.Module) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in module.parameters()])


def exact_mstep_gradient(generator: nn.Module, target: ExactTarget, weight: MStepWeight = "sigma",
                         chunk: int = 65_536) -> Tensor:
    """The M-step gradient at the exact target, flattened over ``generator.parameters()`` (float64):

        -(w / sigma) E_rho[J_theta(z)^T (x - g(z)) / sigma] = grad_theta sum_i <sg(c_i), g_theta(z_i)>,
        c_i = -(w / sigma^2) rho_z(i) (E_rho[x | z_i] - g(z_i)),

    the value :func:`mct.emd.mstep_loss`'s gradient takes in expectation when (z_K, eps_tilde) ~ rho exactly.
    """
    sigma = torch.tensor([target.sigma], dtype=torch.float64)
    coef = float(mstep_weight(sigma, weight)[0]) / target.sigma**2
    c = -coef * target.rho_z[:, None] * (target.mean_x_given_z - target.g)
    z = target.z_grid.points
    dtype = next(iter(generator.parameters())).dtype
    generator.zero_grad()
    keep = (target.rho_z > 0).nonzero().squeeze(1)
    for i in range(0, keep.numel(), chunk):
        idx = keep[i:i + chunk]
        with torch.enable_grad():
            (c[idx].to(dtype) * generator(z[idx].to(dtype), None)).sum().backward()
    out = _flat_grad(generator)
    generator.zero_grad()
    return out


def tv_to_grid(samples: Tensor, grid: Grid2D, masses: Tensor) -> float:
    """Total variation between the histogram of ``samples`` on ``grid``'s cells and ``masses`` (n*n,) on them.

    Samples outside the box count in one extra bin whose target mass is 1 - masses.sum() (zero for a normalised
    target). Finite samples give a positive floor of about sqrt(#occupied bins / (2 pi N)); compare with the TV of
    exact samples of the same size.
    """
    s = samples.double()
    lo = torch.tensor([grid.center[0] - grid.half_width, grid.center[1] - grid.half_width], dtype=torch.float64)
    idx = torch.floor((s - lo) / grid.h).long()
    inside = ((idx >= 0) & (idx < grid.n)).all(1) & torch.isfinite(s).all(1)
    flat = idx[inside, 0] * grid.n + idx[inside, 1]
    hist = torch.bincount(flat, minlength=grid.n**2).double() / s.shape[0]
    outside = 1.0 - float(inside.double().mean())
    target_outside = max(0.0, 1.0 - float(masses.sum()))
    return 0.5 * (float((hist - masses).abs().sum()) + abs(outside - target_outside))


__all__ = ["Grid2D", "StudentQuadrature", "QuadratureStudentDenoiser", "ExactTarget", "exact_estep_target",
           "exact_mstep_gradient", "student_marginal", "student_posterior", "generator_on_grid", "jacobian_norms",
           "z_grid_for", "tv_to_grid"]
