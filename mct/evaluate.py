"""Evaluation stages: the FID feature network, reference statistics, teacher and student metrics.

One flat record per experiment (keys documented in README, "Metrics"): world, method, K, nfe, fid, precision, recall,
samples_per_s, teacher_samples_per_s, teacher_nfe, speedup, and for toy2d the exact mode statistics.
FID on digits uses clean-fid with our trained feature network as ``custom_feat_extractor``; on toy2d the "feature
space" is the plane itself (clean-fid's Frechet distance of the fitted Gaussians).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mct.config import ExperimentConfig, TeacherConfig
from mct.convergence import FILE as CONVERGENCE_FILE
from mct.convergence import convergence_summary, read_convergence
from mct.diffusion import GuidedDenoiser, edm_heun_sample, heun_nfe
from mct.io import write_json
from mct.metrics import fid as fidlib
from mct.metrics.precision_recall import precision_recall
from mct.metrics.speed import samples_per_second
from mct.student import generate, load_generator
from mct.teacher import load_denoiser
from mct.worlds.registry import World

PR_MAX = 5000  # precision/recall on at most this many points per set (k-NN is quadratic)
EVAL_BATCH = 1000  # samples per feature batch


def train_features(world: World, data: Path, out: Path, seed: int = 0, epochs: int = 15) -> dict[str, Any]:
    from mct.metrics.features import save_feature_net, train_feature_net

    if not world.needs_feature_net:
        raise ValueError(f"world {world.name!r} ({world.kind}) has no trained feature network")
    x, y = world.load_split(data, "train")
    xt, yt = world.load_split(data, "test")
    net, acc = train_feature_net(x, y.argmax(1), xt, yt.argmax(1), epochs=epochs, seed=seed,
                                 num_classes=world.label_dim)
    meta = {"held_out_accuracy": acc, "world": world.name, "epochs": epochs, "seed": seed}
    save_feature_net(out, net, meta)
    return meta


def eval_device() -> torch.device:
    """Evaluation runs in one process: on the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


FeatureMap = Callable[[Tensor | np.ndarray], np.ndarray]


def _identity(feature_path: Path | None, device: torch.device) -> FeatureMap:
    """The samples themselves (flattened, float64): exact for low-dimensional worlds (toy2d's plane)."""
    return lambda x: torch.as_tensor(x).double().flatten(1).numpy()


