"""Evaluation stages: the FID feature network, reference statistics, teacher and student metrics.

One flat record per experiment (keys documented in README, "Metrics"): world, method, K, nfe, fid, precision, recall,
samples_per_s, teacher_samples_per_s, teacher_nfe, speedup, and for toy2d the exact mode statistics.
FID on digits uses clean-fid with our trained feature network as ``custom_feat_extractor``; on toy2d the "feature
space" is the plane itself (clean-fid's Frechet distance of the fitted Gaussians).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mct.config import ExperimentConfig, TeacherConfig
from mct.diffusion import edm_heun_sample, heun_nfe
from mct.io import write_json
from mct.metrics import fid as fidlib
from mct.metrics.precision_recall import precision_recall
from mct.metrics.speed import samples_per_second
from mct.teacher import load_denoiser
from mct.train import generate, load_generator, one_hot_labels
from mct.worlds.registry import World

PR_MAX = 5000  # precision/recall on at most this many points per set (k-NN is quadratic)


def train_features(world: World, data: Path, out: Path, seed: int = 0, epochs: int = 15) -> dict[str, Any]:
    from mct.metrics.features import save_feature_net, train_feature_net

    if world.kind != "digits":
        raise ValueError(f"world {world.name!r} ({world.kind}) has no trained feature network")
    x, y = world.load_split(data, "train")
    xt, yt = world.load_split(data, "test")
    net, acc = train_feature_net(x, y.argmax(1), xt, yt.argmax(1), epochs=epochs, seed=seed,
                                 num_classes=world.label_dim)
    meta = {"held_out_accuracy": acc, "world": world.name, "epochs": epochs, "seed": seed}
    save_feature_net(out, net, meta)
    return meta


class FeatureSpace:
    """Maps samples to the space where FID and precision/recall are computed for a world."""

    def __init__(self, world: World, feature_path: Path | None) -> None:
        self.world = world
        self.extractor = None
        if world.kind == "digits":
            from mct.metrics.features import load_feature_net

            if feature_path is None:
                raise ValueError("digits worlds need the feature network (mct features)")
            net, _ = load_feature_net(feature_path)
            self.extractor = fidlib.custom_extractor(net.eval(), resize_to=None)
        elif world.kind == "imagenet":
            self.extractor = fidlib.inception_feature_extractor("legacy_tensorflow")

    def __call__(self, x: Tensor) -> np.ndarray:
        if self.world.kind == "toy2d":
            return x.double().numpy()
        mode = "legacy_tensorflow" if self.world.kind == "imagenet" else None
        return fidlib.images_features(x.clamp(-1, 1), self.extractor, mode=mode)


def reference_stats(world: World, data: Path, feature_path: Path | None, out: Path) -> dict[str, Any]:
    """FID statistics of the held-out split, once per world."""
    x, _ = world.load_split(data, "test")
    feats = FeatureSpace(world, feature_path)(x)
    mu, sigma = fidlib.feature_stats(feats)
    meta = {"world": world.name, "split": "test", "count": int(len(x))}
    fidlib.save_stats(out, mu, sigma, meta)
    return meta


def _quality(world: World, x: Tensor, data: Path, feature_path: Path | None, ref: Path) -> dict[str, Any]:
    space = FeatureSpace(world, feature_path)
    gen_feats = space(x)
    mu, sigma, _ = fidlib.load_stats(ref)
    rec: dict[str, Any] = {"fid": fidlib.fid_from_stats(*fidlib.feature_stats(gen_feats), mu, sigma)}
    real, _ = world.load_split(data, "test")
    real_feats = space(real[:PR_MAX])
    p, r = precision_recall(real_feats, gen_feats[:PR_MAX])
    rec.update(precision=float(p), recall=float(r))
    if world.kind == "toy2d":
        from mct.metrics.modes import mode_statistics

        m = world.mixture
        rec.update({k: (int(v) if k.startswith("modes_") else float(v))
                    for k, v in mode_statistics(x, m.means, m.weights, m.std).items()})
    return rec


def _teacher_sampler(teacher, world: World, steps: int, sigma_min: float, sigma_max: float):
    def run(n: int, rng: torch.Generator | None = None) -> Tensor:
        rng = rng or torch.Generator().manual_seed(0)
        latents = torch.randn((n, *world.data_shape), generator=rng)
        labels = one_hot_labels(n, world.label_dim, rng)
        x, _ = edm_heun_sample(teacher, latents, labels, steps, sigma_min, sigma_max)
        return x
    return run


def evaluate_teacher(world: World, name: str, tcfg: TeacherConfig, teacher_path: Path, data: Path,
                     feature_path: Path | None, ref: Path, num_samples: int, seed: int, out: Path) -> dict[str, Any]:
    teacher, _ = load_denoiser(teacher_path, world)
    teacher.eval()
    sampler = _teacher_sampler(teacher, world, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max)
    rng = torch.Generator().manual_seed(seed)
    xs = [sampler(min(1000, num_samples - i), rng) for i in range(0, num_samples, 1000)]
    x = torch.cat(xs)
    nfe = heun_nfe(tcfg.sampler_steps)
    rec = {"teacher": name, "world": world.name, "method": "teacher", "K": None, "nfe": nfe,
           **_quality(world, x, data, feature_path, ref),
           "samples_per_s": samples_per_second(lambda n: sampler(n), batch_size=256, n_batches=3, warmup=1)}
    write_json(rec, out)
    return rec


def evaluate_experiment(world: World, name: str, exp: ExperimentConfig, tcfg: TeacherConfig, samples: Path,
                        distill_dir: Path, teacher_path: Path, data: Path, feature_path: Path | None, ref: Path,
                        out: Path) -> dict[str, Any]:
    with np.load(samples) as f:
        x = torch.from_numpy(f["x"]).float()
    summary = json.loads((distill_dir / "summary.json").read_text())
    gen = load_generator(distill_dir / "generator.pt", world, "ema").eval()
    teacher, _ = load_denoiser(teacher_path, world)
    teacher.eval()
    # Student and teacher speed in one process on one device, same batch size.
    student_fn = lambda n: generate(gen, world.data_shape, n, 0, world.label_dim, batch_size=n)[0]  # noqa: E731
    teacher_fn = _teacher_sampler(teacher, world, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max)
    s_sps = samples_per_second(student_fn, batch_size=256, n_batches=10, warmup=2)
    t_sps = samples_per_second(teacher_fn, batch_size=256, n_batches=3, warmup=1)
    nfe_t = heun_nfe(tcfg.sampler_steps)
    d = exp.distill
    rec = {"experiment": name, "world": world.name, "method": exp.method_name, "K": d.K, "nfe": 1,
           "space": d.space, "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial,
           "init": exp.student.init, "gamma_eps": d.gamma_eps, "gamma_z": d.gamma_z, "iterations": d.iterations,
           **_quality(world, x, data, feature_path, ref),
           "samples_per_s": s_sps, "teacher_samples_per_s": t_sps, "teacher_nfe": nfe_t,
           "speedup": s_sps / t_sps, "speedup_over_nfe": s_sps / t_sps / nfe_t,
           "sec_per_iter": summary["sec_per_iter"], "sec_per_iter_estep": summary["sec_per_iter_estep"]}
    rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    write_json(rec, out)
    return rec
