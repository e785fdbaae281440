"""OpenAI guided-diffusion's ADM U-Net (Dhariwal & Nichol 2021, ``guided_diffusion/unet.py``), reimplemented.

Every parameter has guided-diffusion's name and shape (``input_blocks.3.0.in_layers.0.weight``,
``middle_block.1.qkv.weight``, ``output_blocks.2.2.conv.weight``, ``label_emb.weight``, ...), so OpenAI's
published plain state dicts (e.g. ``128x128_diffusion.pt``, see ``mct.fetch.KNOWN_TEACHERS``) load by name
with ``strict=True`` and guided-diffusion's own code is never imported.

* :class:`ADMUNet`: guided-diffusion's ``UNetModel``, ``net(x, timesteps, y)`` with integer class labels ``y``.
* :func:`adm_model_kwargs`: guided-diffusion's command-line flags -> :class:`ADMUNet` arguments.
* :func:`build_adm_denoiser`: the U-Net as an eps-predicting VP teacher wrapped into our denoiser convention
  ``D(x, sigma, one_hot_labels)`` through :class:`mct.diffusion.VPEpsDenoiser`.

guided-diffusion's ``use_fp16`` conversion is not reproduced: parameters stay float32 (use autocast instead).
``use_checkpoint=True`` recomputes each residual / attention block's activations in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mct.diffusion import VPEpsDenoiser, linear_alpha_bar
from mct.nets.weights import load_state_strict, zero_init

__all__ = [
    "ADMEpsNet",
    "ADMUNet",
    "AttentionBlock",
    "Downsample",
    "GroupNorm32",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "adm_model_kwargs",
    "build_adm_denoiser",
    "load_adm_state_dict",
    "timestep_embedding",
]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / half), i < dim // 2; a zero column pads odd ``dim``.

    ``timesteps`` is (N,) and may be fractional; the result is float32 (N, dim), as ADM computes it.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.reshape(-1, 1).float() * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: ADM's residual branches and the output start as the identity / zero (marked, so
    a scratch re-initialisation zeroes them again: :func:`mct.nets.weights.reinitialise`)."""
    return zero_init(module)


