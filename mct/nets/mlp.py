"""A small MLP denoiser for low-dimensional worlds, with EDM's raw-network signature."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mct.diffusion import EDMPrecond


class FourierFeatures(nn.Module):
    """Fixed sinusoidal embedding of the scalar noise label c_noise = log(sigma) / 4."""

    def __init__(self, num_features: int = 32, max_period: float = 100.0) -> None:
        super().__init__()
        freqs = torch.exp(-math.log(max_period) * torch.arange(num_features // 2) / (num_features // 2))
        self.register_buffer("freqs", freqs * 2 * math.pi)

    def forward(self, c: Tensor) -> Tensor:
        a = c.reshape(-1, 1) * self.freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1)


class MLPNet(nn.Module):
    """F(x, c_noise, labels): concat(x, noise embedding, label) -> hidden SiLU layers -> x-sized output."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb: int = 32, label_dim: int = 0) -> None:
        super().__init__()
        self.embed = FourierFeatures(emb)
        layers: list[nn.Module] = []
        width = dim + emb + label_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)
        self.label_dim = label_dim

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        parts = [x, self.embed(noise_labels).to(x.dtype)]
        if self.label_dim:
            parts.append(class_labels.to(x.dtype))
        return self.net(torch.cat(parts, dim=1))


def build_mlp_denoiser(dim: int = 2, hidden: int = 128, depth: int = 3, sigma_data: float = 1.0,
                       label_dim: int = 0) -> EDMPrecond:
    return EDMPrecond(MLPNet(dim, hidden, depth, label_dim=label_dim), sigma_data=sigma_data, label_dim=label_dim)
