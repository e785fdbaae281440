"""mct.nets.edm: EDM's DhariwalUNet / SongUNet reimplemented with EDM's parameter names and shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mct.diffusion import EDMPrecond
from mct.nets.edm import (
    ADM_IMAGENET64,
    DDPMPP_CIFAR10,
    Conv2d,
    DhariwalUNet,
    IDDPMPrecond,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    VEPrecond,
    VPPrecond,
)
from mct.nets.weights import count_parameters

SMALL_ADM = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=16,
                 channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0, channels_per_head=8)
SMALL_DDPMPP = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=16,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)


def _randomize(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """EDM zero-initialises output convs; perturb every parameter so that all of them influence the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def _inputs(batch: int, res: int, label_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    noise = torch.randn(batch, generator=g)
    labels = F.one_hot(torch.randint(0, label_dim, (batch,), generator=g), label_dim).float()
    return x, noise, labels


@pytest.mark.parametrize("cls,kwargs", [(DhariwalUNet, SMALL_ADM), (SongUNet, SMALL_DDPMPP)])
def test_forward_backward_reaches_every_parameter(cls, kwargs):
    torch.manual_seed(0)
    net = _randomize(cls(**{**kwargs, "img_resolution": 64, "attn_resolutions": (32,)}))  # the paper's 64x64
    x, noise, labels = _inputs(2, 64, 10)
    x.requires_grad_(True)
    aug = torch.randn(2, 9) if kwargs.get("augment_dim") else None
    out = net(x, noise, labels, aug)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    unused = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert unused == []


def test_labels_change_the_output_and_are_required():
    torch.manual_seed(0)
    net = _randomize(DhariwalUNet(**SMALL_ADM)).eval()
    x, noise, labels = _inputs(2, 16, 10)
    other = torch.roll(labels, 1, dims=1)
    assert not torch.allclose(net(x, noise, labels), net(x, noise, other))
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, noise, None)


def test_dhariwal_parameter_names_and_shapes_follow_edm():
    sd = DhariwalUNet(**SMALL_ADM).state_dict()
    expected = {
        "map_layer0.weight": (64, 16), "map_layer1.bias": (64,), "map_label.weight": (64, 10),
        "enc.16x16_conv.weight": (16, 3, 3, 3), "enc.16x16_block0.affine.weight": (32, 64),
        "enc.8x8_down.conv0.weight": (16, 16, 3, 3), "enc.8x8_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.8x8_down.skip.resample_filter": (1, 1, 2, 2), "enc.8x8_block0.skip.weight": (32, 16, 1, 1),
        "enc.8x8_block0.qkv.weight": (96, 32, 1, 1), "enc.8x8_block0.norm2.weight": (32,),
        "dec.8x8_in0.proj.weight": (32, 32, 1, 1), "dec.8x8_block0.norm0.weight": (64,),
        "dec.8x8_block1.conv0.weight": (32, 48, 3, 3), "dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "dec.16x16_block0.conv0.weight": (16, 48, 3, 3), "dec.16x16_block1.skip.weight": (16, 32, 1, 1),
        "out_norm.weight": (16,), "out_conv.weight": (3, 16, 3, 3), "out_conv.bias": (3,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # ADM: label map without bias; same-width resampling skips carry no weights; attention only at 8x8.
    absent = ["map_label.bias", "map_augment.weight", "enc.8x8_down.skip.weight", "dec.8x8_in1.qkv.weight",
              "enc.16x16_block0.qkv.weight", "map_noise.freqs"]
    assert [k for k in absent if k in sd] == []
    assert torch.equal(sd["enc.8x8_down.conv0.resample_filter"], torch.full((1, 1, 2, 2), 0.25))


def test_song_unet_ncsnpp_branches_names():
    net = SongUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
                   num_blocks=1, attn_resolutions=(8,), embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", decoder_type="skip", resample_filter=(1, 3, 3, 1), dropout=0.0)
    sd = net.state_dict()
    assert tuple(sd["map_noise.freqs"].shape) == (16,)
    assert tuple(sd["enc.8x8_aux_residual.weight"].shape) == (16, 3, 3, 3)
    assert tuple(sd["dec.16x16_aux_up.resample_filter"].shape) == (1, 1, 4, 4)
    assert tuple(sd["dec.8x8_aux_conv.weight"].shape) == (3, 32, 3, 3)
    assert tuple(sd["map_layer0.weight"].shape) == (64, 32)
    x, noise, _ = _inputs(2, 16, 10)
    assert _randomize(net)(x, noise, None).shape == x.shape


def test_full_size_parameter_counts():
    """EDM reports ~296M parameters for the ImageNet-64 ADM network and ~56M for CIFAR-10 DDPM++."""
    with torch.device("meta"):
        adm = DhariwalUNet(**ADM_IMAGENET64)
        ddpmpp = SongUNet(**DDPMPP_CIFAR10)
    assert count_parameters(adm) == 295_899_267
    assert count_parameters(ddpmpp) == 55_732_739
    assert len(adm.state_dict()) == 553


def test_positional_embedding_values():
    x = torch.tensor([1.0])
    assert torch.allclose(PositionalEmbedding(4)(x),
                          torch.tensor([[math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]]))
    assert torch.allclose(PositionalEmbedding(4, endpoint=True)(x),
                          torch.tensor([[math.cos(1), math.cos(1e-4), math.sin(1), math.sin(1e-4)]]))


def test_resampling_with_box_filter_is_avgpool_and_nearest():
    x = torch.randn(2, 4, 8, 8)
    down = Conv2d(4, 4, kernel=0, down=True)
    up = Conv2d(4, 4, kernel=0, up=True)
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


def test_attention_matches_edm_einsum_formula():
    torch.manual_seed(0)
    block = _randomize(UNetBlock(16, 16, emb_channels=8, attention=True, channels_per_head=4)).eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    # EDM's formulation, written out with its own einsums.
    h = block.conv0(F.silu(block.norm0(x)))
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(torch.addcmul(shift, block.norm1(h), scale + 1))
    h = block.conv1(h) + x
    q, k, v = block.qkv(block.norm2(h)).reshape(2 * 4, 4, 3, -1).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(4)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v)
    ref = block.proj(a.reshape(h.shape)) + h
    assert torch.allclose(block(x, emb), ref, atol=1e-5)


def test_gradient_checkpointing_gives_same_values_and_grads():
    torch.manual_seed(0)
    plain = _randomize(DhariwalUNet(**SMALL_ADM))
    ckpt = DhariwalUNet(**SMALL_ADM, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, noise, labels = _inputs(2, 16, 10)
    outs, grads = [], []
    for net in (plain, ckpt):
        out = net(x, noise, labels)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_preconditioners_wrap_raw_networks():
    torch.manual_seed(0)
    net = EDMPrecond(_randomize(DhariwalUNet(**SMALL_ADM)), sigma_data=0.5, label_dim=10)
    x, _, labels = _inputs(2, 16, 10)
    assert net(x, torch.tensor([0.5, 2.0]), labels).shape == x.shape
    vp = VPPrecond(torch.nn.Identity())
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-9)

    class Zero(torch.nn.Module):  # F = 0 => D(x) = x for every parameterisation with c_skip = 1
        def forward(self, x, noise_labels, class_labels):
            return torch.zeros_like(x)

    for pre in (VPPrecond(Zero()), VEPrecond(Zero()), IDDPMPrecond(Zero(), M=50)):
        assert torch.equal(pre(x, torch.tensor([0.7, 3.0])), x)
