"""The paper's Figure 1 on an image world (digits): a long E-step chain moves the one-step student's samples
towards the teacher.

From the student's own samples (z_0 ~ N(0, I), x_0 = g(z_0) + sigma eps_0, eps_0 ~ N(0, I)), ``--steps`` joint
Langevin steps of :func:`mct.emd.langevin_estep` (space x_z by default, as in the paper's figure; the experiment's
step sizes and z-step scheme) run on the E-step target at one noise level sigma. At each snapshot k the script keeps
  x_k = g(z_k) + sigma eps_k     the chain's noisy state,
  D_teacher(x_k, sigma)          its teacher denoising (the figure's top row),
  g(z_k)                         the generator's image of the moved latent (the figure's bottom row),
and measures how far each set is from the teacher: the Frechet distance (pixel space and, when the digits
classifier `mct features` trained is there, its penultimate features) to ``--n-ref`` teacher samples (Heun, the
teacher's sampler steps), and how far the chains moved (mean ||z_k - z_0||, RMS per coordinate of z and x).

The target and the score network (why the teacher cannot stand in for it). The E-step samples
    rho_t(x_t, z) = p_teacher,t(x_t) q_theta(z | x_t),
    q_theta(z | x_t) = N(x_t; g(z), sigma^2 I) N(z; 0, I) / q_theta,t(x_t),
whose x marginal is the teacher's noisy marginal p_teacher,t exactly. Its x drift is
grad_x log rho = s_teacher(x) - s_student(x) - (x - g(z)) / sigma^2: the reweighting p_teacher / q_theta needs the
score of the student's noisy marginal q_theta,t, which the distillation's score network psi learns by DSM on g(z)
samples (mct.emd: d = eps_psi - eps_teacher). With the teacher as psi's stand-in, d = 0 and the target becomes the
student's own joint q_theta(x_t, z), where the chain already starts: the snapshots would show the chain wandering
inside the student's distribution, not moving towards the teacher. So the teacher is not used as the stand-in.
The score network comes from, in this order:
  1. ``--score PATH``: a file with a 'score' state dict: a distill resume state (runs/work/<run>/state-*.pt) or a
     student-init file (student_init.pt: there 'score' is the teacher's copy, so d = 0: the start of distillation);
  2. the generator file itself when it holds one (a student-init file);
  3. the newest resume state in the run's work folder (mct.paths.work_dir: distill writes the final state there,
     with 'score' and 'generator', when the run finishes; generator.pt itself holds no score network);
  4. otherwise ``--score-fit-steps`` DSM steps (the experiment's dsm_sigma, lr_s, betas_s, batch_size) of a copy
     of the teacher on the generator's samples: how distillation's score network starts and learns.
The source is recorded in the JSON. The generator's weights default to 'generator' (the raw weights the score
network tracked during distillation; ``--generator-key ema`` for the EMA).

Chains run in segments between snapshots (one langevin_estep call each, K = the segment's length): the x_z chain
resumes exactly where it stopped (x = g(z) + sigma eps is rebuilt from the returned eps). Per call, the z-step size
is fixed for the segment (the 'curvature' scheme re-measures it at the segment's start) and the chain guard
(z_guard, relative to the segment's start) may reset a chain to the segment's start; resets are counted. Noise
cancellation is off: it changes only the M-step's signal eps_tilde, never where a chain goes (and its antithetic
form would pair the chains).

Floors, for reading the distances: the same distance for ``--n`` fresh teacher samples (g(z_k)'s floor), and for the
teacher denoising of noised teacher samples, D_teacher(x0 + sigma eps, sigma) (D_teacher(x_k)'s floor: at
convergence x_k ~ p_teacher,t and the top row is distributed exactly so). Frechet distances of 64 samples are
biased upwards; compare the snapshots with each other and with the floors, which have the same sample size.

    python benchmarks/estep_chain.py --teacher runs/teachers/digits_unet/teacher.pt \\
        --generator runs/experiments/digits_emd_k4/seed0/distill/generator.pt --experiment digits_emd_k4

Outputs in --out (reports/benchmarks/estep_chain/): estep_chain.png (the figure), estep_chain.json (settings,
per-snapshot distances and moves, floors), estep_chain.npz (z_k, x_k, D_teacher(x_k), g(z_k) per snapshot).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("reports") / "benchmarks" / "estep_chain"
SPACES = ("x_z", "eps_z", "x", "eps")


# --- arguments ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True,
                    help="teacher denoiser file as `mct teacher` writes it (runs/teachers/<teacher>/teacher.pt)")
    ap.add_argument("--generator", type=Path, required=True,
                    help="distilled generator (runs/experiments/<exp>/seed<k>/distill/generator.pt) or a "
                         "student-init file (student_init.pt)")
    ap.add_argument("--generator-key", choices=("generator", "ema"), default="generator",
                    help="which weights of a distill output: the raw ones the score network tracked (default) or "
                         "the EMA")
    ap.add_argument("--score", type=Path, default=None,
                    help="file holding the score network ('score'): a distill resume state or a student-init "
                         "file; default: the generator file's own, else the newest state in the run's work folder, "
                         "else fitted (--score-fit-steps)")
    ap.add_argument("--score-fit-steps", type=int, default=500,
                    help="DSM steps of a teacher copy on the generator's samples when no score network is found "
                         "(0: fail instead)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--experiment", default="digits_emd_k4",
                    help="experiment of params.yaml giving the world, the sigma distributions and the Langevin "
                         "settings")
    ap.add_argument("--features", type=Path, default=None,
                    help="digits classifier for feature-space distances (default: runs/features/<world>/"
                         "feature_net.pt when it exists; without one only pixel distances are measured)")
    ap.add_argument("--space", choices=SPACES, default="x_z",
                    help="the chain's space; x_z: joint (x, z) as in the paper's Figure 1 (default)")
    ap.add_argument("--steps", type=int, default=300, help="Langevin steps in all")
    ap.add_argument("--snapshots", default="0,10,30,100,300",
                    help="comma-separated steps to record (each <= --steps; --steps is always recorded)")
    ap.add_argument("--sigma", type=float, default=None,
                    help="noise level of the chain. Default: the median of the experiment's M-step sigma "
                         "distribution (exp(p_mean) for lognormal, sqrt(sigma_min sigma_max) for loguniform): "
                         "0.45 on digits, a typical level the E-step runs at in distillation. There the teacher's "
                         "denoiser is sharp enough to show a digit's shape while the noise still lets the chain "
                         "mix; at much smaller sigma the target is close to the student's own joint and the chain "
                         "barely moves, at much larger sigma D_teacher(x) is a blur")
    ap.add_argument("--n", type=int, default=64, help="chains (samples shown)")
    ap.add_argument("--n-ref", type=int, default=1000, help="teacher samples the distances are measured against")
    ap.add_argument("--teacher-steps", type=int, default=None,
                    help="Heun steps of the reference teacher samples (default: the teacher's sampler_steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def snapshot_steps(text: str, steps: int) -> list[int]:
    try:
        snaps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--snapshots: comma-separated integers expected, got {text!r}") from None
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    bad = [s for s in snaps if not 0 <= s <= steps]
    if bad:
        raise SystemExit(f"--snapshots: {bad} outside [0, --steps={steps}]")
    return sorted(set(snaps) | {steps})


def check_inputs(args: argparse.Namespace) -> None:
    """Every named input exists and the numbers make sense, before any work."""
    named = [("--teacher", args.teacher), ("--generator", args.generator), ("--params", args.params)]
    named += [(flag, p) for flag, p in (("--score", args.score), ("--features", args.features)) if p is not None]
    missing = [f"{flag} {p}" for flag, p in named if not Path(p).is_file()]
    if missing:
        raise SystemExit("estep_chain: missing input file(s): " + "; ".join(missing)
                         + " (run `dvc repro` or pass the paths of your run)")
    for flag, v, lo in (("--n", args.n, 2), ("--n-ref", args.n_ref, 2), ("--score-fit-steps", args.score_fit_steps, 0)):
        if v < lo:
            raise SystemExit(f"{flag} must be >= {lo}, got {v}")
    if args.sigma is not None and not (args.sigma > 0 and math.isfinite(args.sigma)):
        raise SystemExit(f"--sigma must be a positive number, got {args.sigma}")


def median_sigma(sc: Any) -> float:
    """The median of a params.yaml sigma distribution (mct.config.SigmaConfig)."""
    if sc.kind == "lognormal":
        return math.exp(sc.p_mean)
    return math.sqrt(sc.sigma_min * sc.sigma_max)


# --- networks -------------------------------------------------------------------------------------------------


def work_dir_of(generator: Path) -> Path | None:
    """runs/work/<run> for a distill output runs/experiments/<run>/distill/generator.pt (mct.paths layout)."""
    parts = generator.parent.parts
    if generator.parent.name != "distill" or "experiments" not in parts[:-1]:
        return None
    i = len(parts) - 1 - parts[::-1].index("experiments")
    run = parts[i + 1:-1]
    return Path(*parts[:i], "work", *run) if run else None


def find_score(args: argparse.Namespace, gen_ckpt: dict[str, Any]) -> tuple[dict[str, Tensor] | None, str,
                                                                              dict[str, Any] | None]:
    """(score state dict or None, its source, the file it came from) in the order of the module docstring."""
    from mct.io import load_torch
    from mct.resume import list_states

    if args.score is not None:
        ck = load_torch(args.score)
        if not isinstance(ck, dict) or "score" not in ck:
            raise SystemExit(f"--score {args.score}: holds no score network (no 'score' entry)")
        return ck["score"], f"file {args.score}", ck
    if "score" in gen_ckpt:
        return gen_ckpt["score"], f"generator file {args.generator}", gen_ckpt
    work = work_dir_of(args.generator)
    states = list_states(work) if work is not None and work.is_dir() else []
    if states:
        step, path = states[0]
        ck = load_torch(path)
        return ck["score"], f"resume state {path} (step {step})", ck
    return None, "", None


def same_weights(denoiser_state: dict[str, Tensor], other: dict[str, Tensor]) -> bool:
    """Whether ``other`` (a Generator's state dict, keys 'denoiser.*', as resume states hold it, or a denoiser's)
    holds the same weights as ``denoiser_state`` (generator.pt's, keys without the prefix)."""
    other = {k.removeprefix("denoiser."): v for k, v in other.items()}
    return other.keys() == denoiser_state.keys() and all(torch.equal(v.cpu(), other[k].cpu())
                                                         for k, v in denoiser_state.items())


def fit_score(world: Any, teacher: nn.Module, gen: nn.Module, d: Any, steps: int, seed: int,
              device: torch.device, progress: bool) -> nn.Module:
    """A teacher copy fine-tuned by DSM on the generator's samples (distill's score phase, generator fixed)."""
    from mct.emd import score_dsm_loss

    torch.manual_seed(seed)
    net = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=d.lr_s, betas=d.betas_s)
    sigma_dist = d.dsm_sigma.build()
    rng = torch.Generator(device=device).manual_seed(seed)
    for _ in tqdm(range(steps), desc="fit score network", disable=not progress, mininterval=1.0):
        z = torch.randn((d.batch_size, *world.data_shape), generator=rng, device=device)
        labels = world.draw_labels(d.batch_size, rng, device)
        sigma = sigma_dist.sample(d.batch_size, rng, device)
        noise = torch.randn((d.batch_size, *world.data_shape), generator=rng, device=device)
        opt.zero_grad(set_to_none=True)
        score_dsm_loss(net, gen, z, sigma, labels, noise, world.sigma_data).backward()
        opt.step()
    return net.eval().requires_grad_(False)


