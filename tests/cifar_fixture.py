"""Tiny CIFAR-10 inputs in the release's real layouts, and a random-weight EDM CIFAR-10 teacher of the real class.

* :func:`write_binary_release`: ``cifar-10-batches-bin/`` (data_batch_1..5.bin, test_batch.bin, batches.meta.txt),
  each record a label byte and 3x32x32 pixel bytes, as the release stores them; optionally as its ``.tar.gz``;
* :func:`write_python_release`: ``cifar-10-batches-py/`` pickles of dicts with 'data' (uint8 (N, 3072)), 'labels',
  'filenames', 'batch_label', and ``batches.meta`` with 'label_names' (protocol 2, as the release);
* :func:`write_cifar_teacher`: an EDM network pickle ``{'ema': VPPrecond(SongUNet)}`` (DDPM++ layout, few channels),
  written by mct.edm_export and read back through the safe loader, as EDM's edm-cifar10-32x32-*-vp.pkl is.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from mct.edm_export import write_edm_network
from mct.nets.edm import SongUNet

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY_SONG = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[16], dropout=0.0, embedding_type="positional",
                 encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])


def release_arrays(per_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (5 * per_batch, 32, 32, 3) images, labels) of the five training batches, in the release's order."""
    rng = np.random.default_rng(seed)
    n = 5 * per_batch
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _planes(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (H, W, C) -> R, G, B planes, rows first


def write_binary_release(root: Path, per_batch: int = 40, seed: int = 0, tar: bool = False) -> Path:
    images, labels = release_arrays(per_batch, seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        records = np.concatenate([labels[sl, None].astype(np.uint8), _planes(images[sl])], axis=1)
        (folder / f"data_batch_{i + 1}.bin").write_bytes(records.tobytes())
    (folder / "test_batch.bin").write_bytes(np.zeros((3, 3073), np.uint8).tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    if not tar:
        return folder
    path = root / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-bin")
    return path


def write_python_release(root: Path, per_batch: int = 40, seed: int = 0) -> Path:
    images, labels = release_arrays(per_batch, seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        batch = {"batch_label": f"training batch {i + 1} of 5", "labels": labels[sl].tolist(),
                 "data": _planes(images[sl]), "filenames": [f"img_{j}.png" for j in range(per_batch)]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_cifar_teacher(path: Path, label_dim: int = 10, seed: int = 0) -> SongUNet:
    """A random-weight EDM CIFAR-10 pickle (VPPrecond over SongUNet); returns the raw network written."""
    torch.manual_seed(seed)
    kwargs = {**TINY_SONG, "label_dim": label_dim}
    unet = SongUNet(**kwargs)
    with torch.no_grad():  # EDM zero-initialises the output layers: perturb so the teacher is not the identity
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    write_edm_network(path, unet, kwargs, precond="VPPrecond",
                      precond_kwargs={"img_resolution": 32, "img_channels": 3, "label_dim": label_dim})
    return unet
