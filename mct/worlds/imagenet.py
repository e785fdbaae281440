"""ImageNet world, data side: EDM-style dataset zips built with the ADM ("dhariwal") center crop.

``prepare_imagenet`` turns an ImageFolder tree (``root/<wnid>/<image>.JPEG``) or a zip of the same layout
into the archive format of EDM's dataset_tool: uncompressed PNGs named ``00000/img00000000.png`` and a
``dataset.json`` holding ``{"labels": [[fname, label], ...]}``, where ``label`` is the index of the image's
class folder among the sorted class folder names (the standard ImageNet class index when the folders are
the 1000 wnids). We also store ``"class_names"``; EDM's readers ignore extra keys.

The crop is EDM's ``center-crop-dhariwal``, i.e. ADM's: halve with a BOX filter while the short side is at
least 2x the target, BICUBIC-resize so the short side equals it, then center crop. Images are streamed one
at a time and the zip is written to a temp file and renamed at the end.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import PIL.Image
from tqdm import tqdm

from mct.worlds.base import EvalNeeds, World

if TYPE_CHECKING:  # torch is imported where it runs: the stage table reads this module's world class torch-free
    from torch import Tensor


class DatasetError(ValueError):
    """A source folder/zip or a prepared archive is not usable; the message names what and where."""


# Pixel budget of one image, decoded or resized (2**26 pixels: 192 MiB as RGB; the largest ImageNet photos have
# about 2**24). Checked from the header before decoding, and before the crop's resize, whose output grows with the
# aspect ratio: a 1x200,000 PNG is 372 bytes zipped, and resized to a short side of 64 it would be 12,800,000x64.
MAX_PIXELS = 1 << 26


@functools.cache
def _image_extensions() -> frozenset[str]:
    PIL.Image.init()  # registers every plugin's extensions
    return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith("._") or name.startswith("__MACOSX/"):  # macOS resource forks, not images
        return False
    return os.path.splitext(base)[1].lower() in _image_extensions()


def check_resolution(resolution: int | tuple[int, int]) -> int:
    """EDM's rule: square and a power of two (the paper uses 64 and 128)."""
    if isinstance(resolution, tuple | list):
        if len(resolution) != 2:
            raise DatasetError(f"resolution must be an int or a (width, height) pair, got {resolution!r}")
        w, h = resolution
        if w != h:
            raise DatasetError(f"resolution must be square for center-crop-dhariwal, got {w}x{h}")
        resolution = w
    if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer):
        raise DatasetError(f"resolution must be an int, got {resolution!r}")
    res = int(resolution)
    if res < 1 or res & (res - 1):
        raise DatasetError(f"resolution must be a power of two (e.g. 64 or 128), got {res}")
    return res


# --- the ADM center crop ----------------------------------------------------------------------------


def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> np.ndarray:
    """ADM's ImageNet crop (EDM: --transform=center-crop-dhariwal) -> uint8 array (resolution, resolution, 3).

    Halving with BOX while the short side >= 2 * resolution averages whole pixel blocks (no aliasing, no
    blur beyond the box), so only the last resize to short side == resolution is a BICUBIC interpolation.
    """
    img = img.convert("RGB")
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(img.size)
    check_pixels(round(img.width * scale), round(img.height * scale), f"the crop's resize of a {img.width}x"
                 f"{img.height} image")
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


# --- sources: folder or zip --------------------------------------------------------------------------