def balanced_labels(world: Any, n: int, device: torch.device) -> Tensor | None:
    """One-hot labels 0, 1, ..., C-1, 0, ... (None for an unconditional world): every class in every column."""
    if world.label_dim == 0:
        return None
    return torch.nn.functional.one_hot(torch.arange(n, device=device) % world.label_dim, world.label_dim).float()


# --- distances ------------------------------------------------------------------------------------------------


class Distances:
    """Frechet distances of sample sets to the reference teacher samples, in pixels and (optionally) features."""

    def __init__(self, ref: Tensor, feature_net: nn.Module | None) -> None:
        self.feature_net = feature_net
        self.ref = {"pixels": self._moments(self._pixels(ref))}
        if feature_net is not None:
            self.ref["features"] = self._moments(self._features(ref))

    @staticmethod
    def _pixels(x: Tensor) -> np.ndarray:
        return x.clamp(-1, 1).double().flatten(1).cpu().numpy()

    @torch.no_grad()
    def _features(self, x: Tensor) -> np.ndarray:
        dev = next(self.feature_net.parameters()).device
        return self.feature_net.features(x.clamp(-1, 1).to(dev)).double().cpu().numpy()

    @staticmethod
    def _moments(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))

    def __call__(self, x: Tensor) -> dict[str, float | None]:
        from scipy.linalg import LinAlgWarning

        from mct.metrics.frechet import frechet_to_gaussian

        with warnings.catch_warnings():  # digits' constant border pixels: frechet_to_gaussian's ridge handles it
            warnings.simplefilter("ignore", LinAlgWarning)
            out: dict[str, float | None] = {"pixels": frechet_to_gaussian(self._pixels(x), *self.ref["pixels"])}
            out["features"] = (frechet_to_gaussian(self._features(x), *self.ref["features"])
                               if self.feature_net is not None else None)
        return out


