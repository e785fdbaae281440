"""A tiny random-weight Stable-Diffusion folder, for trying the text-to-image path offline (the real SD v1.5 is a
4 GB download) and for the tests.

It has the layout and file formats of a diffusers SD v1.5 folder (model_index.json; unet/, vae/, text_encoder/ as
safetensors; a CLIP byte-level BPE tokenizer; a scaled-linear scheduler), so every loader of :mod:`mct.nets.sd` runs
on it exactly as on the real weights; only the sizes and the (random) values differ. Written in about a second,
offline: the tokenizer's vocabulary is built here instead of fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# a few merges so the BPE has something to merge; the rest of a word stays as single bytes
_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"),
           ("d", "o"), ("do", "g</w>"))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """SD v1.5's tokenizer/ layout: CLIP's vocabulary (the 256 byte symbols, the same with the end-of-word mark, the
    merges, the two specials), merges.txt and a tokenizer_config.json; no tokenizer.json, as in the real folder."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in _MERGES] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in _MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=max_length, do_lower_case=True,
                  bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def make_tiny_sd(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Write the tiny SD folder to ``folder`` (created) and return it. Latents are (4, image_size/8, image_size/8)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    torch.manual_seed(seed)
    parts = dict(
        unet=UNet2DConditionModel(
            sample_size=image_size // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=32),
        vae=AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8, sample_size=image_size, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)),
        scheduler=PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                                steps_offset=1),
    )
    for name, part in parts.items():
        kwargs = {} if name == "scheduler" else dict(safe_serialization=True)
        part.save_pretrained(folder / name, **kwargs)
    # model_index.json as StableDiffusionPipeline.save_pretrained writes it (without the safety checker)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
