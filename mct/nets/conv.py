"""A small class-conditional convolutional U-Net with EDM's raw signature, for low-resolution worlds.

The pieces are EDM's SongUNet (DDPM++) ones in miniature: a sinusoidal noise embedding plus a linear map of
the one-hot label feed an MLP; residual blocks (GroupNorm, SiLU, 3x3 conv) receive that embedding as a
per-channel scale and shift. The layout is the classic U-Net's, which is lighter than SongUNet's: the
encoder halves the resolution between levels, the decoder upsamples back and concatenates the encoder's
output at each level once (skip connection). At the defaults (32 channels, 8x8 -> 4x4 -> 8x8, two blocks
per level) it has 316k parameters. Wrap it with ``EDMPrecond`` (see :func:`build_digits_denoiser`) to get
a denoiser ``D(x, sigma, labels)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mct.diffusion import EDMPrecond


def _groups(channels: int) -> int:
    """EDM's GroupNorm rule (up to 32 groups of at least 4 channels), rounded down to a divisor."""
    g = max(1, min(32, channels // 4))
    while channels % g != 0:
        g -= 1
    return g


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar noise label (EDM's ``PositionalEmbedding``)."""

    def __init__(self, num_channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        if num_channels % 2 != 0:
            raise ValueError(f"num_channels must be even, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / half
        freqs = (1.0 / self.max_positions) ** freqs
        angles = x.reshape(-1, 1).float() * freqs.reshape(1, -1)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then the embedding as scale/shift, SiLU -> dropout -> conv, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1.0 + scale) + shift)
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * math.sqrt(0.5)  # EDM's skip_scale keeps the variance of the sum at ~1


class ConvUNet(nn.Module):
    """Class-conditional U-Net, ``forward(x, noise_labels, class_labels, augment_labels=None) -> F(x)``.

    Level ``i`` runs at resolution ``img_resolution / 2**i`` with ``channel_mult[i] * model_channels``
    channels and ``num_blocks`` residual blocks on the way down. Between levels the encoder average-pools
    2x2; the decoder upsamples (nearest), concatenates the encoder's output at that level and runs
    ``num_blocks`` blocks. The deepest level is the bottleneck and is visited once. Resampling has no
    parameters: the next block's convolutions mix channels, and 8x8 inputs need little more.
    """

    def __init__(self, img_channels: int = 1, img_resolution: int = 8, model_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2), num_blocks: int = 2, label_dim: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or num_blocks < 1 or model_channels < 2 or model_channels % 2 != 0:
            raise ValueError(f"need >= 1 level, >= 1 block and an even model_channels; got channel_mult="
                             f"{channel_mult}, num_blocks={num_blocks}, model_channels={model_channels}")
        if img_resolution % (2 ** (levels - 1)) != 0:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2**{levels - 1} "
                             f"(channel_mult has {levels} levels)")
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        emb_channels = 4 * model_channels

        # Embedding: sinusoid of c_noise (+ linear map of the one-hot label) -> 2-layer MLP.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = nn.Linear(label_dim, model_channels, bias=False) if label_dim > 0 else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        self.conv_in = nn.Conv2d(img_channels, model_channels, 3, padding=1)
        ch = model_channels
        self.enc = nn.ModuleList()  # one ModuleList of blocks per level
        skip_channels = []
        for mult in channel_mult:
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(ResBlock(ch, model_channels * mult, emb_channels, dropout))
                ch = model_channels * mult
            self.enc.append(blocks)
            skip_channels.append(ch)
        self.dec = nn.ModuleList()  # levels levels-2, ..., 0
        for mult, skip_ch in zip(reversed(channel_mult[:-1]), reversed(skip_channels[:-1]), strict=True):
            blocks = nn.ModuleList()
            for b in range(num_blocks):
                blocks.append(ResBlock(ch + (skip_ch if b == 0 else 0), model_channels * mult, emb_channels,
                                       dropout))
                ch = model_channels * mult
            self.dec.append(blocks)
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, img_channels, 3, padding=1)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this network is class-conditional (label_dim={self.label_dim}); "
                                 "pass one-hot class_labels")
            if class_labels.shape != (emb.shape[0], self.label_dim):
                raise ValueError(f"class_labels must have shape ({emb.shape[0]}, {self.label_dim}), "
                                 f"got {tuple(class_labels.shape)}")
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        del augment_labels  # accepted for EDM compatibility; this net is trained without augmentation
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(x.shape)}")
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1 and x.shape[0] != 1:
            noise_labels = noise_labels.expand(x.shape[0])
        emb = self.embed(noise_labels, class_labels)

        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        skips.pop()  # the bottleneck's output is h itself
        for blocks in self.dec:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_digits_denoiser(sigma_data: float = 0.5, **kwargs) -> EDMPrecond:
    """The digits world's denoiser: a :class:`ConvUNet` (kwargs go to its constructor) under EDMPrecond."""
    net = ConvUNet(**kwargs)
    return EDMPrecond(net, sigma_data=sigma_data, label_dim=net.label_dim)

