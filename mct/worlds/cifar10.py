"""CIFAR-10 world: the benchmark every one-step distillation method reports, with EDM's CIFAR-10 teachers.

``prepare`` turns the user's copy of the CIFAR-10 release into the EDM dataset zip that the ImageNet world reads
(:func:`mct.worlds.imagenet.write_edm_archive`): the 50,000 training images in the release's order (batches 1 to
5, as EDM's dataset_tool), named ``00000/img00000000.png``, with their labels and class names. Three sources:

* the **binary version** (``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz``): plain bytes, 3,073 per image
  (the label, then 1,024 bytes each of R, G and B, rows first); nothing is unpickled;
* the **python version** (``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``): pickles, read by
  :class:`ArrayUnpickler`, which admits only numpy arrays, lists, dicts and strings, with the checkpoint loader's
  allocation budget (:func:`mct.checkpoint.allocation_budget`): a pickle naming any other global is refused;
* an **image folder or zip in EDM's dataset_tool layout** (a ``dataset.json`` of labels, or class folders), as
  :func:`mct.worlds.imagenet.prepare_imagenet` reads it, at 32x32 (32x32 images pass the crop unchanged).

The FID reference is the prepared training set, as EDM's ``cifar10-32x32.npz`` (and every peer's CIFAR-10 FID) is
computed over the 50,000 training images; the peers score 50,000 samples. ``num_classes: 10`` is the conditional
world (EDM's ``cond`` teacher), ``num_classes: 0`` the unconditional one.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mct.worlds.base import EvalNeeds
from mct.worlds.imagenet import DatasetError, ImageNet, prepare_imagenet, write_edm_archive

RESOLUTION = 32
NUM_CLASSES = 10
RECORD_BYTES = 1 + 3 * RESOLUTION * RESOLUTION  # the binary version: label byte, then R, G, B planes
TRAIN_BATCHES = 5
IMAGES_PER_BATCH = 10_000
# A batch file is 30.7 MB (binary) or 31 MB (python); anything far beyond is not the release (and not read whole).
MAX_BATCH_BYTES = 64 << 20
FORMATS = {"binary": ("cifar-10-batches-bin", "data_batch_{}.bin", "batches.meta.txt"),
           "python": ("cifar-10-batches-py", "data_batch_{}", "batches.meta")}


# --- the python version, unpickled within bounds -----------------------------------------------------------


def _array_globals() -> frozenset[tuple[str, str]]:
    multiarray = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy >= 2 renamed numpy.core
    return frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                      *((m, "_reconstruct") for m in multiarray),
                      *(("builtins", t) for t in ("list", "dict", "str", "bytes", "int"))})


def unpickle_arrays(data: bytes, where: str) -> Any:
    """Unpickle ``data`` admitting only numpy arrays (not of object dtype), lists, dicts, strings and ints, within the
    checkpoint loader's allocation budget for a file of this size; Python 2 strings decode as latin-1 (the release
    was pickled by Python 2's cPickle). Anything else raises a :class:`DatasetError` naming ``where``."""
    from mct.checkpoint import CheckpointError, RestrictedUnpickler, allocation_budget

    allowed = _array_globals()

    class ArrayUnpickler(RestrictedUnpickler):
        dispatch = RestrictedUnpickler.dispatch

        def __init__(self, f: io.BytesIO) -> None:
            pickle._Unpickler.__init__(self, f, encoding="latin1")
            self.budget = allocation_budget(len(data))

        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in allowed:
                raise DatasetError(f"{where}: the pickle asks for {module}.{name}; a CIFAR-10 batch holds only "
                                   "numpy arrays, lists and strings, so it is refused (it could run code)")
            return super().find_class(module, name)

    try:
        obj = ArrayUnpickler(io.BytesIO(data)).load()
    except DatasetError:
        raise
    except CheckpointError as e:
        raise DatasetError(f"{where}: {e}") from None
    except Exception as e:  # a malformed pickle surfaces as many exception types
        raise DatasetError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise DatasetError(f"{where}: object arrays are refused")
    return obj


