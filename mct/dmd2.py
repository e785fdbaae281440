"""DMD2 (Yin et al., NeurIPS 2024) as a generator loss: the distribution-matching gradient, normalised.

At x_t = g(z) + sigma eps, with the frozen teacher and fake denoisers read at x_t (no gradient through them),

    grad = (D_psi - D_phi)(x_t) / w,   w = mean |g - D_phi(x_t)|   (per sample, DMD's weighting)
    L    = 1/2 mean (g - sg(g - grad))^2        so  dL/dg = grad / (batch * dim)

as the authors' code writes it (tianweiy/DMD2). Without the normalisation the gradient is Diff-Instruct's with
w(sigma) = sigma^2 (the scores' 1/sigma^2 cancels), up to the mean's 1/dim: an identity the tests check.
DMD2's two time-scale rule is ``distill.score_steps`` (5 fake-score DSM steps per generator step in the paper).
Its GAN term (a classifier on the fake score's bottleneck features) and DMD's regression loss are not built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mct.diffusion import Denoiser, append_dims, mean_abs_residual


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
