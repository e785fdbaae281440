"""CLIP score of text-to-image generations on COCO, with DMD's model: open_clip's ViT-g-14 (laion2b_s12b_b42k).

Per image: ``100 * max(cos(image embedding, text embedding of PROMPT_PREFIX + prompt), 0)``, the CLIPScore
convention (Hessel et al. 2021, whose prompts start with "A photo depicts ") at torchmetrics' scale of 100.
DMD2's COCO evaluation prefixes prompts the same way (it splices the prefix's tokens in after the start token,
which gives the same 77 tokens as tokenizing prefix + prompt) but averages the bare cosine, so its tables
read about 0.3 where our mean reads about 30: divide by 100 to compare (equal whenever no cosine is negative).
DMD2 also scores the 256-px evaluation images (centre crop + LANCZOS, :func:`mct.coco.images_to_uint8_resized`),
not the 512-px generations; pass those.

The weights come from a local safetensors file only: mct never downloads at run time, and a pickle checkpoint
(.bin/.pt/.pth/.ckpt) could run code when loaded. open_clip is handed the file's absolute path as ``pretrained``;
with a path that is not one of its tags it loads that file and fetches nothing, and its default preprocessing
(OpenAI mean/std, bicubic resize of the short side, centre crop) is the one its laion2b_s12b_b42k tag declares.
open_clip is imported when a scorer is built (it takes seconds), so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED_TAG = "laion2b_s12b_b42k"
PROMPT_PREFIX = "A photo depicts "
WEIGHTS_FILENAME = "open_clip_model.safetensors"
WEIGHTS_SETTING = "worlds.<name>.clip_weights"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ClipWeightsMissing(RuntimeError):
    """No usable local CLIP weights (absent, or in a pickle format mct refuses to load); the CLIP score is then not
    computed, and the message says which file to download and where to set it."""


def _how_to_get_weights() -> str:
    return (f"Download open_clip's {DEFAULT_MODEL} {DEFAULT_PRETRAINED_TAG} weights, the file {WEIGHTS_FILENAME} of "
            f"the Hugging Face repository laion/CLIP-ViT-g-14-laion2B-s12B-b42K, on a machine with internet access, "
            f"copy it here and set its path in params.yaml as {WEIGHTS_SETTING}")


def check_weights_file(weights: str | Path) -> Path:
    """The weights path, absolute; refuses pickle formats and missing files before open_clip sees them."""
    path = Path(weights).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ClipWeightsMissing(f"CLIP weights {path} are a pickle file ({path.suffix}), which can run code when "
                                 f"loaded; mct loads safetensors only. {_how_to_get_weights()}")
    if path.suffix.lower() != ".safetensors":
        raise ClipWeightsMissing(f"CLIP weights {path} must be a .safetensors file. {_how_to_get_weights()}")
    if not path.is_file():
        raise ClipWeightsMissing(f"CLIP weights not found: {path} does not exist, and mct never downloads at run "
                                 f"time, so the CLIP score was not computed. {_how_to_get_weights()}")
    return path.resolve()  # absolute: a relative path could coincide with one of open_clip's pretrained tags


def _check_offline_model(open_clip, model_name: str) -> None:
    """Only models whose config and tokenizer ship with open_clip (or were registered) work offline: a hub/local-dir
    schema or a Hugging Face text tower would make open_clip fetch configs or tokenizers."""
    if ":" in model_name:
        raise ValueError(f"CLIP model {model_name!r}: schemas like 'hf-hub:' are not supported (they download); give "
                         f"an open_clip architecture name such as {DEFAULT_MODEL!r}")
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"CLIP model {model_name!r} is not an open_clip architecture (none of open_clip.list_models() "
                         f"nor a config added with open_clip.add_model_config); the default is {DEFAULT_MODEL!r}")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"CLIP model {model_name!r} uses a Hugging Face text tower or tokenizer, which open_clip "
                         f"fetches from the hub; use a model with open_clip's own tokenizer, such as {DEFAULT_MODEL!r}")


class ClipScorer:
    """An open_clip model, its evaluation transform and tokenizer, from a local safetensors file."""

    def __init__(self, weights: str | Path, model_name: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                 prefix: str = PROMPT_PREFIX) -> None:
        path = check_weights_file(weights)
        import open_clip

        _check_offline_model(open_clip, model_name)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path),
                                                                         device=device)
        except RuntimeError as e:  # strict state-dict loading: missing/unexpected keys or shape mismatches
            raise ValueError(f"CLIP weights {path} do not fit the open_clip model {model_name!r} ({str(e):.400}); "
                             f"{WEIGHTS_SETTING} must be that model's {WEIGHTS_FILENAME}") from e
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.prefix = prefix
        self.model_name = model_name
        self.weights = path

    def _image_batch(self, images: Tensor) -> Tensor:
        """uint8 NCHW as they are, float in [-1, 1] quantised as saved PNGs would be, then open_clip's transform
        per image (it works on PIL images: resize, crop, normalise)."""
        from mct.metrics.fid import to_uint8_nhwc

        arr = to_uint8_nhwc(images)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return torch.stack([self.preprocess(PIL.Image.fromarray(img)) for img in arr])

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> np.ndarray:
        """Per-image CLIP score, float64 (N,): ``100 * max(cos(image_emb, text_emb(prefix + prompt)), 0)``.

        This is the CLIPScore convention (Hessel et al. 2021) at weight 100, and DMD prefixes each prompt with
        "A photo depicts " (``PROMPT_PREFIX``); see the module docstring for how this maps to DMD2's tables.
        ``images`` are uint8 (N, 3, H, W) or float in [-1, 1]; ``prompts[i]`` belongs to ``images[i]``. The whole
        batch goes through the model at once, so pass batches that fit on the device.
        """
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(f"need one prompt per image: got {len(images)} images and "
                             f"{'a single string' if isinstance(prompts, str) else f'{len(prompts)} prompts'}")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        pixels = self._image_batch(images).to(self.device)
        tokens = self.tokenizer([self.prefix + p for p in prompts]).to(self.device)
        image_emb = self.model.encode_image(pixels, normalize=True).float()
        text_emb = self.model.encode_text(tokens, normalize=True).float()
        cos = (image_emb * text_emb).sum(dim=-1)
        return (100.0 * cos.clamp(min=0)).double().cpu().numpy()
