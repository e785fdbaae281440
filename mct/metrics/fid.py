"""FID through clean-fid (Parmar et al. 2022): its feature-batch path, its resizers, its Frechet distance.

Nothing here re-implements FID. What this module adds is the plumbing clean-fid leaves to the caller:
  * :func:`custom_extractor` adapts a :class:`~mct.metrics.features.FeatureNet` to clean-fid's
    ``custom_feat_extractor`` contract: a callable taking float32 NCHW images with values in [0, 255]
    (clean-fid's loader hands over RGB, i.e. 3 channels, after its resizer) and returning (B, F) features.
  * :func:`images_features` feeds in-memory images through clean-fid's resizer (``build_resizer(mode)``) and
    ``cleanfid.fid.get_batch_features``, after quantising to uint8 and expanding grayscale to RGB exactly
    as reading the images from PNG files would; so features match ``compute_fid(fdir1, fdir2, ...)`` on
    folders of the same images.
  * :func:`inception_feature_extractor` builds clean-fid's Inception network from a local file only: clean-fid
    would otherwise download it, and nothing may download at run time here.
  * reference statistics as .npz files written atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import fid as cfid
from cleanfid import resize as cresize
from cleanfid.downloads_helper import inception_url
from torch import Tensor, nn

from mct.io import atomic_path

INCEPTION_FILENAME = "inception-2015-12-05.pt"
DEFAULT_INCEPTION_PATH = Path("/tmp") / INCEPTION_FILENAME  # where clean-fid itself looks (and would download to)
INCEPTION_ENV = "MCT_INCEPTION_PATH"
INCEPTION_MODES = ("clean", "legacy_tensorflow")


class InceptionWeightsMissing(RuntimeError):
    """clean-fid's Inception weights are not on disk; raised instead of letting clean-fid download them."""


# --- statistics and the Frechet distance --------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64, as clean-fid computes them (np.cov with N - 1 normalisation)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and covariance of features that arrive in batches, in bounded memory (Chan et al.'s pairwise update).

    Each batch's centred scatter is merged into the running one, so the result equals :func:`feature_stats` of
    all rows at once (N - 1 normalisation) up to float64 rounding, whatever the batching.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # sum of (f - mean)(f - mean)^T

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"features must be (N >= 1, F), got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        if self.mean is not None and f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature width changed from {self.mean.shape[0]} to {f.shape[1]}")
        n_b, mean_b = len(f), f.mean(axis=0)
        centred = f - mean_b
        scatter_b = centred.T @ centred
        if self.mean is None:
            self.count, self.mean, self.scatter = n_b, mean_b, scatter_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        return self.mean.copy(), self.scatter / (self.count - 1)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed by cleanfid.fid.frechet_distance."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (different feature extractors?)")
    return float(cfid.frechet_distance(mu1, sigma1, mu2, sigma2))


def compute_fid(gen_features: np.ndarray, ref_stats: tuple) -> float:
    """FID of generated features against reference statistics ``(mu, sigma[, meta])`` (e.g. from load_stats)."""
    mu, sigma = feature_stats(gen_features)
    return fid_from_stats(mu, sigma, ref_stats[0], ref_stats[1])


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: dict[str, Any],
               pr_features: np.ndarray | None = None) -> None:
    """Write mu, sigma, JSON metadata (feature extractor, N, ...) and optionally a subset of the reference
    features (for precision/recall) to an .npz, atomically."""
    path = Path(path)
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64),
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    if pr_features is not None:
        arrays["pr_features"] = np.asarray(pr_features, dtype=np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_stats(path: str | os.PathLike, with_pr_features: bool = False) -> tuple:
    """(mu, sigma, meta), or (mu, sigma, meta, pr_features or None) with ``with_pr_features``."""
    with np.load(path, allow_pickle=False) as z:
        if not {"mu", "sigma", "meta"} <= set(z.files):
            raise ValueError(f"{path} is not an FID statistics file (needs mu, sigma, meta; has {z.files})")
        out = (z["mu"], z["sigma"], json.loads(str(z["meta"])))
        if with_pr_features:
            out += (z["pr_features"] if "pr_features" in z.files else None,)
        return out


# --- feature extraction through clean-fid -------------------------------------------------------------------


def custom_extractor(feature_net: nn.Module, resize_to: int | tuple[int, int] | None = None
                     ) -> Callable[[Tensor], Tensor]:
    """Wrap ``feature_net`` (a FeatureNet: [-1, 1] images -> ``features``) as a clean-fid custom_feat_extractor.

    clean-fid hands the extractor float32 NCHW batches in [0, 255], RGB. Grayscale nets get the channel mean
    (exact for the replicated gray of PNG digits); images whose size differs from ``resize_to`` are resized
    with antialiased bicubic interpolation, the filter clean-fid's "clean" mode uses.
    """
    size = (resize_to, resize_to) if isinstance(resize_to, int) else resize_to
    in_channels = getattr(feature_net, "in_channels", 3)
    feature_net.eval()

    def extract(x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"extractor expects NCHW images, got shape {tuple(x.shape)}")
        x = x.to(next(feature_net.parameters()).device, torch.float32)
        if x.shape[1] != in_channels:
            if in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, in_channels, -1, -1)
            else:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {in_channels}-channel net")
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 255)
        with torch.no_grad():
            return feature_net.features(x / 127.5 - 1.0)

    return extract


