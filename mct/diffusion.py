"""Diffusion core: one internal convention (EDM's VE form, x_t = x + sigma * eps) for every teacher.

A *denoiser* is any callable ``D(x, sigma, labels) -> x0_hat`` where ``x`` is (B, ...), ``sigma`` is a
tensor of shape (B,) and ``labels`` is a one-hot float tensor (B, label_dim) or None (EDM's convention).
VP teachers (DDPM/ADM eps-prediction) enter through :class:`VPEpsDenoiser`, which converts at the
boundary with x_VE = x_VP / alpha_t and sigma_VE = sigma_t / alpha_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a (B,) tensor so that it broadcasts against a (B, ...) tensor of ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


# --- VP <-> VE conversion -------------------------------------------------------------------------


def vp_to_ve(x_vp: Tensor, alpha: Tensor, sigma_vp: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, alpha_t, sigma_t) of a VP process -> (x, sigma) of the equivalent VE process."""
    return x_vp / append_dims(alpha, x_vp.ndim), sigma_vp / alpha


def ve_sigma_to_vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE sigma -> (alpha_t, sigma_t) of the variance-preserving process with the same log-SNR."""
    alpha = 1.0 / torch.sqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def log_snr(sigma: Tensor | float) -> Tensor:
    """lambda = log(alpha^2 / sigma^2); for VE (alpha = 1) this is -2 log sigma."""
    return -2.0 * torch.log(torch.as_tensor(sigma, dtype=torch.float64))


def sigma_from_log_snr(lam: float) -> float:
    return math.exp(-lam / 2.0)


# --- eps / score helpers ----------------------------------------------------------------------------


def eps_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - x0_hat) / sigma, the denoiser's implied noise prediction (VE form)."""
    return (x - x0) / append_dims(sigma, x.ndim)


def denoiser_eps(denoiser: Denoiser, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
    return eps_from_x0(x, denoiser(x, sigma, labels), sigma)


def denoiser_score(denoiser: Denoiser, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
    """score = grad_x log p_sigma(x) = -eps / sigma."""
    return -denoiser_eps(denoiser, x, sigma, labels) / append_dims(sigma, x.ndim)


# --- EDM preconditioning ----------------------------------------------------------------------------


class EDMPrecond(nn.Module):
    """Karras et al. (2022) preconditioning around a raw network F(c_in x, c_noise, labels).

    D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4, labels). The raw ``model`` follows EDM's
    signature ``model(x, noise_labels, class_labels)`` so that EDM's published networks slot in.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, label_dim: int = 0,
                 sigma_min: float = 0.0, sigma_max: float = float("inf")) -> None:
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.label_dim = int(label_dim)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        s = append_dims(sigma, x.ndim)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        c_in = 1.0 / torch.sqrt(sd**2 + s**2)
        c_noise = torch.log(sigma) / 4.0
        if self.label_dim == 0:
            labels = None
        elif labels is None:
            labels = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=x.dtype)
        f = self.model(c_in * x, c_noise, labels)
        return c_skip * x + c_out * f.to(x.dtype)


class VPEpsDenoiser(nn.Module):
    """Wrap a VP eps-prediction network ``eps_net(x_vp, t, labels)`` (DDPM/ADM) as a VE denoiser.

    ``alpha_bar`` is the discrete cumulative schedule (length T); a VE sigma is mapped to the nearest
    discrete timestep by log-SNR, x_VP = alpha x_VE, and x0_hat = x_VE - sigma eps.
    """

    def __init__(self, eps_net: nn.Module, alpha_bar: Tensor) -> None:
        super().__init__()
        self.eps_net = eps_net
        self.register_buffer("vp_sigmas", torch.sqrt((1.0 - alpha_bar) / alpha_bar))

    def timestep(self, sigma: Tensor) -> Tensor:
        """Index of the discrete timestep whose VE sigma is nearest in log space."""
        diff = torch.log(sigma.reshape(-1, 1)) - torch.log(self.vp_sigmas.reshape(1, -1))
        return diff.abs().argmin(dim=1)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        alpha, _ = ve_sigma_to_vp(sigma)
        x_vp = x * append_dims(alpha, x.ndim)
        eps = self.eps_net(x_vp, self.timestep(sigma), labels)
        return x - append_dims(sigma, x.ndim) * eps


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) of a conditional denoiser:

        D_w(x | c) = D(x | null) + w (D(x | c) - D(x | null)),

    the same combination as in eps (and in score), because D = x - sigma eps is affine in eps with one x and
    sigma. ``null_labels(n)`` is the unconditional input (SD: the empty prompt's embedding). Both halves are one
    batched call, so a guided teacher call costs one network pass over 2B inputs."""

    def __init__(self, denoiser: nn.Module, null_labels, scale: float) -> None:
        super().__init__()
        self.denoiser, self.null_labels, self.scale = denoiser, null_labels, float(scale)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("classifier-free guidance needs conditioning labels")
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(-1)
        null = self.null_labels(b).to(device=labels.device, dtype=labels.dtype)
        d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, labels]))
        d_null, d_cond = d[:b], d[b:]
        return d_null + self.scale * (d_cond - d_null)