class ImageSource:
    """Sorted image names (relative, '/'-separated) of a folder or zip, with their integer labels."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)
        if self.source.is_dir():
            self.is_zip = False
            names = self._list_folder()
            meta = self.source / "dataset.json"
            meta_text = _read_meta_file(meta) if meta.is_file() else None
        elif self.source.is_file():
            if not zipfile.is_zipfile(self.source):
                raise DatasetError(f"source {self.source} is a file but not a zip archive")
            self.is_zip = True
            with zipfile.ZipFile(self.source) as z:
                names = sorted(n for n in z.namelist() if not n.endswith("/") and is_image_name(n))
                meta_text = _read_meta(z, self.source)
        else:
            raise DatasetError(f"source not found: {self.source}")
        if not names:
            raise DatasetError(f"no images found in {self.source} (expected {self.source}/<class>/<image>.JPEG)")
        self.names: list[str] = names
        self.labels, self.class_names = self._labels(meta_text)

    def _list_folder(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.source):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.source).replace(os.sep, "/")
            # regular files only: a FIFO, socket or device named like an image would block or never end
            out += [f if rel == "." else f"{rel}/{f}" for f in filenames
                    if is_image_name(f) and os.path.isfile(os.path.join(dirpath, f))]
        return sorted(out)

    def _labels(self, meta_text: str | None) -> tuple[list[int], list[str] | None]:
        # An existing dataset.json (e.g. an EDM archive as input) wins, as in EDM's dataset_tool.
        meta = _parse_meta(meta_text, self.source)
        if meta.get("labels") is not None:
            table = {}
            for entry in meta["labels"]:
                if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)
                        and not isinstance(entry[1], bool)):
                    raise DatasetError(f"{self.source}: dataset.json labels must be [name, integer] pairs, "
                                       f"got {entry!r:.80}")
                table[entry[0]] = entry[1]
            missing = [n for n in self.names if n not in table]
            if missing:
                raise DatasetError(f"{self.source}: dataset.json has no label for {missing[0]} "
                                   f"({len(missing)} images unlabelled)")
            return [table[n] for n in self.names], meta.get("class_names")
        parts = [n.split("/") for n in self.names]
        # A zip made with `zip -r train.zip train/` wraps the class folders in one top folder: strip it.
        if all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
            parts = [p[1:] for p in parts]
        for name, p in zip(self.names, parts, strict=True):
            if len(p) < 2:
                raise DatasetError(f"{self.source}: image {name} is not inside a class folder; "
                                   "expected root/<class>/<image> (ImageFolder layout)")
        class_names = sorted({p[0] for p in parts})
        index = {c: i for i, c in enumerate(class_names)}
        return [index[p[0]] for p in parts], class_names

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], BinaryIO]]:
        """Context yielding ``open(name) -> binary file``; keeps a zip open for the whole pass."""
        if not self.is_zip:
            yield lambda name: open(self.source / name, "rb")
            return
        with zipfile.ZipFile(self.source) as z:
            yield lambda name: z.open(name, "r")


MAX_META_BYTES = 1 << 29  # dataset.json: ImageNet's 1.28M labels take about 60 MB


def _read_meta(z: zipfile.ZipFile, where: Path) -> str | None:
    """dataset.json of a zip, refused beyond MAX_META_BYTES uncompressed (a zip bomb costs no more than that)."""
    if "dataset.json" not in z.namelist():
        return None
    size = z.getinfo("dataset.json").file_size
    if size > MAX_META_BYTES:
        raise DatasetError(f"{where}: dataset.json is {size:,} bytes uncompressed, over the {MAX_META_BYTES:,} "
                           "limit (mct.worlds.imagenet.MAX_META_BYTES)")
    try:
        return z.read("dataset.json").decode()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: dataset.json is not UTF-8 text ({e})") from None


def _read_meta_file(path: Path) -> str:
    """A source folder's dataset.json, with the same size limit and UTF-8 check as in a zip."""
    if path.stat().st_size > MAX_META_BYTES:
        raise DatasetError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_META_BYTES:,} limit")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def _parse_meta(text: str | None, where: Path) -> dict:
    try:
        meta = json.loads(text) if text else {}
    except ValueError as e:
        raise DatasetError(f"{where}: dataset.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels") or [], list):
        raise DatasetError(f"{where}: dataset.json must be a mapping with a list of labels")
    return meta


def check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise DatasetError(f"{what}: {width}x{height} pixels exceed the budget of {MAX_PIXELS:,} "
                           "(mct.worlds.imagenet.MAX_PIXELS); refusing to decode it (a decompression bomb?)")


def _load_rgb(f: BinaryIO, name: str, source: Path) -> PIL.Image.Image:
    try:
        img = PIL.Image.open(f)  # reads the header only
        check_pixels(*img.size, f"image {name} in {source}")
        img.load()  # decode now, so a truncated file fails here, naming the file
        return img.convert("RGB")
    except PIL.Image.DecompressionBombError as e:
        raise DatasetError(f"image {name} in {source}: refused as a decompression bomb ({e})") from e
    except DatasetError:
        raise
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {name} in {source}: {e}") from e


