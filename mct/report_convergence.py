"""The report's "Convergence" section: quality against training iterations and training seconds, Diff-Instruct
against EMD-K per world, from the convergence points each run wrote (``<distill>/convergence.jsonl``,
:mod:`mct.tracking`), with a band across seeds where an experiment ran several.

Which runs: the two experiments that the "faster convergence" claim (``mct.claims``, key ``emd_converge``) compares
in each world, so the figure is the evidence of the claims table's row. The band at an evaluation point is the
95% Student-t interval of the metric across seeds (mct.aggregate.t_interval), the line its mean; on the seconds
axis a point sits at the seeds' mean training seconds (evaluation time excluded), since seeds reach an iteration
at slightly different times. A world without points (runs with ``eval_every: 0``, or outputs not in this
checkout) gets a sentence saying so instead of an empty figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mct.convergence import FILE, read_convergence
from mct.worlds.base import World

SECTION = "Convergence"
CLAIM_KEY = "emd_converge"
LABELS = {"mode_tv": "mode TV \u2193", "fd_2d": "FD (2-D) \u2193", "modes_covered": "modes covered \u2191",
          "fd_pixels": "FD (pixels) \u2193"}
AXES = (("iteration", "training iterations"), ("train_seconds", "training seconds (evaluation excluded)"))
DEFINITION = (
    "Every distill.eval_every iterations the EMA generator draws distill.eval_samples samples from latents fixed "
    "for the whole run (their own random generator: the training is bitwise the one without evaluation) and they "
    "are scored by a cheap metric of the world: on toy2d the exact mode statistics against the true mixture and "
    "the 2-D Frechet distance to the mixture's exact moments; on digits the Frechet distance in pixel space to the "
    "held-out split (the digits classifier is not an input of training, so this is not the table's FD). Training "
    "seconds are the sum of the iterations' score, E-step and M-step times. The claim's number, convergence_auc, "
    "is the convergence metric (toy2d: mode TV; digits: pixel FD) averaged over the iterations between the first "
    "and the last evaluation point (trapezoid rule); the claim compares it per seed, EMD-K minus Diff-Instruct: "
    "below 0, EMD-K spent the run closer to the target. It counts the end point too, so it is read beside the "
    "final values in the world's main table.")


def _runs(params: Any, suite: str | None, exp: str) -> list[tuple[str, int | None]]:
    from mct.paths import run_name

    seeds = params.experiment_seeds(exp, suite)
    return [(run_name(exp, s), s) for s in seeds] if seeds else [(exp, None)]


def convergence_points(params: Any, suite: str | None, experiments: Sequence[str], src: Any) -> pd.DataFrame:
    """One row per (experiment, seed, evaluation point), read from each run's distill output under ``src``."""
    rows = []
    for exp in experiments:
        for run, seed in _runs(params, suite, exp):
            for p in read_convergence(src.log(run).parent / FILE):
                rows.append({"experiment": exp, "seed": seed, **p})
    return pd.DataFrame(rows)


def band(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (experiment, iteration): the mean training seconds, the metric's mean, its 95% t-interval, n seeds."""
    from mct.aggregate import t_interval

    out = []
    for (exp, it), g in points.dropna(subset=[metric]).groupby(["experiment", "iteration"], sort=True):
        st = t_interval(g[metric].astype(float).tolist())
        out.append({"experiment": exp, "iteration": it, "train_seconds": float(g["train_seconds"].mean()),
                    "mean": st["mean"], "lo": st["lo"], "hi": st["hi"], "n": st["n"]})
    return pd.DataFrame(out)


def fig_convergence(world: str, world_def: World, points: pd.DataFrame, compared: Sequence[str],
                    path: Path) -> None:
    """Rows: against iterations, against seconds; columns: the world's metrics (World.convergence_panels); one
    line (and band) per run."""
    from mct.report_figures import new_figure, save_figure

    metrics = [m for m in world_def.convergence_panels if m in points]
    fig, axes = new_figure(len(metrics), len(AXES), size=(3.8, 3.0))
    for row, (x, xlabel) in enumerate(AXES):
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            stats = band(points, metric)
            for i, exp in enumerate(compared):
                s = stats[stats["experiment"] == exp]
                if s.empty:
                    continue
                n = int(s["n"].min())
                ax.plot(s[x], s["mean"], marker="o", ms=3, color=f"C{i}", label=f"{exp} (n={n})")
                if s["lo"].notna().all():
                    ax.fill_between(s[x], s["lo"].astype(float), s["hi"].astype(float), color=f"C{i}", alpha=0.2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(LABELS.get(metric, metric))
            ax.legend(fontsize=7)
    fig.suptitle(f"{world}: quality during training (band: 95% t-interval across seeds)")
    save_figure(fig, path)


def summary_table(world: str, points: pd.DataFrame, compared: Sequence[str], world_def: World,
                  name: str = "") -> Any:
    """Per compared experiment: seeds, the convergence metric at the first and last point, convergence_auc.
    ``name``: the table's file stem before '_convergence' (default: the world)."""
    from mct.convergence import convergence_summary
    from mct.report_tables import Table

    key = world_def.convergence_metric
    rows = []
    for exp in compared:
        p = points[points["experiment"] == exp]
        if p.empty:
            continue
        per_seed = [convergence_summary(g.to_dict("records"), key).get("convergence_auc")
                    for _, g in p.groupby("seed", dropna=False)]
        per_seed = [v for v in per_seed if v is not None]
        first, last = p["iteration"].min(), p["iteration"].max()
        rows.append({"experiment": exp, "seeds": int(p["seed"].nunique(dropna=False)),
                     f"{key} at {first}": float(p.loc[p["iteration"] == first, key].mean()),
                     f"{key} at {last}": float(p.loc[p["iteration"] == last, key].mean()),
                     "convergence_auc (mean over seeds)": sum(per_seed) / len(per_seed) if per_seed else None,
                     "train seconds at last point": float(p.loc[p["iteration"] == last, "train_seconds"].mean())})
    return Table(f"{name or world}_convergence", f"{world}: convergence of the compared runs (means over seeds)",
                 pd.DataFrame(rows, dtype=object))


def add_convergence(page: Any, params: Any, suite: str | None, src: Any, figures: Path,
                    kinds: dict[str, World], worlds: Sequence[str]) -> None:
    """Append the section to ``page`` (mct.report.Page): per world of the claim, a figure and a table."""
    import seaborn as sns

    from mct.claims import CLAIMS

    claim = next((c for c in CLAIMS if c.key == CLAIM_KEY), None)
    present = set(params.suite_experiments(suite))
    compare = [(w, c) for w, c in (claim.comparisons() if claim else ()) if w in worlds and set(c) <= present]
    if not compare:
        return
    page.h(2, SECTION)
    page.p(DEFINITION)
    for w, compared in compare:
        # one comparison per world keeps the world's name; a second one in the same world is named by its runs
        key = w if sum(cw == w for cw, _ in compare) == 1 else f"{w}_{compared[0]}"
        points = convergence_points(params, suite, compared, src)
        if points.empty:
            page.p(f"{w}: no convergence points in this build ({', '.join(compared)}: distill.eval_every is 0, or "
                   f"their distill outputs are not under {src.runs}/).")
            continue
        name = f"{key}_convergence.png"
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
            fig_convergence(w, kinds[w], points, compared, figures / name)
        page.figure(name, f"{w}: {', '.join(LABELS.get(m, m) for m in kinds[w].convergence_panels)} of "
                          f"{' and '.join(compared)} against training iterations (top) and training seconds "
                          "(bottom)")
        page.table(summary_table(w, points, compared, kinds[w], key))
