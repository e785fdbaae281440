"""Local inputs of a tiny text-to-image world, made by the tests in the real formats: a random-weight SD folder
(mct/sd_export.py), a captions file, a COCO-format annotations JSON with its image folder, a tiny open_clip model
(tests/clip_fixture.py) and the Inception stand-in (tests/inception_fixture.py). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

from mct.sd_export import make_tiny_sd
from tests.clip_fixture import make_tiny_clip
from tests.inception_fixture import write_inception_standin

WORDS = ("a red cat", "two dogs", "a blue car", "an old tree", "a small boat", "green apples", "a tall tower",
         "the city at night", "a bowl of soup", "a yellow bird")
EVAL_PROMPTS = 6
IMAGE_SIZE = 64  # generated images (latents 4 x 8 x 8)
EVAL_RESOLUTION = 32


def make_t2i_inputs(root: Path, n_images: int = 8) -> dict[str, str]:
    """Write every local input under ``root``; returns the paths by role (and MCT_INCEPTION_PATH's value)."""
    root.mkdir(parents=True, exist_ok=True)
    sd = make_tiny_sd(root / "sd15-tiny", image_size=IMAGE_SIZE)
    captions = root / "captions.txt"
    captions.write_text("".join(f"{w} on a table\n{w} in the park\n" for w in WORDS))
    images = root / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    ann = {"images": [], "annotations": []}
    for i in range(n_images):
        name = f"COCO_val2014_{i:012d}.jpg"
        arr = rng.integers(0, 256, size=(40 + 3 * i, 56, 3), dtype=np.uint8)  # not square: the crop matters
        PIL.Image.fromarray(arr).save(images / name)
        ann["images"].append({"id": 100 + i, "file_name": name})
        for j in range(2):
            ann["annotations"].append({"image_id": 100 + i, "id": 1000 + 2 * i + j,
                                       "caption": f"{WORDS[(i + j) % len(WORDS)]} seen from above"})
    annotations = root / "captions_val2014.json"
    annotations.write_text(json.dumps(ann))
    clip_name, clip_weights = make_tiny_clip(root / "clip")
    inception = write_inception_standin(root / "inception")
    return {"source": str(sd), "captions": str(captions), "annotations": str(annotations), "images": str(images),
            "clip_weights": str(clip_weights), "clip_model": str(root / "clip" / f"{clip_name}.json"),
            "inception": str(inception)}


def t2i_params(inputs: dict[str, str], pins: dict[str, str] | None = None, iterations: int = 2) -> dict:
    """A params.yaml with the tiny world, its local SD teacher (guided teacher-eval) and one guided EMD run."""
    world = {"kind": "text2image", "resolution": IMAGE_SIZE, "eval_prompts": EVAL_PROMPTS,
             "eval_resolution": EVAL_RESOLUTION, **{k: inputs[k] for k in ("source", "captions", "annotations",
                                                                        "images", "clip_weights", "clip_model")}}
    if pins:
        world["sha256_files"] = pins
    sigma = {"kind": "loguniform", "sigma_min": 0.05, "sigma_max": 14.0}
    return {
        "suite": "t2i_tiny",
        "worlds": {"t2i_tiny": world},
        "teachers": {"t2i_tiny_sd": {"world": "t2i_tiny", "kind": "local", "arch": "sd_unet", "sampler_steps": 2,
                                     "sigma_min": 0.05, "sigma_max": 14.6, "guidance_scale": 3.0}},
        "templates": {},
        "experiments": {"t2i_tiny_emd": {
            "world": "t2i_tiny", "teacher": "t2i_tiny_sd", "method": "emd", "student": {"sigma_init": 2.5},
            "distill": {"K": 2, "iterations": iterations, "batch_size": 4, "checkpoint_every": 1,
                        "guidance_scale": 3.0, "mstep_sigma": sigma, "dsm_sigma": sigma, "log_with": "none"},
            "eval": {"num_samples": EVAL_PROMPTS, "batch_size": 3, "seed": 3}}},
        "suites": {"t2i_tiny": ["t2i_tiny_emd"]},
    }
