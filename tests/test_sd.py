"""Stable Diffusion's parts (mct.nets.sd) on a tiny random-weight SD folder (mct/sd_export.py), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mct.nets.sd import (
    SD15_UNET_CONFIG,
    SDFolderError,
    TextEncoder,
    check_sd_folder,
    decode_latents,
    load_unet_state,
    load_vae,
    scaled_linear_alpha_bar,
    sd_alpha_bar,
    sd_denoiser,
    unet_config,
    unet_from_config,
)
from mct.sd_export import make_tiny_sd

WEIGHTS = {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def unet(sd_folder):
    net = unet_from_config(unet_config(sd_folder))
    net.load_state_dict(load_unet_state(sd_folder), strict=True)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def text(sd_folder) -> TextEncoder:
    return TextEncoder(sd_folder)


@pytest.fixture
def sd_copy(sd_folder, tmp_path) -> Path:
    return Path(shutil.copytree(sd_folder, tmp_path / "sd"))


def test_schedule_is_diffusers_scaled_linear(sd_folder):
    """sd_alpha_bar reads the folder's scheduler config and matches diffusers' own alphas_cumprod (float32 there:
    atol 1e-6); SD's sigma_max = sqrt((1 - alpha_bar) / alpha_bar) at t = 999 is about 14.6."""
    from diffusers import PNDMScheduler

    ab = sd_alpha_bar(sd_folder)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    torch.testing.assert_close(ab, scaled_linear_alpha_bar(), rtol=0, atol=0)
    ref = PNDMScheduler.from_pretrained(sd_folder / "scheduler").alphas_cumprod.double()
    torch.testing.assert_close(ab, ref, rtol=0, atol=1e-6)
    sigma_max = float(((1 - ab[-1]) / ab[-1]).sqrt())
    assert 14.5 < sigma_max < 14.7, sigma_max


