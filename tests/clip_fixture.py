"""A tiny open_clip model for the CLIP-score tests (the real ViT-g-14 weights are a 5.5 GB download).

The architecture is registered with open_clip like any built-in one (a JSON config through ``add_model_config``),
so :class:`mct.metrics.clip_score.ClipScorer` loads it through exactly the code path the real model takes:
architecture by name, weights from a local safetensors file, open_clip's own transform and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "mct-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def make_tiny_clip(folder: Path, seed: int = 0) -> tuple[str, Path]:
    """Register the tiny architecture, build it with seeded random weights, save them as safetensors.

    Returns ``(model_name, weights_path)``; load the same weights with :func:`load_tiny_clip`.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP_NAME}.json"  # open_clip names a registered config by the file's stem
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return TINY_CLIP_NAME, weights


def load_tiny_clip(weights: Path) -> torch.nn.Module:
    """The saved model, rebuilt without ClipScorer (an independent reference for the tests)."""
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model(TINY_CLIP_NAME)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
