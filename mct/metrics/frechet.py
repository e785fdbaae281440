"""The Frechet distance of samples to a Gaussian given by its moments: the cheap quality metric that worlds score
training with (mct.tracking's convergence points), kept apart from mct.metrics.fid so training imports no
clean-fid (nor reruns when the evaluator's FID code changes)."""

from __future__ import annotations

import numpy as np


def frechet_to_gaussian(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> float:
    """Frechet distance between the Gaussian fitted to the rows of x and N(mu, cov): ||m - mu||^2 +
    Tr(C + cov - 2 (C cov)^(1/2)), the formula of mct.metrics.fid; a singular product (digits' constant border
    pixels) gets clean-fid's remedy, a 1e-6 ridge on both covariances."""
    from scipy import linalg

    m, c = x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))
    root = linalg.sqrtm(c @ cov)
    if not np.isfinite(root).all():
        ridge = 1e-6 * np.eye(len(m))
        root = linalg.sqrtm((c + ridge) @ (cov + ridge))
    return float(((m - mu) ** 2).sum() + np.trace(c + cov - 2 * np.real(root)))
