"""Shared fixtures: a tiny, valid params mapping and a toy2d teacher trained once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mct.config import parse_params
from mct.teacher import train_teacher
from mct.worlds.registry import make_world

torch.set_num_threads(1)  # small ops are faster on one thread, and the machine has two cores

TINY_RAW = {
    "suite": "smoke",
    "worlds": {"toy2d": {"kind": "toy2d", "grid": 5, "spacing": 1.0, "std": 0.05}},
    "teachers": {"toy2d_mlp": {"world": "toy2d", "arch": "mlp", "arch_kwargs": {"hidden": 128, "depth": 3},
                               "iterations": 2000, "batch_size": 512, "lr": 0.002,
                               "sigma": {"kind": "lognormal", "p_mean": -1.0, "p_std": 1.6}}},
    "templates": {"toy2d": {"world": "toy2d", "teacher": "toy2d_mlp", "student": {"sigma_init": 2.5},
                            "distill": {"iterations": 30, "batch_size": 64, "K": 4, "gamma_eps": 0.3,
                                        "gamma_z": 0.02, "z_step_ref": 1.0, "estep_teacher": "analytic",
                                        "checkpoint_every": 10, "lr_g": 3e-4, "ema_decay": 0.9}}},
    "experiments": {"tiny_di": {"template": "toy2d", "distill": {"K": 1, "gamma_z": 0.0}},
                    "tiny_emd": {"template": "toy2d"}},
    "suites": {"smoke": ["tiny_di", "tiny_emd"]},
}


@pytest.fixture
def tiny_raw() -> dict:
    return copy.deepcopy(TINY_RAW)


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory) -> Path:
    """The MLP teacher of params.yaml at half its training budget, fitted to the 5x5 mixture (about 25 s)."""
    torch.set_num_threads(1)
    params = parse_params(copy.deepcopy(TINY_RAW))
    world = make_world("toy2d", params.worlds["toy2d"])
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    x = world.mixture.sample(50_000, torch.Generator().manual_seed(0))
    train_teacher(world, params.teachers["toy2d_mlp"], x, None, out, progress=False)
    return out
