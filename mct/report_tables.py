"""The report's tables: ``Table`` (raw values for CSV, formatted cells for markdown, HTML and LaTeX), the
metrics' display names, the ablations and the main, ablation, cost, experiments, paper and text-to-image tables,
and the noise floor of the main table.

Tables hold only rows with results: a level of the paper's design (a sampling space, a cancellation setting, a K, an
initialisation, a step size), a method or a run of the suite without metrics is no row; ``Table.missing`` names
them in one line under the table.

Ablations follow the paper: each table holds the experiments of a world that differ from the world's
reference EMD setting in that factor alone. The reference is, per setting key, the most common value among the
world's EMD experiments in the suite (ties: the first in suite order); the page states it.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mct.config import Params
from mct.report_collect import NA, NOT_RUN, Entry, is_number
from mct.worlds.base import World

PAPER_NUMBERS = Path(__file__).parent / "data" / "paper_numbers.csv"
PAPER_K = (1, 2, 4, 8, 16)  # Langevin steps of the paper's K sweep and cost table (EMD-1..16)

# Setting keys of an experiment: the ablated factors, then controls that must match for runs to be comparable.
FACTOR_KEYS = ("space", "cancel_noise", "cancel_initial", "K", "init", "gamma_eps", "gamma_z")
CONTROL_KEYS = ("teacher", "iterations", "batch_size", "estep_teacher", "z_step")
SPACE_LABELS = {"eps_z": "(eps, z)", "x_z": "(x, z)", "eps": "eps", "x": "x"}
PAPER_ITERATIONS = 100_000  # the paper's distillation budgets are at least this many iterations (ImageNet)


# Display names of the metrics (metrics.json keys stay as they are): what each distance is, with the direction of
# better. The Frechet distance is FID only in Inception's feature space.
UP, DOWN = "\u2191", "\u2193"
METRIC_NAMES = {"precision": f"precision {UP}", "recall": f"recall {UP}", "modes_covered": f"modes covered {UP}",
                "mode_tv": f"mode TV {DOWN}", "mode_precision": f"mode precision {UP}", "nll": f"NLL (nats) {DOWN}",
                "samples_per_s": f"samples/s {UP}", "sec_per_iter": f"sec/iter {DOWN}",
                "clip_score": f"CLIP score {UP}", "convergence_auc": f"convergence AUC {DOWN}"}
METRIC_DEFINITIONS = (
    "FD (2-D): Frechet distance between Gaussians fitted to the 2-D points themselves (toy2d). "
    "FD (digits classifier): the same distance in the penultimate features of a classifier trained on the digits "
    "training split (not Inception, so not comparable with any FID). FID: Inception features (clean-fid, "
    "legacy_tensorflow), paper-scale worlds only. Precision and recall: k-NN manifolds (k = 3) in the same features. "
    "Modes covered: mixture components that receive at least 10% of their expected share of samples within 3 "
    "standard deviations; mode TV: total variation between those samples' mode frequencies and the true weights; "
    "mode precision: fraction of samples within 3 standard deviations of some mode; NLL: -mean log p(x) of the "
    "samples under the true mixture, in nats (toy2d). CLIP score (text2image): mean cosine between open_clip "
    "embeddings of each image and of 'A photo depicts ' + its caption, as DMD reports it. "
    "Arrows: the direction of better.")


def metric_name(key: str, world_def: World | None) -> str:
    """The column header of a metrics.json key in this world: its Frechet distance is named by its feature space
    (World.fd_name)."""
    if key == "fid":
        return f"{world_def.fd_name if world_def is not None else 'FID'} {DOWN}"
    return METRIC_NAMES.get(key, key)


def plain_metric_name(name: str) -> str:
    """A display name without its direction arrow (for running text)."""
    return name.replace(f" {UP}", "").replace(f" {DOWN}", "")


@dataclass
class Table:
    """A table of raw values (CSV) that renders, formatted, as markdown, HTML and LaTeX."""

    name: str  # file stem under tables/
    title: str
    frame: pd.DataFrame
    note: str = ""
    missing: str = ""  # one line under the table: what has no row because it was not run (empty: nothing)

    def display(self) -> pd.DataFrame:
        return self.frame.apply(lambda col: col.map(fmt)) if len(self.frame) else self.frame.astype(str)


@dataclass(frozen=True)
class Estimate:
    """A seed mean with its 95% Student-t interval (mct.aggregate): one cell, 'mean [lo, hi]'."""

    mean: float
    lo: float
    hi: float
    clipped: bool = False  # the t-interval crossed the metric's range and was cut to it

    def __str__(self) -> str:
        return f"{fmt(self.mean)} [{fmt(self.lo)}, {fmt(self.hi)}]" + ("*" if self.clipped else "")


# The ranges of bounded metrics: a t-interval that leaves one is cut to it and starred (SEEDED_NOTE says so).
# modes_covered is bounded by the record's modes_total.
METRIC_RANGE = {"precision": (0.0, 1.0), "recall": (0.0, 1.0), "mode_tv": (0.0, 1.0), "mode_precision": (0.0, 1.0),
                "fid": (0.0, math.inf), "mode_coverage": (0.0, 1.0), "modes_covered": (0.0, None)}


def with_interval(entry: Entry | None, key: str, value: Any) -> Any:
    """``value`` with its interval when the entry aggregates several seeds (else the value alone)."""
    rec = entry.record if entry is not None else None
    if not rec or not is_number(value):
        return value
    lo, hi = rec.get(f"{key}_ci95_lo"), rec.get(f"{key}_ci95_hi")
    if not (is_number(lo) and is_number(hi)):
        return value
    low, high = METRIC_RANGE.get(key, (-math.inf, math.inf))
    if key == "modes_covered":
        high = float(rec["modes_total"]) if is_number(rec.get("modes_total")) else math.inf
    lo_c, hi_c = max(float(lo), low), min(float(hi), high)
    return Estimate(float(value), lo_c, hi_c, clipped=(lo_c, hi_c) != (float(lo), float(hi)))


def fmt(v: Any) -> str:
    """Cell text: strings stay, null -> 'n/a', floats to 3 significant digits (what 3-5 seeds resolve), booleans
    yes/no, a seed mean with its interval as 'mean [lo, hi]'."""
    if isinstance(v, Estimate):
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NA
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.3g}"
    return str(v)


def _metric_cells(entry: Entry | None, world_def: World | None = None) -> dict[str, Any]:
    """The quality columns of a row, headed by metric_name (``world_def``: the world, whose metrics against its true
    distribution, World.exact_metric_keys, follow in its order)."""
    get = (lambda k: NOT_RUN) if entry is None else (lambda k: with_interval(entry, k, entry.get(k)))
    cells = {metric_name(k, world_def): get(k) for k in ("fid", "precision", "recall")}
    for k in world_def.conditional_metric_keys if world_def is not None else ():  # text2image: CLIP score
        cells[metric_name(k, world_def)] = get(k)
    for k in world_def.exact_metric_keys if world_def is not None else ():
        if k == "modes_total":  # shown as the denominator of modes covered
            continue
        covered, total = get(k), get("modes_total")
        cells[metric_name(k, world_def)] = f"{covered}/{total}" \
            if k == "modes_covered" and isinstance(covered, int) and isinstance(total, int) else covered
    return cells


def headline_table(world: str, main: Table, world_def: World) -> Table:
    """The main table in the paper's form, for the page's summary: method, NFE and the world's primary metrics
    only (World.primary_metrics, in its order), the noise floor and teacher rows included."""
    cols = [c for c in (metric_name(k, world_def) for k, _ in world_def.primary_metrics) if c in main.frame]
    frame = main.frame[[c for c in ("method", "NFE") if c in main.frame] + cols] if len(main.frame) else main.frame
    return Table(f"{world}_headline", f"{world}: the world's primary metrics (method, NFE, seed mean [95% t])",
                 frame.reset_index(drop=True), SEEDED_NOTE.strip(), main.missing)


# The short factor keys as the resolved settings (Entry.setting["settings"]) name them.
RESOLVED_KEY = {"space": "distill.space", "cancel_noise": "distill.cancel_noise",
                "cancel_initial": "distill.cancel_initial", "K": "distill.K", "init": "student.init",
                "gamma_eps": "distill.gamma_eps", "gamma_z": "distill.gamma_z", "z_step": "distill.z_step"}


def _mode(values: list[Any]) -> Any:
    """The most common value (ties: first seen); values compared by their JSON text (lists are unhashable)."""
    counts = Counter(json.dumps(v, sort_keys=True, default=str) for v in values)
    best = max(counts.values())
    return next(v for v in values if counts[json.dumps(v, sort_keys=True, default=str)] == best)


def reference_setting(entries: Sequence[Entry]) -> dict[str, Any] | None:
    """Per setting key, the most common value among EMD experiments (ties: first seen), and under ``settings`` the
    same over every resolved setting; None without any EMD experiment."""
    emd = [e.setting for e in entries if e.kind == "experiment" and e.setting["method"] == "emd"]
    if not emd:
        return None
    ref: dict[str, Any] = {k: _mode([s.get(k) for s in emd]) for k in FACTOR_KEYS + CONTROL_KEYS}
    full = [s.get("settings", {}) for s in emd]
    ref["settings"] = {k: _mode([f.get(k) for f in full]) for k in dict.fromkeys(k for f in full for k in f)}
    return ref


def differs_from_reference(setting: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """The resolved settings in which an experiment differs from the reference (``distill.cancel_scheme``, ...)."""
    mine, theirs = setting.get("settings", {}), ref.get("settings", {})
    return [k for k in dict.fromkeys([*theirs, *mine]) if k != "method" and mine.get(k) != theirs.get(k)]


def one_factor(setting: dict[str, Any], ref: dict[str, Any], free: Sequence[str]) -> bool:
    """The experiment differs from the reference in nothing but the ablation's free keys."""
    allowed = {RESOLVED_KEY.get(k, k) for k in free}
    return set(differs_from_reference(setting, ref)) <= allowed


