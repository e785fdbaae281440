"""The exact E-step as the method's own reference on the toy2d worlds: Diff-Instruct, the short-run EMD-8 and EMD with
an exact E-step (``distill.estep: exact``, mct.exact_em), over paired seeds, at the template's budget, with the
small-sigma M-step of the precision diagnosis at that budget, and at that diagnosis's best setting (4x iterations with
the small-sigma M-step).

Every row is the project's own code path (benchmarks/toy2d_sweep.py's runner: init_student, mct.train.distill,
20,000 samples scored by the exact mode statistics). Every row, Diff-Instruct and EMD-8 included, is run here against
the teachers of this build: the committed rows of the E-step sweep and the precision diagnosis came from teachers
trained on other machines and do not reproduce bitwise (``di_rerun``, Diff-Instruct seed 0 run here, shows by how
much), so pairing with them would not be pairing. Rows are appended to runs.csv as they finish, finished ones are
skipped, so an interrupted run continues.

summary.csv/.md: per world and budget, every setting's seed mean with a 95% t-interval, the paired difference
against Diff-Instruct at the same budget, and the share of the exact E-step's gain that EMD-8 recovers,
(EMD-8 - DI) / (exact - DI), per metric, with a paired bootstrap interval over seeds (blank where the exact E-step's
own gain is within noise of zero, since the ratio is then undefined).

  python benchmarks/toy2d_exact.py --worlds toy2d,toy2d_skewed --seeds 0,1,2,3,4 [--shard 0/2]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from toy2d_precision import SMALL_SIGMA
from toy2d_sweep import METRICS, pending, run_arguments, run_one, run_pending, t_interval
from toy2d_sweep import SETTINGS as SWEEP_SETTINGS

from mct.config import load_params

DI = SWEEP_SETTINGS["di"]
EMD8 = SWEEP_SETTINGS["shrink_k8_linear"]  # the toy2d template's E-step
EXACT = {**DI, "estep": "exact", "exact_control_variate": True}
EXACT_PLAIN = {**EXACT, "exact_control_variate": False}
SMALL = {"mstep_sigma": SMALL_SIGMA}
X4 = {"iterations": 6000, **SMALL}
# setting -> (budget label, distill overrides)
SETTINGS: dict[str, tuple[str, dict]] = {
    "di": ("1x", DI),
    "di_rerun": ("check", DI),  # a committed Diff-Instruct row run again here: must reproduce it
    "emd8": ("1x", EMD8),
    "exact": ("1x", EXACT),
    "exact_plain": ("1x", EXACT_PLAIN),
    # the small-sigma M-step alone, at the template's budget: which of the two factors of '4x + small sigma' it is
    "di_small_sigma": ("1x + small sigma", {**DI, **SMALL}),
    "emd8_small_sigma": ("1x + small sigma", {**EMD8, **SMALL}),
    "exact_small_sigma": ("1x + small sigma", {**EXACT, **SMALL}),
    "di_x4_small_sigma": ("4x + small sigma", {**DI, **X4}),
    "emd8_x4_small_sigma": ("4x + small sigma", {**EMD8, **X4}),
    "exact_x4_small_sigma": ("4x + small sigma", {**EXACT, **X4}),
}
FIELDS = ["world", "setting", "budget", "seed", *METRICS, "mode_dist_median", "seconds", "sec_per_iter",
          "exact_sigma_small", "exact_log_q_gap_small_sigma", "exact_quadrature_gap_small_sigma",
          "exact_kl_small_sigma", "exact_kl_median_sigma", "source", "status"]


def run_row(params, world: str, setting: str, seed: int, samples: int) -> dict:
    budget, overrides = SETTINGS[setting]
    row = run_one(params, world, setting, seed, None, samples, overrides=overrides)
    row.update(budget=budget, source="run here")
    return row


def recovered_share(emd: np.ndarray, exact: np.ndarray, di: np.ndarray, sign: int, reps: int = 4000,
                    seed: int = 0) -> tuple[float, float, float] | None:
    """(EMD - DI) / (exact - DI) over paired seeds, with a 95% paired-bootstrap interval; None where the exact E-step's
    own gain, sign * (exact - DI), has a t-interval that includes 0 (the ratio is then not defined by the data)."""
    gain = exact - di
    _, lo, hi = t_interval(sign * gain)
    if not lo > 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(di), size=(reps, len(di)))
    num, den = (emd - di)[idx].mean(1), gain[idx].mean(1)
    ratios = num[den * sign > 0] / den[den * sign > 0]
    return float((emd - di).mean() / gain.mean()), float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs.status == "ok"].drop_duplicates(["world", "setting", "seed"])
    out = []
    for (world, budget), grp in ok.groupby(["world", "budget"], sort=False):
        by = {s: g.set_index("seed").sort_index() for s, g in grp.groupby("setting")}
        di_name = next(s for s in by if s.startswith("di"))
        exact_name = next((s for s in by if s.startswith("exact") and "plain" not in s), None)
        emd_name = next((s for s in by if s.startswith("emd8")), None)
        for setting, g in by.items():
            rec = {"world": world, "budget": budget, "setting": setting, "n": len(g)}
            for metric in METRICS:
                mean, lo, hi = t_interval(g[metric].to_numpy(float))
                rec[metric] = f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"
                if setting != di_name:
                    seeds = g.index.intersection(by[di_name].index)
                    d, dlo, dhi = t_interval((g.loc[seeds, metric] - by[di_name].loc[seeds, metric]).to_numpy(float))
                    rec[f"{metric} - DI"] = f"{d:+.3g} [{dlo:+.3g}, {dhi:+.3g}]"
            if setting == emd_name and exact_name:
                seeds = g.index.intersection(by[di_name].index).intersection(by[exact_name].index)
                for metric, sign in METRICS.items():
                    share = recovered_share(g.loc[seeds, metric].to_numpy(float),
                                            by[exact_name].loc[seeds, metric].to_numpy(float),
                                            by[di_name].loc[seeds, metric].to_numpy(float), sign)
                    rec[f"{metric} share of exact gain"] = (f"{share[0]:+.2f} [{share[1]:+.2f}, {share[2]:+.2f}]"
                                                            if share else "exact gain within noise")
            out.append(rec)
    return pd.DataFrame(out)


def main() -> None:
    ap = run_arguments(__doc__, "reports/benchmarks/toy2d_exact")
    ap.add_argument("--worlds", default="toy2d,toy2d_skewed")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.csv/.md from runs.csv and stop")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    if not a.summary_only:
        params = load_params("params.yaml")
        unknown = [s for s in a.settings.split(",") if s not in SETTINGS]
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; known: {list(SETTINGS)}")
        worlds, seeds = a.worlds.split(","), [int(k) for k in a.seeds.split(",")]
        settings = a.settings.split(",")
        todo = pending(runs_csv, worlds, settings, seeds, a.shard)
        run_pending(todo, runs_csv, FIELDS, lambda w, s, k: run_row(params, w, s, k, a.samples))
    summary = summarise(pd.read_csv(runs_csv))
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary.to_markdown(index=False) + "\n")
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
