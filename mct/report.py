"""Report stage: the paper's tables and figures, rebuilt from the suite's metrics, logs and samples.

Inputs, per experiment E and teacher T of the suite (a missing one shows as "not run"):
  <reports_in>/experiments/E.json, <reports_in>/teachers/T.json   (written by the evaluate stages)
  <runs>/experiments/E/distill/log.jsonl, <runs>/experiments/E/samples.npz
Outputs, under ``out_dir`` (reports/ by default):
  metrics.json          name -> flat record, see ``metrics_record`` (the file DVC declares as metrics)
  tables/*.csv, *.tex   one pair per table; the same tables as markdown in index.md and as HTML in index.html
  figures/*.png         stable names: <world>_k_sweep, <world>_noise_cancellation, <world>_samples,
                        <world>_speed, and for image worlds <world>_grid_<experiment> (where samples exist)
  index.md, index.html  the page a reviewer reads; index.html needs nothing outside the folder
Everything is deterministic (no timestamps, sorted keys, fixed PNG metadata), so unchanged inputs give
byte-identical files. The build happens in a temporary folder inside ``out_dir``; only a complete build is
moved into place, so a failure leaves the previous report as it was.

Ablations follow the paper: each table holds the experiments of a world that differ from the world's
reference EMD setting in that factor alone. The reference is, per setting key, the most common value among the
world's EMD experiments in the suite (ties: the first in suite order); the page states it.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mct import paths
from mct.config import ExperimentConfig, Params
from mct.diffusion import heun_nfe

NOT_RUN = "not run"
NA = "n/a"  # the run exists but the evaluator left this value null
PAPER_NUMBERS = Path(__file__).parent / "data" / "paper_numbers.csv"
PAPER_K = (1, 2, 4, 8, 16)  # Langevin steps of the paper's K sweep and cost table (EMD-1..16)

EXPERIMENT_KEYS = ("experiment", "world", "method", "K", "nfe", "space", "cancel_noise", "cancel_initial",
                   "init", "gamma_eps", "gamma_z", "iterations", "fid", "precision", "recall",
                   "samples_per_s", "teacher_samples_per_s", "teacher_nfe", "speedup", "speedup_over_nfe",
                   "sec_per_iter", "sec_per_iter_estep")
TEACHER_KEYS = ("teacher", "world", "method", "K", "nfe", "fid", "precision", "recall", "samples_per_s")
TOY2D_KEYS = ("modes_covered", "modes_total", "mode_tv", "mode_precision", "nll")

# Setting keys of an experiment: the ablated factors, then controls that must match for runs to be comparable.
FACTOR_KEYS = ("space", "cancel_noise", "cancel_initial", "K", "init", "gamma_eps", "gamma_z")
CONTROL_KEYS = ("teacher", "iterations", "batch_size")
SPACE_LABELS = {"eps_z": "(eps, z)", "x_z": "(x, z)", "eps": "eps", "x": "x"}


# --- inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Where the report reads: evaluator records under ``reports_in``, logs and samples under ``runs``."""

    reports_in: Path
    runs: Path

    def _rebase(self, p: Path, old: Path, new: Path) -> Path:
        return new / p.relative_to(old)

    def experiment_metrics(self, exp: str) -> Path:
        return self._rebase(paths.experiment_metrics(exp), paths.REPORTS, self.reports_in)

    def teacher_metrics(self, teacher: str) -> Path:
        return self._rebase(paths.teacher_metrics(teacher), paths.REPORTS, self.reports_in)

    def log(self, exp: str) -> Path:
        return self._rebase(paths.distill_dir(exp) / "log.jsonl", paths.RUNS, self.runs)

    def samples(self, exp: str) -> Path:
        return self._rebase(paths.samples_file(exp), paths.RUNS, self.runs)


@dataclass
class Entry:
    """One experiment or teacher of the suite; ``record`` is None when its metrics file does not exist."""

    name: str
    kind: str  # 'experiment' | 'teacher'
    world: str
    setting: dict[str, Any]
    record: dict[str, Any] | None

    def get(self, key: str) -> Any:
        """A metric: NOT_RUN without a record, None where the evaluator wrote null or nothing."""
        return NOT_RUN if self.record is None else self.record.get(key)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    return rec