# --- the figure -----------------------------------------------------------------------------------------------


def write_figure(snaps: list[dict[str, Any]], images: dict[str, list[Tensor]], teacher_x: Tensor,
                 teacher_denoised: Tensor, nrow: int, sigma: float, space: str, path: Path) -> None:
    """Two rows of sample grids, one column per snapshot plus the teacher's: D_teacher(x_k, sigma) and g(z_k)."""
    from mct.images import image_grid
    from mct.report_figures import new_figure, save_figure

    ncols = len(snaps) + 1
    fig, axes = new_figure(ncols, 2, size=(2.3, 2.0))
    rows = [("denoised", f"D_teacher(x_k, {sigma:.3g})", teacher_denoised),
            ("generator", "g(z_k)", teacher_x)]
    for r, (key, label, ref) in enumerate(rows):
        panels = [(f"step {s['step']}", images[key][i], s[f"fd_pixels_{key}"]) for i, s in enumerate(snaps)]
        ref_title = "teacher: D(x0 + sigma eps)" if key == "denoised" else "teacher samples"
        panels.append((ref_title, ref, None))
        for c, (title, x, fd) in enumerate(panels):
            ax = axes[r * ncols + c]
            grid = image_grid(x.float().cpu(), nrow=nrow, upscale=4)
            ax.imshow(np.asarray(grid), cmap="gray" if grid.mode == "L" else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title + ("" if fd is None else f"\nFD pixels {fd:.3g}"), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"E-step chain ({space}, sigma {sigma:.3g}) from the student's samples: top the teacher's "
                 "denoising of x_k, bottom the generator's image of z_k", fontsize=9)
    save_figure(fig, path)