def outside_every_ablation(entries: Sequence[Entry], ref: dict[str, Any] | None) -> dict[str, list[str]]:
    """EMD experiments that differ from the reference in more than any one ablation's factor: name -> the
    resolved settings that differ. They are rows of no ablation table (a table varies one factor)."""
    if ref is None:
        return {}
    out = {}
    for e in entries:
        if e.kind != "experiment" or e.setting["method"] != "emd":
            continue
        diff = differs_from_reference(e.setting, ref)
        if diff and not any(one_factor(e.setting, ref, ab.free) for ab in ABLATIONS):
            out[e.name] = diff
    return out


@dataclass(frozen=True)
class Ablation:
    """A factor of the paper's ablations: ``free`` keys vary, all other setting keys stay at the reference."""

    name: str
    title: str
    column: str
    free: tuple[str, ...]
    levels: Callable[[dict[str, Any] | None, list[dict[str, Any]]], list[tuple[Any, dict[str, Any]]]]
    note: str = ""
    noun: str = ""  # 'sampling-space' in "no sampling-space ablation in this suite"
    others: str = ""  # what the levels without a row are: "the paper's other sampling spaces"


def _observed(ref: dict[str, Any], settings: list[dict[str, Any]], free: tuple[str, ...]) -> list[tuple]:
    """Values of the free keys among settings that match the reference everywhere else."""
    keys = [k for k in FACTOR_KEYS + CONTROL_KEYS if k not in free]
    return [tuple(s[k] for k in free) for s in settings if all(s.get(k) == ref.get(k) for k in keys)]


