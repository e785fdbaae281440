"""COCO captions, the zero-shot evaluation pairs and the one transform shared by generated and reference images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

import mct.worlds.imagenet as imagenet
from mct.coco import (
    CaptionsError,
    center_crop_resize,
    coco_eval_pairs,
    images_to_uint8_resized,
    read_captions,
    reference_batches,
)

LANCZOS = PIL.Image.Resampling.LANCZOS


def _coco_json(path: Path, n_images: int, captioned: set[int] | None = None, split: str = "val2014") -> Path:
    """A COCO-format captions file. Each captioned image k has captions "first k" and "second k"; all "second"
    entries come before any "first" in one half of the ids, so "first in annotation order" is not "first by
    caption text" nor by annotation id. Images outside ``captioned`` have no caption."""
    captioned = set(range(1, n_images + 1)) if captioned is None else captioned
    images = [{"id": k, "file_name": f"COCO_{split}_{k:012d}.jpg"} for k in range(1, n_images + 1)]
    anns = []
    for k in sorted(captioned, reverse=True):
        anns.append({"id": 1000 - k, "image_id": k, "caption": f"  first  {k}\n"})
    for k in sorted(captioned):
        anns.append({"id": 5000 + k, "image_id": k, "caption": f"second {k}"})
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


# --- read_captions ------------------------------------------------------------------------------------------


def test_read_captions_plain_text_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a cat on a mat  \n\n\t\na  dog\n   \nlast line without newline")
    assert read_captions(path) == ["a cat on a mat", "a  dog", "last line without newline"]


def test_read_captions_coco_json_keeps_annotation_order_single_spaced(tmp_path):
    path = _coco_json(tmp_path / "captions_train2014.json", 3)
    assert read_captions(path) == ["first 3", "first 2", "first 1", "second 1", "second 2", "second 3"]


def test_read_captions_missing_file_says_what_to_provide_and_where(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CaptionsError) as err:
        read_captions(missing)
    msg = str(err.value)
    assert str(missing) in msg and "captions_train2014.json" in msg and "worlds.<name>.captions" in msg
    with pytest.raises(CaptionsError, match=r"worlds\.t2i\.captions"):
        read_captions(missing, setting="worlds.t2i.captions")


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""),
    ("blank.txt", "\n   \n\t\n"),
    ("blank.json", json.dumps({"annotations": [{"image_id": 1, "caption": "  \n "}]})),
    ("no_annotations.json", json.dumps({"images": []})),
    ("broken.json", "{not json"),
])
def test_read_captions_refuses_files_without_captions(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CaptionsError, match=name):
        read_captions(path)


# --- coco_eval_pairs ----------------------------------------------------------------------------------------


def test_eval_pairs_follow_the_documented_seeded_permutation(tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json", 30)
    pairs = coco_eval_pairs(path, n=12, seed=7)
    order = np.random.default_rng(7).permutation(30)[:12]  # over the ids 1..30, sorted
    assert pairs == [(f"COCO_val2014_{k + 1:012d}.jpg", f"first {k + 1}") for k in order]
    assert coco_eval_pairs(path, n=12, seed=7) == pairs
    assert coco_eval_pairs(path, n=12, seed=8) != pairs
    assert len({name for name, _ in pairs}) == 12


def test_eval_pairs_use_only_captioned_images_and_their_first_caption(tmp_path):
    captioned = {2, 3, 5, 7, 11, 13, 17, 19}
    path = _coco_json(tmp_path / "captions_val2014.json", 20, captioned)
    pairs = coco_eval_pairs(path, n=len(captioned), seed=0)
    ids = sorted(int(name[-16:-4]) for name, _ in pairs)
    assert ids == sorted(captioned)  # all of them, each once, none without a caption
    assert all(caption == f"first {int(name[-16:-4])}" for name, caption in pairs)


def test_eval_pairs_refuse_too_few_images_naming_the_counts(tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json", 10, {1, 2, 3})
    with pytest.raises(CaptionsError, match=r"has 3 images with captions, fewer than the 4 "):
        coco_eval_pairs(path, n=4)


def test_eval_pairs_refuse_missing_train_and_malformed_files(tmp_path):
    with pytest.raises(CaptionsError, match="captions_val2014.json"):
        coco_eval_pairs(tmp_path / "missing.json", n=1)
    with pytest.raises(CaptionsError, match="train2014"):
        coco_eval_pairs(_coco_json(tmp_path / "captions_train2014.json", 5, split="train2014"), n=2)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "annotations": [{"image_id": 9, "caption": "x"}]}))
    with pytest.raises(CaptionsError, match="image_id 9"):
        coco_eval_pairs(orphan, n=1)


# --- the shared transform -----------------------------------------------------------------------------------