# --- layers -----------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) evaluated in float32 and cast back, so half-precision activations normalise stably."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv ``conv`` when ``use_conv`` (ADM's conv_resample)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the number of channels")

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 conv ``op`` when ``use_conv``, else by 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a conv cannot change the number of channels")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """ADM's residual block: conv(silu(norm x)), conditioned on the embedding, then a zero-init conv + skip.

    The embedding enters as a bias (``h + emb``) or, with ``use_scale_shift_norm``, FiLM-style after the
    second norm (``norm(h) * (1 + scale) + shift``). ``up``/``down`` resample both branches inside the
    block (``resblock_updown``), between the first norm/SiLU and the first conv, as ADM does.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.emb_channels = emb_channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.updown = up or down

        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(GroupNorm32(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention over a fused qkv (B, heads * 3 * ch, T): split into heads first, then into q, k, v.

    This is the channel order of ADM's published checkpoints (``use_new_attention_order=False``).
    """

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        b, width, t = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(b * self.n_heads, 3 * ch, t).split(ch, dim=1)
        return _attend(q, k, v).reshape(b, -1, t)


class QKVAttention(nn.Module):
    """Attention over a fused qkv (B, 3 * heads * ch, T): split into q, k, v first, then into heads."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        b, width, t = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (z.reshape(b * self.n_heads, ch, t) for z in qkv.chunk(3, dim=1))
        return _attend(q, k, v).reshape(b, -1, t)


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q^T k / sqrt(ch)) v over positions for (N, ch, T) tensors; returns (N, ch, T)."""
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return a.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all spatial positions; ``proj_out`` starts at zero."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels != 0:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads) if use_new_attention_order else QKVAttentionLegacy(num_heads)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the embedding; the other layers see only x."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# --- the U-Net --------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-D): encoder, middle block and decoder with skip concatenation.

    ``attention_resolutions`` holds downsample rates ds (1 at full resolution), e.g. (4, 8, 16) for attention
    at 32, 16, 8 pixels of a 128-pixel image. Module indices match guided-diffusion's exactly, because the
    checkpoint's key names encode them.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, use_checkpoint: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(int(d) for d in attention_resolutions)
        self.dropout = float(dropout)
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_ch = 4 * model_channels
        res = dict(emb_channels=emb_ch, dropout=dropout, use_checkpoint=use_checkpoint,
                   use_scale_shift_norm=use_scale_shift_norm)
        attn = dict(use_checkpoint=use_checkpoint, num_head_channels=num_head_channels,
                    use_new_attention_order=use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_ch)

        # Encoder. `skip_chans` records each input block's output width for the decoder's concatenations.
        ch = first_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out_channels=int(mult * model_channels), **res)]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, **attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (ResBlock(ch, out_channels=ch, down=True, **res) if resblock_updown
                        else Downsample(ch, conv_resample, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **res), AttentionBlock(ch, num_heads=num_heads, **attn), ResBlock(ch, **res))

        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip; the last one of a level
        # (except the outermost) upsamples.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), out_channels=int(mult * model_channels), **res)]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, **attn))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, out_channels=ch, up=True, **res) if resblock_updown
                                  else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(first_ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """eps (and, with learn_sigma, the variance interpolation) for x at ``timesteps``; ``y`` int labels (B,)."""
        if self.num_classes is None and y is not None:
            raise ValueError("this ADM U-Net is unconditional (num_classes=None); do not pass class labels y")
        if self.num_classes is not None and y is None:
            raise ValueError(f"this ADM U-Net is class-conditional (num_classes={self.num_classes}); "
                             "pass integer class labels y of shape (B,)")
        batch = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1 and batch != 1:
            timesteps = timesteps.expand(batch)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            if y.shape != (batch,):
                raise ValueError(f"y must be integer class labels of shape ({batch},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


# --- guided-diffusion's flags -----------------------------------------------------------------------

#: guided-diffusion's ``model_and_diffusion_defaults()``, restricted to the flags that shape the network.
ADM_MODEL_DEFAULTS: dict = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
    learn_sigma=False,
)
#: Flags of ``model_and_diffusion_defaults()`` that only concern the diffusion process (ignored here).
ADM_DIFFUSION_FLAGS = frozenset({"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
                                 "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas"})
#: guided-diffusion's default channel multipliers by image size (``channel_mult=""``).
ADM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
ADM_NUM_CLASSES = 1000


def _int_list(v: str | Iterable[int]) -> tuple[int, ...]:
    if isinstance(v, str):
        return tuple(int(s) for s in v.split(",") if s.strip())
    return tuple(int(s) for s in v)


def adm_model_kwargs(flags: dict) -> dict:
    """guided-diffusion's command-line flags -> :class:`ADMUNet` kwargs, as its ``script_util.create_model``.

    Missing flags take ``model_and_diffusion_defaults()``'s values; diffusion-only flags are ignored and an
    unknown flag is an error (a typo would otherwise silently build a different network).
    """
    unknown = sorted(set(flags) - set(ADM_MODEL_DEFAULTS) - ADM_DIFFUSION_FLAGS)
    if unknown:
        raise ValueError(f"unknown guided-diffusion flag(s): {', '.join(unknown)}")
    f = {**ADM_MODEL_DEFAULTS, **{k: v for k, v in flags.items() if k in ADM_MODEL_DEFAULTS}}
    image_size = int(f["image_size"])
    if f["channel_mult"] in ("", None, ()):
        if image_size not in ADM_CHANNEL_MULT:
            raise ValueError(f"unsupported image size {image_size} for the default channel_mult; "
                             f"known: {sorted(ADM_CHANNEL_MULT)} (or pass channel_mult)")
        channel_mult: tuple[float, ...] = ADM_CHANNEL_MULT[image_size]
    else:
        channel_mult = _int_list(f["channel_mult"])
    return dict(
        image_size=image_size,
        in_channels=3,
        model_channels=int(f["num_channels"]),
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_resolutions=tuple(image_size // r for r in _int_list(f["attention_resolutions"])),
        dropout=float(f["dropout"]),
        channel_mult=channel_mult,
        num_classes=ADM_NUM_CLASSES if f["class_cond"] else None,
        use_checkpoint=bool(f["use_checkpoint"]),
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
    )


# --- adapters -------------------------------------------------------------------------------------------


class ADMEpsNet(nn.Module):
    """``eps_net(x_vp, t, labels)`` for :class:`mct.diffusion.VPEpsDenoiser` around an :class:`ADMUNet`.

    One-hot labels (B, num_classes) become ADM's integer ``y = argmax``; with learn_sigma only the first
    ``eps_channels`` outputs (eps) are returned, the variance interpolation is not needed for x0.
    """

    def __init__(self, unet: ADMUNet, eps_channels: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.eps_channels = int(eps_channels if eps_channels is not None else unet.in_channels)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        y = None
        if self.unet.num_classes is not None:
            if labels is None:
                raise ValueError(f"this ADM network is class-conditional (num_classes={self.unet.num_classes}); "
                                 "pass one-hot labels")
            y = labels.reshape(-1, self.unet.num_classes).argmax(dim=1)
            if y.shape[0] == 1 and x.shape[0] != 1:
                y = y.expand(x.shape[0])
        return self.unet(x, t, y)[:, : self.eps_channels]


def build_adm_denoiser(flags: dict, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                       use_checkpoint: bool = False) -> nn.Module:
    """An ADM eps-prediction teacher as a denoiser ``D(x, sigma, one_hot_labels)`` (random weights).

    Load a guided-diffusion state dict into ``denoiser.eps_net.unet`` with :func:`load_adm_state_dict`.
    The returned module carries ``sigma_data``, ``label_dim``, ``img_resolution``, ``img_channels`` and the
    schedule's ``sigma_min``/``sigma_max`` like our EDM denoisers.
    """
    kwargs = adm_model_kwargs(flags)
    if use_checkpoint:
        kwargs["use_checkpoint"] = True
    unet = ADMUNet(**kwargs)
    denoiser = VPEpsDenoiser(ADMEpsNet(unet), linear_alpha_bar(T, beta_start, beta_end))
    denoiser.sigma_data = 0.5
    denoiser.label_dim = int(unet.num_classes or 0)
    denoiser.img_resolution = unet.image_size
    denoiser.img_channels = unet.in_channels
    denoiser.sigma_min = float(denoiser.vp_sigmas.min())
    denoiser.sigma_max = float(denoiser.vp_sigmas.max())
    return denoiser


def load_adm_state_dict(model: ADMUNet, state: dict[str, Tensor]) -> None:
    """Copy a guided-diffusion state dict into ``model``; a missing, unexpected or mis-shaped key is a ValueError."""
    load_state_strict(model, state, where="ADM state dict")
