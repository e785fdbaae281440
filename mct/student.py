"""The one-step student outside the training loop: build, initialise and load the generator; sample from it with class
labels; gather the samples of several processes into the single-process set.

Evaluation and the ``sample`` stage use this module without importing :mod:`mct.train`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mct.config import ExperimentConfig
from mct.emd import Generator
from mct.images import quantize
from mct.io import load_torch, save_torch
from mct.nets.weights import check_reinitialised, reinitialise
from mct.teacher import load_denoiser
from mct.worlds.base import class_labels as draw_class_labels
from mct.worlds.registry import World

# --- build, initialise, load ---------------------------------------------------------------------------------


def scratch_init(net: nn.Module, seed: int) -> dict[str, int]:
    """Re-initialise ``net`` in place as its network family initialises a fresh one (seeded), and prove it did:
    raises ValueError when a parameter has no initialiser or a randomly initialised tensor kept its value
    (:func:`mct.nets.weights.check_reinitialised`). Returns how many tensors changed."""
    torch.manual_seed(seed)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    return check_reinitialised(before, net, reinitialise(net))


def init_student(world: World, exp: ExperimentConfig, teacher_path: Path, out: Path) -> dict[str, Any]:
    """Generator = copy of the teacher ('teacher') or re-initialised ('scratch'); score network = teacher copy."""
    teacher, spec = load_denoiser(teacher_path, world)
    gen_net = copy.deepcopy(teacher)
    sigma_init = exp.student.resolved_sigma()
    info: dict[str, Any] = {"sigma_init": sigma_init, "init": exp.student.init}
    if exp.student.init == "scratch":
        info["reset"] = scratch_init(gen_net, exp.distill.seed)
    save_torch({"format": "mct-student-v1", "spec": spec, "sigma_init": sigma_init, "init": exp.student.init,
                "generator": gen_net.state_dict(), "score": teacher.state_dict()}, out)
    return info


def build_generator(world: World, spec: dict[str, Any], sigma_init: float, state: dict[str, Tensor],
                    arch_kwargs: dict[str, Any] | None = None) -> Generator:
    """The generator around a fresh network of the recorded architecture, with ``state`` loaded."""
    gen = Generator(world.build_network(spec["arch"], arch_kwargs or spec["arch_kwargs"]), sigma_init)
    gen.denoiser.load_state_dict(state)
    return gen


def load_generator(path: Path, world: World, key: str = "generator") -> Generator:
    """Generator from a student-init file ('generator') or a distill output ('ema' / 'generator')."""
    ckpt = load_torch(path)
    if ckpt.get("format") not in ("mct-student-v1", "mct-generator-v1"):
        raise ValueError(f"{path}: not an mct student or generator file (format {ckpt.get('format')!r})")
    return build_generator(world, ckpt["spec"], ckpt["sigma_init"], ckpt[key])


# --- sampling -------------------------------------------------------------------------------------------------


LabelSource = Callable[[int, int, torch.Generator, "torch.device | str"], tuple[Tensor | None, Tensor | None]]


def class_labels(label_dim: int) -> LabelSource:
    """The label source of a class-conditional (or, label_dim 0, unconditional) world: uniform classes, drawn from
    the batch's generator after its z by :func:`mct.worlds.base.class_labels`, World.eval_labels's default."""
    def draw(start: int, n: int, rng: torch.Generator, device: torch.device | str
             ) -> tuple[Tensor | None, Tensor | None]:
        return draw_class_labels(n, label_dim, rng, device)
    return draw


@torch.no_grad()
def generate(gen: nn.Module, shape: tuple[int, ...], n: int, seed: int, labels: int | LabelSource,
             batch_size: int = 1000, device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1),
             uint8: bool = False, finish: Callable[[Tensor, Tensor | None], Tensor] | None = None
             ) -> tuple[Tensor, Tensor | None]:
    """n one-step samples. Batch j draws its z and then its labels from a generator seeded with (seed, j), so the set
    is the same whatever the number of processes: ``shard=(rank, world)`` makes the batches j = rank mod world.

    ``labels``: a class count (uniform one-hot classes; 0: unconditional) or a label source such as a world's
    ``eval_labels``: (start, n, rng, device) -> (conditioning, ids stored with the samples). ``finish`` maps each
    batch to the stored samples (a world's ``finish_samples``: quantise, decode latents); ``uint8`` alone
    quantises each image batch as EDM saves images (:func:`mct.images.quantize`): a quarter of the memory."""
    source = class_labels(labels) if isinstance(labels, int) else labels
    if finish is None:
        finish = (lambda x, ids: quantize(x)) if uint8 else (lambda x, ids: x)
    rank, world_size = shard
    gen = gen.to(device).eval()
    xs, ys = [], []
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world_size != rank:
            continue
        rng = torch.Generator(device=device).manual_seed(seed * 1_000_003 + j)
        m = min(batch_size, n - start)
        z = torch.randn((m, *shape), generator=rng, device=device)
        cond, ids = source(start, m, rng, device)
        xs.append(finish(gen(z, cond), ids).cpu())
        if ids is not None:
            ys.append(ids.cpu())
    if not xs:
        empty_y = torch.empty(0, dtype=torch.long) if not isinstance(labels, int) or labels else None
        return torch.empty((0, *shape), dtype=torch.uint8 if uint8 else torch.float32), empty_y
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def interleave_shards(shards: list[tuple[Tensor, Tensor | None]], n: int, batch_size: int
                      ) -> tuple[Tensor, Tensor | None]:
    """The single-process set from the outputs of ``generate(..., shard=(r, W))`` for r = 0..W-1 (in rank order):
    rank r drew batches r, r + W, ..., so batch j is the (j // W)-th batch of rank j mod W."""
    world_size = len(shards)
    xs, ys = [], []
    for j in range((n + batch_size - 1) // batch_size):
        xr, yr = shards[j % world_size]
        k = j // world_size
        xs.append(xr[k * batch_size:(k + 1) * batch_size])
        if yr is not None:
            ys.append(yr[k * batch_size:(k + 1) * batch_size])
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def generate_all(gen: nn.Module, shape: tuple[int, ...], n: int, seed: int, labels: int | LabelSource,
                 batch_size: int = 1000, device: torch.device | str = "cpu", uint8: bool = False,
                 finish: Callable[[Tensor, Tensor | None], Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`generate`'s n samples, drawn by every process of an initialised ``torch.distributed`` group (a share
    each) and all-gathered, so each process returns the set one process would draw; without a group, one process
    draws them all."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return generate(gen, shape, n, seed, labels, batch_size, device, uint8=uint8, finish=finish)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = generate(gen, shape, n, seed, labels, batch_size, device, shard=(rank, world_size), uint8=uint8,
                    finish=finish)
    shards: list[Any] = [None] * world_size
    dist.all_gather_object(shards, mine)
    return interleave_shards(shards, n, batch_size)