def experiment_setting(exp: ExperimentConfig) -> dict[str, Any]:
    d = exp.distill
    return {"method": exp.method_name, "space": d.space, "cancel_noise": d.cancel_noise,
            "cancel_initial": d.cancel_initial, "K": d.K, "init": exp.student.init, "gamma_eps": d.gamma_eps,
            "gamma_z": d.gamma_z, "teacher": exp.teacher, "iterations": d.iterations,
            "batch_size": d.batch_size}


def collect(params: Params, suite: str | None, src: Sources) -> list[Entry]:
    entries = []
    for t in params.suite_teachers(suite):
        tcfg = params.teacher(t)
        entries.append(Entry(t, "teacher", tcfg.world, {"nfe": heun_nfe(tcfg.sampler_steps)},
                             _read_json(src.teacher_metrics(t))))
    for e in params.suite_experiments(suite):
        exp = params.experiment(e)
        entries.append(Entry(e, "experiment", exp.world, experiment_setting(exp),
                             _read_json(src.experiment_metrics(e))))
    return entries


def read_log(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, dtype=object) if rows else None


# --- metrics.json -------------------------------------------------------------------------------------------


def metrics_record(entry: Entry, world_kind: str) -> dict[str, Any]:
    """The flat metrics.json record of one experiment or teacher.

    Always present: ``status`` ('ok' | 'not run') and, for experiments, EXPERIMENT_KEYS, for teachers
    TEACHER_KEYS, plus TOY2D_KEYS in toy2d worlds; absent values are null. A not-run entry carries its
    settings from params.yaml. Further keys that the evaluator wrote are passed through unchanged.
    """
    keys = EXPERIMENT_KEYS if entry.kind == "experiment" else TEACHER_KEYS
    keys = keys + (TOY2D_KEYS if world_kind == "toy2d" else ())
    if entry.kind == "experiment":
        known = {k: v for k, v in entry.setting.items() if k in keys}
        known.update(experiment=entry.name, world=entry.world, nfe=1)
    else:
        known = {"teacher": entry.name, "world": entry.world, "method": "teacher", "K": None,
                 "nfe": entry.setting["nfe"]}
    rec = {k: known.get(k) for k in keys}
    if entry.record is not None:
        rec.update(entry.record)
    rec["status"] = "ok" if entry.record is not None else NOT_RUN
    return rec


# --- tables -------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table of raw values (CSV) that renders, formatted, as markdown, HTML and LaTeX."""

    name: str  # file stem under tables/
    title: str
    frame: pd.DataFrame
    note: str = ""

    def display(self) -> pd.DataFrame:
        return self.frame.apply(lambda col: col.map(fmt)) if len(self.frame) else self.frame.astype(str)


def fmt(v: Any) -> str:
    """Cell text: 'not run' stays, null -> 'n/a', floats to 4 significant digits, booleans yes/no."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NA
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _metric_cells(entry: Entry | None, toy: bool) -> dict[str, Any]:
    get = (lambda k: NOT_RUN) if entry is None else entry.get
    cells = {"FID": get("fid"), "precision": get("precision"), "recall": get("recall")}
    if toy:
        covered, total = get("modes_covered"), get("modes_total")
        cells["modes covered"] = f"{covered}/{total}" if isinstance(covered, int) and isinstance(total, int) \
            else covered
        cells["mode TV"] = get("mode_tv")
    return cells


def reference_setting(entries: Sequence[Entry]) -> dict[str, Any] | None:
    """Per setting key, the most common value among EMD experiments (ties: first seen); None without any."""
    emd = [e.setting for e in entries if e.kind == "experiment" and e.setting["method"] == "emd"]
    if not emd:
        return None
    ref = {}
    for k in FACTOR_KEYS + CONTROL_KEYS:
        counts = Counter(s[k] for s in emd)
        best = max(counts.values())
        ref[k] = next(s[k] for s in emd if counts[s[k]] == best)
    return ref


@dataclass(frozen=True)
class Ablation:
    """A factor of the paper's ablations: ``free`` keys vary, all other setting keys stay at the reference."""

    name: str
    title: str
    column: str
    free: tuple[str, ...]
    levels: Callable[[dict[str, Any] | None, list[dict[str, Any]]], list[tuple[Any, dict[str, Any]]]]
    note: str = ""


def _observed(ref: dict[str, Any], settings: list[dict[str, Any]], free: tuple[str, ...]) -> list[tuple]:
    """Values of the free keys among settings that match the reference everywhere else."""
    keys = [k for k in FACTOR_KEYS + CONTROL_KEYS if k not in free]
    return [tuple(s[k] for k in free) for s in settings if all(s[k] == ref[k] for k in keys)]


