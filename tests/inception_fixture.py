"""A stand-in for clean-fid's Inception TorchScript file, written by the tests (the real one is a 95 MB download).

It has the interface clean-fid's ``InceptionV3W`` relies on (a ``layers`` submodule, ``forward(x, return_features)``
returning 2048 features of images in [0, 255]), so our loader, clean-fid's wrapper and every FID stage run on
ImageNet-world data exactly as they would with the real weights; only the feature values differ.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

FEATURES = 2048


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4 * 4, FEATURES)

    def forward(self, x: Tensor) -> Tensor:  # x: normalised images (x - 128) / 128, any size
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.tanh(self.proj(pooled)).reshape(x.shape[0], 2048, 1, 1)


class InceptionStandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return self.layers((x - 128.0) / 128.0).reshape(x.shape[0], 2048)


def write_inception_standin(folder: Path) -> Path:
    """Script and save the stand-in as ``folder/inception-2015-12-05.pt`` (the name clean-fid loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception-2015-12-05.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format clean-fid loads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(InceptionStandIn().eval()).save(str(path))
    return path