def _left_third_red(width: int, height: int) -> PIL.Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 2] = 255  # blue
    arr[:, : width // 3] = (255, 0, 0)
    return PIL.Image.fromarray(arr)


def test_center_crop_resize_takes_the_centre_square():
    img = _left_third_red(300, 200)  # crop x in [50, 250): red on its first 50 of 200 columns -> 64 of 256
    out = center_crop_resize(img, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert (out[:, :60, 0] > 240).all() and (out[:, :60, 2] < 15).all()
    assert (out[:, 68:, 2] > 240).all() and (out[:, 68:, 0] < 15).all()  # a left crop would be red to column 128
    expected = np.asarray(img.crop((50, 0, 250, 200)).resize((256, 256), LANCZOS))
    np.testing.assert_array_equal(out, expected)
    portrait = PIL.Image.fromarray(np.asarray(img).transpose(1, 0, 2).copy())  # 200 wide, 300 high: rows cropped
    np.testing.assert_array_equal(center_crop_resize(portrait, 256), out.transpose(1, 0, 2))


@pytest.mark.parametrize("width", [301, 303, 256, 120])
def test_center_crop_resize_matches_torchvision_center_crop_then_lanczos(width):
    """DMD2's evaluation crops with torchvision's center_crop (rounded offset) before LANCZOS; odd excesses
    (301: 50.5 -> 50, 303: 51.5 -> 52) and upscaling land on the same pixels."""
    rng = np.random.default_rng(width)
    img = PIL.Image.fromarray(rng.integers(0, 256, (200, width, 3), dtype=np.uint8))
    side = min(img.size)
    expected = np.asarray(TF.center_crop(img, [side, side]).resize((64, 64), LANCZOS))
    np.testing.assert_array_equal(center_crop_resize(img, 64), expected)


def test_center_crop_resize_converts_to_rgb():
    gray = PIL.Image.fromarray(np.full((40, 50), 77, np.uint8), mode="L")
    out = center_crop_resize(gray, 16)
    assert out.shape == (16, 16, 3) and (out == 77).all()


def test_images_to_uint8_resized_equals_the_transform_of_the_quantised_image():
    x = torch.rand(3, 3, 40, 60, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # a little out of range
    out = images_to_uint8_resized(x, 16)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 16, 16)
    quantised = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for got, img in zip(out, quantised, strict=True):
        expected = center_crop_resize(PIL.Image.fromarray(img), 16)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError, match="RGB"):
        images_to_uint8_resized(x[:, :1], 16)


# --- reference_batches --------------------------------------------------------------------------------------


def _write_images(folder: Path, n: int) -> list[str]:
    """Images of different sizes, each a solid colour k * 40 in red, so their order is visible after resizing."""
    folder.mkdir()
    names = []
    for k in range(n):
        arr = np.zeros((30 + 3 * k, 40, 3), np.uint8)
        arr[..., 0] = 40 * k
        name = f"COCO_val2014_{k:012d}.png"
        PIL.Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


def test_reference_batches_keep_the_given_order_and_batch_shape(tmp_path):
    names = _write_images(tmp_path / "val2014", 5)
    order = [names[k] for k in (3, 0, 4, 1, 2)]
    batches = list(reference_batches(tmp_path / "val2014", order, size=8, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b.dtype == torch.uint8 for b in batches)
    assert torch.cat(batches)[:, 0, 4, 4].tolist() == [120, 0, 160, 40, 80]
    with PIL.Image.open(tmp_path / "val2014" / names[4]) as img:
        np.testing.assert_array_equal(batches[1][0].permute(1, 2, 0).numpy(), center_crop_resize(img, 8))


def test_reference_batches_check_every_name_before_reading_any_image(tmp_path, monkeypatch):
    names = _write_images(tmp_path / "val2014", 3)

    def no_reads(*args, **kwargs):
        raise AssertionError("an image was opened before the names were checked")

    monkeypatch.setattr(PIL.Image, "open", no_reads)
    with pytest.raises(CaptionsError, match=r"1 of 4 reference images are missing .*COCO_val2014_gone\.jpg"):
        reference_batches(tmp_path / "val2014", [*names, "COCO_val2014_gone.jpg"])  # raises before iteration
    with pytest.raises(CaptionsError, match="reference image folder not found"):
        reference_batches(tmp_path / "nowhere", names)


def test_reference_batches_refuse_images_over_the_pixel_budget(tmp_path, monkeypatch):
    names = _write_images(tmp_path / "val2014", 2)
    monkeypatch.setattr(imagenet, "MAX_PIXELS", 1000)  # 30x40 = 1200 pixels
    with pytest.raises(CaptionsError, match=names[0]):
        next(reference_batches(tmp_path / "val2014", names, size=8))
