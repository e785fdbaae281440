"""EDM's network architectures (Karras et al. 2022, NVlabs/edm ``training/networks.py``), reimplemented.

Every parameter and buffer has EDM's name and shape (``enc.64x64_conv.weight``, ``map_label.weight``,
``dec.8x8_in0.qkv.weight``, ...), so the state in EDM's published pickles loads by name into these
modules (see :func:`mct.checkpoint.load_edm_pickle`) and EDM's own code is never imported or executed.

* :class:`DhariwalUNet`: the ADM architecture (Dhariwal & Nichol 2021) as EDM trains it, e.g. the
  ImageNet-64 teacher ``edm-imagenet-64x64-cond-adm.pkl`` (see :data:`ADM_IMAGENET64`).
* :class:`SongUNet`: DDPM++ / NCSN++ (Song et al. 2021), e.g. the CIFAR-10 teachers (:data:`DDPMPP_CIFAR10`).

Raw networks keep EDM's signature ``net(x, noise_labels, class_labels, augment_labels=None)``; wrap them
with :class:`mct.diffusion.EDMPrecond` (or :class:`VPPrecond`, :class:`VEPrecond`, :class:`IDDPMPrecond`
for EDM's baseline pickles) to obtain a denoiser ``D(x, sigma, labels)``. ``use_checkpoint=True``
recomputes each U-Net block's activations in the backward pass (gradient checkpointing) to save memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mct.diffusion import append_dims

# --- paper configurations ---------------------------------------------------------------------------

#: EDM's ImageNet-64 ADM network (``--arch=adm``), edm-imagenet-64x64-cond-adm.pkl; about 296M parameters.
ADM_IMAGENET64: dict = dict(
    img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
    channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
)

#: EDM's CIFAR-10 DDPM++ network (``--arch=ddpmpp``), edm-cifar10-32x32-*-vp.pkl; about 56M parameters.
DDPMPP_CIFAR10: dict = dict(
    img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
    num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
)


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """EDM's unified initialiser: uniform or normal, with Xavier (fan_in + fan_out) or Kaiming (fan_in) scale."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}")


@torch.no_grad()
def _redraw(layer: nn.Module, init: dict) -> None:
    """Draw a layer's weight and bias again exactly as its constructor did (``init`` is what it recorded)."""
    fans = {k: init[k] for k in ("mode", "fan_in", "fan_out")}
    if layer.weight is not None:
        layer.weight.copy_(weight_init(layer.weight.shape, **fans) * init["weight"])
    if layer.bias is not None:
        layer.bias.copy_(weight_init(layer.bias.shape, **fans) * init["bias"])