# --- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    snaps_at = snapshot_steps(args.snapshots, args.steps)
    check_inputs(args)

    from mct.config import MAX_K, ConfigError, load_params
    from mct.diffusion import GuidedDenoiser, edm_heun_sample
    from mct.emd import ChainExplosionError, langevin_estep
    from mct.io import load_torch, write_json
    from mct.paths import feature_net as feature_net_path
    from mct.student import build_generator
    from mct.teacher import load_denoiser
    from mct.worlds.registry import make_world

    try:
        params = load_params(args.params)
        exp = params.experiment(args.experiment)
        tcfg = params.teacher(exp.teacher)
    except ConfigError as e:
        raise SystemExit(f"estep_chain: {e}") from None
    world = make_world(exp.world, params.worlds[exp.world])
    if len(world.data_shape) != 3:
        raise SystemExit(f"estep_chain: world {exp.world!r} is not an image world (data shape {world.data_shape})")
    gen_ckpt = load_torch(args.generator)
    if not isinstance(gen_ckpt, dict) or gen_ckpt.get("format") not in ("mct-student-v1", "mct-generator-v1"):
        raise SystemExit(f"--generator {args.generator}: not an mct student or generator file")
    if args.generator_key not in gen_ckpt:
        raise SystemExit(f"--generator {args.generator}: has no {args.generator_key!r} weights")
    features = args.features or feature_net_path(world.name)
    d = exp.distill
    sigma = args.sigma if args.sigma is not None else median_sigma(d.mstep_sigma)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    t_start = time.perf_counter()

    # networks: teacher (as the E-step reads it), generator, score network
    teacher, _ = load_denoiser(args.teacher, world)
    teacher = teacher.to(device).eval().requires_grad_(False)
    estep_teacher: nn.Module = world.analytic_denoiser().to(device) if d.estep_teacher == "analytic" else teacher
    if d.guidance_scale != 1.0:
        estep_teacher = GuidedDenoiser(estep_teacher, lambda b: world.null_labels(b, device), d.guidance_scale)
    gen = build_generator(world, gen_ckpt["spec"], gen_ckpt["sigma_init"], gen_ckpt[args.generator_key])
    gen = gen.to(device).eval().requires_grad_(False)
    score_state, score_source, score_file = find_score(args, gen_ckpt)
    score_matches = None
    if score_state is not None:
        score = world.build_network(gen_ckpt["spec"]["arch"], gen_ckpt["spec"]["arch_kwargs"])
        score.load_state_dict(score_state)
        score = score.to(device).eval().requires_grad_(False)
        if score_file is not gen_ckpt and args.generator_key == "generator" and "generator" in score_file:
            score_matches = same_weights(gen_ckpt["generator"], score_file["generator"])
            if not score_matches:
                print(f"estep_chain: warning: the score network's file ({score_source}) holds other generator "
                      f"weights than --generator's {args.generator_key!r}: the score network tracked another "
                      "generator", file=sys.stderr)
    elif args.score_fit_steps > 0:
        print(f"estep_chain: no score network found (generator.pt holds none, and no resume state in "
              f"{work_dir_of(args.generator)}); fitting one: {args.score_fit_steps} DSM steps of a teacher copy on "
              "the generator's samples", file=sys.stderr)
        score = fit_score(world, teacher, gen, d, args.score_fit_steps, args.seed + 2, device, progress)
        score_source = f"fitted: {args.score_fit_steps} DSM steps of a teacher copy on the generator's samples"
    else:
        raise SystemExit("estep_chain: no score network: pass --score (a distill resume state, runs/work/<run>/"
                         "state-*.pt) or allow --score-fit-steps > 0")
    if d.guide_score_net and d.guidance_scale != 1.0:
        score = GuidedDenoiser(score, lambda b: world.null_labels(b, device), d.guidance_scale)
    feature_net = None
    if Path(features).is_file():
        from mct.metrics.features import load_feature_net

        feature_net = load_feature_net(features)[0].to(device)

    # reference teacher samples and the floors
    steps_heun = args.teacher_steps or tcfg.sampler_steps
    cpu_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + 1)

    def teacher_samples(n: int) -> Tensor:
        latents = torch.randn((n, *world.data_shape), generator=cpu_rng).to(device)
        x, _ = edm_heun_sample(teacher, latents, balanced_labels(world, n, device), steps_heun, tcfg.sigma_min,
                               tcfg.sigma_max)
        return x

    s_vec = torch.full((args.n,), sigma, device=device)
    labels = balanced_labels(world, args.n, device)
    ref = teacher_samples(args.n_ref)
    dist = Distances(ref, feature_net)
    floor_x = teacher_samples(args.n)
    with torch.no_grad():
        floor_noise = torch.randn(floor_x.shape, generator=cpu_rng).to(device)
        floor_denoised = estep_teacher(floor_x + sigma * floor_noise, s_vec, labels)
    floors = {"teacher_samples": dist(floor_x), "teacher_denoised": dist(floor_denoised)}

    # the chain
    chain_rng = torch.Generator(device=device).manual_seed(args.seed)
    z0 = torch.randn((args.n, *world.data_shape), generator=chain_rng, device=device)
    eps0 = torch.randn((args.n, *world.data_shape), generator=chain_rng, device=device)
    base = dataclasses.replace(d.langevin(), space=args.space, cancel_noise=False)
    z, eps = z0, eps0
    with torch.no_grad():
        x0 = gen(z0, labels) + sigma * eps0
    snaps: list[dict[str, Any]] = []
    images: dict[str, list[Tensor]] = {"denoised": [], "generator": []}
    arrays: dict[str, list[np.ndarray]] = {"z": [], "x": [], "denoised": [], "generator": []}
    resets = 0
    done = 0
    bar = tqdm(total=args.steps, desc=f"E-step chain {args.space}", disable=not progress, mininterval=1.0)
    for k in snaps_at:
        while done < k:  # one langevin_estep call per segment (at most MAX_K steps each)
            seg = min(k - done, MAX_K)
            try:
                res = langevin_estep(gen, estep_teacher, score, z, eps, s_vec, labels,
                                     dataclasses.replace(base, K=seg), chain_rng)
            except ChainExplosionError as e:
                raise SystemExit(f"estep_chain: the chain exploded between steps {done} and {done + seg}: {e}"
                                 ) from None
            z, eps = res.z, res.eps
            resets += int(res.reset.sum())
            bar.update(seg)
            done += seg
        with torch.no_grad():
            g = gen(z, labels)
            x = g + sigma * eps
            den = estep_teacher(x, s_vec, labels)
        fd_den, fd_gen = dist(den), dist(g)
        snaps.append({
            "step": k,
            "z_move_norm": float((z - z0).flatten(1).norm(dim=1).mean()),
            "z_move_rms": float((z - z0).flatten(1).pow(2).mean(1).sqrt().mean()),
            "x_move_rms": float((x - x0).flatten(1).pow(2).mean(1).sqrt().mean()),
            "fd_pixels_denoised": fd_den["pixels"], "fd_pixels_generator": fd_gen["pixels"],
            "fd_features_denoised": fd_den["features"], "fd_features_generator": fd_gen["features"],
            "chains_reset": resets})
        images["denoised"].append(den.cpu())
        images["generator"].append(g.cpu())
        for key, t in (("z", z), ("x", x), ("denoised", den), ("generator", g)):
            arrays[key].append(t.cpu().numpy())
    bar.close()
    seconds = time.perf_counter() - t_start

    gz = 0.0
    if base.moves_z:
        from mct.emd import z_step_size

        step = z_step_size(base, gen, z0, s_vec, labels, torch.Generator(device=device).manual_seed(0), False)
        gz = float(torch.as_tensor(step).float().mean())
    nrow = world.label_dim if 0 < world.label_dim <= 16 else max(1, math.isqrt(args.n - 1) + 1)
    record = {
        "settings": {
            "experiment": args.experiment, "world": world.name, "teacher": str(args.teacher),
            "generator": str(args.generator), "generator_key": args.generator_key, "score_source": score_source,
            "score_matches_generator": score_matches, "space": args.space, "sigma": sigma,
            "sigma_rule": "given" if args.sigma is not None else "median of the M-step sigma distribution",
            "steps": args.steps, "snapshots": snaps_at, "n": args.n, "n_ref": args.n_ref,
            "teacher_sampler_steps": steps_heun, "seed": args.seed, "labels": "balanced (i mod classes)",
            "feature_net": str(features) if feature_net is not None else None,
            "langevin": {k: v for k, v in dataclasses.asdict(base).items() if k != "K"},
            "z_step_mean": gz, "device": str(device)},
        "snapshots": snaps,
        "floors": floors,
        "seconds": round(seconds, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(record, args.out / "estep_chain.json")
    np.savez_compressed(args.out / "estep_chain.npz", steps=np.array(snaps_at), z0=z0.cpu().numpy(),
                        labels=(labels.argmax(1).cpu().numpy() if labels is not None else np.zeros(0)),
                        **{k: np.stack(v) for k, v in arrays.items()})
    write_figure(snaps, images, floor_x.cpu(), floor_denoised.cpu(), nrow, sigma, args.space,
                 args.out / "estep_chain.png")
    print(f"estep_chain: {len(snaps)} snapshots, {args.steps} steps in {seconds:.1f} s -> {args.out}")
    return record


if __name__ == "__main__":
    main()
