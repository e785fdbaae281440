"""Exponential moving average of a network's weights (the teacher's and the generator's EMA copies)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every parameter; buffers are copied from ``model``.

    After n updates towards parameters theta_1..theta_n: ema_n = decay^n ema_0 + (1 - decay) sum_k decay^(n-k) theta_k.
    """
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)