def linear_alpha_bar(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM/ADM linear schedule: beta_t = linspace(beta_start, beta_end, T), alpha_bar_t = prod_{s<=t} (1 - beta_s).

    Index t = 0..T-1 is ADM's integer timestep. (ADM rescales beta_start/end by 1000 / T for T != 1000; pass
    the scaled values explicitly if you need that.) float64, shape (T,).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


# --- noise-level distributions ----------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training distribution: log sigma ~ N(p_mean, p_std^2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def sample(self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return torch.exp(self.p_mean + self.p_std * z)


@dataclass(frozen=True)
class LogUniformSigma:
    """log sigma ~ U(log sigma_min, log sigma_max)."""

    sigma_min: float = 0.02
    sigma_max: float = 80.0

    def sample(self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
        u = torch.rand(n, generator=generator, device=device)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + (hi - lo) * u)


SigmaDistribution = LogNormalSigma | LogUniformSigma


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 for x0-space DSM."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def dsm_loss(denoiser: Denoiser, x0: Tensor, sigma: Tensor, labels: Tensor | None, noise: Tensor,
             sigma_data: float) -> Tensor:
    """Denoising score matching with EDM weighting; equals ||eps_hat - eps||^2 up to EDM's weight."""
    x_t = x0 + append_dims(sigma, x0.ndim) * noise
    err = (denoiser(x_t, sigma, labels) - x0) ** 2
    w = append_dims(edm_loss_weight(sigma, sigma_data), x0.ndim)
    return (w * err).flatten(1).sum(1).mean()


# --- EDM sampler ------------------------------------------------------------------------------------


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device: str | torch.device = "cpu") -> Tensor:
    """Karras time steps sigma_0 > ... > sigma_{N-1}, followed by 0 (length num_steps + 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of the deterministic EDM Heun sampler: 2 per step but the last, which is Euler."""
    return 2 * num_steps - 1


@torch.no_grad()
def edm_heun_sample(denoiser: Denoiser, latents: Tensor, labels: Tensor | None = None, num_steps: int = 18,
                    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> tuple[Tensor, int]:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Alg. 1). Returns (x0, NFE)."""
    steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x = latents.to(torch.float64) * steps[0]
    nfe = 0
    b = latents.shape[0]
    for i in range(num_steps):
        s_cur, s_next = steps[i], steps[i + 1]
        d_cur = (x - denoiser(x.float(), s_cur.float().expand(b), labels).double()) / s_cur
        nfe += 1
        x_next = x + (s_next - s_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - denoiser(x_next.float(), s_next.float().expand(b), labels).double()) / s_next
            nfe += 1
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    assert nfe == heun_nfe(num_steps)
    return x.float(), nfe


def mean_abs_residual(x0: Tensor, denoised: Tensor, floor: float = 1e-5) -> Tensor:
    """Per sample, mean |x0 - D(x_t)| over the data dimensions, broadcastable to x0, without gradient: the
    normalisation DMD, DMD2 and SiD divide their generator gradients by (the teacher's denoising error on the
    generator's own sample), floored as SiD's code floors it."""
    with torch.no_grad():
        return (x0 - denoised).abs().flatten(1).mean(1).clamp_min(floor).reshape(-1, *([1] * (x0.ndim - 1)))
