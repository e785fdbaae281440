"""DMD2 (Yin et al., NeurIPS 2024) as a generator loss: the distribution-matching gradient, normalised.

At x_t = g(z) + sigma eps, with the frozen teacher and fake denoisers read at x_t (no gradient through them),

    grad = (D_psi - D_phi)(x_t) / w,   w = mean |g - D_phi(x_t)|   (per sample, DMD's weighting)
    L    = 1/2 mean (g - sg(g - grad))^2        so  dL/dg = grad / (batch * dim)

as the authors' code writes it (tianweiy/DMD2). Without the normalisation the gradient is Diff-Instruct's with
w(sigma) = sigma^2 (the scores' 1/sigma^2 cancels), up to the mean's 1/dim: an identity the tests check.
DMD2's two time-scale rule is ``distill.score_steps`` (5 fake-score DSM steps per generator step in the paper).

DMD's (v1) regression loss is an option (``distill.regression_weight``, 0 = off as in DMD2): noise-image pairs
(z_j, y_j), y_j the teacher's deterministic sample from x_T = sigma_max z_j, made once per run, and

    L_reg = mean |g(z_j) - y_j|^2     on a batch of pairs per generator step

(DMD measures it with LPIPS on images; these worlds are small, so it is the mean squared error). The GAN term (a
classifier on the fake score's bottleneck features) is not built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mct.diffusion import Denoiser, append_dims, edm_heun_sample, mean_abs_residual


@dataclass(frozen=True)
class DMD2Loss:
    """The distribution-matching loss; ``normalize`` divides each sample's gradient by w."""

    normalize: bool = True

    def __call__(self, generator: nn.Module, teacher: Denoiser, fake: Denoiser, z: Tensor, eps: Tensor,
                 sigma: Tensor, labels: Tensor | None) -> Tensor:
        g = generator(z, labels)
        with torch.no_grad():
            x_t = g + append_dims(sigma, g.ndim) * eps
            d_real = teacher(x_t, sigma, labels)
            grad = fake(x_t, sigma, labels) - d_real
            if self.normalize:
                grad = grad / mean_abs_residual(g, d_real)
            grad = torch.nan_to_num(grad)
        return 0.5 * F.mse_loss(g, g.detach() - grad)


@dataclass(frozen=True)
class RegressionPairs:
    """DMD's regression targets: ``count`` noises z and the teacher's deterministic samples from sigma_max z (EDM's
    Heun sampler, ``steps`` steps, EDM's sigma range), drawn from their own seed so that a resumed run, and every
    process of a multi-process one, makes the same pairs."""

    count: int = 4096
    steps: int = 18
    chunk: int = 1024

    def make(self, teacher: Denoiser, shape: tuple[int, ...], draw_labels, seed: int, device: torch.device
             ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(z, labels, y): ``draw_labels(n, rng, device)`` gives the class labels (None for an unconditional world)."""
        rng = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn((self.count, *shape), generator=rng, device=device)
        labels = draw_labels(self.count, rng, device)
        with torch.no_grad():
            y = torch.cat([edm_heun_sample(teacher, z[i:i + self.chunk],
                                           None if labels is None else labels[i:i + self.chunk], self.steps)[0]
                           for i in range(0, self.count, self.chunk)])
        return z, labels, y


def regression_loss(generator: nn.Module, z: Tensor, labels: Tensor | None, target: Tensor) -> Tensor:
    """DMD's regression of the one-step generator onto the teacher's sample from the same noise (squared error)."""
    return F.mse_loss(generator(z, labels), target)
