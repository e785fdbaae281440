"""Benchmark: how close K Langevin steps of the E-step get to the E-step's exact target, on toy2d.

For a fixed nonlinear 2-D generator g and noise levels sigma, the target rho(x, z) = p_t(x) q(z | x) is computed by
quadrature (mct.estep_exact): p_t exactly (the world's mixture), the student posterior on a z grid. Chains of
mct.emd.langevin_estep start at the student's own sample (z0, eps0 ~ N(0, I)) and run K steps with the exact teacher
(MixtureDenoiser) and, as the score network, either the exact student denoiser (QuadratureStudentDenoiser: what is
left is sampler error) or a DSM-trained MLP (sampler plus score-network error). Per (world, sigma, score network,
space, z-step scheme, K) we measure
  tv_x   TV between the histogram of x_K = g(z_K) + sigma eps_K and p_t on square bins (plus one outside bin)
  tv_z   TV between the histogram of z_K and rho's z marginal on square bins
  the M-step gradient (mct.emd.mstep_loss, weight 'sigma') averaged over the chains against the exact-target
  gradient (mct.estep_exact.exact_mstep_gradient): relative L2 error and cosine, with jackknife standard errors
  over batches of chains, for each noise cancellation the run supports ('none' and 'linear' from one chain,
  'antithetic' from its own paired chains).
Finite samples put a floor under a histogram TV: tv_x_floor / tv_z_floor are the TVs of exact samples of the same
size (x ~ p_t exactly; z ~ rho_z on the grid). grad_rel_noise is the relative error an unbiased chain would show
from Monte Carlo noise alone (sqrt(trace Cov / batches) / |exact|).

The generator (fixed, documented choice): g(z) = D_p(a z, s_a) + r_theta(z), where D_p is the world's exact mixture
denoiser (the map mct's `init: teacher` starts from, here with the exact teacher, at a = 1.4, s_a = 0.4) and r_theta a
small random MLP (fixed seed, output scaled by 0.1) that carries the parameters theta of the M-step gradient. It is
nonlinear (|J| from about 0.1 on the modes to 2-3 on the bridges between them) and partially mode-covering: its
modes' weights follow the Gaussian prior, not the mixture's (heavy centre, light corners). A few hundred
Diff-Instruct steps from scratch, tried first, left a nearly uniform square rather than modes.

    python benchmarks/estep_fidelity.py                 # default: worlds toy2d (+ toy2d_skewed if in params.yaml)
    python benchmarks/estep_fidelity.py --quick --out /tmp/ef   # seconds: what the test runs
    python benchmarks/estep_fidelity.py --convergence   # grid convergence only (n vs 2n), writes convergence.*

Outputs in --out (reports/benchmarks/estep_fidelity/): fidelity.csv (every row), summary.csv (the report's table),
cancel.csv (gradient by cancellation where z moves), fidelity.md, fidelity.json (every number and the settings),
tv_vs_k.png, and with --convergence convergence.csv / convergence.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import typing
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mct.config import load_params
from mct.emd import LangevinConfig, antithetic_start, langevin_estep, mstep_loss, score_dsm_loss
from mct.estep_exact import (
    ExactTarget,
    Grid2D,
    QuadratureStudentDenoiser,
    StudentQuadrature,
    exact_estep_target,
    exact_mstep_gradient,
    jacobian_norms,
    tv_to_grid,
    z_grid_for,
)
from mct.nets.mlp import build_mlp_denoiser
from mct.worlds.registry import make_world
from mct.worlds.toy2d import MixtureDenoiser

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "benchmarks" / "estep_fidelity"
Z_HALF_WIDTH = 5.0  # z box [-5, 5]^2: the prior's mass outside is 1e-6; rho's edge mass is reported
X_BINS, Z_BINS = 24, 20  # histogram bins per axis for the TVs (the quadrature grids are refinements of them)


# --- the fixed generator and the learned score network -----------------------------------------------------


class SnapGenerator(nn.Module):
    """g(z) = D_p(a z, s_a) + 0.1 r_theta(z): the exact mixture denoiser's map plus a small trainable MLP."""

    def __init__(self, denoiser: MixtureDenoiser, a: float = 1.4, s_a: float = 0.4, hidden: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        self.denoiser = denoiser.requires_grad_(False)
        self.a, self.s_a = float(a), float(s_a)
        gen = torch.Generator().manual_seed(seed)
        self.residual = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                      nn.Linear(hidden, 2))
        with torch.no_grad():
            for p in self.residual.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.s_a, dtype=z.dtype)
        return self.denoiser(self.a * z, sigma) + 0.1 * self.residual(z)


