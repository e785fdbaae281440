"""mct.nets.adm: guided-diffusion's ADM U-Net reimplemented with guided-diffusion's parameter names and shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mct.diffusion import linear_alpha_bar
from mct.fetch import KNOWN_TEACHERS
from mct.nets.adm import (
    ADMEpsNet,
    ADMUNet,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    adm_model_kwargs,
    build_adm_denoiser,
    load_adm_state_dict,
    timestep_embedding,
)
from tests.test_edm_nets import _randomize  # ADM zero-initialises its output convs too

IMAGENET128_FLAGS = KNOWN_TEACHERS["adm-imagenet-128x128-cond"]["adm_flags"]

TINY = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, num_heads=2)

TINY_FLAGS = dict(image_size=32, class_cond=True, learn_sigma=True, num_channels=32, num_heads=2, num_res_blocks=1,
                  attention_resolutions="16", channel_mult="1,2", resblock_updown=True, use_fp16=False,
                  use_scale_shift_norm=True, diffusion_steps=1000, noise_schedule="linear")




def _tiny(seed: int = 0, **overrides) -> ADMUNet:
    torch.manual_seed(seed)
    return _randomize(ADMUNet(**{**TINY, **overrides}), seed=seed)


def _inputs(batch: int = 2, res: int = 32, num_classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


# --- the U-Net --------------------------------------------------------------------------------------


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("updown", [False, True])
def test_forward_backward_reaches_every_parameter(updown, scale_shift, new_order):
    net = _tiny(image_size=64, resblock_updown=updown, use_scale_shift_norm=scale_shift,  # the paper's 64x64
                use_new_attention_order=new_order, **({"num_head_channels": 32} if new_order else {}))
    x, t, y = _inputs(res=64)
    x.requires_grad_(True)
    out = net(x, t, y)
    assert out.shape == (2, 6, 64, 64) and out.dtype == x.dtype and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    unused = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not unused, unused


def test_avgpool_resampling_without_conv_has_no_resampling_params():
    net = _tiny(conv_resample=False)
    keys = net.state_dict().keys()
    assert not [k for k in keys if ".op." in k or ".conv." in k]
    x, t, y = _inputs()
    assert net(x, t, y).shape == (2, 6, 32, 32)


def test_labels_are_checked():
    net = _tiny()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="shape"):
        net(x, t, y[:1])
    uncond = _tiny(num_classes=None)
    assert "label_emb.weight" not in uncond.state_dict()
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, y)
    assert uncond(x, t).shape == (2, 6, 32, 32)


def test_attention_orders_match_reference():
    """Legacy order splits heads before q/k/v, the new order after; both are softmax(q.k / sqrt(ch)) v."""
    g = torch.Generator().manual_seed(0)
    b, heads, ch, t = 2, 2, 4, 5
    qkv = torch.randn(b, 3 * heads * ch, t, generator=g)

    def ref(q, k, v):  # (B, heads, ch, T) each
        w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(ch), dim=-1)
        return torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, heads * ch, t)

    legacy = qkv.reshape(b, heads, 3, ch, t)
    torch.testing.assert_close(QKVAttentionLegacy(heads)(qkv), ref(legacy[:, :, 0], legacy[:, :, 1], legacy[:, :, 2]))
    new = qkv.reshape(b, 3, heads, ch, t)
    torch.testing.assert_close(QKVAttention(heads)(qkv), ref(new[:, 0], new[:, 1], new[:, 2]))


def test_groupnorm32_computes_in_float32_and_casts_back():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4)
    assert norm.num_groups == 32
    out = norm(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.group_norm(x.half().float(), 32), atol=2e-3, rtol=2e-3)


def test_checkpointing_matches_plain_forward_and_gradients():
    plain = _tiny(resblock_updown=True, use_scale_shift_norm=True)
    ckpt = _tiny(resblock_updown=True, use_scale_shift_norm=True, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = _inputs()
    outs, grads = [], []
    for net in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        out = net(xi, t, y)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


# --- guided-diffusion's names and shapes ---------------------------------------------------------------


# Derived by hand from guided_diffusion/unet.py UNetModel with the 128x128_diffusion.pt flags:
# model_channels 256, channel_mult (1, 1, 2, 3, 4), 2 res blocks, attention at 32/16/8 px (ds 4, 8, 16),
# resblock_updown and use_scale_shift_norm, learn_sigma (6 outputs), 1000 classes.
IMAGENET128_SHAPES = {
    "time_embed.0.weight": (1024, 256),
    "time_embed.2.weight": (1024, 1024),
    "label_emb.weight": (1000, 1024),
    "input_blocks.0.0.weight": (256, 3, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (256,),
    "input_blocks.1.0.in_layers.2.weight": (256, 256, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # 2 * out for scale and shift
    "input_blocks.1.0.out_layers.0.weight": (256,),
    "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
    "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # downsampling ResBlock (128 -> 64 px)
    "input_blocks.3.0.out_layers.3.bias": (256,),
    "input_blocks.6.0.in_layers.2.weight": (256, 256, 3, 3),  # 64 -> 32 px
    "input_blocks.7.0.in_layers.2.weight": (512, 256, 3, 3),
    "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
    "input_blocks.7.1.norm.weight": (512,),
    "input_blocks.7.1.qkv.weight": (1536, 512, 1),  # attention at 32x32
    "input_blocks.7.1.qkv.bias": (1536,),
    "input_blocks.7.1.proj_out.weight": (512, 512, 1),
    "input_blocks.9.0.emb_layers.1.weight": (1024, 1024),  # 32 -> 16 px
    "input_blocks.10.1.qkv.weight": (2304, 768, 1),
    "input_blocks.13.0.skip_connection.weight": (1024, 768, 1, 1),
    "input_blocks.14.1.qkv.weight": (3072, 1024, 1),
    "middle_block.0.in_layers.2.weight": (1024, 1024, 3, 3),
    "middle_block.1.qkv.weight": (3072, 1024, 1),
    "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
    "output_blocks.0.0.in_layers.0.weight": (2048,),
    "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
    "output_blocks.2.0.in_layers.2.weight": (1024, 1792, 3, 3),  # 1024 + 768 from input_blocks.12
    "output_blocks.2.1.qkv.weight": (3072, 1024, 1),
    "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # upsampling ResBlock (8 -> 16 px)
    "output_blocks.5.2.emb_layers.1.weight": (1536, 1024),
    "output_blocks.8.1.qkv.weight": (1536, 512, 1),
    "output_blocks.9.0.in_layers.2.weight": (256, 768, 3, 3),
    "output_blocks.14.0.in_layers.0.weight": (512,),
    "output_blocks.14.0.skip_connection.weight": (256, 512, 1, 1),
    "out.0.weight": (256,),
    "out.2.weight": (6, 256, 3, 3),
    "out.2.bias": (6,),
}


def test_imagenet128_keys_and_shapes_match_guided_diffusion():
    kwargs = adm_model_kwargs(IMAGENET128_FLAGS)
    with torch.device("meta"):
        net = ADMUNet(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for key, shape in IMAGENET128_SHAPES.items():
        assert shapes.get(key) == shape, (key, shapes.get(key), shape)
    assert len(net.input_blocks) == 15 and len(net.output_blocks) == 15
    assert sum(k.endswith("qkv.weight") for k in shapes) == 6 + 1 + 9
    # resblock_updown: no conv resamplers; identity skips carry no parameters
    assert not [k for k in shapes if ".op." in k or ".conv." in k or "upd" in k]
    assert "input_blocks.1.0.skip_connection.weight" not in shapes
    assert "input_blocks.3.0.skip_connection.weight" not in shapes
    assert "output_blocks.2.2.skip_connection.weight" not in shapes
    n_params = sum(p.numel() for p in net.parameters())
    print(f"ADM ImageNet-128 (128x128_diffusion.pt) parameters: {n_params:,}")
    assert n_params == 421_529_606


def test_conv_resamplers_are_named_like_guided_diffusion():
    with torch.device("meta"):
        net = ADMUNet(**adm_model_kwargs({**IMAGENET128_FLAGS, "resblock_updown": False}))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["input_blocks.3.0.op.weight"] == (256, 256, 3, 3)
    assert shapes["input_blocks.12.0.op.bias"] == (768,)
    assert shapes["output_blocks.2.2.conv.weight"] == (1024, 1024, 3, 3)
    assert shapes["output_blocks.11.1.conv.weight"] == (256, 256, 3, 3)  # no attention at 64 px
    assert "input_blocks.3.0.in_layers.0.weight" not in shapes


def test_state_dict_round_trip_and_strict_errors(tmp_path):
    src = _tiny(seed=0)
    path = tmp_path / "adm.pt"
    torch.save(src.state_dict(), path)
    state = torch.load(path, weights_only=True)
    dst = _tiny(seed=1)
    x, t, y = _inputs()
    assert not torch.equal(dst(x, t, y), src(x, t, y))
    load_adm_state_dict(dst, state)
    assert torch.equal(dst(x, t, y), src(x, t, y))

    missing = dict(state)
    del missing["middle_block.1.qkv.weight"]
    with pytest.raises(ValueError, match=r"middle_block\.1\.qkv\.weight"):
        load_adm_state_dict(dst, missing)
    wrong = dict(state)
    wrong["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(ValueError, match=r"out\.2\.weight"):
        load_adm_state_dict(dst, wrong)


# --- timestep embedding -------------------------------------------------------------------------------


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    assert emb.shape == (2, 4) and emb.dtype == torch.float32
    assert emb[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    freqs = [1.0, math.exp(-math.log(10000.0) / 2)]  # exp(-ln(max_period) * i / half), half = 2
    expected = [math.cos(freqs[0]), math.cos(freqs[1]), math.sin(freqs[0]), math.sin(freqs[1])]
    torch.testing.assert_close(emb[1], torch.tensor(expected), rtol=1e-6, atol=1e-7)

    cont = timestep_embedding(torch.tensor([2.5]), 4, max_period=100.0)
    f = [1.0, math.exp(-math.log(100.0) / 2)]
    torch.testing.assert_close(cont[0], torch.tensor([math.cos(2.5 * f[0]), math.cos(2.5 * f[1]),
                                                      math.sin(2.5 * f[0]), math.sin(2.5 * f[1])]))

    odd = timestep_embedding(torch.tensor([3, 7]), 5)
    assert odd.shape == (2, 5) and odd[:, 4].tolist() == [0.0, 0.0]
    torch.testing.assert_close(odd[:, :4], timestep_embedding(torch.tensor([3, 7]), 4))


# --- adapters --------------------------------------------------------------------------------------------


def test_eps_net_maps_one_hot_labels_and_keeps_eps_channels():
    unet = _tiny()
    eps_net = ADMEpsNet(unet)
    x, t, y = _inputs()
    labels = F.one_hot(y, 10).float()
    eps = eps_net(x, t, labels)
    assert eps.shape == (2, 3, 32, 32)
    assert torch.equal(eps, unet(x, t, y)[:, :3])
    assert next(iter(eps_net.state_dict())).startswith("unet.")
    with pytest.raises(ValueError, match="class-conditional"):
        eps_net(x, t, None)
    uncond = ADMEpsNet(_tiny(num_classes=None))
    assert torch.equal(uncond(x, t, labels), uncond.unet(x, t)[:, :3])


def test_build_adm_denoiser_matches_vp_eps_formula():
    torch.manual_seed(0)
    D = build_adm_denoiser(TINY_FLAGS)
    _randomize(D)
    assert (D.sigma_data, D.label_dim, D.img_resolution, D.img_channels) == (0.5, 1000, 32, 3)
    assert D.eps_net.unet.attention_resolutions == (2,) and D.eps_net.unet.channel_mult == (1, 2)
    assert D.sigma_min < 0.02 and D.sigma_max > 100
    assert "eps_net.unet.input_blocks.0.0.weight" in D.state_dict()
    x, _, y = _inputs()
    labels = F.one_hot(y, 1000).float()
    sigma = torch.tensor([0.3, 7.0])
    out = D(x, sigma, labels)
    assert out.shape == x.shape

    alpha_bar = linear_alpha_bar()
    vp_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    t = (sigma.double().log()[:, None] - vp_sigmas.log()[None]).abs().argmin(1)
    assert torch.equal(t, D.timestep(sigma))
    alpha = (1 / (1 + sigma**2).sqrt())[:, None, None, None]
    eps = D.eps_net.unet(alpha * x, t, y)[:, :3]
    torch.testing.assert_close(out, x - sigma[:, None, None, None] * eps)


def test_build_adm_denoiser_checkpointing_flag():
    D = build_adm_denoiser(TINY_FLAGS, use_checkpoint=True)
    assert D.eps_net.unet.input_blocks[1][0].use_checkpoint


# --- flags ---------------------------------------------------------------------------------------------


def test_adm_model_kwargs():
    kw = adm_model_kwargs(IMAGENET128_FLAGS)
    assert kw["channel_mult"] == (1, 1, 2, 3, 4)
    assert kw["attention_resolutions"] == (4, 8, 16)
    assert (kw["model_channels"], kw["out_channels"], kw["num_classes"], kw["num_heads"]) == (256, 6, 1000, 4)
    assert kw["resblock_updown"] and kw["use_scale_shift_norm"] and kw["num_head_channels"] == -1
    assert "use_fp16" not in kw

    defaults = adm_model_kwargs({})  # guided-diffusion's model_and_diffusion_defaults()
    assert defaults["channel_mult"] == (1, 2, 3, 4) and defaults["attention_resolutions"] == (4, 8)
    assert defaults["out_channels"] == 3 and defaults["num_classes"] is None and defaults["use_scale_shift_norm"]
    assert adm_model_kwargs({"image_size": 256})["channel_mult"] == (1, 1, 2, 2, 4, 4)
    assert adm_model_kwargs({"image_size": 512})["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4)
    assert adm_model_kwargs({"image_size": 32, "channel_mult": "1,2,2"})["channel_mult"] == (1, 2, 2)

    with pytest.raises(ValueError, match="num_chanels"):
        adm_model_kwargs({**IMAGENET128_FLAGS, "num_chanels": 128})
    with pytest.raises(ValueError, match="image size"):
        adm_model_kwargs({"image_size": 32})