def archive_name(idx: int) -> str:
    """EDM's archive naming: 00000/img00000000.png (a folder per 100k images)."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    num_images: int
    num_classes: int
    resolution: int


def write_edm_archive(dest: Path, images: Iterator[tuple[np.ndarray, int]], n: int, class_names: list[str] | None,
                      *, progress: bool = True) -> None:
    """Write (uint8 (H, W, 3) image, label) pairs as an EDM dataset zip at ``dest``: uncompressed PNGs named
    :func:`archive_name` and a ``dataset.json`` of their labels. Written to a temp file beside ``dest`` and renamed
    at the end, so an error (a bad image half-way) leaves ``dest`` as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for idx, (arr, label) in enumerate(tqdm(images, total=n, unit="img", desc=dest.name,
                                                    disable=not progress)):
                buf = io.BytesIO()
                # Uncompressed PNG, as EDM: decoding cost matters more than size in the training loop.
                PIL.Image.fromarray(arr, "RGB").save(buf, format="png", compress_level=0, optimize=False)
                fname = archive_name(idx)
                zf.writestr(fname, buf.getbuffer())
                labels.append([fname, int(label)])
            zf.writestr("dataset.json", json.dumps({"labels": labels, "class_names": class_names}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_imagenet(source: str | Path, dest: str | Path, resolution: int | tuple[int, int] = 64, *,
                     max_images: int | None = None, progress: bool = True,
                     num_classes: int | None = None) -> PreparedDataset:
    """Convert an ImageFolder tree or zip into an EDM dataset zip at ``dest`` (center-crop-dhariwal).

    The first ``max_images`` images in sorted name order are used (EDM's rule); class indices always come
    from all class folders, so they do not depend on ``max_images``. Every label must lie in [0, ``num_classes``)
    (the world's class count; else [0, number of class names] when the source names its classes).
    """
    res = check_resolution(resolution)
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise DatasetError(f"max_images must be a positive int or None, got {max_images!r}")
    dest = Path(dest)
    if dest.suffix.lower() != ".zip":
        raise DatasetError(f"dest must be a .zip path, got {dest}")
    src = ImageSource(source)
    n = len(src.names) if max_images is None else min(len(src.names), int(max_images))
    limit = num_classes or (len(src.class_names) if src.class_names else None)
    bad = [(n, y) for n, y in zip(src.names, src.labels, strict=True) if y < 0 or (limit is not None and y >= limit)]
    if bad:
        raise DatasetError(f"{src.source}: label {bad[0][1]} of {bad[0][0]} is outside [0, {limit or 'inf'}) "
                           f"({len(bad)} labels out of range; num_classes {limit})")
    num_classes = len(src.class_names) if src.class_names else max(src.labels) + 1

    def images() -> Iterator[tuple[np.ndarray, int]]:
        with src.reader() as open_member:
            for idx in range(n):
                name = src.names[idx]
                with open_member(name) as f:
                    arr = center_crop_dhariwal(_load_rgb(f, name, src.source), res)
                if arr.shape != (res, res, 3):
                    raise DatasetError(f"crop of {name} has shape {arr.shape}, expected {(res, res, 3)}")
                yield arr, src.labels[idx]

    write_edm_archive(dest, images(), n, src.class_names, progress=progress)
    return PreparedDataset(path=dest, num_images=n, num_classes=num_classes, resolution=res)


# --- reading a prepared zip ---------------------------------------------------------------------------


class ImageZipDataset:
    """Lazy reader of an EDM dataset zip: item i -> (image (3, H, W) float32 in [-1, 1], label); a map-style
    dataset for torch's DataLoader (``__len__``, ``__getitem__``; torch asks no base class of it).

    The label is a one-hot float32 (num_classes,) (``one_hot=True``, the denoiser convention) or an int64
    scalar; an unlabelled archive gives num_classes == 0 and labels of shape (0,) / the value -1. The zip is
    opened on first access in each process, so the dataset pickles into DataLoader workers.
    """

    def __init__(self, path: str | Path, *, one_hot: bool = True, num_classes: int | None = None) -> None:
        self.path = Path(path)
        self.one_hot = bool(one_hot)
        if not self.path.is_file() or not zipfile.is_zipfile(self.path):
            raise DatasetError(f"not a dataset zip: {self.path}")
        with zipfile.ZipFile(self.path) as z:
            all_names = z.namelist()
            self.names = sorted(n for n in all_names if not n.endswith("/") and is_image_name(n))
            meta_text = _read_meta(z, self.path)
            meta = _parse_meta(meta_text, self.path)
            if not self.names:
                raise DatasetError(f"no images in {self.path}")
            with PIL.Image.open(io.BytesIO(z.read(self.names[0]))) as first:
                w, h = first.size
            check_pixels(w, h, f"{self.path}: {self.names[0]}")
        if w != h:
            raise DatasetError(f"{self.path}: images must be square, got {w}x{h}")
        self.resolution = w
        self.class_names: list[str] | None = meta.get("class_names")

        self.labels: np.ndarray | None = None
        if meta.get("labels") is not None:
            table = {name: int(label) for name, label in meta["labels"]}
            missing = [n for n in self.names if n not in table]
            if missing:
                raise DatasetError(f"{self.path}: dataset.json has no label for {missing[0]}")
            self.labels = np.array([table[n] for n in self.names], dtype=np.int64)
        if num_classes is None:
            if self.class_names:
                num_classes = len(self.class_names)
            else:
                num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0
        self.num_classes = int(num_classes)
        if self.labels is not None and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(f"{self.path}: labels must lie in [0, {self.num_classes}), "
                               f"got [{self.labels.min()}, {self.labels.max()}]")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # a zip handle must not cross a fork
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": None}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def image(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3) image i, as stored."""
        with PIL.Image.open(io.BytesIO(self._archive().read(self.names[i]))) as img:
            if img.size != (self.resolution, self.resolution):  # checked before decoding: no bomb gets decoded
                raise DatasetError(f"{self.path}: {self.names[i]} is {img.width}x{img.height}, expected "
                                   f"{self.resolution}x{self.resolution}")
            arr = np.array(img.convert("RGB"))
        if arr.shape != (self.resolution, self.resolution, 3):
            raise DatasetError(f"{self.path}: {self.names[i]} has shape {arr.shape}, expected "
                               f"{(self.resolution, self.resolution, 3)}")
        return arr

    def label(self, i: int) -> Tensor:
        import torch

        if self.one_hot:
            onehot = torch.zeros(self.num_classes, dtype=torch.float32)
            if self.labels is not None:
                onehot[int(self.labels[i])] = 1.0
            return onehot
        return torch.tensor(int(self.labels[i]) if self.labels is not None else -1, dtype=torch.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        import torch

        i = i % len(self)
        x = torch.from_numpy(self.image(i)).permute(2, 0, 1).to(torch.float32)
        return x / 127.5 - 1.0, self.label(i)


class _Uint8Images:
    """Items ``indices[i]`` of a prepared archive as uint8 (3, H, W) tensors: what FID feature extractors read."""

    def __init__(self, dataset: ImageZipDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        import torch

        return torch.from_numpy(self.dataset.image(self.indices[i])).permute(2, 0, 1).contiguous()


def iter_uint8_batches(dataset: ImageZipDataset, indices: list[int], batch_size: int,
                       num_workers: int | None = None) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of the given images, in that order; PNG decoding runs in DataLoader workers
    (default: up to 8, one core left free) when there are enough images to repay starting them."""
    import torch.utils.data
    if num_workers is None:
        num_workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if len(indices) >= 20 * batch_size else 0
    loader = torch.utils.data.DataLoader(_Uint8Images(dataset, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    yield from loader


class ImageNet(World):
    """worlds.<name>: {kind: imagenet, source, resolution, num_classes, max_images, ref_images}: an EDM dataset zip
    made from an ImageFolder tree by prepare_imagenet; teachers are the published EDM and ADM checkpoints.

    Its scale sets its answers: FID in Inception's feature space (TensorFlow-legacy weights, so numbers compare
    with the literature), the reference set the whole prepared archive streamed (not a held-out split), samples
    stored as uint8 (what FID reads anyway, at a quarter of the size), and evaluation stages on a GPU."""

    data_suffix = ".zip"
    reference_split = "all"
    feature_space = "inception-legacy-tf"
    fd_name = "FID"
    samples_uint8 = True
    takes_published_checkpoints = True
    primary_metrics = (("fid", "lower"), ("precision", "higher"), ("recall", "higher"))  # the paper's Table 1
    eval_needs = EvalNeeds(mem_mb=32000, runtime=720, gpu=1, ref_threads=8)

    @classmethod
    def check_config(cls, cfg, key: str) -> str | None:
        res = cfg.resolution
        if res < 8 or res & (res - 1):
            return f"{key}.resolution: the U-Nets take a power of two >= 8 (e.g. 64 or 128), got {res}"
        return None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, self.cfg.resolution, self.cfg.resolution)

    @property
    def label_dim(self) -> int:
        return self.cfg.num_classes

    @property
    def sigma_data(self) -> float:
        return 0.5  # images in [-1, 1], EDM's convention

    @property
    def paper_dataset(self) -> str | None:
        return f"ImageNet {self.cfg.resolution}x{self.cfg.resolution}"

    def prepare(self, out: Path) -> None:
        if not self.cfg.source:
            raise ValueError(f"worlds.{self.name}.source: set the ImageNet folder or zip to prepare")
        prepare_imagenet(self.cfg.source, out, self.cfg.resolution, max_images=self.cfg.max_images or None,
                         num_classes=self.cfg.num_classes or None)

    def load_split(self, path: Path, split: str = "train"):
        raise NotImplementedError(f"load_split is not available for {self.kind} worlds; use ImageZipDataset")

    def reference_batches(self, path: Path, batch_size: int = 500) -> Iterator[Tensor]:
        """The prepared archive as uint8 images, streamed in a fixed shuffled order (seed 0), so any prefix of it
        (the precision/recall subset, ``ref_images``) spreads over all classes; memory stays bounded."""
        import torch

        dataset = ImageZipDataset(path, one_hot=False)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        if self.cfg.ref_images:
            order = order[:self.cfg.ref_images]
        yield from iter_uint8_batches(dataset, order.tolist(), batch_size)

    def build_network(self, arch: str, arch_kwargs: dict):
        if arch == "edm":
            from mct.diffusion import EDMPrecond

            use_checkpoint = bool(arch_kwargs.get("use_checkpoint", False))
            if "network" in arch_kwargs:  # EDM's architecture from its constructor kwargs (random weights)
                from mct.nets.edm import build_network

                net = build_network(arch_kwargs.get("model_type", "DhariwalUNet"),
                                    **{**arch_kwargs["network"], "use_checkpoint": use_checkpoint})
                precond = arch_kwargs.get("precond", "EDMPrecond")
                if precond == "VPPrecond":  # EDM's CIFAR-10 teachers (VP formulation), at EDM's VP defaults
                    from mct.nets.edm import VPPrecond

                    return VPPrecond(net, label_dim=self.label_dim)
                if precond != "EDMPrecond":
                    raise ValueError(f"arch_kwargs.precond: EDMPrecond or VPPrecond, got {precond!r}")
                return EDMPrecond(net, sigma_data=float(arch_kwargs.get("sigma_data", 0.5)),
                                  label_dim=self.label_dim)
            # EDM pickles carry their architecture: a fresh instance is the pickle loaded again (safely).
            from mct.checkpoint import load_edm_pickle

            return load_edm_pickle(arch_kwargs["source"], use_checkpoint=use_checkpoint)["ema"]
        if arch == "adm":
            # guided-diffusion's flags of the checkpoint; the VP schedule is its linear one over diffusion_steps.
            from mct.nets.adm import build_adm_denoiser

            return build_adm_denoiser(arch_kwargs, T=int(arch_kwargs.get("diffusion_steps", 1000)))
        return super().build_network(arch, arch_kwargs)