# --- the release's files, from a folder or a tarball -------------------------------------------------------


class CifarRelease:
    """The CIFAR-10 release at ``source``: its format ('binary' or 'python') and a reader of its members."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)
        found = self._find()
        if found is None:
            raise DatasetError(f"{self.source}: not a CIFAR-10 release (expected cifar-10-batches-bin/ or "
                               "cifar-10-batches-py/ with data_batch_1..5, or their .tar.gz)")
        self.format, self._prefix = found

    def _find(self) -> tuple[str, str] | None:
        if self.source.is_dir():
            for fmt, (folder, batch, _) in FORMATS.items():
                for prefix in ("", f"{folder}/"):
                    if (self.source / prefix / batch.format(1)).is_file():
                        return fmt, prefix
            return None
        if self.source.is_file() and tarfile.is_tarfile(self.source):
            with tarfile.open(self.source) as tar:
                names = set(tar.getnames())
            for fmt, (folder, batch, _) in FORMATS.items():
                for prefix in ("", f"{folder}/"):
                    if prefix + batch.format(1) in names:
                        return fmt, prefix
        return None

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        """``read(name) -> bytes`` of a member (refused beyond MAX_BATCH_BYTES, and when not a regular file)."""
        if self.source.is_dir():
            def read(name: str) -> bytes:
                path = self.source / self._prefix / name
                if not path.is_file():
                    raise DatasetError(f"{self.source}: {self._prefix}{name} is missing")
                _check_size(path.stat().st_size, f"{path}")
                return path.read_bytes()

            yield read
            return
        with tarfile.open(self.source) as tar:
            def read_member(name: str) -> bytes:
                try:
                    info = tar.getmember(self._prefix + name)
                except KeyError:
                    raise DatasetError(f"{self.source}: {self._prefix}{name} is missing") from None
                if not info.isfile():
                    raise DatasetError(f"{self.source}: {info.name} is not a regular file")
                _check_size(info.size, f"{self.source}: {info.name}")
                return tar.extractfile(info).read()

            yield read_member

    def class_names(self, read: Callable[[str], bytes]) -> list[str]:
        meta = FORMATS[self.format][2]
        raw = read(meta)
        if self.format == "binary":
            names = [line.strip() for line in raw.decode("ascii", errors="replace").splitlines() if line.strip()]
        else:
            obj = unpickle_arrays(raw, f"{self.source}: {meta}")
            names = obj.get("label_names") if isinstance(obj, dict) else None
        if not (isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names)):
            raise DatasetError(f"{self.source}: {meta} must name the {NUM_CLASSES} classes")
        return names

    def batch(self, read: Callable[[str], bytes], i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (N, 32, 32, 3) images, int labels (N,)) of training batch i (1..5)."""
        name = FORMATS[self.format][1].format(i)
        where = f"{self.source}: {self._prefix}{name}"
        raw = read(name)
        if self.format == "binary":
            if len(raw) % RECORD_BYTES or not raw:
                raise DatasetError(f"{where}: {len(raw):,} bytes is not a whole number of {RECORD_BYTES}-byte "
                                   "records (label byte + 3x32x32 pixels)")
            records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
            labels, pixels = records[:, 0].astype(np.int64), records[:, 1:]
        else:
            obj = unpickle_arrays(raw, where)
            if not (isinstance(obj, dict) and isinstance(obj.get("data"), np.ndarray) and "labels" in obj):
                raise DatasetError(f"{where}: expected a dict with 'data' (an array) and 'labels'")
            pixels, labels = obj["data"], obj["labels"]
            if not (isinstance(labels, list) and all(isinstance(y, int) and not isinstance(y, bool) for y in labels)):
                raise DatasetError(f"{where}: 'labels' must be a list of ints")
            labels = np.asarray(labels, dtype=np.int64)
            if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != RECORD_BYTES - 1:
                raise DatasetError(f"{where}: 'data' must be uint8 of shape (N, {RECORD_BYTES - 1}), got "
                                   f"{pixels.dtype} {pixels.shape}")
            if len(labels) != len(pixels):
                raise DatasetError(f"{where}: {len(pixels)} images but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise DatasetError(f"{where}: labels must lie in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")
        images = pixels.reshape(-1, 3, RESOLUTION, RESOLUTION).transpose(0, 2, 3, 1)  # planes -> (H, W, C)
        return np.ascontiguousarray(images), labels


def _check_size(size: int, where: str) -> None:
    if size > MAX_BATCH_BYTES:
        raise DatasetError(f"{where}: {size:,} bytes, over the {MAX_BATCH_BYTES:,} of a CIFAR-10 batch "
                           "(mct.worlds.cifar10.MAX_BATCH_BYTES)")


def prepare_cifar10(source: str | Path, dest: str | Path, *, max_images: int | None = None,
                    progress: bool = True) -> int:
    """The training set of the CIFAR-10 release at ``source`` (or an EDM-layout image folder/zip) as an EDM dataset
    zip at ``dest``; the first ``max_images`` images (EDM's rule). Returns the number of images written. Every
    batch is checked before the archive is written, so a bad file leaves ``dest`` as it was."""
    dest = Path(dest)
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"source not found: {source}")
    try:
        release = CifarRelease(source)
    except DatasetError:
        if source.is_dir() or (source.is_file() and not tarfile.is_tarfile(source)):  # an EDM-layout folder/zip
            try:
                return prepare_imagenet(source, dest, RESOLUTION, max_images=max_images, progress=progress,
                                        num_classes=None).num_images
            except DatasetError as e:
                raise DatasetError(f"{source}: neither a CIFAR-10 release (cifar-10-batches-bin/ or "
                                   "cifar-10-batches-py/ with data_batch_1..5, or their .tar.gz) nor an image "
                                   f"folder/zip in EDM's dataset_tool layout ({e})") from None
        raise
    with release.reader() as read:
        class_names = release.class_names(read)
        batches = [release.batch(read, i) for i in range(1, TRAIN_BATCHES + 1)]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    n = len(images) if max_images is None else min(len(images), int(max_images))
    write_edm_archive(dest, zip(images[:n], labels[:n].tolist(), strict=True), n, class_names, progress=progress)
    return n


