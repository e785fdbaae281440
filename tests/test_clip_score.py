"""ClipScorer on a tiny registered open_clip model: the score is 100 * max(cos, 0) of open_clip's own embeddings,
weights come only from a local safetensors file, and nothing is fetched."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms

from mct.metrics.clip_score import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED_TAG,
    PROMPT_PREFIX,
    ClipScorer,
    ClipWeightsMissing,
)
from tests.clip_fixture import load_tiny_clip, make_tiny_clip

PROMPTS = ["a red bus on a street", "two cats", "a bowl of fruit", "a man riding a wave on a surfboard",
           "a plate of food", "an empty room", "a dog catching a frisbee", "a clock tower at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(tiny):
    name, weights = tiny
    return ClipScorer(weights, model_name=name)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images, not square, not at the model's size, so the transform's resize and crop both matter."""
    return torch.randint(0, 256, (n, 3, 40, 52), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _reference_scores(weights, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """Independent of ClipScorer: the saved weights rebuilt by hand, the transform of open_clip's default
    preprocessing written out (bicubic short side to 32, centre crop, OpenAI mean/std), the tokenizer called
    directly, and torch's cosine_similarity."""
    import open_clip

    model = load_tiny_clip(weights)
    tf = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32),
        transforms.ToTensor(), transforms.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    pixels = torch.stack([tf(PIL.Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    tokens = open_clip.tokenize([PROMPT_PREFIX + p for p in prompts])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_image(pixels), model.encode_text(tokens), dim=1)
    return (100 * cos.clamp(min=0)).double().numpy()


def test_score_is_100_times_the_clamped_cosine_of_open_clips_embeddings(scorer, tiny):
    images = _images(len(PROMPTS))
    scores = scorer.score(images, PROMPTS)
    expected = _reference_scores(tiny[1], images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 100)).all()
    assert (expected > 0).any(), "the check needs at least one positive cosine"
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)


def test_the_prefix_is_part_of_the_text(tiny, scorer):
    """Without the prefix the text embeddings differ, so the scores must too (the prefix is really applied)."""
    name, weights = tiny
    images = _images(len(PROMPTS))
    bare = ClipScorer(weights, model_name=name, prefix="").score(images, PROMPTS)
    assert not np.allclose(bare, scorer.score(images, PROMPTS), atol=1e-3)


def test_permuting_the_batch_permutes_the_scores(scorer):
    images = _images(len(PROMPTS), seed=1)
    scores = scorer.score(images, PROMPTS)
    perm = torch.randperm(len(PROMPTS), generator=torch.Generator().manual_seed(3))
    permuted = scorer.score(images[perm], [PROMPTS[i] for i in perm])
    np.testing.assert_allclose(permuted, scores[perm.numpy()], rtol=0, atol=1e-4)


def test_float_images_score_as_their_uint8_quantisation(scorer):
    x = torch.rand(4, 3, 40, 52, generator=torch.Generator().manual_seed(2)) * 2 - 1
    quantised = torch.from_numpy(np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(scorer.score(x, PROMPTS[:4]), scorer.score(quantised, PROMPTS[:4]))


def test_one_prompt_per_image_is_required(scorer):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(_images(3), PROMPTS[:2])
    with pytest.raises(ValueError, match="single string"):
        scorer.score(_images(1), "a cat")


def test_scorer_loads_without_touching_the_network(tiny, monkeypatch):
    import open_clip.factory

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    name, weights = tiny
    assert ClipScorer(weights, model_name=name).score(_images(1), PROMPTS[:1]).shape == (1,)


def test_missing_weights_say_what_to_download_and_where_to_set_it(tmp_path):
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(ClipWeightsMissing) as err:
        ClipScorer(missing)
    msg = str(err.value)
    for needed in (str(missing), DEFAULT_MODEL, DEFAULT_PRETRAINED_TAG, "open_clip_model.safetensors",
                   "worlds.<name>.clip_weights"):
        assert needed in msg
    assert isinstance(err.value, RuntimeError) and not missing.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_weights_are_refused_even_when_present(tmp_path, suffix):
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(ClipWeightsMissing, match="safetensors only"):
        ClipScorer(path)


def test_weights_of_another_model_and_download_schemas_are_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(wrong))
    with pytest.raises(ValueError, match="do not fit the open_clip model"):
        ClipScorer(wrong, model_name=tiny[0])
    with pytest.raises(ValueError, match="schemas"):
        ClipScorer(tiny[1], model_name="hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        ClipScorer(tiny[1], model_name="ViT-nonexistent")


def test_negative_cosines_score_zero(tmp_path, tiny, scorer):
    """Negating the text projection negates every cosine; the tiny model's are all positive, so the flipped
    weights give negative ones, which the CLIPScore convention clamps to 0 instead of reporting."""
    from safetensors.torch import load_file, save_file

    name, weights = tiny
    state = load_file(str(weights))
    state["text_projection"] = -state["text_projection"]
    flipped = tmp_path / "flipped.safetensors"
    save_file(state, str(flipped))
    images = _images(len(PROMPTS))
    assert (scorer.score(images, PROMPTS) > 0).all()
    np.testing.assert_array_equal(ClipScorer(flipped, model_name=name).score(images, PROMPTS), 0.0)
