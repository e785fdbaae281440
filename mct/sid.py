"""Score identity Distillation (SiD; Zhou et al., ICML 2024) as a generator loss.

With x_t = g(z) + sigma eps and the frozen teacher and fake denoisers D_phi, D_psi read at x_t, the authors' loss
(their training/sid_loss.py), per sample and summed over dimensions, is

    L = < D_phi - D_psi, (D_phi - g) - alpha (D_phi - D_psi) > / w,   w = sg(mean |g - D_phi|)
      = (1 - alpha) |D_phi - D_psi|^2 + < D_phi - D_psi, D_psi - g > / w          (the paper's form)

Unlike Diff-Instruct and DMD2, the gradient flows through x_t into both denoisers (their parameters held fixed), so
each generator step backpropagates through the teacher and the fake score network. alpha = 1.2 is the paper's.
The fake score is trained by DSM on generator samples, as for every method here (mct.train's score phase).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mct.diffusion import Denoiser, append_dims, mean_abs_residual


@dataclass(frozen=True)
class SiDLoss:
    """SiD's generator loss; ``normalize`` divides each sample's loss by w (the authors' code does)."""

    alpha: float = 1.2
    normalize: bool = True

    def __call__(self, generator: nn.Module, teacher: Denoiser, fake: Denoiser, z: Tensor, eps: Tensor,
                 sigma: Tensor, labels: Tensor | None) -> Tensor:
        g = generator(z, labels)
        x_t = g + append_dims(sigma, g.ndim) * eps  # not detached: the gradient goes through both denoisers
        d_real, d_fake = teacher(x_t, sigma, labels), fake(x_t, sigma, labels)
        gap = d_real - d_fake
        per_sample = (gap * ((d_real - g) - self.alpha * gap)).flatten(1).sum(1)
        if self.normalize:
            per_sample = per_sample / mean_abs_residual(g, d_real).flatten()
        return per_sample.mean()
