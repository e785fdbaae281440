"""E-step settings against Diff-Instruct on the toy2d worlds, over paired seeds, at an equal iteration budget.

Every run is the project's own code path: `mct.student.init_student` (a copy of the world's teacher), then
`mct.train.distill` with the toy2d template's budget (iterations, batch, learning rates) and the setting's E-step
overrides, then 20,000 one-step samples scored by the exact mode statistics (modes covered, mode-weight TV, mode
precision). The seed sets `distill.seed`; the same seeds serve every setting, so differences are paired.

Needs the worlds' data and teachers (`mct prepare --world W`, `mct teacher --teacher T`). Rows are appended to
runs.csv as they finish, and finished rows are skipped on a rerun, so an interrupted sweep continues where it stopped.
Writes runs.csv, summary.csv/.md (mean, sd, n, 95% t-interval; paired difference against Diff-Instruct) under --out.

  python benchmarks/toy2d_sweep.py --worlds toy2d,toy2d_skewed --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mct import paths
from mct.claims import t_interval as claims_t_interval
from mct.config import ExperimentConfig, build, deep_merge, load_params
from mct.metrics.modes import mode_statistics
from mct.student import generate, init_student, load_generator
from mct.train import DivergenceError, distill
from mct.worlds.registry import make_world

TEACHERS = {"toy2d": "toy2d_mlp", "toy2d_skewed": "toy2d_skewed_mlp"}
# name -> distill overrides of the toy2d template. Diff-Instruct is the K = 1, gamma_z = 0 corner. Every setting names
# its cancellation scheme, so that a later template default cannot change what a setting means ('auto': linear where
# z is fixed, where it is exact; antithetic where z moves).
SETTINGS: dict[str, dict] = {
    "di": {"K": 1, "gamma_z": 0.0, "cancel_scheme": "auto"},
    "eps_k8": {"K": 8, "gamma_z": 0.0, "space": "eps", "cancel_scheme": "auto"},
    "shrink_k8": {"K": 8, "z_step": "shrink", "gamma_z": 0.005, "z_step_ref": 1.0, "cancel_scheme": "auto"},
    "shrink_k8_linear": {"K": 8, "z_step": "shrink", "gamma_z": 0.005, "z_step_ref": 1.0, "cancel_scheme": "linear"},
    "curv_k1": {"K": 1, "z_step": "curvature", "gamma_z": 0.3, "cancel_scheme": "auto"},
    "curv_k4": {"K": 4, "z_step": "curvature", "gamma_z": 0.3, "cancel_scheme": "auto"},
    "curv_k8": {"K": 8, "z_step": "curvature", "gamma_z": 0.3, "cancel_scheme": "auto"},
    "curv_k16": {"K": 16, "z_step": "curvature", "gamma_z": 0.3, "cancel_scheme": "auto"},
    "curv_k8_g0.1": {"K": 8, "z_step": "curvature", "gamma_z": 0.1, "cancel_scheme": "auto"},
    "curv_k8_g1": {"K": 8, "z_step": "curvature", "gamma_z": 1.0, "cancel_scheme": "auto"},
    "curv_k8_linear": {"K": 8, "z_step": "curvature", "gamma_z": 0.3, "cancel_scheme": "linear"},
    "curv_k8_x_z": {"K": 8, "z_step": "curvature", "gamma_z": 0.3, "space": "x_z", "cancel_scheme": "auto"},
    "curv_k8_x_z_linear": {"K": 8, "z_step": "curvature", "gamma_z": 0.3, "space": "x_z", "cancel_scheme": "linear"},
}
METRICS = {"modes_covered": +1, "mode_tv": -1, "mode_precision": +1}  # +1: higher is better
FIELDS = ["world", "setting", "seed", "modes_covered", "mode_tv", "mode_precision", "seconds", "sec_per_iter",
          "z_move_rms", "z_moved_frac", "chains_reset_frac", "status"]


def experiment(params, world: str, overrides: dict, seed: int, iterations: int | None) -> ExperimentConfig:
    """The toy2d template with ``overrides`` (distill keys, and student keys under "student")."""
    distill_over = {k: v for k, v in overrides.items() if k != "student"}
    distill_over.update(seed=seed, checkpoint_every=10**6, log_with="none", eval_every=0)
    if iterations:
        distill_over["iterations"] = iterations
    merged = deep_merge(params.templates["toy2d"], {"world": world, "teacher": TEACHERS[world],
                                                    "student": overrides.get("student", {}),
                                                    "distill": distill_over})
    return build(ExperimentConfig, merged, f"sweep.{world}")


def run_one(params, world_name: str, setting: str, seed: int, iterations: int | None, samples: int,
            overrides: dict | None = None) -> dict:
    """Distil one (world, setting, seed) and score 20,000 samples; ``overrides`` default to SETTINGS[setting]."""
    world = make_world(world_name, params.worlds[world_name])
    exp = experiment(params, world_name, SETTINGS[setting] if overrides is None else overrides, seed, iterations)
    teacher = paths.teacher_file(TEACHERS[world_name])
    row = {"world": world_name, "setting": setting, "seed": seed}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_student(world, exp, teacher, tmp / "student.pt")
        try:
            summary = distill(world, exp, teacher, tmp / "student.pt", tmp / "out", tmp / "work", progress=False)
        except DivergenceError as e:
            return {**row, "status": f"diverged: {str(e)[:120]}", "seconds": time.perf_counter() - t0}
        gen = load_generator(tmp / "out" / "generator.pt", world, key="ema")
        x, _ = generate(gen, world.data_shape, samples, seed=1234, labels=0)
        log = pd.read_json(tmp / "out" / "log.jsonl", lines=True)
    m = world.mixture
    st = mode_statistics(x, m.means, m.weights, m.std)
    tail = log.tail(100)
    return {**row, **{k: st[k] for k in METRICS}, "mode_dist_median": mode_distance_median(x, m),
            **exact_check_fields(summary),
            "seconds": round(time.perf_counter() - t0, 1),
            "sec_per_iter": summary["sec_per_iter"],
            **{k: float(tail[k].mean()) if k in tail else math.nan
               for k in ("z_move_rms", "z_moved_frac", "chains_reset_frac")}, "status": "ok"}


def exact_check_fields(summary: dict) -> dict:
    """The exact E-step's record at the smallest sigma checked (mct.methods.EMDExact.record): the estimate's mean gap to
    quadrature and the quadrature's own resolution gap; nothing for a Langevin run."""
    checks = summary.get("exact_estep", {}).get("checks", [])
    if not checks:
        return {}
    c = checks[0]
    return {"exact_log_q_gap_small_sigma": c["estimate_gap"], "exact_quadrature_gap_small_sigma": c["quadrature_gap"],
            "exact_sigma_small": c["sigma"], "exact_kl_small_sigma": c.get("kl", math.nan),
            "exact_kl_median_sigma": checks[-1].get("kl", math.nan) if len(checks) > 1 else math.nan}


