"""The digits world: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download).

Pixels are integers 0..16; they are mapped linearly to [-1, 1] (EDM's image convention) and stored as
(N, 1, 8, 8) float32. The held-out split is stratified by class and fixed by a seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mct.worlds.base import World

if TYPE_CHECKING:  # torch is imported where it runs: the stage table reads this module's world class torch-free
    import torch
    from torch import Tensor, nn

NUM_CLASSES = 10
IMG_SHAPE = (1, 8, 8)
PIXEL_MAX = 16.0  # load_digits' pixel range is 0..16
SIGMA_DATA = 0.5  # images in [-1, 1], EDM's convention
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


class DigitsFileError(ValueError):
    """A saved split file is missing an array or holds one of the wrong shape or dtype."""


@dataclass
class DigitsSplit:
    train_x: Tensor  # float32 (N, 1, 8, 8) in [-1, 1]
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor


def pixels_to_unit(pixels: np.ndarray) -> np.ndarray:
    """0..16 -> [-1, 1], float32."""
    return (np.asarray(pixels, dtype=np.float32) / (PIXEL_MAX / 2.0) - 1.0).astype(np.float32)


def stratified_indices(labels: np.ndarray, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted: each class contributes round(fraction * count) to the test side, at
    least one and at most count - 1, so that every class appears on both sides."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < 2:
            raise ValueError(f"class {c} has {idx.size} example(s); a stratified split needs at least 2")
        n_test = int(np.clip(round(held_out_fraction * idx.size), 1, idx.size - 1))
        perm = rng.permutation(idx)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_split(held_out_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The digits data split into train / held-out, stratified by class and deterministic in ``seed``."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    import torch
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = pixels_to_unit(data.images).reshape(-1, *IMG_SHAPE)
    y = np.asarray(data.target, dtype=np.int64)
    train_idx, test_idx = stratified_indices(y, held_out_fraction, seed)
    return DigitsSplit(train_x=torch.from_numpy(x[train_idx]), train_y=torch.from_numpy(y[train_idx]),
                       test_x=torch.from_numpy(x[test_idx]), test_y=torch.from_numpy(y[test_idx]))


def save_split(path: str | os.PathLike, split: DigitsSplit) -> None:
    """Write the split as an uncompressed .npz, atomically (temp file in the same folder + os.replace)."""
    from mct.io import atomic_path

    arrays = {name: getattr(split, name).detach().cpu().numpy() for name in _ARRAYS}
    _validate(arrays, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_split(path: str | os.PathLike) -> DigitsSplit:
    """Read a split written by :func:`save_split`; raises :class:`DigitsFileError` naming what is wrong."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits split file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError) as e:
        raise DigitsFileError(f"{path} is not a readable .npz file: {e}") from e
    _validate(arrays, str(path))
    return DigitsSplit(**{name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in _ARRAYS})


def _validate(arrays: dict[str, np.ndarray], where: str) -> None:
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise DigitsFileError(f"{where}: missing array(s) {missing}; expected {list(_ARRAYS)}")
    for side in ("train", "test"):
        x, y = arrays[f"{side}_x"], arrays[f"{side}_y"]
        if x.ndim != 4 or x.shape[1:] != IMG_SHAPE:
            raise DigitsFileError(f"{where}: {side}_x must have shape (N, 1, 8, 8), got {x.shape}")
        if x.dtype != np.float32:
            raise DigitsFileError(f"{where}: {side}_x must be float32, got {x.dtype}")
        if y.shape != (x.shape[0],):
            raise DigitsFileError(f"{where}: {side}_y must have shape ({x.shape[0]},) to match {side}_x, "
                                  f"got {y.shape}")
        if y.dtype != np.int64:
            raise DigitsFileError(f"{where}: {side}_y must be int64, got {y.dtype}")


def one_hot(labels: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """Integer labels (B,) -> float one-hot (B, num_classes), EDM's ``class_labels`` format."""
    import torch

    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def uniform_labels(n: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """n labels drawn uniformly from {0, ..., num_classes - 1}; deterministic given the generator's state."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    import torch

    return torch.randint(0, num_classes, (n,), generator=generator, device=generator.device)


class Digits(World):
    """worlds.<name>: {kind: digits, held_out_fraction, seed}: 8x8 digits, 10 classes, pixels in [-1, 1].

    FID needs a feature space that knows digits: Inception on 8x8 images measures the upsampling, so evaluation
    trains a small classifier on the training split (`mct features`) and measures in its penultimate layer."""

    needs_feature_net = True
    feature_space = "digits-feature-net"
    fd_name = "FD (digits classifier)"
    # the pixel-space Frechet distance to the held-out split: cheap enough to score training
    convergence_metric = "fd_pixels"
    convergence_panels = ("fd_pixels",)
    primary_metrics = (("fid", "lower"), ("precision", "higher"), ("recall", "higher"))  # in the classifier's features

    @property
    def data_shape(self) -> tuple[int, ...]:
        return IMG_SHAPE

    @property
    def label_dim(self) -> int:
        return NUM_CLASSES

    @property
    def sigma_data(self) -> float:
        return SIGMA_DATA

    def prepare(self, out: Path) -> None:
        save_split(out, load_digits_split(self.cfg.held_out_fraction, self.cfg.seed))

    def load_split(self, path: Path, split: str = "train") -> tuple[Tensor, Tensor | None]:
        import torch

        s = load_split(path)
        x, y = (s.train_x, s.train_y) if split == "train" else (s.test_x, s.test_y)
        x, y = torch.as_tensor(x).float(), torch.as_tensor(y).long()
        return x, one_hot(y, self.label_dim)

    def build_network(self, arch: str, arch_kwargs: dict) -> nn.Module:
        if arch == "conv":
            from mct.nets.conv import build_digits_denoiser

            return build_digits_denoiser(sigma_data=self.sigma_data, **arch_kwargs)
        return super().build_network(arch, arch_kwargs)

    def training_metric(self):
        """The Frechet distance in pixel space to the held-out split (sklearn's bundled data, no file read)."""
        import torch

        from mct.metrics.frechet import frechet_to_gaussian

        held_out = load_digits_split(self.cfg.held_out_fraction, self.cfg.seed).test_x
        ref = torch.as_tensor(held_out).double().flatten(1).numpy()
        mu, cov = ref.mean(0), np.cov(ref, rowvar=False)
        return lambda x: {"fd_pixels": frechet_to_gaussian(x.clamp(-1, 1).double().flatten(1).numpy(), mu, cov)}

    def noise_floor_ready(self, feature_path: Path | None) -> bool:
        return feature_path is not None and feature_path.exists()