class Cifar10(ImageNet):
    """worlds.<name>: {kind: cifar10, source, resolution: 32, num_classes: 10 | 0, max_images, ref_images}: the
    CIFAR-10 training set as an EDM dataset zip; teachers are EDM's CIFAR-10 pickles (VP, DDPM++), 10 classes
    (``num_classes: 10``) or unconditional (``num_classes: 0``).

    Everything after ``prepare`` is the ImageNet world's: Inception FID (TensorFlow-legacy weights), the prepared
    archive as reference set, uint8 samples, and evaluation on a GPU (smaller than ImageNet's)."""

    reference_split = "train"
    eval_needs = EvalNeeds(mem_mb=16000, runtime=180, gpu=1, ref_threads=8)

    @classmethod
    def check_config(cls, cfg, key: str) -> str | None:
        if cfg.resolution != RESOLUTION:
            return f"{key}.resolution: CIFAR-10 is {RESOLUTION}x{RESOLUTION}; set resolution: {RESOLUTION}"
        if cfg.num_classes not in (0, NUM_CLASSES):
            return (f"{key}.num_classes: {NUM_CLASSES} (class-conditional, EDM's cond teacher) or 0 "
                    f"(unconditional), got {cfg.num_classes}")
        return None

    @property
    def paper_dataset(self) -> str | None:
        return f"CIFAR-10 32x32, {'conditional' if self.label_dim else 'unconditional'}"

    def prepare(self, out: Path) -> None:
        if not self.cfg.source:
            raise ValueError(f"worlds.{self.name}.source: set the CIFAR-10 release (folder or .tar.gz) to prepare")
        prepare_cifar10(self.cfg.source, out, max_images=self.cfg.max_images or None)
