"""Image helpers: [-1, 1] float tensors to uint8 arrays, grids for figures, atomic PNG writes."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from mct.io import atomic_path


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 of the same shape and device, as EDM saves images: (x * 127.5 + 128).clip(0, 255),
    truncated."""
    return (x.detach().float() * 127.5 + 128.0).clip(0, 255).to(torch.uint8)


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC numpy (:func:`quantize`)."""
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    return quantize(x).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: Tensor, nrow: int, upscale: int = 4) -> PIL.Image.Image:
    """Tile N images into rows of ``nrow`` (the last row padded with black) and upscale by nearest neighbour.

    1-channel images give a grayscale ('L') image, 3-channel ones an 'RGB' image.
    """
    if nrow < 1 or upscale < 1:
        raise ValueError(f"nrow and upscale must be >= 1, got nrow={nrow}, upscale={upscale}")
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    if c not in (1, 3):
        raise ValueError(f"image_grid needs 1 or 3 channels, got {c}")
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    rows = -(-n // nrow)
    pad = np.zeros((rows * nrow - n, h, w, c), dtype=np.uint8)
    grid = np.concatenate([arr, pad]).reshape(rows, nrow, h, w, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * h, nrow * w, c)
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return PIL.Image.fromarray(np.ascontiguousarray(grid[:, :, 0] if c == 1 else grid))  # uint8 -> 'L' / 'RGB'


def save_png(path: str | os.PathLike, image: PIL.Image.Image) -> None:
    """Write ``image`` as PNG atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
