"""COCO captions and reference images for the text-to-image world (distilled Stable Diffusion v1.5).

Two uses, two files:
  * training prompts: :func:`read_captions` reads a local captions file, either plain text (one prompt per line)
    or a COCO annotations JSON (e.g. ``captions_train2014.json``); nothing is downloaded.
  * evaluation: :func:`coco_eval_pairs` fixes the zero-shot COCO-2014 set, (val2014 image, caption) pairs drawn
    by a seeded permutation; :func:`reference_batches` reads those images and :func:`images_to_uint8_resized`
    brings generated images to the same size through the same transform (:func:`center_crop_resize`), so FID
    compares the two sets after one identical crop and resize.

torch is imported inside the functions that return tensors: the stage table imports world modules torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from mct.worlds.imagenet import DatasetError, check_pixels

if TYPE_CHECKING:
    from torch import Tensor

CAPTIONS_SETTING = "worlds.<name>.captions"
COCO_EVAL_N = 30_000
COCO_EVAL_SEED = 2014


class CaptionsError(ValueError):
    """A captions file, a COCO annotations file or a reference image is missing or unusable; the message says
    which file and how to provide it."""


# --- captions -----------------------------------------------------------------------------------------------


def _single_spaced(text: str) -> str:
    """COCO captions carry stray newlines, doubled and trailing spaces; a prompt is one line of single spaces."""
    return " ".join(text.split())


def _load_annotations(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionsError(f"{path} is not valid JSON ({e}); a COCO captions file such as captions_train2014.json "
                            "is expected, or a .txt file with one prompt per line") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionsError(f"{path} is JSON but not a COCO captions file: it needs an 'annotations' list of "
                            "{'image_id', 'caption'} entries (as in captions_train2014.json)")
    return data


def _annotation_captions(data: dict, path: Path) -> Iterator[tuple[object, str]]:
    """(image_id, single-spaced caption) per annotation, in file order; blank captions are not prompts."""
    for i, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str) and "image_id" in ann):
            raise CaptionsError(f"{path}: annotation {i} is not an {{'image_id', 'caption': str}} entry: "
                                f"{ann!r:.80}")
        caption = _single_spaced(ann["caption"])
        if caption:
            yield ann["image_id"], caption


def read_captions(path: str | os.PathLike, *, setting: str = CAPTIONS_SETTING) -> list[str]:
    """Prompts from a local file: a ``.json`` file is read as COCO annotations (every caption, in annotation
    order, stripped and single-spaced), any other file as plain text (one prompt per line, stripped, blank lines
    skipped). ``setting`` is the params.yaml key the path came from, named in the errors so the user knows what
    to change.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"captions file not found: {path}. Provide COCO's captions_train2014.json (from "
                            "annotations_trainval2014.zip) or a .txt file with one prompt per line, and set its path "
                            f"in params.yaml as {setting}")
    if path.suffix.lower() == ".json":
        captions = [caption for _, caption in _annotation_captions(_load_annotations(path), path)]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CaptionsError(f"{path} is not UTF-8 text ({e}); a .txt file with one prompt per line or a COCO "
                                "captions .json is expected") from e
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise CaptionsError(f"{path} holds no captions (empty file, or only blank lines/captions); set {setting} "
                            "to a file with at least one prompt")
    return captions


def coco_eval_pairs(annotations_json: str | os.PathLike, n: int = COCO_EVAL_N, seed: int = COCO_EVAL_SEED
                    ) -> list[tuple[str, str]]:
    """(image file_name, caption) pairs of the zero-shot COCO-2014 evaluation set.

    Our choice of protocol: DMD, DMD2 and GigaGAN evaluate text-to-image models on 30k random captions of COCO
    val2014; we take ``n`` distinct val2014 images with at least one caption, chosen by
    ``np.random.default_rng(seed).permutation`` over the images sorted by id, and for each image its first
    caption in annotation order. One caption per image makes the reference set (the images those captions belong
    to, under the same transform as the generations) a set of distinct photos. The result depends only on the
    file, ``n`` and ``seed``.

    ``annotations_json`` is COCO's captions_val2014.json; its ``images`` list gives each id's file_name.
    """
    path = Path(annotations_json)
    if not path.is_file():
        raise CaptionsError(f"COCO annotations file not found: {path}. The evaluation set is drawn from COCO's "
                            "captions_val2014.json (in annotations_trainval2014.zip); give its local path")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CaptionsError(f"n must be a positive number of image-caption pairs, got {n!r}")
    data = _load_annotations(path)
    if not isinstance(data.get("images"), list):
        raise CaptionsError(f"{path} has no 'images' list of {{'id', 'file_name'}} entries; the evaluation set needs "
                            "it to find each caption's image (captions_val2014.json has one)")
    file_names = {}
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)):
            raise CaptionsError(f"{path}: images entry {i} is not an {{'id': int, 'file_name': str}} entry: "
                                f"{img!r:.80}")
        file_names[img["id"]] = img["file_name"]
    first_caption: dict = {}
    for image_id, caption in _annotation_captions(data, path):
        if image_id not in file_names:
            raise CaptionsError(f"{path}: a caption refers to image_id {image_id!r}, which the 'images' list lacks")
        first_caption.setdefault(image_id, caption)
    _refuse_train_split(path, [file_names[i] for i in first_caption])
    if len(first_caption) < n:
        raise CaptionsError(f"{path} has {len(first_caption):,} images with captions, fewer than the {n:,} the "
                            "evaluation set needs (captions_val2014.json has 40,504); lower n or use the full file")
    ids = sorted(first_caption)
    order = np.random.default_rng(seed).permutation(len(ids))[:n]
    return [(file_names[ids[k]], first_caption[ids[k]]) for k in order]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_train_split(path: Path, names: Sequence[str]) -> None:
    """Evaluating on training captions would measure memorisation, not zero-shot quality; COCO's file names say
    the split, so a train2014 file passed by mistake is caught here."""
    if names and all(name.startswith("COCO_train2014_") for name in names):
        raise CaptionsError(f"{path} is a train2014 annotations file (its images are COCO_train2014_*); the zero-shot "
                            "evaluation set is drawn from captions_val2014.json")


