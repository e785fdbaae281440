"""Distillation methods behind one interface: what one generator step computes, chosen by ``distill.method``.

Every method shares the loop of mct.train: fake-score (DSM) steps on generator samples, then one generator step on a
micro-batch (z0, eps0, sigma, labels) drawn by the loop. A method turns that batch into a loss whose backward gives
the generator's gradient; the loop knows no method by name (:func:`build_method`).

  emd    the paper's E-step (Langevin chain, mct.emd; or the exact E-step, mct.exact_em) and M-step;
         Diff-Instruct is its K = 1, gamma_z = 0 corner with cancellation.
  sid    Score identity Distillation (mct.sid).
  dmd2   DMD2's distribution-matching loss (mct.dmd2); its two time-scale rule is ``distill.score_steps``; DMD's
         regression on teacher noise-image pairs as an option (``distill.regression_weight``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mct.config import DistillConfig, LangevinConfig
from mct.diffusion import Denoiser
from mct.dmd2 import DMD2Loss, RegressionPairs, regression_loss
from mct.emd import EStepResult, MStepWeight, antithetic_start, langevin_estep, mstep_loss
from mct.exact_em import ExactEStep, marginal_check
from mct.sid import SiDLoss
from mct.worlds.registry import World


@dataclass
class Networks:
    """What a generator step reads: the generator (``generator`` wrapped by accelerate, whose backward syncs
    gradients; ``generator_raw`` the same parameters unwrapped), the frozen teacher the loss reads (the network or
    the world's analytic denoiser, guided when asked), the fake score network and the world."""

    generator: nn.Module
    generator_raw: nn.Module
    teacher: Denoiser
    score: nn.Module
    world: World


@dataclass
class GeneratorLoss:
    """One micro-batch's loss; the batch's start ``z0`` (antithetic pairs rebuild it); the E-step's chain (None
    where there is none); its health for the log; the seconds spent in E-steps."""

    loss: Tensor
    z0: Tensor
    chain: EStepResult | None = None
    health: dict[str, float] = field(default_factory=dict)
    estep_seconds: float = 0.0


Autocast = Callable[[], AbstractContextManager]


class Method(Protocol):
    def __call__(self, nets: Networks, z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None,
                 rng: torch.Generator, autocast: Autocast) -> GeneratorLoss: ...

    def record(self, nets: Networks, m_sigma: Any, device: torch.device) -> dict[str, Any]:
        """What the run's summary.json records of the method beyond the common keys ({} for most)."""
        return {}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class EMDLangevin(Method):
    """The paper's EMD step: K Langevin steps of the E-step from the student's own sample, then the M-step."""

    langevin: LangevinConfig
    weight: MStepWeight = "sigma"

    def __call__(self, nets: Networks, z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None,
                 rng: torch.Generator, autocast: Autocast) -> GeneratorLoss:
        t0 = time.perf_counter()
        if self.langevin.antithetic:
            z0, eps0, sigma, labels = antithetic_start(z0, eps0, sigma, labels)
        with autocast():  # bf16/fp16 network passes when asked; the chain state stays fp32
            res = langevin_estep(nets.generator_raw, nets.teacher, nets.score, z0, eps0, sigma, labels,
                                 self.langevin, rng)
        synchronize(z0.device)
        seconds = time.perf_counter() - t0
        with autocast():
            loss = mstep_loss(nets.generator, res.z, res.eps_tilde, sigma, labels, self.weight)
        return GeneratorLoss(loss, z0, res, res.health(), seconds)


@dataclass(frozen=True)
class EMDExact(Method):
    """EMD with the exact E-step (mct.exact_em): x_t = x_0 + sigma n with x_0 an exact data draw, and (for the control
    variate) the student's own x'_t = g(z0) + sigma eps0 at the same sigmas. E-step and M-step are one backward,
    timed as E-step."""

    estep: ExactEStep

    def __call__(self, nets: Networks, z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None,
                 rng: torch.Generator, autocast: Autocast) -> GeneratorLoss:
        t0 = time.perf_counter()
        with autocast():
            x0 = nets.world.exact_data_sample(z0.shape[0], rng, z0.device)
            noise = torch.randn(x0.shape, generator=rng, device=z0.device)
            x_t = x0 + sigma[:, None] * noise
            with torch.no_grad():
                student_x_t = nets.generator_raw(z0, labels) + sigma[:, None] * eps0
            res = self.estep(nets.generator, x_t, sigma, labels, student_x_t, rng)
        return GeneratorLoss(res.loss, z0, None, res.health(), time.perf_counter() - t0)

    def record(self, nets: Networks, m_sigma: Any, device: torch.device, quantiles: tuple[float, ...] = (0.01, 0.5),
               n: int = 512) -> dict[str, Any]:
        """The exact E-step's settings and its estimate of log q_t against quadrature (mct.exact_em.marginal_check)
        on the final generator, at the 1% quantile of the M-step's sigmas (the smallest it trained on, bar 1%) and
        at their median: the grid's error bound and the estimate's gap."""
        rng = torch.Generator(device=device).manual_seed(20_240_527)
        sigmas = m_sigma.sample(100_000, rng, device)
        est = self.estep
        checks = []
        for q in quantiles:
            sigma = float(torch.quantile(sigmas.double().cpu(), q))
            x_t = nets.world.exact_data_sample(n, rng, device).double()
            x_t = x_t + sigma * torch.randn(x_t.shape, generator=rng, device=device, dtype=torch.float64)
            log_p = nets.world.exact_log_prob(x_t, sigma)
            checks.append({"quantile": q, **marginal_check(nets.generator_raw, est, x_t, sigma, rng, log_p)})
        return {"exact_estep": {"grid": est.grid, "half_width": est.half_width, "draws": est.draws,
                                "defensive": est.defensive, "control_variate": est.control_variate,
                                "checks": checks}}


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters out of the autograd graph built inside (a loss that backpropagates through the fake
    score network's input must not accumulate gradients into its parameters)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


@dataclass(frozen=True)
class FakeScoreLoss(Method):
    """A method whose generator loss reads the teacher and the fake score at x_t = g(z0) + sigma eps0 (SiD, DMD2)."""

    loss: SiDLoss | DMD2Loss

    def __call__(self, nets: Networks, z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None,
                 rng: torch.Generator, autocast: Autocast) -> GeneratorLoss:
        with autocast(), _frozen(nets.score):
            loss = self.loss(nets.generator, nets.teacher, nets.score, z0, eps0, sigma, labels)
        return GeneratorLoss(loss, z0)


@dataclass
class DMDRegression(Method):
    """DMD2's loss plus DMD's regression on teacher noise-image pairs (mct.dmd2): L = L_DMD2 + weight * L_reg, on a
    batch of pairs drawn with the loop's generator. The pairs are made at the first step (of the run, or of its
    resumption: their own seed makes them the same)."""

    base: FakeScoreLoss
    pairs: RegressionPairs
    weight: float
    seed: int
    _made: tuple[Tensor, Tensor | None, Tensor] | None = field(default=None, repr=False)

    def __call__(self, nets: Networks, z0: Tensor, eps0: Tensor, sigma: Tensor, labels: Tensor | None,
                 rng: torch.Generator, autocast: Autocast) -> GeneratorLoss:
        out = self.base(nets, z0, eps0, sigma, labels, rng, autocast)
        if self._made is None:
            self._made = self.pairs.make(nets.teacher, tuple(z0.shape[1:]), nets.world.draw_labels, self.seed,
                                         z0.device)
        z, y_labels, y = self._made
        idx = torch.randint(len(z), (z0.shape[0],), generator=rng, device=z0.device)
        with autocast():
            reg = regression_loss(nets.generator, z[idx], None if y_labels is None else y_labels[idx], y[idx])
        return GeneratorLoss(out.loss + self.weight * reg, z0, health={"regression_loss": float(reg.detach())})


def _dmd2(world: World, d: DistillConfig) -> Method:
    base = FakeScoreLoss(DMD2Loss(normalize=d.normalize_gradient))
    if not d.regression_weight:
        return base
    # the pairs' seed: the run's, offset so that they share no draw with the loop's generator
    return DMDRegression(base, RegressionPairs(d.regression_pairs, d.regression_steps), d.regression_weight,
                         seed=d.seed * 1_000_003 + 524_287)


def _emd(world: World, d: DistillConfig) -> Method:
    if d.estep != "exact":
        return EMDLangevin(d.langevin(), d.mstep_weight)
    if not world.has_exact_estep or world.data_shape != (2,) or world.label_dim:
        raise ValueError(f"distill.estep: 'exact' needs an unconditional world with a 2-D latent and exact data "
                         f"samples (World.has_exact_estep); world {world.name!r} is not one")
    return EMDExact(ExactEStep(grid=d.exact_grid, draws=d.exact_draws, defensive=d.exact_defensive,
                               control_variate=d.exact_control_variate, weight=d.mstep_weight))


METHODS: dict[str, Callable[[World, DistillConfig], Method]] = {
    "emd": _emd,
    "sid": lambda world, d: FakeScoreLoss(SiDLoss(alpha=d.sid_alpha, normalize=d.normalize_gradient)),
    "dmd2": _dmd2,
}


def build_method(world: World, d: DistillConfig) -> Method:
    """The generator step of ``distill.method``, checked against the world before any work (config validation
    checks the same for params.yaml; this is for settings built in code)."""
    if d.method not in METHODS:
        raise ValueError(f"distill.method: unknown method {d.method!r}; expected one of {sorted(METHODS)}")
    return METHODS[d.method](world, d)


__all__ = ["METHODS", "Networks", "GeneratorLoss", "Method", "EMDLangevin", "EMDExact", "FakeScoreLoss",
           "DMDRegression", "build_method"]
