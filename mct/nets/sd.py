"""Stable Diffusion (v1.5-style) as a text-conditioned VP teacher: the parts a text-to-image world needs.

* :func:`check_sd_folder`: a local diffusers SD folder verified before anything loads (layout, no pickle files,
  safetensors weights, optional sha256 pins). Nothing here downloads; nothing here unpickles.
* :func:`sd_alpha_bar`: the discrete schedule from scheduler/scheduler_config.json (SD: scaled linear).
* :class:`SDUNetEps` and :func:`sd_denoiser`: diffusers' ``UNet2DConditionModel`` as an eps-predicting VP network in
  our denoiser convention ``D(x, sigma, labels)`` through :class:`mct.diffusion.VPEpsDenoiser`; ``labels`` are the
  text encoder's hidden states (B, L, D) instead of one-hot classes.
* :class:`TextEncoder`, :func:`load_vae`, :func:`decode_latents`: prompts -> embeddings, latents -> images.
* :data:`SD15_UNET_CONFIG`: the published SD v1.5 UNet configuration (859.52M parameters), so the real-size network
  can be built with random weights where the weights are not at hand.

diffusers and transformers are imported inside the functions that need them: importing this module is cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mct.diffusion import VPEpsDenoiser

REFUSED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")  # pickle formats: never loaded
WEIGHT_PARTS = ("unet", "vae", "text_encoder")
REQUIRED_PARTS = (*WEIGHT_PARTS, "tokenizer", "scheduler")
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the mirror of the withdrawn runwayml/stable-diffusion-v1-5

# SD v1.5's unet/config.json as published (diffusers' defaults fill in the keys not listed)
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


class SDFolderError(ValueError):
    """A Stable Diffusion folder that is missing, incomplete, holds pickle files or fails its pins."""


def _download_hint(folder: Path) -> str:
    files = ("'model_index.json' 'scheduler/*' 'tokenizer/*' 'unet/config.json'"
             " 'unet/diffusion_pytorch_model.safetensors' 'vae/config.json' 'vae/diffusion_pytorch_model.safetensors'"
             " 'text_encoder/config.json' 'text_encoder/model.safetensors'")
    return (f"download runwayml/stable-diffusion-v1-5 (or a mirror, e.g. {SD15_REPO}) with its safetensors files to "
            f"{folder}, e.g. `huggingface-cli download {SD15_REPO} --local-dir {folder} --include {files}`, and set "
            f"the text-to-image world's SD folder in params.yaml to that path (pinning the sha256 of its weight files "
            f"is recommended)")


def _sha256(path: Path) -> str:
    from mct.fetch import sha256_file

    return sha256_file(path)


def check_sd_folder(folder: str | Path, pins: dict[str, str] | None = None) -> dict[str, str]:
    """Verify a local diffusers SD folder before anything in it is read; return {relative path: sha256} of every
    ``*.safetensors`` file under it.

    Refused: a missing folder, model_index.json or part (unet/, vae/, text_encoder/, tokenizer/, scheduler/); any
    pickle-format file anywhere (suffix in REFUSED_SUFFIXES: loading one can run arbitrary code, and its presence
    means a loader might silently prefer it); a weight part without a safetensors file. With ``pins``
    ({relative posix path: sha256}) every pinned file must exist with that hash, and every safetensors file must be
    pinned: an unpinned one is weights nobody vouched for.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SDFolderError(f"Stable Diffusion folder {folder} does not exist: {_download_hint(folder)}")
    missing = [p for p in ("model_index.json", *REQUIRED_PARTS) if not (folder / p).exists()]
    if missing:
        raise SDFolderError(f"Stable Diffusion folder {folder} lacks {', '.join(missing)}: {_download_hint(folder)}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    pickles = [p for p in files if p.name.lower().endswith(REFUSED_SUFFIXES)]
    if pickles:
        names = ", ".join(str(p) for p in pickles)
        raise SDFolderError(f"pickle files are never loaded (they can run code); remove them from {folder} and keep "
                            f"the safetensors files: {names}")
    for part in WEIGHT_PARTS:
        if not any((folder / part).glob("*.safetensors")):
            raise SDFolderError(f"{folder / part} holds no *.safetensors weights: {_download_hint(folder)}")
    hashes = {p.relative_to(folder).as_posix(): _sha256(p) for p in files if p.name.endswith(".safetensors")}
    if pins is not None:
        for rel, expected in pins.items():
            found = hashes.get(rel)
            if found is None:
                raise SDFolderError(f"pinned file {rel} is not a safetensors file in {folder}")
            if found != expected.lower():
                raise SDFolderError(f"{folder / rel}: sha256 is {found}, expected {expected}; refusing to load it")
        unpinned = sorted(set(hashes) - set(pins))
        if unpinned:
            raise SDFolderError(f"weight files in {folder} without a sha256 pin: {', '.join(unpinned)}; pin them "
                                f"(`sha256sum FILE`) or remove them")
    return hashes


# --- schedule ---------------------------------------------------------------------------------------------------


def scaled_linear_alpha_bar(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """SD's "scaled linear" schedule: beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2,
    alpha_bar_t = prod_{s<=t} (1 - beta_s). float64, shape (T,); index t is the UNet's integer timestep."""
    if T < 1 or not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need T >= 1 and 0 < beta_start <= beta_end < 1, got {T}, {beta_start}, {beta_end}")
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sd_alpha_bar(folder: str | Path) -> Tensor:
    """alpha_bar of the folder's scheduler/scheduler_config.json ("scaled_linear" or "linear" betas)."""
    from mct.diffusion import linear_alpha_bar

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise SDFolderError(f"{path} is missing: {_download_hint(Path(folder))}")
    cfg = json.loads(path.read_text())
    T, b0, b1 = int(cfg.get("num_train_timesteps", 1000)), float(cfg["beta_start"]), float(cfg["beta_end"])
    kind = cfg.get("beta_schedule", "linear")
    if kind == "scaled_linear":
        return scaled_linear_alpha_bar(T, b0, b1)
    if kind == "linear":
        return linear_alpha_bar(T, b0, b1)
    raise SDFolderError(f"{path}: beta_schedule {kind!r} is not supported (only 'scaled_linear' and 'linear')")


# --- the UNet ---------------------------------------------------------------------------------------------------


def unet_from_config(config: dict[str, Any], use_checkpoint: bool = False) -> nn.Module:
    """A randomly initialised diffusers UNet2DConditionModel; ``use_checkpoint`` recomputes activations in the
    backward pass (memory for compute, as ADM's ``use_checkpoint``)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    if use_checkpoint:
        unet.enable_gradient_checkpointing()
    return unet


def unet_config(folder: str | Path) -> dict[str, Any]:
    """unet/config.json as a plain dict, without diffusers' bookkeeping keys ("_class_name", "_diffusers_version")."""
    path = Path(folder) / "unet" / "config.json"
    if not path.is_file():
        raise SDFolderError(f"{path} is missing: {_download_hint(Path(folder))}")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def load_unet_state(folder: str | Path) -> dict[str, Tensor]:
    """The UNet's state dict from unet/*.safetensors (safetensors only: never torch.load).

    Variant files (``*.fp16.safetensors``, ``*.non_ema.safetensors``) are skipped when the plain weights are there;
    the shards of a sharded checkpoint are merged, and a key found twice is an error.
    """
    from safetensors.torch import load_file

    unet_dir = Path(folder) / "unet"
    files = sorted(unet_dir.glob("*.safetensors"))
    plain = [p for p in files if "." not in p.name.removesuffix(".safetensors")]
    if not (plain or files):
        raise SDFolderError(f"{unet_dir} holds no *.safetensors weights: {_download_hint(Path(folder))}")
    state: dict[str, Tensor] = {}
    for path in plain or files:
        part = load_file(str(path))
        dup = sorted(set(part) & set(state))
        if dup:
            raise SDFolderError(f"{path} repeats {len(dup)} keys of another file in {unet_dir} (e.g. {dup[0]}); "
                                f"keep one variant of the weights")
        state.update(part)
    return state


class SDUNetEps(nn.Module):
    """The UNet as ``eps_net(x_vp, t, labels)`` for :class:`~mct.diffusion.VPEpsDenoiser`: ``labels`` are text
    embeddings (B, L, D), the UNet's cross-attention context."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_vp: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("SD's UNet needs text embeddings (B, L, D) as labels; use TextEncoder.uncond(n) for none")
        return self.unet(x_vp, t, encoder_hidden_states=labels.to(x_vp.dtype)).sample


def sd_denoiser(unet: nn.Module, alpha_bar: Tensor) -> VPEpsDenoiser:
    """D(x, sigma, text_embeddings) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma), text_embeddings)."""
    return VPEpsDenoiser(SDUNetEps(unet), alpha_bar)


# --- text and pixels --------------------------------------------------------------------------------------------


class TextEncoder:
    """CLIP's tokenizer and text model of an SD folder: prompts -> the UNet's context (B, 77, D), frozen."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        self.device = torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                   use_safetensors=True, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self._uncond: Tensor | None = None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.model(tokens.input_ids.to(self.device)).last_hidden_state

    def uncond(self, n: int = 1) -> Tensor:
        """The empty prompt's embedding (classifier-free guidance's unconditional branch), encoded once."""
        if self._uncond is None:
            self._uncond = self.encode([""])
        return self._uncond.expand(n, -1, -1)


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", local_files_only=True, use_safetensors=True,
                                        torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor, batch_size: int = 8) -> Tensor:
    """Latents (SD's scaled space) -> float32 images in [-1, 1], on the latents' device; in batches, so 50k samples
    never sit in the decoder at once."""
    param = next(vae.parameters())
    out = [vae.decode(chunk.to(param.device, param.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)
           for chunk in latents.split(batch_size)]
    return torch.cat(out).to(latents.device)
