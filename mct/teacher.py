"""Teachers: train an EDM-preconditioned denoiser by DSM on a world's data, save and load it safely."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mct.config import TeacherConfig
from mct.diffusion import EDMPrecond, dsm_loss
from mct.ema import ema_update
from mct.io import load_torch, save_torch
from mct.worlds.registry import World


def denoiser_spec(world: World, arch: str, arch_kwargs: dict) -> dict[str, Any]:
    return {"world_kind": world.kind, "arch": arch, "arch_kwargs": dict(arch_kwargs),
            "sigma_data": world.sigma_data, "label_dim": world.label_dim, "data_shape": list(world.data_shape)}


def save_denoiser(path: Path, denoiser: nn.Module, spec: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    save_torch({"format": "mct-denoiser-v1", "spec": spec, "state_dict": denoiser.state_dict(),
                "meta": meta or {}}, path)


def load_denoiser(path: Path, world: World) -> tuple[EDMPrecond, dict[str, Any]]:
    """Load a denoiser saved by :func:`save_denoiser` (weights_only) or an EDM pickle (restricted unpickler)."""
    from mct.checkpoint import detect_format, load_edm_pickle

    if detect_format(path) == "edm-pickle":
        net = load_edm_pickle(path)["ema"]
        spec = {"world_kind": world.kind, "arch": "edm", "arch_kwargs": {"source": str(path)},
                "sigma_data": float(getattr(net, "sigma_data", 0.5)), "label_dim": world.label_dim,
                "data_shape": list(world.data_shape)}
        return net, spec
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "mct-denoiser-v1":
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not an mct denoiser checkpoint (found format {found!r})")
    spec = ckpt["spec"]
    net = world.build_network(spec["arch"], spec["arch_kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    return net, spec


def import_adm_teacher(raw: Path, world: World, flags: dict[str, Any], out: Path,
                       meta: dict[str, Any] | None = None) -> None:
    """A guided-diffusion state dict (read with ``torch.load(weights_only=True)``) -> an mct denoiser checkpoint:
    the ADM U-Net inside VPEpsDenoiser, so every later stage loads it like any other teacher."""
    from mct.checkpoint import load_state_checkpoint
    from mct.nets.adm import load_adm_state_dict

    state = load_state_checkpoint(raw)
    if not isinstance(state, dict):
        raise ValueError(f"{raw}: expected a guided-diffusion state dict, found {type(state).__name__}")
    denoiser = world.build_network("adm", flags)
    load_adm_state_dict(denoiser.eps_net.unet, state)
    save_denoiser(out, denoiser, denoiser_spec(world, "adm", flags), meta)


def train_teacher(world: World, tcfg: TeacherConfig, train_x: Tensor, train_y: Tensor | None, out: Path,
                  progress: bool = True, log: Path | None = None) -> dict[str, Any]:
    """EDM DSM training with an EMA copy; the EMA is the teacher that is saved."""
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    net = world.build_network(tcfg.arch, dict(tcfg.arch_kwargs))
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr)
    sigma_dist = tcfg.sigma.build()
    n = train_x.shape[0]
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(tcfg.iterations), desc=f"teacher {world.name}", disable=not progress, mininterval=1.0)
    for it in bar:
        idx = torch.randint(0, n, (tcfg.batch_size,), generator=gen)
        x0 = train_x[idx]
        labels = train_y[idx] if train_y is not None else None
        sigma = sigma_dist.sample(tcfg.batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = dsm_loss(net, x0, sigma, labels, noise, world.sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Warm up the learning rate over the first 5% of training, as EDM does, for stability.
        for g in opt.param_groups:
            g["lr"] = tcfg.lr * min(1.0, (it + 1) / max(1, tcfg.iterations // 20))
        opt.step()
        ema_update(ema, net, tcfg.ema_decay)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher training diverged at iteration {it} (loss {loss.item()})")
        losses.append(loss.item())
        if it % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    seconds = time.perf_counter() - t0
    summary = {"iterations": tcfg.iterations, "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
               "seconds": round(seconds, 2), "parameters": sum(p.numel() for p in net.parameters())}
    save_denoiser(out, ema, denoiser_spec(world, tcfg.arch, tcfg.arch_kwargs), summary)
    return summary