def _images(extractor: Any, device: torch.device, mode: str | None) -> FeatureMap:
    """Float images in [-1, 1] (clamped) or uint8 images through a clean-fid extractor."""
    def features(x: Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.clamp(-1, 1)
        return fidlib.images_features(x, extractor, device=device, mode=mode)
    return features


def _trained_classifier(feature_path: Path | None, device: torch.device) -> FeatureMap:
    """The penultimate layer of the classifier `mct features` trained on the world's training split (digits)."""
    from mct.metrics.features import load_feature_net

    if feature_path is None:
        raise ValueError("this world measures in a trained feature network's space: run `mct features` first")
    net, _ = load_feature_net(feature_path)
    return _images(fidlib.custom_extractor(net.eval(), resize_to=None), device, None)


def _inception(feature_path: Path | None, device: torch.device) -> FeatureMap:
    """Inception-v3 with the TensorFlow-legacy weights and resizing, so FID compares with the literature."""
    return _images(fidlib.inception_feature_extractor("legacy_tensorflow", device), device, "legacy_tensorflow")


def _inception_clean(feature_path: Path | None, device: torch.device) -> FeatureMap:
    """Inception-v3 with clean-fid's 'clean' resizing: the zero-shot COCO protocol of DMD/DMD2."""
    return _images(fidlib.inception_feature_extractor("clean", device), device, "clean")


# The spaces a world can name (World.feature_space); the names are recorded with the reference statistics.
FEATURE_SPACES: dict[str, Callable[[Path | None, torch.device], FeatureMap]] = {
    "identity": _identity, "digits-feature-net": _trained_classifier, "inception-legacy-tf": _inception,
    "inception-clean": _inception_clean}


class FeatureSpace:
    """Maps samples to the space where FID and precision/recall are computed for a world: the one its class names
    (World.feature_space: the plane itself on toy2d, the trained classifier on digits, Inception on ImageNet)."""

    def __init__(self, world: World, feature_path: Path | None, device: torch.device | str = "cpu") -> None:
        self.world = world
        self.device = torch.device(device)
        if world.feature_space not in FEATURE_SPACES:
            raise ValueError(f"world {world.name!r}: unknown feature space {world.feature_space!r}; "
                             f"known: {sorted(FEATURE_SPACES)}")
        self.features = FEATURE_SPACES[world.feature_space](feature_path, self.device)

    @property
    def name(self) -> str:
        return self.world.feature_space

    def __call__(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Features of a batch: float images in [-1, 1] or uint8 images (image worlds), points (toy2d)."""
        return self.features(x)


class FeatureAccumulator:
    """Streams sample batches into FID statistics, keeping the first ``keep`` features for precision/recall
    and, in worlds with exact metrics (toy2d), the points themselves; memory is bounded by ``keep``."""

    def __init__(self, space: FeatureSpace, keep: int = PR_MAX) -> None:
        self.space, self.keep = space, keep
        self.stats = fidlib.RunningStats()
        self.kept: list[np.ndarray] = []
        self.points: list[Tensor] = []

    def add(self, x: Tensor | np.ndarray) -> None:
        feats = self.space(x)
        self.stats.update(feats)
        have = sum(len(f) for f in self.kept)
        if have < self.keep:
            self.kept.append(feats[:self.keep - have])
        if self.space.world.exact_metric_keys:
            self.points.append(torch.as_tensor(x).float())

    @property
    def pr_features(self) -> np.ndarray:
        return np.concatenate(self.kept)


class ConditionalMetrics:
    """Means of a world's per-sample metrics against the samples' conditions (World.conditional_metrics: the CLIP
    score of text2image), accumulated batch by batch; nothing for worlds without them."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, x: Tensor, ids: Tensor | None) -> None:
        if not self.world.conditional_metric_keys:
            return
        for key, values in self.world.conditional_metrics(x, ids).items():
            self.sums[key] = self.sums.get(key, 0.0) + float(np.sum(values))
        self.count += len(x)

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}


def reference_stats(world: World, data: Path, feature_path: Path | None, out: Path,
                    batch_size: int = 500, progress: bool = False) -> dict[str, Any]:
    """FID statistics of the reference set (held-out split; the ImageNet archive), streamed, once per world.
    The file also keeps up to PR_MAX reference features for precision/recall."""
    acc = FeatureAccumulator(FeatureSpace(world, feature_path, eval_device()))
    for x in tqdm(world.reference_batches(data, batch_size), desc=f"reference {world.name}", unit="batch",
                  disable=not progress):
        acc.add(x)
    mu, sigma = acc.stats.stats()
    meta = {"world": world.name, "split": world.reference_split, "count": int(acc.stats.count),
            "features": acc.space.name}
    fidlib.save_stats(out, mu, sigma, meta, pr_features=acc.pr_features)
    return meta


def _quality(world: World, acc: FeatureAccumulator, ref: Path) -> dict[str, Any]:
    mu, sigma, meta, ref_pr = fidlib.load_stats(ref, with_pr_features=True)
    if ref_pr is None:
        raise ValueError(f"{ref} holds no precision/recall features (written by an older mct); "
                         "rebuild it with `mct ref-stats`")
    rec: dict[str, Any] = {"fid": fidlib.fid_from_stats(*acc.stats.stats(), mu, sigma),
                           # the protocol beside the number: FIDs of different sample counts do not compare
                           "fid_samples": int(acc.stats.count), "fid_reference_images": int(meta["count"])}
    p, r = precision_recall(ref_pr, acc.pr_features)
    rec.update(precision=float(p), recall=float(r))
    if acc.points:
        rec.update(world.exact_metrics(torch.cat(acc.points)))
    return rec


def _teacher_sampler(teacher, world: World, steps: int, sigma_min: float, sigma_max: float,
                     device: torch.device | str = "cpu", guidance_scale: float = 1.0):
    """Teacher samples (Heun, guided when ``guidance_scale`` != 1) of evaluation conditions start .. start + n - 1,
    finished as the world stores samples; latents are drawn on the CPU, so a seed gives the same set anywhere.
    Returns (samples, ids)."""
    if guidance_scale != 1.0:
        teacher = GuidedDenoiser(teacher, lambda b: world.null_labels(b, device), guidance_scale)

    def run(n: int, rng: torch.Generator | None = None, start: int = 0, finish: bool = True
            ) -> tuple[Tensor, Tensor | None]:
        rng = rng or torch.Generator().manual_seed(0)
        latents = torch.randn((n, *world.data_shape), generator=rng)
        labels, ids = world.eval_labels(start, n, rng, device)
        x, _ = edm_heun_sample(teacher, latents.to(device), labels, steps, sigma_min, sigma_max)
        return (world.finish_samples(x, ids) if finish else x).cpu(), ids
    return run


def _teacher_nfe(tcfg: TeacherConfig) -> int:
    """Network passes of one teacher sample: Heun's, twice over when guided (a guided call is 2 passes)."""
    return heun_nfe(tcfg.sampler_steps) * (2 if tcfg.guidance_scale != 1.0 else 1)


def evaluate_teacher(world: World, name: str, tcfg: TeacherConfig, teacher_path: Path,
                     feature_path: Path | None, ref: Path, num_samples: int, seed: int, out: Path,
                     batch_size: int = 1000, progress: bool = False) -> dict[str, Any]:
    device = eval_device()
    teacher, _ = load_denoiser(teacher_path, world)
    teacher.eval().to(device)
    sampler = _teacher_sampler(teacher, world, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max, device,
                               tcfg.guidance_scale)
    rng = torch.Generator().manual_seed(seed)
    acc = FeatureAccumulator(FeatureSpace(world, feature_path, device))
    cond = ConditionalMetrics(world)
    for i in tqdm(range(0, num_samples, batch_size), desc=f"teacher {name}", unit="batch", disable=not progress):
        x, ids = sampler(min(batch_size, num_samples - i), rng, i)
        acc.add(x)
        cond.add(x, ids)
    nfe = _teacher_nfe(tcfg)
    rec = {"teacher": name, "world": world.name, "method": "teacher", "K": None, "nfe": nfe,
           "guidance_scale": tcfg.guidance_scale, **_quality(world, acc, ref), **cond.means(),
           "samples_per_s": samples_per_second(lambda n: sampler(n)[0], batch_size=world.speed_batch,
                                               n_batches=3, warmup=1)}
    write_json(rec, out)
    return rec


def evaluate_experiment(world: World, name: str, exp: ExperimentConfig, tcfg: TeacherConfig, samples: Path,
                        distill_dir: Path, teacher_path: Path, feature_path: Path | None, ref: Path,
                        out: Path) -> dict[str, Any]:
    device = eval_device()
    acc = FeatureAccumulator(FeatureSpace(world, feature_path, device))
    cond = ConditionalMetrics(world)
    with np.load(samples) as f:
        x = f["x"]  # float32 [-1, 1], or uint8 for ImageNet (EDM's saved-image quantisation)
        ids = torch.from_numpy(f["labels"]) if "labels" in f.files else None
    for start in range(0, len(x), EVAL_BATCH):
        chunk = x[start:start + EVAL_BATCH]
        chunk = torch.from_numpy(chunk) if chunk.dtype == np.uint8 else torch.from_numpy(chunk).float()
        acc.add(chunk)
        cond.add(chunk, None if ids is None else ids[start:start + EVAL_BATCH])
    del x
    summary = json.loads((distill_dir / "summary.json").read_text())
    gen = load_generator(distill_dir / "generator.pt", world, "ema").eval()
    teacher, _ = load_denoiser(teacher_path, world)
    teacher.eval().to(device)
    gen.to(device)
    # Student and teacher speed in one process on one device, same batch size.
    # Network passes only, for both: a latent world's decoding is left out of the student's and the teacher's timing.
    student_fn = lambda n: generate(gen, world.data_shape, n, 0, world.eval_labels, batch_size=n, device=device)[0]  # noqa: E731
    teacher_fn = _teacher_sampler(teacher, world, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max, device,
                                  tcfg.guidance_scale)
    s_sps = samples_per_second(student_fn, batch_size=world.speed_batch, n_batches=10, warmup=2)
    t_sps = samples_per_second(lambda n: teacher_fn(n, finish=False)[0], batch_size=world.speed_batch, n_batches=3,
                               warmup=1)
    nfe_t = _teacher_nfe(tcfg)
    d = exp.distill
    rec = {"experiment": name, "world": world.name, "method": exp.method_name, "K": d.K, "nfe": 1,
           "space": d.space, "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial,
           "init": exp.student.init, "gamma_eps": d.gamma_eps, "gamma_z": d.gamma_z, "iterations": d.iterations,
           "guidance_scale": d.guidance_scale, **_quality(world, acc, ref), **cond.means(),
           # convergence_auc: the run's time-averaged quality over training (mct.convergence), when it was evaluated
           **convergence_summary(read_convergence(distill_dir / CONVERGENCE_FILE), world.convergence_metric),
           "samples_per_s": s_sps, "teacher_samples_per_s": t_sps, "teacher_nfe": nfe_t,
           "speedup": s_sps / t_sps, "speedup_over_nfe": s_sps / t_sps / nfe_t,
           "sec_per_iter": summary["sec_per_iter"], "sec_per_iter_estep": summary["sec_per_iter_estep"],
           "code_sha256": summary.get("code_sha256")}  # the code distill ran (mct.resume.loaded_code_sha256)
    rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    write_json(rec, out)
    return rec