def to_uint8_nhwc(images: Tensor | np.ndarray) -> np.ndarray:
    """uint8 images pass through; float images in [-1, 1] quantise as EDM saves them: (x * 127.5 + 128).clip."""
    x = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        x = np.clip(x * 127.5 + 128.0, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def images_features(images: Tensor | np.ndarray, extractor: Callable[[Tensor], Tensor], batch_size: int = 256,
                    device: str | torch.device = "cpu", mode: str | None = None) -> np.ndarray:
    """Features of in-memory images through clean-fid's per-image resizer and ``get_batch_features``.

    ``mode`` None feeds the images at their own size (custom extractors resize themselves); "clean",
    "legacy_tensorflow" or "legacy_pytorch" apply ``cleanfid.resize.build_resizer(mode)`` (Inception).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = to_uint8_nhwc(images)
    if x.shape[-1] == 1:  # what PIL's convert("RGB") does to a grayscale PNG in clean-fid's loader
        x = np.repeat(x, 3, axis=-1)
    fn_resize = cresize.build_resizer(mode) if mode is not None else None
    device = torch.device(device)
    feats = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        if fn_resize is not None:
            chunk = np.stack([fn_resize(img) for img in chunk])
        batch = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))).to(torch.float32)
        feats.append(cfid.get_batch_features(batch, extractor, device))
    return np.concatenate(feats).astype(np.float64)


def inception_weights_path() -> Path:
    """$MCT_INCEPTION_PATH (the file, or a folder holding it) if set, else clean-fid's own /tmp location."""
    env = os.environ.get(INCEPTION_ENV)
    path = Path(env) if env else DEFAULT_INCEPTION_PATH
    return path / INCEPTION_FILENAME if path.is_dir() else path


def inception_feature_extractor(mode: str = "clean", device: str | torch.device = "cpu") -> nn.Module:
    """clean-fid's InceptionV3W (2048-d pool features of images in [0, 255]), loaded only from a local file.

    "clean" expects 299x299 inputs (use ``images_features(..., mode="clean")``); "legacy_tensorflow" resizes
    inside the network as the original TF implementation did. Raises InceptionWeightsMissing if absent.
    """
    if mode not in INCEPTION_MODES:
        raise ValueError(f"Inception mode must be one of {INCEPTION_MODES}, got {mode!r}")
    path = inception_weights_path()
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"clean-fid's Inception weights are missing: {path} does not exist, and mct never downloads at run "
            f"time, so Inception FID was not computed (no other metric was substituted). To provide them, on a "
            f"machine with internet access download {inception_url} (e.g. `curl -L -o {INCEPTION_FILENAME} "
            f"{inception_url}`), then copy the file to {DEFAULT_INCEPTION_PATH} on this machine, or anywhere and "
            f"set {INCEPTION_ENV} to that file (named {INCEPTION_FILENAME}) or to the folder holding it.")
    if path.name != INCEPTION_FILENAME:
        raise ValueError(f"{INCEPTION_ENV} points to {path}; clean-fid loads the file by its name, so it must be "
                         f"called {INCEPTION_FILENAME} (or point {INCEPTION_ENV} at the folder holding it)")
    from cleanfid.inception_torchscript import InceptionV3W

    # download=False: clean-fid would fetch the file itself if we let it.
    model = InceptionV3W(str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
    return model.to(device).eval()
