"""A world defined outside mct: a 3-D Gaussian, known in closed form (the test fixture of tests/test_world_plugin.py).

This package is not part of mct and mct never names it: a params file selects it with
``kind: "g3world:Gauss3D"`` once this folder's parent is on PYTHONPATH, or with ``kind: gauss3d`` through the
entry point of an installed package. It shows the optional answers too: an exact denoiser (``estep_teacher:
analytic``), exact metrics in the evaluation record and a training metric whose convergence_auc evaluate reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mct.worlds.base import World

SCALES = (1.0, 2.0, 3.0)  # the Gaussian's standard deviations per axis, in units of cfg.std


class Gauss3D(World):
    """worlds.<name>: {kind: gauss3d, std, seed}: N(0, diag((std * (1, 2, 3))^2)) in R^3, known in closed form."""

    has_analytic_denoiser = True
    exact_metric_keys = ("mean_error",)
    convergence_metric = "fd_3d"
    convergence_panels = ("fd_3d",)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3,)

    @property
    def cov(self) -> torch.Tensor:
        return torch.diag((self.cfg.std * torch.tensor(SCALES)) ** 2)

    @property
    def sigma_data(self) -> float:
        return float(self.cov.diagonal().mean().sqrt())

    def _draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 3, generator=gen) * self.cov.diagonal().sqrt()

    def prepare(self, out: Path) -> None:
        gen = torch.Generator().manual_seed(self.cfg.seed)
        train, test = self._draw(4000, gen), self._draw(1000, gen)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, train_x=train.numpy(), test_x=test.numpy())

    def load_split(self, path: Path, split: str = "train"):
        with np.load(path) as f:
            return torch.from_numpy(f[f"{split}_x"]).float(), None

    def analytic_denoiser(self):
        from mct.worlds.mixture import GaussianDenoiser

        return GaussianDenoiser(torch.zeros(3), self.cov)

    def exact_metrics(self, x: torch.Tensor) -> dict[str, float]:
        return {"mean_error": float(x.double().mean(0).norm())}

    def training_metric(self):
        from mct.metrics.frechet import frechet_to_gaussian

        cov = self.cov.double().numpy()
        return lambda x: {"fd_3d": frechet_to_gaussian(x.double().numpy(), np.zeros(3), cov)}