def test_denoiser_is_x_minus_sigma_eps_at_the_mapped_timestep(sd_folder, unet, text):
    """D(x, sigma, c) = x - sigma * unet(x / sqrt(1 + sigma^2), t, c) where sigma is timestep t's VE sigma, for t
    from 0 to 999 (sigma_max ~ 14.6). Computed in float64 on both sides, so the two orders of the same arithmetic
    agree to rounding: atol 1e-6 is exact for values of order sigma_max."""
    net = unet_from_config(unet_config(sd_folder))
    net.load_state_dict(unet.state_dict())
    net = net.double()
    den = sd_denoiser(net, sd_alpha_bar(sd_folder))
    t = torch.tensor([0, 10, 250, 500, 999])
    sigma = den.vp_sigmas[t]
    assert 14.5 < float(sigma[-1]) < 14.7
    assert torch.equal(den.timestep(sigma), t)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(t), 4, 8, 8, generator=gen, dtype=torch.float64) * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    ctx = text.encode(["a cat", "the dog", "", "and 42!", "x"]).double()
    with torch.no_grad():
        got = den(x, sigma, ctx)
        s = sigma.reshape(-1, 1, 1, 1)
        want = x - s * net(x / (1 + s**2).sqrt(), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_denoiser_bf16_autocast_agrees_with_fp32(sd_folder, unet, text):
    """bf16 autocast (CPU) against fp32 on the fixture, compared in eps = (x - D) / sigma over sigma in
    [0.05, 14.6]. Measured: relative RMS error 0.013-0.014, max |error| 0.019-0.021 at eps RMS ~0.35 (3 seeds).
    Tolerances 0.05 (relative RMS) and 0.08 (max) are ~4x that: a wrong cast (e.g. fp16 overflow, text
    embeddings left in another dtype) is far outside."""
    den = sd_denoiser(unet, sd_alpha_bar(sd_folder))
    sigma = torch.tensor([0.05, 0.1, 0.3, 1.0, 2.0, 3.0, 8.0, 14.6])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 8, 8, generator=gen) * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    ctx = text.encode(["a cat", "the dog", "and", ""] * 2)
    with torch.no_grad():
        ref = den(x, sigma, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = den(x, sigma, ctx).float()
    s = sigma.reshape(-1, 1, 1, 1)
    eps_ref, eps_low = (x - ref) / s, (x - low) / s
    err = eps_low - eps_ref
    rel = float(err.pow(2).mean().sqrt() / eps_ref.pow(2).mean().sqrt())
    assert rel < 0.05, rel
    assert float(err.abs().max()) < 0.08, float(err.abs().max())
    assert rel > 0, "autocast did not run the UNet in bf16"


def test_check_sd_folder_accepts_the_fixture_and_pins(sd_folder):
    hashes = check_sd_folder(sd_folder)
    assert set(hashes) == WEIGHTS
    assert all(len(h) == 64 for h in hashes.values())
    assert check_sd_folder(sd_folder, pins=hashes) == hashes


@pytest.mark.parametrize("name", ["unet/diffusion_pytorch_model.bin", "v1-5-pruned.ckpt", "tokenizer/x.pkl"])
def test_check_sd_folder_refuses_pickle_files(sd_copy, name):
    (sd_copy / name).write_bytes(b"\x80\x04not really")
    with pytest.raises(SDFolderError, match="pickle") as info:
        check_sd_folder(sd_copy)
    assert Path(name).name in str(info.value)


def test_check_sd_folder_refuses_pin_mismatch_and_unpinned_weights(sd_copy):
    pins = check_sd_folder(sd_copy)
    rel = "vae/diffusion_pytorch_model.safetensors"
    bad = dict(pins, **{rel: "0" * 64})
    with pytest.raises(SDFolderError, match=rel) as info:
        check_sd_folder(sd_copy, pins=bad)
    assert "0" * 64 in str(info.value) and pins[rel] in str(info.value)
    unpinned = {k: v for k, v in pins.items() if k != rel}
    with pytest.raises(SDFolderError, match=rf"without a sha256 pin: {rel}"):
        check_sd_folder(sd_copy, pins=unpinned)
    with pytest.raises(SDFolderError, match="unet/extra.safetensors"):
        check_sd_folder(sd_copy, pins=dict(pins, **{"unet/extra.safetensors": "1" * 64}))


def test_check_sd_folder_says_how_to_provide_a_missing_folder(tmp_path, sd_copy):
    with pytest.raises(SDFolderError, match="does not exist: download runwayml/stable-diffusion-v1-5") as info:
        check_sd_folder(tmp_path / "nowhere")
    assert "huggingface-cli download" in str(info.value) and str(tmp_path / "nowhere") in str(info.value)
    shutil.rmtree(sd_copy / "tokenizer")
    with pytest.raises(SDFolderError, match="lacks tokenizer"):
        check_sd_folder(sd_copy)
    (sd_copy / "tokenizer").mkdir()
    (sd_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SDFolderError, match="no \\*.safetensors"):
        check_sd_folder(sd_copy)


def test_unet_state_skips_variants_and_builds_with_checkpointing(sd_copy, unet):
    """A downloaded unet/ often also holds *.fp16.safetensors: the plain weights are the ones loaded."""
    plain = sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(plain, sd_copy / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    state = load_unet_state(sd_copy)
    assert state.keys() == unet.state_dict().keys()
    assert unet_from_config(unet_config(sd_copy), use_checkpoint=True).is_gradient_checkpointing
    assert "_class_name" not in unet_config(sd_copy)


def test_text_encoder_and_vae_shapes(sd_folder, text):
    """Prompts -> (B, 77, 32) (the fixture's hidden size); latents (2, 4, 8, 8) -> images (2, 3, 64, 64) in [-1, 1]."""
    emb = text.encode(["a cat and a dog", "the 42nd cat!"])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    assert text.uncond(3).shape == (3, 77, 32)
    torch.testing.assert_close(text.uncond(2)[1], text.encode([""])[0])
    vae = load_vae(sd_folder)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    img = decode_latents(vae, lat, batch_size=1)
    assert img.shape == (2, 3, 64, 64) and img.dtype == torch.float32
    assert float(img.min()) >= -1 and float(img.max()) <= 1
    torch.testing.assert_close(img, decode_latents(vae, lat, batch_size=8))


def test_sd15_unet_config_has_the_published_parameter_count():
    """SD v1.5's UNet has 859,520,964 parameters; built on the meta device, nothing is allocated."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        net = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert all(p.is_meta for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == 859_520_964
