"""Sampling the student across processes: two gloo processes together draw exactly the one-process set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mct.config import parse_params
from mct.emd import Generator
from mct.nets.mlp import build_mlp_denoiser
from mct.student import generate, generate_all, interleave_shards

N, BATCH, SEED, LABELS = 1050, 100, 5, 3  # 11 batches, the last one half full: ranks hold 6 and 5 batches


def _generator() -> Generator:
    torch.manual_seed(0)
    return Generator(build_mlp_denoiser(hidden=32, depth=2, label_dim=LABELS), sigma_init=2.5)


def _worker(rank: int, world_size: int, root: str) -> None:
    torch.set_num_threads(1)  # the same kernels as the one-process reference
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world_size)
    try:
        x, y = generate_all(_generator(), (2,), N, SEED, LABELS, BATCH)
        torch.save({"x": x, "y": y}, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_gather_the_one_process_set(tmp_path: Path):
    """Each batch j is drawn from its own generator seeded with (seed, j), so sharding changes who draws a batch, not
    what is drawn; the all-gather must hand every rank the one-process samples and labels, bitwise."""
    torch.set_num_threads(1)
    reference = generate(_generator(), (2,), N, SEED, LABELS, BATCH)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["x"].shape == (N, 2) and torch.equal(got["x"], reference[0]), rank
        assert torch.equal(got["y"], reference[1]), rank


def test_interleave_shards_restores_the_batch_order():
    """Rank r of W holds batches r, r + W, ...: interleaving gives batch j at rows j*B..(j+1)*B, whatever W."""
    gen = _generator()
    full_x, full_y = generate(gen, (2,), N, SEED, LABELS, BATCH)
    for world_size in (1, 2, 3, 11, 12):  # 12 ranks for 11 batches: one rank draws nothing
        shards = [generate(gen, (2,), N, SEED, LABELS, BATCH, shard=(r, world_size)) for r in range(world_size)]
        x, y = interleave_shards(shards, N, BATCH)
        assert torch.equal(x, full_x) and torch.equal(y, full_y), world_size
    assert generate_all(gen, (2,), N, SEED, LABELS, BATCH)[0].shape == (N, 2)  # no process group: one process


@pytest.mark.slow
def test_sample_stage_under_accelerate_launch_equals_one_process(tiny_raw, tmp_path: Path):
    """`mct sample` launched as two CPU processes by `accelerate launch` (gloo) writes the file one process writes."""
    from mct.io import save_torch
    from mct.teacher import denoiser_spec
    from mct.worlds.registry import make_world

    params = parse_params(tiny_raw)
    world = make_world("toy2d", params.worlds["toy2d"])
    torch.manual_seed(0)
    net = world.build_network("mlp", {"hidden": 32, "depth": 2})
    state = net.state_dict()
    save_torch({"format": "mct-generator-v1", "spec": denoiser_spec(world, "mlp", {"hidden": 32, "depth": 2}),
                "sigma_init": 2.5, "ema": state, "generator": state}, tmp_path / "generator.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    args = ["sample", "--experiment", "tiny_emd", "--generator", str(tmp_path / "generator.pt"), "--num", str(N),
            "--params", str(tmp_path / "params.yaml"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mct.cli", *args, "--out", str(tmp_path / "one.npz")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "-m", "mct.cli", *args, "--out", str(tmp_path / "two.npz")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes)" in two.stdout and "(1 process)" in one.stdout  # the set was really drawn in shares
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["x"].shape == (N, 2) and np.array_equal(a["x"], b["x"])