def _k_levels(ref, settings):
    ks = sorted(set(PAPER_K) | ({k for (k,) in _observed(ref, settings, ("K",))} if ref else set()))
    return [(k, {"K": k}) for k in ks]


def _step_levels(ref, settings):
    if ref is None:
        return []
    pairs = {(ref["gamma_eps"], ref["gamma_z"])} | set(_observed(ref, settings, ("gamma_eps", "gamma_z")))
    pairs = sorted(pairs)
    return [(f"gamma_eps={ge:g}, gamma_z={gz:g}", {"gamma_eps": ge, "gamma_z": gz}) for ge, gz in pairs]


def _z_step_levels(ref, settings):
    if ref is None:
        return []
    pairs = sorted({(ref.get("z_step"), ref["gamma_z"])} | set(_observed(ref, settings, ("z_step", "gamma_z"))),
                   key=str)
    return [(f"{zs}, gamma_z={gz:g}", {"z_step": zs, "gamma_z": gz}) for zs, gz in pairs]


ABLATIONS = (
    Ablation("space", "Sampling space of the E-step", "sampling space", ("space",),
             lambda ref, s: [(lab, {"space": sp}) for sp, lab in SPACE_LABELS.items()],
             noun="sampling-space", others="the paper's other sampling spaces"),
    Ablation("noise", "Noise cancellation", "cancellation", ("cancel_noise", "cancel_initial"),
             lambda ref, s: [("none", {"cancel_noise": False}),
                             ("injected only", {"cancel_noise": True, "cancel_initial": False}),
                             ("injected + initial", {"cancel_noise": True, "cancel_initial": True})],
             "grad norm: mean generator gradient norm over the last 10% of iterations (log.jsonl).",
             noun="noise-cancellation", others="the paper's other cancellation settings"),
    Ablation("K", "Number of Langevin steps K", "K", ("K",), _k_levels, noun="K",
             others="the paper's other K"),
    Ablation("init", "Generator initialisation", "initialisation", ("init",),
             lambda ref, s: [("teacher", {"init": "teacher"}), ("scratch", {"init": "scratch"})],
             noun="initialisation", others="the paper's other initialisation"),
    Ablation("z_step", "Scheme of the E-step's z step", "z step", ("z_step", "gamma_z"), _z_step_levels,
             "shrink: gamma_z shrunk at small sigma by z_step_ref; curvature: gamma_z / (1 + lambda_max(J^T J) / "
             "sigma^2) per chain. Each run's cancellation scheme is the one params.yaml gives it.",
             noun="z-step", others="the suite's other z-step schemes"),
    Ablation("step_size", "Langevin step sizes", "step sizes", ("gamma_eps", "gamma_z"), _step_levels,
             noun="step-size", others="the suite's other step sizes"),
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
        members = [e for e in exps if all(e.setting.get(k) == ref.get(k) for k in fixed)
                   and all(e.setting.get(k) == v for k, v in values.items())
                   and one_factor(e.setting, ref, ab.free)]
        out.append((label, sorted(members, key=lambda e: e.name)))
    return out


def _tail_mean(log: pd.DataFrame | None, key: str) -> Any:
    if log is None or key not in log:
        return "no log"  # the run has metrics but its log.jsonl (or this column) is missing
    v = log[key].to_numpy(dtype=float)
    return float(v[-max(1, len(v) // 10):].mean())


def ran(e: Entry | None) -> bool:
    """The entry has metrics (an evaluator record): only such entries are rows of a table."""
    return e is not None and e.record is not None


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _not_run_label(label: Any, group: Sequence[Entry] = ()) -> str:
    """A row that has no results: its label, and the suite's runs at it that have no metrics (if any)."""
    names = [e.name for e in group if not ran(e)]
    return f"{label} ({', '.join(names)}: no metrics)" if names else str(label)


def not_run_line(labels: Sequence[str], what: str = "") -> str:
    """'Not run in this suite: a, b (what).' -- the line under a table that names its absent rows; '' if none."""
    if not labels:
        return ""
    return f"Not run in this suite: {', '.join(labels)}" + (f" ({what})" if what else "") + "."


def levels_with_results(members: list[tuple[Any, list[Entry]]]) -> list[Any]:
    """The ablation levels at which some experiment has metrics."""
    return [label for label, group in members if any(ran(e) for e in group)]


def ablation_varied(members: list[tuple[Any, list[Entry]]]) -> bool:
    """Whether the ablation is one: at least two of its levels have results (else it is a line, not a table)."""
    return len(levels_with_results(members)) >= 2


def ablation_line(world: str, ab: Ablation, members: list[tuple[Any, list[Entry]]], ref: dict[str, Any] | None,
                  carriers: Sequence[str]) -> str:
    """The line that stands for an ablation with fewer than two levels with results; ``carriers``: the worlds of
    the report whose table of this ablation is printed."""
    done = [(label, [e for e in group if ran(e)]) for label, group in members]
    done = [(label, group) for label, group in done if group]
    if ref is None:
        why = "this world has no EMD experiment"
    elif not done:
        why = "no experiment at the reference setting has metrics"
    elif all(done[0][1][0].setting[k] == ref[k] for k in ab.free):
        why = "only the reference setting ran"
    else:
        why = f"only {ab.column} {done[0][0]} ran"
    others = [w for w in carriers if w != world]
    tail = f"; {_and(others)} {'carries' if len(others) == 1 else 'carry'} it" if others else ""
    return f"{world}: no {ab.noun} ablation in this suite ({why}){tail}."


SEEDED_NOTE = (" A run over several seeds shows the seed mean and its 95% Student-t interval, 'mean [lo, hi]' (n: the "
               "provenance table); * marks an interval cut to the metric's range (0 to 1, or to the number of "
               "modes), where the t-interval of a few seeds left it.")


def ablation_table(world: str, ab: Ablation, members: list[tuple[Any, list[Entry]]],
                   logs: dict[str, pd.DataFrame | None], world_def: World | None = None) -> Table:
    """One row per experiment with metrics at each level; the levels without one are named under the table."""
    rows = []
    for label, group in members:
        for e in (e for e in group if ran(e)):
            row = {ab.column: label, "experiment": e.name, **_metric_cells(e, world_def)}
            if ab.name == "noise":
                row["grad norm"] = _tail_mean(logs.get(e.name), "grad_norm_gen")
            rows.append(row)
    missing = [_not_run_label(label, group) for label, group in members if not any(ran(e) for e in group)]
    if missing and ab.name == "K":  # 'K = 1, 2, 8, 16', not bare numbers
        missing = ["K = " + ", ".join(missing)]
    return Table(f"{world}_{ab.name}", f"{world}: {ab.title}", pd.DataFrame(rows, dtype=object),
                 ab.note, not_run_line(missing, ab.others))  # SEEDED_NOTE: once, under the summary's table


def main_table(world: str, entries: Sequence[Entry], k_members: list[tuple[Any, list[Entry]]],
               world_def: World | None = None, floor: dict[str, Any] | None = None) -> Table:
    """Teacher, Diff-Instruct and EMD-K rows; ``floor`` (noise_floor's record) adds the real-vs-real row."""
    rows, missing = [], []
    # a suite that compares methods at unequal iterations (equal wall-clock) says each row's in its label
    budgets = {e.setting.get("iterations") for e in entries if e.kind == "experiment" and ran(e)}

    def add(method: str, e: Entry, nfe: Any) -> None:
        if len(budgets) > 1 and e.kind == "experiment":
            method += f", {e.setting['iterations']:,} iterations"
        rows.append({"method": method, "experiment": e.name, "NFE": nfe, **_metric_cells(e, world_def),
                     metric_name("samples_per_s", world_def): e.get("samples_per_s")})

    if floor is not None:
        rec = Entry("-", "floor", world, {}, floor)
        rows.append({"method": "Real data: training vs held-out split (noise floor)", "experiment": "-",
                     "NFE": "-", **_metric_cells(rec, world_def),
                     metric_name("samples_per_s", world_def): "-"})

    for t in (e for e in entries if e.kind == "teacher"):
        if ran(t):
            nfe = t.get("nfe") if is_number(t.get("nfe")) else t.setting["nfe"]
            add(f"Teacher ({nfe:g} NFE)", t, nfe)
        else:
            missing.append(_not_run_label("Teacher", [t]))
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    for e in (e for e in dis if ran(e)):
        add("Diff-Instruct (K=1)", e, 1)
    if not any(ran(e) for e in dis):
        missing.append(_not_run_label("Diff-Instruct (K=1)", dis))
    peers = [e for e in entries if e.kind == "experiment" and e.setting["method"] in PEER_LABELS]
    for e in (e for e in peers if ran(e)):
        add(peer_label(e), e, 1)
    emd = [(k, e) for k, group in k_members for e in group if ran(e)]
    for k, e in emd:
        add(f"EMD-{k}", e, 1)
    missing += [_not_run_label(f"EMD-{k}", group) for k, group in k_members
                if group and not any(ran(e) for e in group)]  # the suite's K without metrics
    if not any(group for _, group in k_members):
        missing.append("EMD-K")
    note = ("EMD-K rows: the world's reference EMD setting at each K that the suite runs; 'mean [lo, hi]' as in the "
            "summary's table.")
    if peers:
        note += (" SiD and DMD2 rows: the peers in the same loop (mct.methods), with the same teacher, generator "
                 "initialisation, fake-score training and " + ("iterations" if len(budgets) <= 1 else
                 "training time per run (the iterations in each label: equal wall-clock by the timing benchmark)")
                 + "; the settings in which they differ are in the settings table.")
    if floor is not None:
        note += (f" Noise floor: {floor['count']:,} training-split points against the held-out reference set "
                 "through the same metrics; no model can be told apart from the data below it.")
    return Table(f"{world}_main", f"{world}: one-step students against the teacher",
                 pd.DataFrame(rows, dtype=object), note, not_run_line(missing))


# The peers that distill.method runs in EMD's loop (mct.methods), as the main table names them.
PEER_LABELS = {"sid": "SiD", "dmd2": "DMD2"}


def peer_label(e: Entry) -> str:
    """'SiD (alpha=1.2)', 'DMD2 (5 fake-score steps per generator step)': the method and its own keys."""
    s = e.setting.get("settings", {})
    if e.setting["method"] == "sid":
        return f"SiD (alpha={s.get('distill.sid_alpha', 1.2):g})"
    reg = s.get("distill.regression_weight")
    return (f"DMD2 ({s.get('distill.score_steps', 1)} fake-score steps per generator step"
            + (f", DMD's regression x {reg:g})" if reg else ")"))


def cost_table(world: str, entries: Sequence[Entry], k_members: list[tuple[Any, list[Entry]]]) -> Table:
    all_dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    dis = [e for e in all_dis if ran(e)]
    rows = [("Diff-Instruct", 1, e) for e in dis]
    missing = [] if dis else [_not_run_label("Diff-Instruct", all_dis)]
    emd_missing = []
    for k, group in k_members:
        done = [e for e in group if ran(e)]
        rows += [(f"EMD-{k}", k, e) for e in done]
        if not done:
            emd_missing.append(_not_run_label(f"EMD-{k}", group))
    if emd_missing:
        missing.append(", ".join(emd_missing) + " (the paper's other K)")
    base = next((e.get("sec_per_iter") for e in dis if is_number(e.get("sec_per_iter"))), None)

    def rel(e: Entry) -> Any:
        v = e.get("sec_per_iter")
        return v / base if isinstance(v, (int, float)) and base else None

    frame = pd.DataFrame(dtype=object, data=[
        {"method": m, "K": k, "experiment": e.name,
         metric_name("sec_per_iter", ""): with_interval(e, "sec_per_iter", e.get("sec_per_iter")),
         "E-step sec/iter": with_interval(e, "sec_per_iter_estep", e.get("sec_per_iter_estep")),
         "x Diff-Instruct": rel(e)} for m, k, e in rows])
    return Table(f"{world}_cost", f"{world}: training cost per iteration", frame,
                 "Mean over the last 10% of iterations of score + E-step + M-step time (summary.json); with several "
                 "seeds, the seed mean [95% t-interval]; x Diff-Instruct: ratio of the seed means.",
                 not_run_line(missing))


def experiments_table(world: str, entries: Sequence[Entry], world_def: World | None = None) -> Table:
    rows = []
    for e in (e for e in entries if e.kind == "experiment" and ran(e)):
        s = e.setting  # the other settings: the settings table below it (every one in which the rows differ)
        rows.append({"experiment": e.name, "method": s["method"], "K": s["K"],
                     "iterations": s["iterations"], **_metric_cells(e, world_def),
                     metric_name("samples_per_s", world_def): e.get("samples_per_s"),
                     metric_name("sec_per_iter", world_def): e.get("sec_per_iter")})
    note = ("NLL: -mean log p(x) of the samples under the true mixture, in nats."
            if world_def is not None and "nll" in world_def.exact_metric_keys else "")
    missing = [_not_run_label(e.name) for e in entries if e.kind == "experiment" and not ran(e)]
    return Table(f"{world}_experiments", f"{world}: every experiment of the suite with metrics",
                 pd.DataFrame(rows, dtype=object), note, not_run_line(missing, "in the suite, no metrics"))


def settings_table(world: str, entries: Sequence[Entry]) -> Table:
    """Every resolved setting of every experiment of the world (mct.report_collect.resolved_settings): the
    settings in which its experiments differ, one row each (and in the CSV); the line under it gives every setting
    they share. metrics.json has every setting of each row under ``settings``."""
    exps = [e for e in entries if e.kind == "experiment"]
    full = [e.setting.get("settings", {}) for e in exps]
    keys = list(dict.fromkeys(k for f in full for k in f))
    text = {k: [json.dumps(f.get(k), default=str) for f in full] for k in keys}
    varied = [k for k in keys if len(set(text[k])) > 1]
    shared = [k for k in keys if k not in varied]
    frame = pd.DataFrame([{"experiment": e.name, **{k: _setting_cell(f.get(k)) for k in varied}}
                          for e, f in zip(exps, full, strict=True)], dtype=object)
    note = ("Shared by every experiment above: "
            + ", ".join(f"{k}={_setting_cell(full[0].get(k))}" for k in shared) + ".") if shared and full else ""
    return Table(f"{world}_settings", f"{world}: the settings in which its experiments differ", frame, note)


def _setting_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_setting_cell(x) for x in v) + ")"
    return "null" if v is None else str(v)


def paper_tables(params: Params, worlds: Sequence[str], world_tables: dict[str, dict[str, Any]]) -> list[Table]:
    """The EMD paper's reported numbers beside ours, then the other methods' numbers, each with its source.

    mct/data/paper_numbers.csv keeps numbers as published (strings: 2.20, 6.0); ``from_emd_paper`` says whether
    the EMD paper reports the row itself. Ours is '-' unless the suite has a matching (Inception) world that ran
    the method; the line under each table names the paper-scale rows that this suite does not run.
    """
    paper = pd.read_csv(PAPER_NUMBERS, dtype=str, keep_default_na=False)
    own, other = [], []
    not_here: dict[bool, list[tuple[str, str]]] = {True: [], False: []}  # from_emd_paper -> (method, dataset)
    for r in paper.itertuples(index=False):
        world = _paper_world(params, worlds, r.dataset)
        ours: Any = "-"
        if world is not None:
            ours = _ours(r.method, world_tables[world])
        elif _ours_method(r.method):
            ours = NOT_RUN
        if ours == NOT_RUN:  # a row of ours that this suite does not run: no cell, a name in the line
            ours = "-"
            not_here[r.from_emd_paper == "yes"].append((r.method, r.dataset))
        row = {"dataset": r.dataset, "method": r.method, "NFE": r.nfe or None,
               f"FID {DOWN} (reported)": r.fid, f"FID {DOWN} (ours)": ours, "source": r.source}
        (own if r.from_emd_paper == "yes" else other).append(row)
    legend = ("'-' (ours): a method this project does not implement, or a row this suite does not run (named "
              "under the table).")
    return [Table("paper", "Paper-scale results: the EMD paper's numbers beside ours", pd.DataFrame(own, dtype=object),
                  legend, _paper_not_run(params, not_here[True])),
            Table("paper_other", "Other methods, other sources (not rows of the EMD paper)",
                  pd.DataFrame(other, dtype=object),
                  "Numbers read from the paper named in 'source', for context; they are not the EMD paper's "
                  "comparison rows. CIFAR-10 FIDs are of 50,000 samples against the 50,000 training images, as "
                  "every source reports them. " + legend,
                  _paper_not_run(params, not_here[False]))]


def _planning_suites(params: Params, datasets: Sequence[str]) -> list[str]:
    """The suites of params that run a world of one of the paper's ``datasets`` (params order)."""
    from mct.worlds.registry import make_world

    worlds = {w for w in params.worlds if make_world(w, params.worlds[w]).paper_dataset in set(datasets)}
    return [s for s in params.suites if worlds & set(params.suite_worlds(s))]


def _paper_not_run(params: Params, rows: Sequence[tuple[str, str]], why: str = "") -> str:
    """The line under a paper-scale table: its rows of ours (method, dataset) that this suite does not run."""
    if not rows:
        return ""
    suites = _planning_suites(params, [d for _, d in rows])
    plan = (f"suite{'s' if len(suites) > 1 else ''} {', '.join(suites)} plan{'' if len(suites) > 1 else 's'} "
            f"{'them' if len(rows) > 1 else 'it'}" if suites else "no suite of params.yaml plans them")
    return (f"Not run here: {'; '.join(f'{m} on {d}' for m, d in rows)} "
            f"({why or 'paper-scale rows: they need a GPU cluster'}; {plan}).")


T2I_DATASET = "COCO-2014 30k, SD v1.5"
T2I_WHY = ("the paper's protocol needs Stable Diffusion v1.5's weights, COCO-2014 and a multi-GPU cluster: DMD "
           "trained on 72 GPUs")


def text_to_image_table(params: Params, worlds: Sequence[str], world_tables: dict[str, dict[str, Any]]) -> Table:
    """The paper's zero-shot COCO-2014 rows beside ours (FID and CLIP score), then each text2image world of the suite
    that does not follow the paper's protocol (the tiny test world), labelled as such."""
    from mct.worlds.registry import make_world

    paper = pd.read_csv(PAPER_NUMBERS, dtype=str, keep_default_na=False)
    paper_world = _paper_world(params, worlds, T2I_DATASET)
    rows, not_here, no_metrics = [], [], []
    for r in paper[paper.dataset == T2I_DATASET].itertuples(index=False):
        ours: Any = "-"  # a method this project does not implement (DMD), or not run here (named under the table)
        if _ours_method(r.method):
            ours = NOT_RUN if paper_world is None else _ours(r.method, world_tables[paper_world])
            if ours == NOT_RUN:
                ours = "-"
                not_here.append((r.method, r.dataset))
        rows.append({"world": paper_world or "-", "method": r.method, "NFE": r.nfe or None,
                     f"FID {DOWN} (reported)": r.fid, f"FID {DOWN} (ours)": ours, f"CLIP score {UP} (ours)": "-",
                     "source": r.source})
    for w in worlds:
        world = make_world(w, params.worlds[w])
        if "clip_score" not in world.conditional_metric_keys or w == paper_world:
            continue
        for e in world_tables[w]["entries"]:
            if not ran(e):
                no_metrics.append(e.name)
                continue
            method = "teacher" if e.kind == "teacher" else e.setting.get("method", "")
            rows.append({"world": w, "method": f"{method} ({e.name}; not the paper's protocol)",
                         "NFE": e.get("nfe"), f"FID {DOWN} (reported)": "-", f"FID {DOWN} (ours)": e.get("fid"),
                         f"CLIP score {UP} (ours)": e.get("clip_score"), "source": "-"})
    missing = " ".join(x for x in (_paper_not_run(params, not_here, T2I_WHY), not_run_line(
        no_metrics, "text2image runs of the suite without metrics")) if x)
    return Table("text_to_image", "Text-to-image: zero-shot COCO-2014 30k (the paper's rows) and our text2image "
                 "worlds", pd.DataFrame(rows, dtype=object),
                 "FID: clean-fid Inception ('clean' mode) of 256-px centre crops (Lanczos) of the generations against "
                 "the same crops of the captions' val2014 images. Rows of a world that is not the paper's protocol "
                 "(fewer prompts, a tiny random-weight model) test the pipeline, not the method.", missing)


def _paper_world(params: Params, worlds: Sequence[str], dataset: str) -> str | None:
    """The first of ``worlds`` that is the paper table's ``dataset`` (World.paper_dataset, e.g. 'ImageNet 64x64')."""
    from mct.worlds.registry import make_world

    matches = [w for w in worlds if make_world(w, params.worlds[w]).paper_dataset == dataset]
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
    if not found:
        return NOT_RUN
    fid, n = found[0].get("fid"), found[0].get("fid_samples")
    return fid if fid is None or n is None else f"{fid:.2f} ({n:,} samples)"


def noise_floor(world, num_samples: int, feature_path: Path | None) -> dict[str, Any] | None:
    """The metrics of real data against real data: up to ``num_samples`` points of the world's training split
    against its held-out split (the FD reference set), through the evaluator's metrics. toy2d always (the data
    is regenerated from params); digits when its feature network exists; None otherwise."""
    from mct.evaluate import PR_MAX, FeatureSpace
    from mct.metrics import fid as fidlib
    from mct.metrics.precision_recall import precision_recall

    if not world.noise_floor_ready(feature_path):
        return None
    with tempfile.TemporaryDirectory(prefix="mct-floor-") as tmp:
        data = Path(tmp) / "data.npz"
        world.prepare(data)  # the prepare stage's own code: the same splits as runs/data
        train, _ = world.load_split(data, "train")
        test, _ = world.load_split(data, "test")
    space = FeatureSpace(world, feature_path if world.needs_feature_net else None, "cpu")
    x = train[:num_samples]
    fx, fr = space(x), space(test)
    rec: dict[str, Any] = {"fid": fidlib.fid_from_stats(*fidlib.feature_stats(fx), *fidlib.feature_stats(fr)),
                           "count": int(len(x)), "reference_count": int(len(test))}
    p, r = precision_recall(fr[:PR_MAX], fx[:PR_MAX])
    rec.update(precision=float(p), recall=float(r))
    rec.update(world.exact_metrics(x))
    return rec