def _k_levels(ref, settings):
    ks = sorted(set(PAPER_K) | ({k for (k,) in _observed(ref, settings, ("K",))} if ref else set()))
    return [(k, {"K": k}) for k in ks]


def _step_levels(ref, settings):
    if ref is None:
        return []
    pairs = {(ref["gamma_eps"], ref["gamma_z"])} | set(_observed(ref, settings, ("gamma_eps", "gamma_z")))
    pairs = sorted(pairs)
    return [(f"gamma_eps={ge:g}, gamma_z={gz:g}", {"gamma_eps": ge, "gamma_z": gz}) for ge, gz in pairs]


ABLATIONS = (
    Ablation("space", "Sampling space of the E-step", "sampling space", ("space",),
             lambda ref, s: [(lab, {"space": sp}) for sp, lab in SPACE_LABELS.items()]),
    Ablation("noise", "Noise cancellation", "cancellation", ("cancel_noise", "cancel_initial"),
             lambda ref, s: [("none", {"cancel_noise": False}),
                             ("injected only", {"cancel_noise": True, "cancel_initial": False}),
                             ("injected + initial", {"cancel_noise": True, "cancel_initial": True})],
             "grad norm: mean generator gradient norm over the last 10% of iterations (log.jsonl)."),
    Ablation("K", "Number of Langevin steps K", "K", ("K",), _k_levels),
    Ablation("init", "Generator initialisation", "initialisation", ("init",),
             lambda ref, s: [("teacher", {"init": "teacher"}), ("scratch", {"init": "scratch"})]),
    Ablation("step_size", "Langevin step sizes", "step sizes", ("gamma_eps", "gamma_z"), _step_levels),
)


def ablation_members(ab: Ablation, ref: dict[str, Any] | None,
                     entries: Sequence[Entry]) -> list[tuple[Any, list[Entry]]]:
    """(level, experiments at that level with every non-free key at the reference) for each level."""
    exps = [e for e in entries if e.kind == "experiment"]
    if ref is None:
        return [(lab, []) for lab, _ in ab.levels(None, [])]
    fixed = [k for k in FACTOR_KEYS + CONTROL_KEYS if k not in ab.free]
    out = []
    for label, values in ab.levels(ref, [e.setting for e in exps]):
        members = [e for e in exps if all(e.setting[k] == ref[k] for k in fixed)
                   and all(e.setting[k] == v for k, v in values.items())]
        out.append((label, sorted(members, key=lambda e: e.name)))
    return out


