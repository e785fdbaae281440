"""ImageNet preparation: EDM archive layout, ADM center crop, labels from class folders, lazy reader."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from mct.worlds.imagenet import (
    DatasetError,
    ImageZipDataset,
    center_crop_dhariwal,
    prepare_imagenet,
)

# Created in this (unsorted) order; labels must follow the sorted names: n01 -> 0, n02 -> 1, n03 -> 2.
CLASSES = ["n03", "n01", "n02"]
SIZES = [(100, 80), (80, 120), (64, 64), (150, 90)]  # (width, height), portrait, landscape and square


def _make_imagefolder(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for j, (w, h) in enumerate(SIZES):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            # Mix formats and modes as in real ImageNet (JPEG mostly, the odd grayscale image).
            if j == 1:
                PIL.Image.fromarray(arr[..., 0], "L").save(root / c / f"{c}_{j}.JPEG")
            else:
                PIL.Image.fromarray(arr).save(root / c / f"{c}_{j}.{'png' if j == 3 else 'JPEG'}")


def _zip_tree(root: Path, zpath: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zpath, "w") as z:
        for dirpath, _, files in os.walk(root):
            for f in files:
                full = Path(dirpath) / f
                z.write(full, prefix + full.relative_to(root).as_posix())
    return zpath


@pytest.fixture()
def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    _make_imagefolder(root)
    return root


def _source_names(root: Path) -> list[str]:
    return sorted(f"{c}/{f}" for c in CLASSES for f in os.listdir(root / c))


def test_prepare_imagefolder_edm_layout(imagefolder: Path, tmp_path: Path):
    out = prepare_imagenet(imagefolder, tmp_path / "out" / "img64.zip", 64, progress=False)
    assert (out.num_images, out.num_classes, out.resolution) == (12, 3, 64)
    assert os.listdir(tmp_path / "out") == ["img64.zip"]  # temp file renamed away
    with zipfile.ZipFile(out.path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        meta = json.loads(z.read("dataset.json"))
        assert names == [f"00000/img{i:08d}.png" for i in range(12)]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        src_names = _source_names(imagefolder)
        for i, name in enumerate(names):
            with PIL.Image.open(io.BytesIO(z.read(name))) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
                got = np.asarray(img)
            # Image i is the ADM crop of the i-th source image in sorted order (PNG is lossless).
            with PIL.Image.open(imagefolder / src_names[i]) as src:
                np.testing.assert_array_equal(got, center_crop_dhariwal(src, 64))
    assert meta["labels"] == [[f"00000/img{i:08d}.png", i // 4] for i in range(12)]
    assert meta["class_names"] == ["n01", "n02", "n03"]


def test_prepare_zip_source_matches_folder(imagefolder: Path, tmp_path: Path):
    ref = prepare_imagenet(imagefolder, tmp_path / "ref.zip", 64, progress=False)
    plain = _zip_tree(imagefolder, tmp_path / "plain.zip")
    wrapped = _zip_tree(imagefolder, tmp_path / "wrapped.zip", prefix="train/")  # `zip -r train.zip train/`
    with zipfile.ZipFile(ref.path) as z:
        want = {n: z.read(n) for n in z.namelist()}
    for i, src in enumerate([plain, wrapped]):
        out = prepare_imagenet(src, tmp_path / f"from_zip{i}.zip", 64, progress=False)
        with zipfile.ZipFile(out.path) as z:
            assert {n: z.read(n) for n in z.namelist()} == want


def test_max_images_keeps_class_indices(imagefolder: Path, tmp_path: Path):
    out = prepare_imagenet(imagefolder, tmp_path / "five.zip", 64, max_images=5, progress=False)
    assert out.num_images == 5 and out.num_classes == 3
    with zipfile.ZipFile(out.path) as z:
        meta = json.loads(z.read("dataset.json"))
        assert len([n for n in z.namelist() if n.endswith(".png")]) == 5
    assert [label for _, label in meta["labels"]] == [0, 0, 0, 0, 1]
    ds = ImageZipDataset(out.path)
    assert ds.num_classes == 3 and len(ds) == 5


def test_center_crop_keeps_the_middle_stripe():
    # 300x100 landscape with red | green | blue thirds. Short side 100 < 128: no BOX step; BICUBIC to
    # 192x64 (scale 0.64), crop columns 64..127 = source columns 100..199 = exactly the green third.
    # Bicubic's support is 2 / 0.64 = 3.1 source pixels, so columns 3..60 see only green.
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100, 0] = a[:, 100:200, 1] = a[:, 200:, 2] = 255
    out = center_crop_dhariwal(PIL.Image.fromarray(a), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, 3:61] == np.array([0, 255, 0], np.uint8)).all()
    assert (out[..., 1] >= 200).all()  # the red and blue thirds are cropped away (edge blend only)
    # Portrait: the same holds along the rows.
    outp = center_crop_dhariwal(PIL.Image.fromarray(a.transpose(1, 0, 2).copy()), 64)
    assert (outp[3:61] == np.array([0, 255, 0], np.uint8)).all()


def test_center_crop_box_path_and_pure_crop():
    rng = np.random.default_rng(1)
    # 512x256: BOX halving twice (256 >= 128, then 128 >= 128) -> 128x64, scale 1 (no BICUBIC change),
    # center crop columns 32..95. So the output is exactly two PIL BOX halvings, cropped ...
    a = rng.integers(0, 256, size=(256, 512, 3), dtype=np.uint8)
    out = center_crop_dhariwal(PIL.Image.fromarray(a), 64)
    box = PIL.Image.Resampling.BOX
    halved = PIL.Image.fromarray(a).resize((256, 128), box).resize((128, 64), box)
    np.testing.assert_array_equal(out, np.asarray(halved)[:, 32:96])
    # ... i.e. the 4x4 block mean of the central 256x256 source region, up to PIL's uint8 rounding in each
    # halving (measured: each halving is 0..+1 above the exact mean). A misplaced crop would be off by ~100.
    blocks = a[:, 128:384].astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    diff = out.astype(np.float64) - blocks
    assert diff.min() >= 0.0 and diff.max() <= 2.0
    # 128x64 at 64: neither BOX nor a real resize, so the crop is exact: columns 32..95.
    b = rng.integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_dhariwal(PIL.Image.fromarray(b), 64), b[:, 32:96])


def test_image_zip_dataset_reads_back(imagefolder: Path, tmp_path: Path):
    out = prepare_imagenet(imagefolder, tmp_path / "img.zip", (64, 64), progress=False)
    ds = ImageZipDataset(out.path)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.resolution == 64
    with zipfile.ZipFile(out.path) as z:
        meta = json.loads(z.read("dataset.json"))
    for i in (0, 5, 11, -1):
        x, y = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert y.shape == (3,) and y.sum() == 1.0 and int(y.argmax()) == meta["labels"][i][1]
        raw = torch.from_numpy(ds.image(i)).permute(2, 0, 1).float()
        assert torch.equal(x, raw / 127.5 - 1.0)
    assert x.min() < -0.9 and x.max() > 0.9  # random pixels span the range: not a constant image
    ints = ImageZipDataset(out.path, one_hot=False)
    assert [int(ints[i][1]) for i in range(12)] == [i // 4 for i in range(12)]
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy without the open zip handle
    assert torch.equal(ds2[3][0], ds[3][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 64, 64) and yb.shape == (4, 3)
    with pytest.raises(IndexError):
        ds[12]


def test_errors_are_early_and_named(imagefolder: Path, tmp_path: Path):
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        prepare_imagenet(tmp_path / "empty", tmp_path / "e.zip", progress=False)
    with pytest.raises(DatasetError, match="not found"):
        prepare_imagenet(tmp_path / "nowhere", tmp_path / "e.zip", progress=False)
    with pytest.raises(DatasetError, match="square"):
        prepare_imagenet(imagefolder, tmp_path / "e.zip", (64, 32), progress=False)
    with pytest.raises(DatasetError, match="power of two"):
        prepare_imagenet(imagefolder, tmp_path / "e.zip", 100, progress=False)
    with pytest.raises(DatasetError, match=".zip"):
        prepare_imagenet(imagefolder, tmp_path / "e.tar", progress=False)
    with pytest.raises(DatasetError, match="max_images"):
        prepare_imagenet(imagefolder, tmp_path / "e.zip", max_images=0, progress=False)
    assert not (tmp_path / "e.zip").exists()

    flat = tmp_path / "flat"
    flat.mkdir()
    PIL.Image.new("RGB", (70, 70)).save(flat / "a.png")
    with pytest.raises(DatasetError, match="not inside a class folder"):
        prepare_imagenet(flat, tmp_path / "e.zip", progress=False)


def test_unreadable_image_leaves_nothing(imagefolder: Path, tmp_path: Path):
    (imagefolder / "n02" / "n02_9.JPEG").write_bytes(b"this is not a jpeg")
    out_dir = tmp_path / "out"
    with pytest.raises(DatasetError, match="n02/n02_9.JPEG"):
        prepare_imagenet(imagefolder, out_dir / "img.zip", progress=False)
    assert os.listdir(out_dir) == []