def mode_distance_median(x: torch.Tensor, mixture) -> float:
    """Median distance of the samples to their nearest mode, in mode standard deviations: sqrt(2 ln 2) = 1.18 for
    exact samples, larger when the modes are widened or mass sits between them."""
    d = torch.cdist(x.double(), torch.as_tensor(mixture.means, dtype=torch.float64)).min(dim=1).values
    return float(d.median()) / mixture.std


def t_interval(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and a 95% Student-t interval (nan bounds for n < 2): mct.claims.t_interval without the sd."""
    mean, _, lo, hi = claims_t_interval(x)
    return mean, lo, hi


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs.status == "ok"]
    rows = []
    for (world, setting), grp in ok.groupby(["world", "setting"], sort=False):
        rec = {"world": world, "setting": setting, "n": len(grp),
               "diverged": int(((runs.world == world) & (runs.setting == setting) & (runs.status != "ok")).sum()),
               "sec_per_iter": grp["sec_per_iter"].mean() if "sec_per_iter" in grp else math.nan}
        base = ok[(ok.world == world) & (ok.setting == "di")].set_index("seed")
        wins = []
        for metric, sign in METRICS.items():
            mean, lo, hi = t_interval(grp[metric].to_numpy(float))
            rec[metric] = f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
            paired = grp.set_index("seed")[metric].sub(base[metric]).dropna().to_numpy(float)
            if setting != "di" and len(paired):
                d, dlo, dhi = t_interval(paired)
                rec[f"{metric} - di"] = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                wins.append(sign * dlo > 0 if sign > 0 else sign * dhi > 0)
        if "mode_dist_median" in grp and grp["mode_dist_median"].notna().all():
            mean, lo, hi = t_interval(grp["mode_dist_median"].to_numpy(float))
            rec["mode_dist_median"] = f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
        rec["beats_di_on_all_three"] = (all(wins) if wins else "") if setting != "di" else ""
        rows.append(rec)
    return pd.DataFrame(rows)


def pending(runs_csv: Path, worlds: list[str], settings: list[str], seeds: list[int], shard: str) -> list[tuple]:
    """(world, setting, seed) not yet in runs_csv, seeds outermost (an interrupted sweep still has every setting on its
    first seeds), every N-th from the I-th for shard 'I/N'."""
    done = set()
    if runs_csv.exists():
        done = {(r.world, r.setting, int(r.seed)) for r in pd.read_csv(runs_csv).itertuples()}
    # the shard is taken from the full list before the finished runs are dropped, so that workers started at
    # different times still split the runs between them without overlap
    everything = [(w, s, k) for k in seeds for s in settings for w in worlds]
    i, n = (int(v) for v in shard.split("/"))
    return [t for t in everything[i::n] if t not in done]


def run_pending(todo: list[tuple], runs_csv: Path, fields: list[str], run) -> None:
    """run(world, setting, seed) -> row for each of ``todo``, each row appended to runs_csv as it finishes."""
    t_start = time.perf_counter()
    for i, (w, s, k) in enumerate(todo):
        row = run(w, s, k)
        new = not runs_csv.exists()
        with open(runs_csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"[{i + 1}/{len(todo)} {time.perf_counter() - t_start:.0f}s] {w} {s} seed {k}: "
              + ", ".join(f"{m}={row.get(m)}" for m in (*METRICS, "seconds", "status")), flush=True)


def write_summary(out: Path) -> pd.DataFrame:
    """summary.csv and summary.md under ``out`` from its runs.csv."""
    summary = summarise(pd.read_csv(out / "runs.csv"))
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary.to_markdown(index=False) + "\n")
    print(summary.to_string(index=False))
    return summary


def run_arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every paired-seed toy2d benchmark takes: seeds, samples, threads, output folder, shard."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=out)
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th pending run from the I-th (parallel workers)")
    return ap


def main() -> None:
    ap = run_arguments(__doc__, "reports/benchmarks/toy2d_sweep")
    ap.add_argument("--worlds", default="toy2d,toy2d_skewed")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--iterations", type=int, default=None, help="default: the toy2d template's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = load_params("params.yaml")
    unknown = [s for s in a.settings.split(",") if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    todo = pending(runs_csv, a.worlds.split(","), a.settings.split(","), [int(k) for k in a.seeds.split(",")],
                   a.shard)
    run_pending(todo, runs_csv, FIELDS, lambda w, s, k: run_one(params, w, s, k, a.iterations, a.samples))
    write_summary(out)


if __name__ == "__main__":
    main()