# --- layers -----------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x W^T + b with EDM's initialisation; weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.init_spec = dict(fans, weight=init_weight, bias=init_bias)  # what reset_parameters draws again
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def reset_parameters(self) -> None:
        _redraw(self, self.init_spec)

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """'Same' convolution with optional 2x up/downsampling by a separable FIR ``resample_filter``.

    ``kernel=0`` gives a pure resampling layer without weights. The normalised 2-D filter f f^T / (sum f)^2
    is kept as the buffer ``resample_filter`` (as in EDM) whenever the layer resamples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.init_spec = dict(fans, weight=init_weight, bias=init_bias)  # what reset_parameters draws again
        w = weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight if kernel else None
        self.weight = nn.Parameter(w) if w is not None else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f).reshape(1, 1, len(f), len(f)) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def reset_parameters(self) -> None:
        _redraw(self, self.init_spec)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            # Upsample with padding that also covers the conv's support, then a valid convolution.
            fx = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, fx, groups=self.in_channels, stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # transposed depthwise FIR; x4 keeps the mean since each output sees 1/4 of the taps
                x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with at most ``num_groups`` groups of at least ``min_channels_per_group`` channels."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels cannot form {self.num_groups} equal groups")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """EDM's unified residual block (DDPM++, NCSN++ and ADM), with optional resampling and self-attention.

    x -> conv0(silu(norm0 x)) -> modulated by the embedding (scale/shift if ``adaptive_scale`` else a bias)
    -> conv1(dropout(.)) + skip(x), times ``skip_scale``; then, with attention, x + proj(attn(norm2 x)).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
            if self.num_heads < 1 or out_channels % self.num_heads != 0:
                raise ValueError(f"UNetBlock: {out_channels} channels cannot be split into {self.num_heads} heads")
        self.dropout = float(dropout)
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale
        self.use_checkpoint = use_checkpoint

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            qkv_init = init_attn if init_attn is not None else init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).to(x.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            b, c, h, w = x.shape
            # EDM's channel layout of qkv: (head, channel within head, q/k/v), hence the reshape order.
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            # softmax(q^T k / sqrt(c_head)) v over the h*w positions, per head.
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x w_i), sin(x w_i)] with w_i = max_positions^(-i / (C/2 - endpoint)), i < C/2 (DDPM++, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) fixed (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_labels(class_labels: Tensor | None, label_dim: int, batch: int) -> Tensor:
    if class_labels is None:
        raise ValueError(f"this network is class-conditional (label_dim={label_dim}); pass one-hot class_labels")
    class_labels = class_labels.reshape(-1, label_dim)
    if class_labels.shape[0] not in (1, batch):
        raise ValueError(f"class_labels has batch {class_labels.shape[0]}, expected 1 or {batch}")
    return class_labels


def _label_dropout(labels: Tensor, p: float, training: bool) -> Tensor:
    """Zero whole label vectors with probability p while training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# --- DDPM++ / NCSN++ --------------------------------------------------------------------------------


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++ (Fourier, residual, [1,3,3,1]).

    Defaults are EDM's; the CIFAR-10 DDPM++ teacher is :data:`DDPMPP_CIFAR10`.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), use_checkpoint: bool = False) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn, use_checkpoint=use_checkpoint,
        )

        # Mapping: noise level (+ label, + augmentation) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder: mirror of the encoder; every `_block` consumes one encoder activation.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels.reshape(-1))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _label_dropout(_check_labels(class_labels, self.label_dim, x.shape[0]), self.label_dropout,
                                    self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# --- ADM --------------------------------------------------------------------------------------------


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as reimplemented by EDM; defaults give the ImageNet-64 network."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0, channels_per_head: int = 64,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        # channels_per_head is fixed to 64 in EDM; smaller values let narrow test networks keep attention.
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout, init=init,
                            init_zero=init_zero, use_checkpoint=use_checkpoint)

        # Mapping: noise level (+ augmentation) -> MLP, then + label embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: every `_block` consumes one encoder activation.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels.reshape(-1))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = _check_labels(class_labels, self.label_dim, x.shape[0])
            emb = emb + self.map_label(_label_dropout(labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


NETWORKS: dict[str, type[nn.Module]] = {"DhariwalUNet": DhariwalUNet, "SongUNet": SongUNet}


def build_network(model_type: str, **kwargs) -> nn.Module:
    """Build one of EDM's raw networks by its EDM class name (``model_type`` in EDM's preconditioners)."""
    if model_type not in NETWORKS:
        raise ValueError(f"unknown EDM model_type {model_type!r}; known: {sorted(NETWORKS)}")
    try:
        return NETWORKS[model_type](**kwargs)
    except TypeError as e:  # an argument this reimplementation does not know
        raise ValueError(f"cannot build {model_type} from {sorted(kwargs)}: {e}") from e


# --- EDM's baseline preconditioners (VP, VE, iDDPM), as denoisers D(x, sigma, labels) -------------------


class _Precond(nn.Module):
    def __init__(self, model: nn.Module, label_dim: int = 0) -> None:
        super().__init__()
        self.model = model
        self.label_dim = int(label_dim)

    def _labels(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if labels is None:
            return torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=x.dtype)
        return labels


class VPPrecond(_Precond):
    """Song et al.'s VP formulation: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).

    D(x, sigma) = x - sigma F(x / sqrt(sigma^2 + 1), (M - 1) t(sigma)).
    """

    def __init__(self, model: nn.Module, label_dim: int = 0, beta_d: float = 19.9, beta_min: float = 0.1,
                 M: int = 1000, epsilon_t: float = 1e-5) -> None:
        super().__init__(model, label_dim)
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.M = int(M)
        self.epsilon_t = float(epsilon_t)
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        s = append_dims(sigma, x.ndim)
        f = self.model(x / (s**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma), self._labels(x, labels))
        return x - s * f.to(x.dtype)


class VEPrecond(_Precond):
    """Song et al.'s VE formulation: D(x, sigma) = x + sigma F(x, log(sigma / 2))."""

    def __init__(self, model: nn.Module, label_dim: int = 0, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        super().__init__(model, label_dim)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        f = self.model(x, (0.5 * sigma).log(), self._labels(x, labels))
        return x + append_dims(sigma, x.ndim) * f.to(x.dtype)


class IDDPMPrecond(_Precond):
    """Improved DDPM (Nichol & Dhariwal 2021): the net predicts eps (first half of 2C channels) at the
    discrete step whose sigma u_j is nearest; D(x, sigma) = x - sigma F(x / sqrt(sigma^2 + 1), M - 1 - j)."""

    def __init__(self, model: nn.Module, label_dim: int = 0, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000) -> None:
        super().__init__(model, label_dim)
        self.C_1 = float(C_1)
        self.C_2 = float(C_2)
        self.M = int(M)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # u_{j-1} from u_j through the cosine schedule's alpha-bar ratio
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: int | Tensor) -> Tensor:
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma_index(self, sigma: Tensor) -> Tensor:
        return (sigma.float().reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1)

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        s = append_dims(sigma, x.ndim)
        c_noise = (self.M - 1 - self.round_sigma_index(sigma)).to(x.dtype)
        f = self.model(x / (s**2 + 1).sqrt(), c_noise, self._labels(x, labels))
        return x - s * f[:, : x.shape[1]].to(x.dtype)
