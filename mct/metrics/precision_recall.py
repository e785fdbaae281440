"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

Each set's manifold is the union of balls around its points, each with radius the distance to that point's
k-th nearest neighbour in the same set. Precision = fraction of generated samples inside the real manifold
(fidelity); recall = fraction of real samples inside the generated manifold (coverage). Distances are
computed in row chunks with torch.cdist, so memory stays O(chunk * N) instead of O(N^2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x: Tensor | np.ndarray, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(x).to(device=device, dtype=dtype)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, F), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def knn_radii(feats: Tensor, k: int = 3, chunk: int = 4096) -> Tensor:
    """Distance from every point to its k-th nearest neighbour in the same set (the point itself excluded)."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, N - 1] = [1, {len(feats) - 1}], got {k}")
    # The k+1-th smallest distance, since each row holds the point's zero distance to itself.
    return torch.cat([torch.cdist(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), chunk)])


def inside_manifold(query: Tensor, ref: Tensor, ref_radii: Tensor, chunk: int = 4096) -> Tensor:
    """Boolean (Q,): whether each query point lies in some ball B(ref_j, ref_radii_j) (closed ball)."""
    return torch.cat([(torch.cdist(query[i:i + chunk], ref) <= ref_radii[None]).any(dim=1)
                      for i in range(0, len(query), chunk)])


def precision_recall(real_feats: Tensor | np.ndarray, gen_feats: Tensor | np.ndarray, k: int = 3,
                     chunk: int = 4096, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """(precision, recall) of generated features against real features; the paper uses k = 3."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = torch.device(device)
    real = _as_tensor(real_feats, "real_feats", device, dtype)
    gen = _as_tensor(gen_feats, "gen_feats", device, dtype)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, generated {gen.shape[1]}")
    precision = inside_manifold(gen, real, knn_radii(real, k, chunk), chunk).double().mean()
    recall = inside_manifold(real, gen, knn_radii(gen, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