# --- the shared transform -----------------------------------------------------------------------------------


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    return int(size)


def center_crop_resize(img: PIL.Image.Image, size: int = 256) -> np.ndarray:
    """RGB, centre crop to the short side, LANCZOS resize to ``size`` -> uint8 array (size, size, 3).

    The protocol's one transform: the 512-px generations and the val2014 photos both go through it, so neither
    set sees a filter the other does not. The crop offset is ``int(round(excess / 2))``, torchvision's
    ``center_crop`` rounding (which DMD2's evaluation uses), so an odd excess lands where theirs does.
    """
    size = _check_size(size)
    img = img.convert("RGB")
    side = min(img.size)
    left, top = int(round((img.width - side) / 2)), int(round((img.height - side) / 2))
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), resample=PIL.Image.Resampling.LANCZOS))


def images_to_uint8_resized(x: Tensor, size: int) -> Tensor:
    """Float images in [-1, 1] (N, 3, H, W), e.g. VAE decodes at 512, -> uint8 (N, 3, size, size) through
    :func:`center_crop_resize`.

    Quantised first as EDM saves images (``mct.metrics.fid.to_uint8_nhwc``: (x * 127.5 + 128) clipped, i.e.
    diffusers' round-to-nearest of (x / 2 + 0.5) * 255), then resized as a PIL image, exactly as a PNG of the
    generation would be, so generated and reference images share one transform. uint8 input skips quantisation.
    """
    import torch

    from mct.metrics.fid import to_uint8_nhwc

    size = _check_size(size)
    arr = to_uint8_nhwc(x)
    if arr.shape[-1] != 3:
        raise ValueError(f"images must be RGB (N, 3, H, W), got {arr.shape[-1]} channel(s)")
    out = np.zeros((len(arr), size, size, 3), np.uint8)
    for i, img in enumerate(arr):
        out[i] = center_crop_resize(PIL.Image.fromarray(img), size)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


# --- reference images ---------------------------------------------------------------------------------------


def _read_rgb(path: Path) -> PIL.Image.Image:
    """Decode one reference photo, refusing decompression bombs from the header (imagenet world's budget)."""
    try:
        with PIL.Image.open(path) as img:  # reads the header only
            check_pixels(*img.size, f"reference image {path}")
            img.load()  # decode now, so a truncated file fails here, naming the file
            return img.convert("RGB")
    except DatasetError as e:
        raise CaptionsError(str(e)) from e
    except PIL.Image.DecompressionBombError as e:
        raise CaptionsError(f"reference image {path}: refused as a decompression bomb ({e})") from e
    except OSError as e:  # PIL.UnidentifiedImageError included
        raise CaptionsError(f"reference image {path} cannot be read as an image ({e}); re-extract val2014.zip") from e


def reference_batches(image_folder: str | os.PathLike, file_names: Sequence[str], size: int = 256,
                      batch_size: int = 100) -> Iterator[Tensor]:
    """uint8 (B, 3, size, size) batches of ``image_folder/<file_name>``, in the order given, through
    :func:`center_crop_resize`.

    Every name is checked before any image is read (and before this returns), so a wrong folder or an
    incomplete extraction fails at once, naming the files, not after an hour of reading.
    """
    size = _check_size(size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    folder = Path(image_folder)
    if not folder.is_dir():
        raise CaptionsError(f"reference image folder not found: {folder}. Extract COCO's val2014.zip and give the "
                            "folder holding the COCO_val2014_*.jpg files")
    paths = [folder / name for name in file_names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CaptionsError(f"{len(missing):,} of {len(paths):,} reference images are missing from {folder}, e.g. "
                            f"{', '.join(missing[:3])}; is this the complete val2014 folder?")
    return _batches(paths, size, batch_size)


def _batches(paths: list[Path], size: int, batch_size: int) -> Iterator[Tensor]:
    import torch

    for i in range(0, len(paths), batch_size):
        arr = np.stack([center_crop_resize(_read_rgb(p), size) for p in paths[i:i + batch_size]])
        yield torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
