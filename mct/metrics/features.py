"""A small conv classifier whose penultimate layer is the feature space for FID on small images.

Inception features mean little on 8x8 digits, so the digits world trains its own classifier (its held-out
accuracy is reported next to every FID computed with it) and hands it to clean-fid as a
``custom_feat_extractor`` (see :func:`mct.metrics.fid.custom_extractor`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mct.io import save_torch


class FeatureNet(nn.Module):
    """conv-conv-pool-conv-pool -> Linear(feature_dim) -> Linear(num_classes).

    ``features(x)`` is the penultimate layer (SiLU, so no dead units that would make the feature
    covariance singular); ``forward(x)`` returns the logits computed from exactly those features.
    Inputs are images in [-1, 1], NCHW, any spatial size >= 2 (adaptive pooling to 2x2 at the end).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.in_channels = in_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FeatureNet expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero-filled at -1, the background), per sample."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    was_training = net.training
    net.eval()
    correct = sum(int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    net.train(was_training)
    return correct / len(x)


def _check_split(name: str, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    if x.ndim != 4 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{name}: expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if float(x.min()) < -1.0 - 1e-6 or float(x.max()) > 1.0 + 1e-6:
        raise ValueError(f"{name}: images must lie in [-1, 1], got [{float(x.min())}, {float(x.max())}]")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return x, y


def train_feature_net(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, epochs: int = 15,
                      lr: float = 3e-3, batch_size: int = 64, seed: int = 0, num_classes: int = 10,
                      max_shift: int = 1, width: int = 32, feature_dim: int = 64) -> tuple[FeatureNet, float]:
    """Adam + cosine decay with cross-entropy; returns the net (eval mode) and its accuracy on the held-out set.

    Deterministic given ``seed``: initialisation runs under a forked RNG seeded with it and shuffling and
    augmentation (random shifts of up to ``max_shift`` pixels; 0 disables) draw from a torch.Generator.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    train_x, train_y = _check_split("train", train_x, train_y, num_classes)
    test_x, test_y = _check_split("test", test_x, test_y, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(train_x.shape[1], num_classes, width=width, feature_dim=feature_dim)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_x) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(random_shift(train_x[idx], max_shift, gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net, accuracy(net, test_x, test_y)


def save_feature_net(path: str | os.PathLike, net: FeatureNet, meta: dict[str, Any]) -> None:
    """Atomic torch.save of {config, state_dict, meta}; ``meta`` must hold plain types (str, int, float, lists,
    dicts) so that :func:`load_feature_net` can read it with ``weights_only=True``."""
    path = Path(path)
    payload = {"config": dict(net.config), "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "meta": dict(meta)}
    save_torch(payload, path)


def load_feature_net(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[FeatureNet, dict]:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or not {"config", "state_dict", "meta"} <= payload.keys():
        raise ValueError(f"{path} is not a FeatureNet file written by save_feature_net")
    net = FeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return net.eval(), payload["meta"]
