"""Why the one-step toy2d students stay blurry: Diff-Instruct's mode precision under one change at a time, against the
student's starting point and a supervised fit to the teacher's map, over paired seeds.

Diff-Instruct (the toy2d template at K = 1, gamma_z = 0) is the best one-step row, with mode precision about 0.5
against the teacher's 0.93. Each setting below changes one suspect of the template and keeps the rest:

- budget: 4x the iterations;
- sigma*: the noise level at which the generator starts, g(z) = D(sigma* z, sigma*);
- learning rates: the generator's, and the score network's (lag of the student-score estimate);
- score steps: 4 score-network updates per generator update (lag again, at 4x its cost);
- w(sigma): the M-step's noise distribution moved to small sigmas, and the flat weight w = 1;
- EMA: decay 0 (the raw generator is evaluated) against the template's 0.99;
- the two that helped most together (4x budget, small-sigma M-step), for Diff-Instruct and the template's EMD-8.

Two reference rows train nothing by distillation:

- ``init``: the generator before distillation (the teacher's denoiser at sigma*);
- ``ode_regression``: the same network, initialised the same way, fitted by plain regression to the teacher's own
  deterministic sampler (18 Heun steps, z -> x), at the same batch, learning rate, EMA and iteration budget as
  distillation (and at 4x). It measures how far this network and optimiser get towards one sharp map, told
  exactly which x each z should reach and free of any score estimate: a reference for the budget, not a bound
  (distillation may find another, easier map onto the modes).

Every row scores 20,000 samples by the exact mode statistics plus the median distance to the nearest mode in mode
standard deviations (1.18 for exact samples). Rows are appended to runs.csv as they finish, finished ones are skipped.

  python benchmarks/toy2d_precision.py --seeds 0,1,2,3,4 [--shard 0/2]
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from toy2d_sweep import (
    METRICS,
    TEACHERS,
    experiment,
    mode_distance_median,
    pending,
    run_arguments,
    run_one,
    run_pending,
    write_summary,
)
from toy2d_sweep import (
    SETTINGS as SETTINGS_ESTEP,
)

from mct import paths
from mct.config import load_params
from mct.diffusion import edm_heun_sample
from mct.metrics.modes import mode_statistics
from mct.student import generate, init_student, load_generator
from mct.teacher import load_denoiser
from mct.worlds.registry import make_world

WORLD = "toy2d"
DI = SETTINGS_ESTEP["di"]
EMD8 = SETTINGS_ESTEP["shrink_k8_linear"]  # the toy2d template's E-step
SMALL_SIGMA = {"kind": "lognormal", "p_mean": -1.5, "p_std": 1.2}  # the template's M-step p_mean is -0.5
SETTINGS: dict[str, dict] = {
    "di": DI,
    "di_iters_x4": {**DI, "iterations": 6000},
    "di_sigma_init_1": {**DI, "student": {"sigma_init": 1.0}},
    "di_sigma_init_5": {**DI, "student": {"sigma_init": 5.0}},
    "di_lr_g_x0.3": {**DI, "lr_g": 3e-4},
    "di_lr_g_x3": {**DI, "lr_g": 3e-3},
    "di_lr_s_x3": {**DI, "lr_s": 3e-3},
    "di_score_steps_4": {**DI, "score_steps": 4},
    "di_mstep_small_sigma": {**DI, "mstep_sigma": SMALL_SIGMA},
    "di_mstep_weight_one": {**DI, "mstep_weight": "one"},
    "di_no_ema": {**DI, "ema_decay": 0.0},
    # the two levers that moved precision most, together, for Diff-Instruct and for the template's EMD-8
    "di_x4_small_sigma": {**DI, "iterations": 6000, "mstep_sigma": SMALL_SIGMA},
    "emd8": EMD8,
    "emd8_small_sigma": {**EMD8, "mstep_sigma": SMALL_SIGMA},
    "emd8_x4_small_sigma": {**EMD8, "iterations": 6000, "mstep_sigma": SMALL_SIGMA},
}
REFERENCES = {"init": 0, "ode_regression": 1, "ode_regression_x4": 4}  # name -> budget in template budgets
FIELDS = ["world", "setting", "seed", *METRICS, "mode_dist_median", "fit_mse", "seconds", "status"]


def score(x: torch.Tensor, world) -> dict:
    m = world.mixture
    st = mode_statistics(x, m.means, m.weights, m.std)
    return {**{k: st[k] for k in METRICS}, "mode_dist_median": mode_distance_median(x, m)}


def run_reference(params, name: str, seed: int, samples: int) -> dict:
    """The generator at initialisation, or fitted by regression to the teacher's Heun map z -> x."""
    t0 = time.perf_counter()
    world = make_world(WORLD, params.worlds[WORLD])
    exp = experiment(params, WORLD, DI, seed, None)
    dcfg = exp.distill
    teacher_path = paths.teacher_file(TEACHERS[WORLD])
    row = {"world": WORLD, "setting": name, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        init_student(world, exp, teacher_path, Path(tmp) / "student.pt")
        gen = load_generator(Path(tmp) / "student.pt", world, key="generator")
    iterations = REFERENCES[name] * dcfg.iterations
    if iterations:
        row["fit_mse"] = fit_to_teacher_map(gen, world, params.teachers[TEACHERS[WORLD]], teacher_path, seed,
                                            iterations, dcfg.batch_size, dcfg.lr_g, dcfg.betas_g, dcfg.ema_decay)
    x, _ = generate(gen, world.data_shape, samples, seed=1234, labels=0)
    return {**row, **score(x, world), "seconds": round(time.perf_counter() - t0, 1), "status": "ok"}


def fit_to_teacher_map(gen: torch.nn.Module, world, tcfg, teacher_path: Path, seed: int, iterations: int,
                       batch_size: int, lr: float, betas: tuple[float, float], ema_decay: float) -> float:
    """Regress gen(z) onto the teacher's Heun sample from the same z, keep the EMA weights in ``gen``, and return the
    EMA generator's mean squared error on 4,096 held-out pairs. Batches are drawn from a pool of 100,000 pairs
    (sampled once: the teacher's 35 evaluations per pair cost more in small batches than the fit itself)."""
    teacher, _ = load_denoiser(teacher_path, world)
    teacher.eval().requires_grad_(False)
    rng = torch.Generator().manual_seed(seed)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn((n, *world.data_shape), generator=rng)
        x, _ = edm_heun_sample(teacher, z, None, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max)
        return z, x

    pool_z, pool_x = pairs(100_000)
    ema = copy.deepcopy(gen).requires_grad_(False)
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=betas)
    for _ in range(iterations):
        idx = torch.randint(len(pool_z), (batch_size,), generator=rng)
        loss = (gen(pool_z[idx]) - pool_x[idx]).square().sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), gen.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema_decay)
    gen.load_state_dict(ema.state_dict())
    z, x = pairs(4096)
    with torch.no_grad():
        return float((gen(z) - x).square().sum(dim=1).mean())


def main() -> None:
    ap = run_arguments(__doc__, "reports/benchmarks/toy2d_precision")
    ap.add_argument("--settings", default=",".join([*REFERENCES, *SETTINGS]))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = load_params("params.yaml")
    settings = a.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS and s not in REFERENCES]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {[*REFERENCES, *SETTINGS]}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending(out / "runs.csv", [WORLD], settings, [int(k) for k in a.seeds.split(",")], a.shard)

    def run(world: str, setting: str, seed: int) -> dict:
        if setting in REFERENCES:
            return run_reference(params, setting, seed, a.samples)
        return run_one(params, world, setting, seed, None, a.samples, overrides=SETTINGS[setting])

    run_pending(todo, out / "runs.csv", FIELDS, run)
    write_summary(out)


if __name__ == "__main__":
    main()