def train_score_net(gen: nn.Module, sigma_data: float, steps: int, seed: int, progress: bool) -> nn.Module:
    """A DSM-trained MLP score network for the fixed generator (EDM preconditioning, lognormal(-1, 1.6) sigma)."""
    torch.manual_seed(seed)
    net = build_mlp_denoiser(hidden=128, depth=3, sigma_data=sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="DSM score net", disable=not progress, mininterval=2.0):
        z = torch.randn(512, 2, generator=rng)
        sigma = torch.exp(-1.0 + 1.6 * torch.randn(512, generator=rng))
        noise = torch.randn(512, 2, generator=rng)
        opt.zero_grad()
        score_dsm_loss(net, gen, z, sigma, None, noise, sigma_data).backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


# --- sampler configurations ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One chain configuration; ``cancels`` are the cancellation variants its chains give gradients for."""

    space: str
    z_step: str  # '-' where z does not move
    cfg: LangevinConfig
    cancels: tuple[str, ...]


def sampler_runs(base: LangevinConfig, gamma_z: dict[str, float]) -> list[Run]:
    """Every space; in the z spaces every z-step scheme of LangevinConfig, each with linear (giving 'none' and
    'linear') and, where the scheme exists, antithetic cancellation; in the eps/x spaces linear (exact there)."""
    fields = {f.name for f in dataclasses.fields(LangevinConfig)}
    hints = typing.get_type_hints(LangevinConfig)
    schemes = typing.get_args(hints["z_step"]) if "z_step" in hints else ("shrink",)
    has_cancel_scheme = "cancel_scheme" in fields
    runs = []
    for space in ("eps_z", "x_z", "eps", "x"):
        if space in ("eps", "x"):
            cfg = dataclasses.replace(base, space=space, cancel_noise=True, cancel_initial=True,
                                      **({"cancel_scheme": "linear"} if has_cancel_scheme else {}))
            runs.append(Run(space, "-", cfg, ("none", "linear")))
            continue
        for scheme in schemes:
            kw = {"z_step": scheme} if "z_step" in fields else {}
            cfg = dataclasses.replace(base, space=space, gamma_z=gamma_z[scheme], cancel_noise=True,
                                      cancel_initial=True, **kw,
                                      **({"cancel_scheme": "linear"} if has_cancel_scheme else {}))
            runs.append(Run(space, scheme, cfg, ("none", "linear")))
            if has_cancel_scheme:
                runs.append(Run(space, scheme, dataclasses.replace(cfg, cancel_scheme="antithetic"), ("antithetic",)))
    return runs


# --- measurements -------------------------------------------------------------------------------------------


def flat_grad(gen: nn.Module, z: Tensor, eps_tilde: Tensor, sigma: Tensor) -> Tensor:
    gen.zero_grad()
    mstep_loss(gen, z, eps_tilde, sigma, None, "sigma").backward()
    out = torch.cat([p.grad.flatten().double() for p in gen.parameters()])
    gen.zero_grad()
    return out


def gradient_stats(batch_grads: Tensor, exact: Tensor) -> dict[str, float]:
    """Relative L2 error and cosine of the batch-mean gradient vs ``exact``, jackknife SEs over batches."""
    nb = batch_grads.shape[0]

    def stats(g: Tensor) -> tuple[float, float]:
        return float((g - exact).norm() / exact.norm()), float(g @ exact / (g.norm() * exact.norm()).clamp_min(1e-300))

    mean = batch_grads.mean(0)
    rel, cos = stats(mean)
    loo = [(batch_grads.sum(0) - batch_grads[i]) / (nb - 1) for i in range(nb)]
    jr, jc = torch.tensor([stats(g)[0] for g in loo]), torch.tensor([stats(g)[1] for g in loo])
    se = lambda v: float(math.sqrt((nb - 1) / nb * ((v - v.mean()) ** 2).sum()))  # noqa: E731
    noise = float(torch.sqrt(batch_grads.var(0).sum() / nb) / exact.norm())
    return {"grad_rel_err": rel, "grad_rel_err_se": se(jr), "grad_cos": cos, "grad_cos_se": se(jc),
            "grad_rel_noise": noise}