def _tail_mean(log: pd.DataFrame | None, key: str) -> Any:
    if log is None or key not in log:
        return "no log"  # the run has metrics but its log.jsonl (or this column) is missing
    v = log[key].to_numpy(dtype=float)
    return float(v[-max(1, len(v) // 10):].mean())


def ablation_table(world: str, ab: Ablation, members: list[tuple[Any, list[Entry]]], toy: bool,
                   logs: dict[str, pd.DataFrame | None]) -> Table:
    rows = []
    for label, group in members or [(NOT_RUN, [])]:
        for e in group or [None]:
            row = {ab.column: label, "experiment": NOT_RUN if e is None else e.name, **_metric_cells(e, toy)}
            if ab.name == "noise":
                row["grad norm"] = NOT_RUN if e is None else _tail_mean(logs.get(e.name), "grad_norm_gen")
            rows.append(row)
    return Table(f"{world}_{ab.name}", f"{world}: {ab.title}", pd.DataFrame(rows, dtype=object), ab.note)


def main_table(world: str, entries: Sequence[Entry], k_members: list[tuple[Any, list[Entry]]],
               toy: bool) -> Table:
    rows = []

    def add(method: str, e: Entry | None, nfe: Any) -> None:
        rows.append({"method": method, "experiment": NOT_RUN if e is None else e.name, "NFE": nfe,
                     **_metric_cells(e, toy), "samples/s": NOT_RUN if e is None else e.get("samples_per_s")})

    for t in (e for e in entries if e.kind == "teacher"):
        nfe = t.get("nfe") if _number(t.get("nfe")) else t.setting["nfe"]
        add(f"Teacher ({nfe:g} NFE)", t, nfe)
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    for e in dis or [None]:
        add("Diff-Instruct (K=1)", e, 1)
    emd = [(k, e) for k, group in k_members for e in group]
    for k, e in emd:
        add(f"EMD-{k}", e, 1)
    if not emd:
        add("EMD-K", None, 1)
    note = "EMD-K rows: the world's reference EMD setting at each K that the suite runs."
    return Table(f"{world}_main", f"{world}: one-step students against the teacher",
                 pd.DataFrame(rows, dtype=object), note)


def cost_table(world: str, entries: Sequence[Entry], k_members: list[tuple[Any, list[Entry]]]) -> Table:
    rows = []
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    for e in dis or [None]:
        rows.append(("Diff-Instruct", 1, e))
    rows += [(f"EMD-{k}", k, e) for k, group in k_members for e in group or [None]]
    base = next((e.get("sec_per_iter") for e in dis if _number(e.get("sec_per_iter"))), None)

    def rel(e: Entry | None) -> Any:
        v = NOT_RUN if e is None else e.get("sec_per_iter")
        return v / base if isinstance(v, (int, float)) and base else (NOT_RUN if v == NOT_RUN else None)

    frame = pd.DataFrame(dtype=object, data=[
        {"method": m, "K": k, "experiment": NOT_RUN if e is None else e.name,
         "sec/iter": NOT_RUN if e is None else e.get("sec_per_iter"),
         "E-step sec/iter": NOT_RUN if e is None else e.get("sec_per_iter_estep"),
         "x Diff-Instruct": rel(e)} for m, k, e in rows])
    return Table(f"{world}_cost", f"{world}: training cost per iteration", frame,
                 "Mean over the last 10% of iterations of score + E-step + M-step time (summary.json).")


def experiments_table(world: str, entries: Sequence[Entry], toy: bool) -> Table:
    rows = []
    for e in (e for e in entries if e.kind == "experiment"):
        s = e.setting
        cancel = "injected + initial" if s["cancel_noise"] and s["cancel_initial"] else \
            "injected only" if s["cancel_noise"] else "none"
        rows.append({"experiment": e.name, "method": s["method"], "K": s["K"],
                     "space": SPACE_LABELS[s["space"]], "cancellation": cancel, "init": s["init"],
                     "gamma_eps": s["gamma_eps"], "gamma_z": s["gamma_z"],
                     "iterations": s["iterations"], **_metric_cells(e, toy),
                     "samples/s": e.get("samples_per_s"), "sec/iter": e.get("sec_per_iter"),
                     "status": "ok" if e.record is not None else NOT_RUN})
    return Table(f"{world}_experiments", f"{world}: every experiment of the suite",
                 pd.DataFrame(rows, dtype=object))


def paper_table(params: Params, worlds: Sequence[str], world_tables: dict[str, dict[str, Any]]) -> Table:
    """The paper's reported numbers beside ours; ours is 'not run' unless the suite has a matching world."""
    paper = pd.read_csv(PAPER_NUMBERS, dtype={"nfe": "Int64"})
    rows = []
    for r in paper.itertuples(index=False):
        world = _paper_world(params, worlds, r.dataset)
        ours: Any = NOT_RUN
        if world is not None:
            ours = _ours(r.method, world_tables[world])
        elif not _ours_method(r.method):
            ours = "-"
        rows.append({"dataset": r.dataset, "method": r.method, "NFE": None if pd.isna(r.nfe) else int(r.nfe),
                     "FID (paper)": float(r.fid), "FID (ours)": ours, "source": r.source})
    return Table("paper", "Paper-scale results: reported numbers beside ours",
                 pd.DataFrame(rows, dtype=object),
                 "'-': a method this project does not implement. 'not run': the suite has no such world.")


def _paper_world(params: Params, worlds: Sequence[str], dataset: str) -> str | None:
    m = re.match(r"ImageNet (\d+)x", dataset)
    if m is None:
        return None
    res = int(m.group(1))
    matches = [w for w in worlds if (params.worlds[w].kind, params.worlds[w].resolution) == ("imagenet", res)]
    return matches[0] if matches else None


def _ours_method(method: str) -> str | None:
    if method.startswith("EMD"):
        return "emd"
    if method == "Diff-Instruct":
        return "diff_instruct"
    if "teacher" in method:
        return "teacher"
    return None


def _ours(method: str, tables: dict[str, Any]) -> Any:
    kind = _ours_method(method)
    if kind is None:
        return "-"
    entries: list[Entry] = tables["entries"]
    if kind == "teacher":
        found = [e for e in entries if e.kind == "teacher"]
    elif kind == "diff_instruct":
        found = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    else:
        m = re.match(r"EMD-(\d+)$", method)
        ref = tables["reference"]
        want = int(m.group(1)) if m else (ref["K"] if ref else None)
        found = [e for k, group in tables["k_members"] if k == want for e in group]
    return found[0].get("fid") if found else NOT_RUN


# --- figures ------------------------------------------------------------------------------------------------


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.2, 3.4)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def _not_run(ax, text: str = NOT_RUN) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set_xticks([])
    ax.set_yticks([])


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fig_k_sweep(world: str, entries: Sequence[Entry], k_members, toy: bool, path: Path) -> None:
    import seaborn as sns

    metrics = [("fid", "FID"), ("recall", "recall")] + ([("modes_covered", "modes covered")] if toy else [])
    rows = [{"K": k, "metric": label, "value": e.get(key)} for k, group in k_members for e in group
            for key, label in metrics if _number(e.get(key))]
    data = pd.DataFrame(rows, columns=["K", "metric", "value"])
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    teachers = [e for e in entries if e.kind == "teacher"]
    fig, axes = _figure(len(metrics))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        d = data[data["metric"] == label]
        if d.empty:
            _not_run(ax)
        else:
            sns.lineplot(data=d, x="K", y="value", marker="o", errorbar=None, ax=ax, label="EMD")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(d.K.unique()), [str(k) for k in sorted(d.K.unique())])
            lines = [(e, "--", "C3", "Diff-Instruct") for e in dis]
            lines += [(t, ":", "0.3", "teacher") for t in teachers]
            for e, style, color, name in lines:
                if _number(e.get(key)):
                    ax.axhline(e.get(key), ls=style, color=color, label=name)
            ax.legend(fontsize=8)
            if key == "modes_covered":
                ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{label} vs K")
        ax.set_ylabel(label)
    fig.suptitle(f"{world}: K sweep")
    _save(fig, path)


def fig_noise(world: str, members, logs: dict[str, pd.DataFrame | None], path: Path) -> None:
    import seaborn as sns

    curves = []
    for label, group in members:
        for e in group:
            log = logs.get(e.name)
            if log is None:
                continue
            window = max(1, len(log) // 50)  # a running mean keeps the trend readable; raw values: log.jsonl
            for key in ("grad_norm_gen", "loss_gen"):
                if key in log:
                    y = log[key].astype(float).rolling(window, min_periods=1).mean()
                    it = log["iteration"] if "iteration" in log else pd.Series(np.arange(len(log)))
                    curves.append(pd.DataFrame({"iteration": it, "value": y, "key": key,
                                                "run": f"{label} ({e.name})"}))
    data = pd.concat(curves, ignore_index=True) if curves else None
    panels = [("grad_norm_gen", "generator gradient norm"), ("loss_gen", "generator loss")]
    fig, axes = _figure(2, size=(5.0, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        d = None if data is None else data[data["key"] == key]
        if d is None or d.empty:
            _not_run(ax)
        else:
            sns.lineplot(data=d, x="iteration", y="value", hue="run", errorbar=None, ax=ax)
            ax.legend(fontsize=7)
            if key == "grad_norm_gen":
                ax.set_yscale("log")
        ax.set_title(label)
        ax.set_ylabel(label)
    fig.suptitle(f"{world}: noise cancellation")
    _save(fig, path)


def _load_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    if not path.exists():
        return None
    with np.load(path) as f:
        return f["x"], (f["labels"] if "labels" in f else None)


def fig_toy_samples(world, entries: Sequence[Entry], src: Sources, path: Path,
                    max_points: int = 2000) -> None:
    import torch

    mix = world.mixture
    means = mix.means.numpy()
    pad = 0.15 * float(np.ptp(means)) + 5 * mix.std
    lo, hi = means.min() - pad, means.max() + pad
    g = np.linspace(lo, hi, 400)
    gx, gy = np.meshgrid(g, g)
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
    logp = mix.log_prob(grid).numpy().reshape(gx.shape)
    levels = np.linspace(max(logp.max() - 10.0, logp.min()), logp.max(), 6)  # top 10 nats: each mode's core
    exps = [e for e in entries if e.kind == "experiment"] or [None]
    ncols = min(4, len(exps))
    fig, axes = _figure(ncols, -(-len(exps) // ncols), size=(3.2, 3.2))
    for ax in axes[len(exps):]:
        ax.set_axis_off()
    for ax, e in zip(axes, exps, strict=False):
        ax.contourf(gx, gy, logp, levels=levels, cmap="Greys", alpha=0.5)
        s = None if e is None else _load_samples(src.samples(e.name))
        if s is None:
            _not_run(ax, "samples: " + NOT_RUN)
        else:
            x = s[0][:max_points]
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6, color="C0", linewidths=0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title("no experiment" if e is None else f"{e.name}\n{_method_label(e)}", fontsize=9)
    fig.suptitle(f"{world.name}: samples (blue) over the true mixture density (grey: top 10 nats of log p)")
    _save(fig, path)


def _method_label(e: Entry) -> str:
    return "Diff-Instruct" if e.setting["method"] == "diff_instruct" else f"EMD-{e.setting['K']}"


def image_samples(x: np.ndarray, labels: np.ndarray | None, per_class: int = 10,
                  classes: int = 10) -> np.ndarray:
    """Up to ``classes`` x ``per_class`` images in class order when labels exist, else the first 100."""
    if labels is None:
        return x[:per_class * classes]
    y = labels.argmax(1) if labels.ndim == 2 else labels.astype(int)
    picks = [np.flatnonzero(y == c)[:per_class] for c in range(classes)]
    idx = np.concatenate([p for p in picks if len(p)]) if any(len(p) for p in picks) else np.arange(0)
    return x[idx]


def fig_image_samples(world: str, entries: Sequence[Entry], src: Sources, figures: Path) -> list[str]:
    """One grid PNG per experiment (mct.images.image_grid) and an overview figure; returns the grid names."""
    import torch

    from mct.images import image_grid

    exps = [e for e in entries if e.kind == "experiment"] or [None]
    ncols = min(4, len(exps))
    fig, axes = _figure(ncols, -(-len(exps) // ncols), size=(3.2, 3.4))
    for ax in axes[len(exps):]:
        ax.set_axis_off()
    names = []
    for ax, e in zip(axes, exps, strict=False):
        s = None if e is None else _load_samples(src.samples(e.name))
        shown = None if s is None else image_samples(*s)
        if shown is None or len(shown) == 0:
            _not_run(ax, "samples: " + NOT_RUN)
        else:
            grid = image_grid(torch.from_numpy(shown).float(), nrow=10, upscale=4)
            name = f"{world}_grid_{_safe(e.name)}.png"
            grid.save(figures / name, format="PNG")
            names.append(name)
            ax.imshow(np.asarray(grid), cmap="gray" if grid.mode == "L" else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_axis_off()
        ax.set_title("no experiment" if e is None else f"{e.name}\n{_method_label(e)}", fontsize=9)
    fig.suptitle(f"{world}: samples (rows: classes 0-9 where labels exist)")
    _save(fig, figures / f"{world}_samples.png")
    return names


def fig_speed(world: str, entries: Sequence[Entry], path: Path) -> None:
    import seaborn as sns

    rows = []
    for e in (e for e in entries if e.kind == "experiment"):
        if _number(e.get("samples_per_s")):
            rows.append({"experiment": e.name, "model": "student (1 NFE)",
                         "samples/s": e.get("samples_per_s")})
        if _number(e.get("teacher_samples_per_s")):
            rows.append({"experiment": e.name, "model": f"teacher ({e.get('teacher_nfe')} NFE)",
                         "samples/s": e.get("teacher_samples_per_s")})
    n = len({r["experiment"] for r in rows})
    fig, (ax,) = _figure(size=(max(5.0, 1.2 * n + 2.5), 3.6))
    if rows:
        data = pd.DataFrame(rows).astype({"samples/s": float})
        sns.barplot(data=data, x="experiment", y="samples/s", hue="model", errorbar=None, ax=ax)
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title=None)
    else:
        _not_run(ax)
    ax.set_title(f"{world}: student vs teacher sampling speed (same process, same batch)")
    _save(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- page ---------------------------------------------------------------------------------------------------


@dataclass
class Page:
    """Blocks rendered twice: markdown (index.md) and self-contained HTML (index.html)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, t: Table) -> None:
        self.blocks.append(("table", t))

    def figure(self, name: str, caption: str) -> None:
        self.blocks.append(("figure", name, caption))

    def sections(self) -> list[str]:
        return [b[2] for b in self.blocks if b[0] == "h" and b[1] == 2]

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        out += [f"- [{s}](#{slug(s)})" for s in self.sections()] + [""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "figure":
                out += [f"![{b[2]}](figures/{b[1]})", "", f"*{b[2]}*", ""]
            else:
                t: Table = b[1]
                out += [f"**{t.title}**", "", markdown_table(t.display()), ""]
                if t.note:
                    out += [t.note, ""]
                csv, tex = f"tables/{t.name}.csv", f"tables/{t.name}.tex"
                out += [f"Files: [{csv}]({csv}), [{tex}]({tex})", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>", '<nav><ul>']
        body += [f'<li><a href="#{slug(s)}">{e(s)}</a></li>' for s in self.sections()] + ["</ul></nav>"]
        for b in self.blocks:
            if b[0] == "h":
                anchor = f' id="{slug(b[2])}"' if b[1] == 2 else ""
                body.append(f"<h{b[1]}{anchor}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "figure":
                body.append(f'<figure><img src="figures/{e(b[1])}" alt="{e(b[2])}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
            else:
                t = b[1]
                body.append(f'<div class="table"><p class="caption">{e(t.title)}</p>')
                body.append(t.display().to_html(index=False, border=0, escape=True, classes="data"))
                if t.note:
                    body.append(f'<p class="note">{e(t.note)}</p>')
                body.append(f'<p class="files">Files: <a href="tables/{e(t.name)}.csv">{e(t.name)}.csv</a> '
                            f'<a href="tables/{e(t.name)}.tex">{e(t.name)}.tex</a></p></div>')
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{e(self.title)}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


CSS = """body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
  color: #222; line-height: 1.45; }
h1, h2, h3 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table.data { border-collapse: collapse; margin: .5em 0; font-size: 0.9em; }
table.data th, table.data td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td:first-child, table.data th:first-child { text-align: left; }
p.caption { font-weight: bold; margin-bottom: .2em; }
p.note, p.files { font-size: 0.85em; color: #555; margin-top: .2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
"""


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading; index.html uses the same ids."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _describe(ref: dict[str, Any] | None) -> str:
    if ref is None:
        return "This world has no EMD experiment in the suite, so every ablation level is not run."
    cancel = "injected + initial" if ref["cancel_noise"] and ref["cancel_initial"] else \
        "injected only" if ref["cancel_noise"] else "none"
    return (f"Reference EMD setting (most common value of each key among this world's EMD experiments): "
            f"space {SPACE_LABELS[ref['space']]}, noise cancellation {cancel}, K={ref['K']}, "
            f"init {ref['init']}, gamma_eps={ref['gamma_eps']:g}, gamma_z={ref['gamma_z']:g}, "
            f"teacher {ref['teacher']}, {ref['iterations']} iterations, batch {ref['batch_size']}. "
            f"Each ablation table varies one factor and keeps the rest at this setting.")


# --- build --------------------------------------------------------------------------------------------------


def _write_table(t: Table, tables: Path) -> None:
    t.frame.to_csv(tables / f"{t.name}.csv", index=False, lineterminator="\n")
    tex = t.display().to_latex(index=False, escape=True, caption=t.title, label=f"tab:{t.name}")
    (tables / f"{t.name}.tex").write_text(tex)


def _build(params: Params, suite: str | None, src: Sources, out: Path) -> None:
    import seaborn as sns

    from mct.worlds.registry import make_world

    tables, figures = out / "tables", out / "figures"
    tables.mkdir()
    figures.mkdir()
    entries = collect(params, suite, src)
    names = Counter(e.name for e in entries)
    clash = sorted(n for n, c in names.items() if c > 1)
    if clash:
        raise ValueError(f"report: {clash[0]!r} names both a teacher and an experiment; metrics.json needs "
                         f"unique names")
    kinds = {w: params.worlds[w].kind for w in params.worlds}
    metrics = {e.name: metrics_record(e, kinds[e.world]) for e in entries}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    suite_name = suite or params.suite
    page = Page(f"Mode-Covering Training report: suite {suite_name}")
    ran = sum(e.record is not None for e in entries)
    page.p(f"{ran} of {len(entries)} teachers and experiments have metrics; the others show as '{NOT_RUN}'. "
           f"Machine-readable metrics: metrics.json.")
    worlds = params.suite_worlds(suite)
    per_world: dict[str, dict[str, Any]] = {}
    for w in worlds:
        we = [e for e in entries if e.world == w]
        toy = kinds[w] == "toy2d"
        ref = reference_setting(we)
        logs = {e.name: read_log(src.log(e.name)) for e in we if e.kind == "experiment"}
        members = {ab.name: ablation_members(ab, ref, we) for ab in ABLATIONS}
        per_world[w] = {"entries": we, "reference": ref, "k_members": members["K"]}
        page.h(2, f"World {w} ({kinds[w]})")
        page.table(main_table(w, we, members["K"], toy))
        page.h(3, "Ablations")
        page.p(_describe(ref))
        for ab in ABLATIONS:
            page.table(ablation_table(w, ab, members[ab.name], toy, logs))
        page.table(cost_table(w, we, members["K"]))
        page.h(3, "Figures")
        with sns.axes_style("whitegrid"):  # a context: the caller's matplotlib settings stay as they were
            fig_k_sweep(w, we, members["K"], toy, figures / f"{w}_k_sweep.png")
            fig_noise(w, members["noise"], logs, figures / f"{w}_noise_cancellation.png")
            if toy:
                fig_toy_samples(make_world(w, params.worlds[w]), we, src, figures / f"{w}_samples.png")
                grids = []
            else:
                grids = fig_image_samples(w, we, src, figures)
            fig_speed(w, we, figures / f"{w}_speed.png")
        page.figure(f"{w}_k_sweep.png", f"{w}: FID, recall{', modes covered' if toy else ''} against K "
                                        "(Diff-Instruct dashed, teacher dotted)")
        page.figure(f"{w}_noise_cancellation.png", f"{w}: generator gradient norm and loss over training, "
                                                   "with and without noise cancellation (running mean)")
        page.figure(f"{w}_samples.png", f"{w}: samples of each experiment" + (" over the true mixture density"
                                                                              if toy else ", as image grids"))
        for name in grids:
            page.figure(name, f"{w}: sample grid {name}")
        page.figure(f"{w}_speed.png", f"{w}: samples per second, student against teacher")
        page.h(3, "All experiments")
        page.table(experiments_table(w, we, toy))
    page.h(2, "Paper-scale results")
    page.table(paper_table(params, worlds, per_world))

    for b in page.blocks:
        if b[0] == "table":
            _write_table(b[1], tables)
    (out / "index.md").write_text(page.markdown())
    (out / "index.html").write_text(page.html())


OWNED_DIRS = ("tables", "figures")
OWNED_FILES = ("metrics.json", "index.md", "index.html")


def build_report(params: Params, suite: str | None, out_dir: str | os.PathLike = paths.REPORTS, *,
                 reports_in: str | os.PathLike | None = None,
                 runs_dir: str | os.PathLike | None = None) -> Path:
    """Build the report of ``suite`` into ``out_dir``; returns the path of index.html.

    ``reports_in`` (default paths.REPORTS) holds the evaluator records experiments/*.json and
    teachers/*.json; ``runs_dir`` (default paths.RUNS) holds the logs and samples. Only tables/, figures/,
    metrics.json, index.md and index.html in ``out_dir`` are replaced, and only once the whole build has
    succeeded; anything else there (the evaluator records among it) is left alone.
    """
    out_dir = Path(out_dir)
    src = Sources(Path(paths.REPORTS if reports_in is None else reports_in),
                  Path(paths.RUNS if runs_dir is None else runs_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-build.", dir=out_dir))
    try:
        new = tmp / "new"
        new.mkdir()
        _build(params, suite, src, new)
        old = tmp / "old"
        old.mkdir()
        # Publish: swap each owned folder by rename (the old copy goes to tmp and is deleted), then the files;
        # index.html last, so a reader never sees a page that points at missing files.
        for d in OWNED_DIRS:
            if (out_dir / d).exists():
                os.replace(out_dir / d, old / d)
            os.replace(new / d, out_dir / d)
        for f in OWNED_FILES:
            os.replace(new / f, out_dir / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "index.html"


__all__ = ["build_report", "metrics_record", "reference_setting", "ablation_members", "ABLATIONS", "Entry",
           "Sources", "Table", "fmt", "markdown_table", "image_samples", "NOT_RUN", "EXPERIMENT_KEYS",
           "TEACHER_KEYS", "TOY2D_KEYS"]