def batch_indices(n: int, nb: int, antithetic: bool) -> list[Tensor]:
    """nb batches of chain indices; antithetic pairs (i, i + n/2) stay in one batch."""
    if not antithetic:
        return list(torch.arange(n).chunk(nb))
    h = n // 2
    return [torch.cat([c, c + h]) for c in torch.arange(h).chunk(nb)]


def x_grid_for(mixture, sigma: float, per_sigma: float) -> Grid2D:
    """A box around the mixture holding p_t (6 standard deviations past the outermost means), spacing <= sigma /
    per_sigma, n a multiple of X_BINS."""
    center = (mixture.weights[:, None] * mixture.means).sum(0).double()
    reach = float((mixture.means.double() - center).abs().max()) + 6 * math.sqrt(mixture.std**2 + sigma**2)
    n = X_BINS * math.ceil(2 * reach * per_sigma / (sigma * X_BINS))
    return Grid2D((float(center[0]), float(center[1])), reach, n)


def exact_floors(target: ExactTarget, mixture, n: int, rng: torch.Generator, reps: int = 3) -> tuple[float, float]:
    """Mean TV of exact samples of size n (x ~ p_t exactly, z ~ rho_z on the grid, spread over its cell)."""
    xb, zb = target.x_grid.coarsen(target.x_grid.n // X_BINS), target.z_grid.coarsen(target.z_grid.n // Z_BINS)
    px = target.x_grid.bin_masses(target.p_x, target.x_grid.n // X_BINS)
    rz = target.z_grid.bin_masses(target.rho_z, target.z_grid.n // Z_BINS)
    tx, tz = [], []
    zpts = target.z_grid.points
    for _ in range(reps):
        x = mixture.sample(n, rng).double() + target.sigma * torch.randn(n, 2, generator=rng, dtype=torch.float64)
        idx = torch.multinomial(target.rho_z.float(), n, replacement=True, generator=rng)
        z = zpts[idx] + (torch.rand(n, 2, generator=rng, dtype=torch.float64) - 0.5) * target.z_grid.h
        tx.append(tv_to_grid(x, xb, px))
        tz.append(tv_to_grid(z, zb, rz))
    return sum(tx) / reps, sum(tz) / reps


def measure_sigma(world_name: str, mixture, gen: nn.Module, teacher: nn.Module, learned: nn.Module, sigma: float,
                  runs: list[Run], ks: list[int], n_chains: int, n_batches: int, grid_scale: float, seed: int,
                  progress: bool) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    zg = z_grid_for(gen, sigma, half_width=Z_HALF_WIDTH, cells_per_width=grid_scale, multiple_of=Z_BINS,
                    n_min=40, n_max=400)
    quad = StudentQuadrature(gen, zg)
    xg = x_grid_for(mixture, sigma, per_sigma=grid_scale)
    target = exact_estep_target(quad, mixture.log_prob, sigma, xg)
    g_exact = exact_mstep_gradient(gen, target)
    xb, zb = xg.coarsen(xg.n // X_BINS), zg.coarsen(zg.n // Z_BINS)
    px, rz = xg.bin_masses(target.p_x, xg.n // X_BINS), zg.bin_masses(target.rho_z, zg.n // Z_BINS)
    floor_x, floor_z = exact_floors(target, mixture, n_chains, torch.Generator().manual_seed(seed + 7))
    exact_net = QuadratureStudentDenoiser(quad)
    # score-network error of the learned net, in eps units, on the student's own x_t
    rng = torch.Generator().manual_seed(seed + 11)
    xs = (gen(torch.randn(4096, 2, generator=rng)) + sigma * torch.randn(4096, 2, generator=rng)).detach()
    sv = torch.full((4096,), sigma)
    with torch.no_grad():
        err = ((learned(xs, sv) - exact_net(xs, sv)) / sigma).pow(2).sum(1).mean().sqrt()
    info = {"world": world_name, "sigma": sigma, "z_grid_n": zg.n, "z_grid_h": zg.h, "x_grid_n": xg.n,
            "x_grid_h": xg.h, "rho_z_edge_mass": target.rho_z_edge_mass, "p_x_box_mass": target.p_x_box_mass,
            "tv_x_floor": floor_x, "tv_z_floor": floor_z, "exact_grad_norm": float(g_exact.norm()),
            "learned_score_eps_rmse": float(err),
            "kl_p_q": float((target.p_x * (torch.log(target.p_x / xg.cell_area) - target.log_q_x)).sum()),
            "target_seconds": time.perf_counter() - t0}
    rows = []
    sig = torch.full((n_chains,), sigma)
    total = 2 * len(runs) * len(ks)
    bar = tqdm(total=total, desc=f"{world_name} sigma={sigma:g}", disable=not progress, mininterval=2.0)
    for score_name, score_net in (("exact", exact_net), ("learned", learned)):
        for run in runs:
            anti = run.cancels == ("antithetic",)
            for K in ks:
                # the same seed for every run and K: chains of different K share their start and noise prefix, so
                # a curve against K follows one set of trajectories (the curvature scheme's power iteration draws
                # first, which shifts its noise but not its start)
                rng = torch.Generator().manual_seed(seed + 1)
                z0, eps0 = torch.randn(n_chains, 2, generator=rng), torch.randn(n_chains, 2, generator=rng)
                s_in = sig
                if anti:
                    z0, eps0, s_in, _ = antithetic_start(z0, eps0, sig, None)
                t = time.perf_counter()
                res = langevin_estep(gen, teacher, score_net, z0, eps0, s_in, None, dataclasses.replace(run.cfg, K=K),
                                     rng)
                sec = time.perf_counter() - t
                with torch.no_grad():
                    x_k = gen(res.z) + sigma * res.eps
                row = {"world": world_name, "sigma": sigma, "score": score_name, "space": run.space,
                       "z_step": run.z_step, "gamma_z": run.cfg.gamma_z if run.z_step != "-" else 0.0, "K": K,
                       "tv_x": tv_to_grid(x_k, xb, px), "tv_z": tv_to_grid(res.z, zb, rz),
                       "tv_x_floor": floor_x, "tv_z_floor": floor_z,
                       "z_shift": float((res.z - z0).norm(dim=1).mean()),
                       "reset_frac": float(getattr(res, "reset", torch.zeros(1)).float().mean()),
                       "estep_seconds": sec}
                signals = {"none": res.eps, "linear": res.eps_tilde, "antithetic": res.eps_tilde}
                for cancel in run.cancels:
                    grads = torch.stack([flat_grad(gen, res.z[i], signals[cancel][i], s_in[i])
                                         for i in batch_indices(n_chains, n_batches, anti)])
                    rows.append({**row, "cancel": cancel, **gradient_stats(grads, g_exact)})
                bar.update()
    bar.close()
    return rows, info


def convergence(world_name: str, mixture, gen: nn.Module, sigma: float, grid_scale: float, seed: int) -> dict:
    """The exact quantities on the benchmark's grids against grids twice as fine in z (and, separately, in x)."""
    zg = z_grid_for(gen, sigma, half_width=Z_HALF_WIDTH, cells_per_width=grid_scale, multiple_of=Z_BINS, n_min=40,
                    n_max=400)
    zg2 = Grid2D(zg.center, zg.half_width, 2 * zg.n)
    xg = x_grid_for(mixture, sigma, per_sigma=grid_scale)
    xg2 = Grid2D(xg.center, xg.half_width, 2 * xg.n)
    q1, q2 = StudentQuadrature(gen, zg), StudentQuadrature(gen, zg2)
    t1 = exact_estep_target(q1, mixture.log_prob, sigma, xg)
    t2 = exact_estep_target(q2, mixture.log_prob, sigma, xg)
    t3 = exact_estep_target(q1, mixture.log_prob, sigma, xg2)
    g1, g2, g3 = (exact_mstep_gradient(gen, t) for t in (t1, t2, t3))
    rng = torch.Generator().manual_seed(seed)
    x = torch.cat([(gen(torch.randn(1024, 2, generator=rng)) + sigma * torch.randn(1024, 2, generator=rng)).detach(),
                   mixture.sample(1024, rng) + sigma * torch.randn(1024, 2, generator=rng)]).double()
    d1, d2 = q1.posterior_mean_g(x, sigma), q2.posterior_mean_g(x, sigma)
    f = zg.n // Z_BINS
    rz1, rz2 = zg.bin_masses(t1.rho_z, f), zg2.bin_masses(t2.rho_z, 2 * f)
    return {"world": world_name, "sigma": sigma, "z_n": zg.n, "z_n_fine": zg2.n, "x_n": xg.n, "x_n_fine": xg2.n,
            "denoiser_max_diff_eps": float((d1 - d2).abs().max() / sigma),
            "log_q_max_diff": float((q1.log_marginal(x, sigma) - q2.log_marginal(x, sigma)).abs().max()),
            "rho_z_tv_z_refined": 0.5 * float((rz1 - rz2).abs().sum()),
            "rho_z_tv_x_refined": 0.5 * float((zg.bin_masses(t1.rho_z, f) - zg.bin_masses(t3.rho_z, f)).abs().sum()),
            "grad_rel_diff_z_refined": float((g1 - g2).norm() / g2.norm()),
            "grad_rel_diff_x_refined": float((g1 - g3).norm() / g3.norm()),
            "rho_z_edge_mass": t1.rho_z_edge_mass}


# --- outputs ------------------------------------------------------------------------------------------------


def markdown(df: pd.DataFrame) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """The report's table: per world, sigma, score, space and z step, at the largest K and at K=8, TV and the
    gradient of the template's cancellation ('antithetic' where z moves and it exists, else 'linear')."""
    cancel_pref = df.groupby(["world", "sigma", "score", "space", "z_step"])["cancel"].transform(
        lambda c: "antithetic" if (c == "antithetic").any() else "linear")
    d = df[df["cancel"] == cancel_pref]
    kmax = int(d["K"].max())
    keep = d[d["K"].isin(sorted({min(8, kmax), kmax}))]
    cols = ["world", "sigma", "score", "space", "z_step", "cancel", "K", "tv_x", "tv_x_floor", "tv_z", "tv_z_floor",
            "grad_rel_err", "grad_rel_err_se", "grad_cos", "z_shift"]
    return keep[cols].sort_values(["world", "sigma", "score", "space", "z_step", "K"]).reset_index(drop=True)


def cancel_table(df: pd.DataFrame) -> pd.DataFrame:
    """Where z moves, the M-step gradient under each noise cancellation (K = 8 and the largest K)."""
    kmax = int(df["K"].max())
    d = df[df["space"].isin(["eps_z", "x_z"]) & df["K"].isin(sorted({min(8, kmax), kmax}))]
    wide = d.pivot_table(index=["world", "sigma", "score", "space", "z_step", "K"], columns="cancel",
                         values=["grad_cos", "grad_rel_err"])
    wide.columns = [f"{v}_{c}" for v, c in wide.columns]
    return wide.reset_index()


def figure(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = df.drop_duplicates(["world", "sigma", "score", "space", "z_step", "K"]).copy()
    d["sampler"] = d["space"].map({"eps_z": "(eps, z)", "x_z": "(x, z)", "eps": "eps", "x": "x"}) + \
        d["z_step"].map(lambda s: "" if s == "-" else f" {s}")
    worlds, sigmas = sorted(d["world"].unique()), sorted(d["sigma"].unique())
    rows = [(w, metric) for w in worlds for metric in ("tv_x", "tv_z")]
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(len(rows), len(sigmas), figsize=(4.2 * len(sigmas), 3.2 * len(rows)), squeeze=False,
                                 sharex=True)
        for r, (w, metric) in enumerate(rows):
            for c, s in enumerate(sigmas):
                ax = axes[r, c]
                sub = d[(d["world"] == w) & (d["sigma"] == s)]
                sns.lineplot(data=sub, x="K", y=metric, hue="sampler", style="score", markers=True, ax=ax,
                             legend=(r == 0 and c == len(sigmas) - 1))
                floor = sub[f"{metric}_floor"].iloc[0] if len(sub) else None
                if floor is not None:
                    ax.axhline(floor, color="grey", ls=":", lw=1)
                ax.set_xscale("symlog", linthresh=1)
                ax.set_title(f"{w}, sigma={s:g}: {'x_K vs p_t' if metric == 'tv_x' else 'z_K vs rho_z'}", fontsize=9)
                ax.set_ylabel("TV")
        if len(sigmas):
            sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle("E-step fidelity: TV to the exact target after K steps (dotted: exact samples' floor)")
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--worlds", default="",
                    help="comma-separated toy2d worlds (default: toy2d, and toy2d_skewed if params has it)")
    ap.add_argument("--template", default="toy2d", help="params template whose distill settings are the base sampler")
    ap.add_argument("--sigmas", default="0.1,0.3,1.0")
    ap.add_argument("--ks", default="0,1,4,8,16,32")
    ap.add_argument("--chains", type=int, default=3072)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--gamma-z-curvature", type=float, default=0.3,
                    help="gamma_z of the 'curvature' scheme (a step in units of the posterior's width)")
    ap.add_argument("--grid-scale", type=float, default=0.6,
                    help="grid cells per sigma / max|J| (z) and per sigma (x); --convergence checks it")
    ap.add_argument("--dsm-steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    ap.add_argument("--convergence", action="store_true", help="only the grid convergence check")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.sigmas, args.ks, args.chains, args.batches, args.dsm_steps = "0.3", "0,2", 256, 4, 50
        args.grid_scale = 0.5
    progress = not args.no_progress
    t_start = time.perf_counter()
    params = load_params(args.params)
    names = [w for w in args.worlds.split(",") if w] or [w for w in ("toy2d", "toy2d_skewed") if w in params.worlds]
    if args.quick:
        names = names[:1]
    dist = params.templates[args.template]["distill"] if isinstance(params.templates, dict) else None
    base_kw = {k: dist[k] for k in ("gamma_eps", "gamma_z", "z_step_ref") if dist and k in dist}
    base = LangevinConfig(**base_kw)
    gamma_z = {"shrink": base.gamma_z, "curvature": args.gamma_z_curvature}
    runs = sampler_runs(base, gamma_z)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, infos, conv = [], [], []
    for name in names:
        world = make_world(name, params.worlds[name])
        if world.kind != "toy2d":
            raise SystemExit(f"world {name!r} is not a toy2d world")
        mixture = world.mixture
        teacher = MixtureDenoiser(mixture)
        gen = SnapGenerator(MixtureDenoiser(mixture), seed=args.seed)
        if args.convergence:
            for s in sigmas:
                conv.append(convergence(name, mixture, gen, s, args.grid_scale, args.seed))
                print(json.dumps(conv[-1]), flush=True)
            continue
        jn = jacobian_norms(gen, Grid2D((0.0, 0.0), 3.0, 120).points)
        learned = train_score_net(gen, world.sigma_data, args.dsm_steps, args.seed, progress)
        for s in sigmas:
            r, info = measure_sigma(name, mixture, gen, teacher, learned, s, runs, ks, args.chains, args.batches,
                                    args.grid_scale, args.seed, progress)
            info["jacobian_norm_max"], info["jacobian_norm_median"] = float(jn.max()), float(jn.median())
            rows += r
            infos.append(info)
    if args.convergence:
        cdf = pd.DataFrame(conv)
        cdf.to_csv(out / "convergence.csv", index=False, lineterminator="\n")
        (out / "convergence.md").write_text(markdown(cdf))
        return
    df = pd.DataFrame(rows)
    df.to_csv(out / "fidelity.csv", index=False, lineterminator="\n")
    summ = summary_table(df)
    summ.to_csv(out / "summary.csv", index=False, lineterminator="\n")
    canc = cancel_table(df)
    canc.to_csv(out / "cancel.csv", index=False, lineterminator="\n")
    (out / "fidelity.md").write_text("# E-step fidelity (toy2d, exact target)\n\n" + markdown(summ)
                                     + "\n## M-step gradient by noise cancellation (z moving)\n\n" + markdown(canc)
                                     + "\n## Grids\n\n" + markdown(pd.DataFrame(infos)))
    figure(df, out / "tv_vs_k.png")
    settings = {"sigmas": sigmas, "ks": ks, "chains": args.chains, "batches": args.batches,
                "base": dataclasses.asdict(base), "gamma_z": gamma_z, "grid_scale": args.grid_scale,
                "dsm_steps": args.dsm_steps, "seed": args.seed, "worlds": names, "quick": args.quick,
                "generator": "SnapGenerator(a=1.4, s_a=0.4) + 0.1 * random MLP residual",
                "wall_seconds": time.perf_counter() - t_start}
    (out / "fidelity.json").write_text(json.dumps({"settings": settings, "grids": infos, "rows": rows}, indent=1)
                                       + "\n")
    print(f"wrote {out} in {settings['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
