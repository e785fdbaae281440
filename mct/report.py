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
from mct.aggregate import read_experiment  # seeds: mean, std, n, 95% t-interval
from mct.config import ExperimentConfig, Params
from mct.diffusion import heun_nfe
from mct.worlds.base import World

NOT_RUN = "not run"
NA = "n/a"  # the run exists but the evaluator left this value null
PAPER_NUMBERS = Path(__file__).parent / "data" / "paper_numbers.csv"
PAPER_K = (1, 2, 4, 8, 16)  # Langevin steps of the paper's K sweep and cost table (EMD-1..16)

EXPERIMENT_KEYS = ("experiment", "world", "method", "K", "nfe", "space", "cancel_noise", "cancel_initial",
                   "init", "gamma_eps", "gamma_z", "iterations", "fid", "precision", "recall",
                   "samples_per_s", "teacher_samples_per_s", "teacher_nfe", "speedup", "speedup_over_nfe",
                   "sec_per_iter", "sec_per_iter_estep")
TEACHER_KEYS = ("teacher", "world", "method", "K", "nfe", "fid", "precision", "recall", "samples_per_s")

# Setting keys of an experiment: the ablated factors, then controls that must match for runs to be comparable.
FACTOR_KEYS = ("space", "cancel_noise", "cancel_initial", "K", "init", "gamma_eps", "gamma_z")
CONTROL_KEYS = ("teacher", "iterations", "batch_size", "estep_teacher")
SPACE_LABELS = {"eps_z": "(eps, z)", "x_z": "(x, z)", "eps": "eps", "x": "x"}
PAPER_ITERATIONS = 100_000  # the paper's distillation budgets are at least this many iterations (ImageNet)

# Display names of the metrics (metrics.json keys stay as they are): what each distance is, with the direction of
# better. The Frechet distance is FID only in Inception's feature space.
UP, DOWN = "\u2191", "\u2193"
METRIC_NAMES = {"precision": f"precision {UP}", "recall": f"recall {UP}", "modes_covered": f"modes covered {UP}",
                "mode_tv": f"mode TV {DOWN}", "mode_precision": f"mode precision {UP}", "nll": f"NLL (nats) {DOWN}",
                "samples_per_s": f"samples/s {UP}", "sec_per_iter": f"sec/iter {DOWN}",
                "clip_score": f"CLIP score {UP}"}
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

    def summary(self, exp: str) -> Path:
        return self._rebase(paths.distill_dir(exp) / "summary.json", paths.RUNS, self.runs)

    def teacher(self, teacher: str) -> Path:
        return self._rebase(paths.teacher_file(teacher), paths.RUNS, self.runs)

    def feature_net(self, world: str) -> Path:
        return self._rebase(paths.feature_net(world), paths.RUNS, self.runs)


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
            "batch_size": d.batch_size, "estep_teacher": d.estep_teacher, "seed": d.seed,
            "eval_samples": exp.eval.num_samples, "eval_seed": exp.eval.seed}


def collect(params: Params, suite: str | None, src: Sources) -> list[Entry]:
    entries = []
    for t in params.suite_teachers(suite):
        tcfg = params.teacher(t)
        entries.append(Entry(t, "teacher", tcfg.world, {"nfe": heun_nfe(tcfg.sampler_steps)},
                             _read_json(src.teacher_metrics(t))))
    for e in params.suite_experiments(suite):
        exp = params.experiment(e)
        entries.append(Entry(e, "experiment", exp.world, experiment_setting(exp),
                             read_experiment(e, params.experiment_seeds(e, suite), src.experiment_metrics)))
    return entries


def read_log(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, dtype=object) if rows else None


# --- metrics.json -------------------------------------------------------------------------------------------


def metrics_record(entry: Entry, world_def: World) -> dict[str, Any]:
    """The flat metrics.json record of one experiment or teacher.

    Always present: ``status`` ('ok' | 'not run') and, for experiments, EXPERIMENT_KEYS, for teachers
    TEACHER_KEYS, plus the world's exact metrics (World.exact_metric_keys: toy2d's mode statistics); absent values
    are null. A not-run entry carries its
    settings from params.yaml. Further keys that the evaluator wrote are passed through unchanged.
    """
    keys = EXPERIMENT_KEYS if entry.kind == "experiment" else TEACHER_KEYS
    keys = keys + tuple(world_def.exact_metric_keys) + tuple(world_def.conditional_metric_keys)
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


def _metric_cells(entry: Entry | None, toy: bool, world_def: World | None = None) -> dict[str, Any]:
    """The quality columns of a row, headed by metric_name (``world_def``: the world; ``toy``: it has mode
    statistics)."""
    get = (lambda k: NOT_RUN) if entry is None else entry.get
    cells = {metric_name(k, world_def): get(k) for k in ("fid", "precision", "recall")}
    for k in world_def.conditional_metric_keys if world_def is not None else ():  # text2image: CLIP score
        cells[metric_name(k, world_def)] = get(k)
    if toy:
        covered, total = get("modes_covered"), get("modes_total")
        cells[metric_name("modes_covered", world_def)] = f"{covered}/{total}" \
            if isinstance(covered, int) and isinstance(total, int) else covered
        cells[metric_name("mode_tv", world_def)] = get("mode_tv")
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
                   logs: dict[str, pd.DataFrame | None], world_def: World | None = None) -> Table:
    rows = []
    for label, group in members or [(NOT_RUN, [])]:
        for e in group or [None]:
            row = {ab.column: label, "experiment": NOT_RUN if e is None else e.name,
                   **_metric_cells(e, toy, world_def)}
            if ab.name == "noise":
                row["grad norm"] = NOT_RUN if e is None else _tail_mean(logs.get(e.name), "grad_norm_gen")
            rows.append(row)
    return Table(f"{world}_{ab.name}", f"{world}: {ab.title}", pd.DataFrame(rows, dtype=object), ab.note)


def main_table(world: str, entries: Sequence[Entry], k_members: list[tuple[Any, list[Entry]]],
               toy: bool, world_def: World | None = None, floor: dict[str, Any] | None = None) -> Table:
    """Teacher, Diff-Instruct and EMD-K rows; ``floor`` (noise_floor's record) adds the real-vs-real row."""
    rows = []

    def add(method: str, e: Entry | None, nfe: Any) -> None:
        rows.append({"method": method, "experiment": NOT_RUN if e is None else e.name, "NFE": nfe,
                     **_metric_cells(e, toy, world_def),
                     metric_name("samples_per_s", world_def): NOT_RUN if e is None else e.get("samples_per_s")})

    if floor is not None:
        rec = Entry("-", "floor", world, {}, floor)
        rows.append({"method": "Real data: training vs held-out split (noise floor)", "experiment": "-",
                     "NFE": "-", **_metric_cells(rec, toy, world_def), metric_name("samples_per_s", world_def): "-"})

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
    if floor is not None:
        note += (f" Noise floor: {floor['count']:,} training-split points against the held-out reference set "
                 "through the same metrics; no model can be told apart from the data below it.")
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
         metric_name("sec_per_iter", ""): NOT_RUN if e is None else e.get("sec_per_iter"),
         "E-step sec/iter": NOT_RUN if e is None else e.get("sec_per_iter_estep"),
         "x Diff-Instruct": rel(e)} for m, k, e in rows])
    return Table(f"{world}_cost", f"{world}: training cost per iteration", frame,
                 "Mean over the last 10% of iterations of score + E-step + M-step time (summary.json).")


def experiments_table(world: str, entries: Sequence[Entry], toy: bool, world_def: World | None = None) -> Table:
    rows = []
    for e in (e for e in entries if e.kind == "experiment"):
        s = e.setting
        cancel = "injected + initial" if s["cancel_noise"] and s["cancel_initial"] else \
            "injected only" if s["cancel_noise"] else "none"
        rows.append({"experiment": e.name, "method": s["method"], "K": s["K"],
                     "space": SPACE_LABELS[s["space"]], "cancellation": cancel, "init": s["init"],
                     "gamma_eps": s["gamma_eps"], "gamma_z": s["gamma_z"],
                     "iterations": s["iterations"], **_metric_cells(e, toy, world_def),
                     **({metric_name("nll", world_def): e.get("nll")} if toy else {}),
                     metric_name("samples_per_s", world_def): e.get("samples_per_s"),
                     metric_name("sec_per_iter", world_def): e.get("sec_per_iter"),
                     "status": "ok" if e.record is not None else NOT_RUN})
    note = "NLL: -mean log p(x) of the samples under the true mixture, in nats." if toy else ""
    return Table(f"{world}_experiments", f"{world}: every experiment of the suite",
                 pd.DataFrame(rows, dtype=object), note)


def paper_tables(params: Params, worlds: Sequence[str], world_tables: dict[str, dict[str, Any]]) -> list[Table]:
    """The EMD paper's reported numbers beside ours, then the other methods' numbers, each with its source.

    mct/data/paper_numbers.csv keeps numbers as published (strings: 2.20, 6.0); ``from_emd_paper`` says whether
    the EMD paper reports the row itself. Ours is 'not run' unless the suite has a matching (Inception) world.
    """
    paper = pd.read_csv(PAPER_NUMBERS, dtype=str, keep_default_na=False)
    own, other = [], []
    for r in paper.itertuples(index=False):
        world = _paper_world(params, worlds, r.dataset)
        ours: Any = NOT_RUN
        if world is not None:
            ours = _ours(r.method, world_tables[world])
        elif not _ours_method(r.method):
            ours = "-"
        row = {"dataset": r.dataset, "method": r.method, "NFE": r.nfe or None,
               f"FID {DOWN} (reported)": r.fid, f"FID {DOWN} (ours)": ours, "source": r.source}
        (own if r.from_emd_paper == "yes" else other).append(row)
    legend = "'-': a method this project does not implement. 'not run': the suite has no such world."
    return [Table("paper", "Paper-scale results: the EMD paper's numbers beside ours", pd.DataFrame(own, dtype=object),
                  legend),
            Table("paper_other", "Other methods, other sources (not rows of the EMD paper)",
                  pd.DataFrame(other, dtype=object),
                  "Numbers read from the paper named in 'source' (DMD: Yin et al. 2024; sCM: Lu & Song 2024), "
                  "for context; they are not the EMD paper's comparison rows. " + legend)]


T2I_DATASET = "COCO-2014 30k, SD v1.5"
T2I_NOT_RUN = ("not run: the paper's protocol needs Stable Diffusion v1.5's weights, COCO-2014 and a multi-GPU "
               "cluster (DMD trained on 72 GPUs); suite t2i_sd15 plans it")


def text_to_image_table(params: Params, worlds: Sequence[str], world_tables: dict[str, dict[str, Any]]) -> Table:
    """The paper's zero-shot COCO-2014 rows beside ours (FID and CLIP score), then each text2image world of the suite
    that does not follow the paper's protocol (the tiny test world), labelled as such."""
    from mct.worlds.registry import make_world

    paper = pd.read_csv(PAPER_NUMBERS, dtype=str, keep_default_na=False)
    paper_world = _paper_world(params, worlds, T2I_DATASET)
    rows = []
    for r in paper[paper.dataset == T2I_DATASET].itertuples(index=False):
        if not _ours_method(r.method):
            ours: Any = "-"  # a method this project does not implement (DMD)
        else:
            ours = T2I_NOT_RUN if paper_world is None else _ours(r.method, world_tables[paper_world])
        rows.append({"world": paper_world or "-", "method": r.method, "NFE": r.nfe or None,
                     f"FID {DOWN} (reported)": r.fid, f"FID {DOWN} (ours)": ours, f"CLIP score {UP} (ours)": "-",
                     "source": r.source})
    for w in worlds:
        world = make_world(w, params.worlds[w])
        if "clip_score" not in world.conditional_metric_keys or w == paper_world:
            continue
        for e in world_tables[w]["entries"]:
            method = "teacher" if e.kind == "teacher" else e.setting.get("method", "")
            rows.append({"world": w, "method": f"{method} ({e.name}; not the paper's protocol)",
                         "NFE": e.get("nfe") if e.record else None, f"FID {DOWN} (reported)": "-",
                         f"FID {DOWN} (ours)": e.get("fid") if e.record else NOT_RUN,
                         f"CLIP score {UP} (ours)": e.get("clip_score") if e.record else NOT_RUN, "source": "-"})
    return Table("text_to_image", "Text-to-image: zero-shot COCO-2014 30k (the paper's rows) and our text2image "
                 "worlds", pd.DataFrame(rows, dtype=object),
                 "FID: clean-fid Inception ('clean' mode) of 256-px centre crops (Lanczos) of the generations against "
                 "the same crops of the captions' val2014 images. Rows of a world that is not the paper's protocol "
                 "(fewer prompts, a tiny random-weight model) test the pipeline, not the method.")


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
    return found[0].get("fid") if found else NOT_RUN


# --- claims, discussion, noise floor, provenance -------------------------------------------------------------


def seed_records(entries: Sequence[Entry], src: Sources | None = None) -> pd.DataFrame:
    """Per-seed records for the claims engine: one row per (experiment, seed) with the numeric metrics.

    An experiment whose record aggregates several seeds (mct.aggregate: a ``seeds`` list) contributes each
    seed's own record (reports/experiments/<run_name(exp, seed)>.json, read through ``src``); any other
    experiment contributes its one record, as the seed it ran (its ``seed`` key, else distill.seed).
    """
    rows = []
    for e in entries:
        if e.kind != "experiment" or e.record is None:
            continue
        seeds = e.record.get("seeds")
        if src is not None and isinstance(seeds, list) and seeds:
            from mct.paths import run_name

            per_seed = {s: _read_json(src.experiment_metrics(run_name(e.name, s))) for s in seeds}
        else:
            per_seed = {e.record.get("seed", e.setting.get("seed", 0)): e.record}
        for seed, rec in per_seed.items():
            if rec is not None:
                row = {"experiment": e.name, "world": e.world, "seed": seed}
                row.update({k: float(v) for k, v in rec.items() if _number(v) and k not in row})
                rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["experiment", "world", "seed"])


def _plain(name: str) -> str:
    return name.replace(f" {UP}", "").replace(f" {DOWN}", "")


def claims_table(results: Sequence[Any], kinds: dict[str, World]) -> Table:
    from mct.claims import effect_unit

    rows = []
    for r in results:
        c = r.claim
        side = "< 0" if c.better == "lower" else "> 0"
        rows.append({"claim": c.text, "world": r.world, "verdict": r.label, "n (seeds)": r.n, "mean": r.mean,
                     "95% CI low": r.lo, "95% CI high": r.hi, "paper predicts": side,
                     "effect": effect_unit(r) + (f" (linear fit R^2 {r.extra['r2']:.3f})" if "r2" in r.extra else ""),
                     "metric": _plain(metric_name(c.metric, kinds[r.world])),
                     "compared": " vs ".join(r.compared) if c.kind == "paired" else ", ".join(r.compared)})
    from mct.claims import LINEAR_R2

    note = ("Paired across the seeds that every compared experiment shares: per seed the difference A - B "
            "(or the least-squares slope against log2 K; for cost, against K), then the mean and a two-sided 95% "
            "Student-t interval over seeds. Verdict, computed: reproduced when the interval excludes 0 on the "
            "paper's side, contradicted when it excludes 0 on the other side, inconclusive otherwise and always "
            f"with fewer than 2 seeds (no interval). A linear-cost claim also needs mean R^2 >= {LINEAR_R2:g}. "
            "Not tested here: 'faster convergence of EMD over Diff-Instruct' (needs quality measured during "
            "training, which the runs do not record yet).")
    return Table("claims", "The paper's claims, tested on this suite's runs", pd.DataFrame(rows, dtype=object),
                 note)


def discussion(results: Sequence[Any], table: str, world: str, entries: Sequence[Entry],
               world_def: World | None = None) -> list[str]:
    """One sentence group per claim of ``table`` in ``world`` where our data disagree with the paper: a
    contradicted verdict, or a point estimate on the other side of 0. The text follows from the results."""
    out = []
    settings = {e.name: e.setting for e in entries if e.kind == "experiment"}
    for r in results:
        if r.world != world or r.claim.table != table or not (r.verdict == "contradicted" or r.opposite):
            continue
        from mct.claims import effect_text, effect_unit

        c = r.claim
        if r.verdict == "contradicted":
            ours = (f"our runs contradict it: {effect_unit(r)} = {effect_text(r)} (mean [95% t-interval], "
                    f"n={r.n} seeds), on the other side of 0")
        elif r.n < 2:
            ours = (f"our one run points the other way ({effect_unit(r)} = {effect_text(r)}), but one seed "
                    f"gives no interval, so the difference may be run-to-run spread (verdict {r.label})")
        else:
            ours = (f"our mean points the other way ({effect_unit(r)} = {effect_text(r)}, n={r.n}), but the "
                    f"95% interval includes 0 (verdict {r.label})")
        iters = sorted({settings[x]["iterations"] for x in r.compared if x in settings})
        causes = []
        if iters and max(iters) < PAPER_ITERATIONS:
            causes.append(f"budget: {'/'.join(f'{i:,}' for i in iters)} iterations against the paper's "
                          f">= {PAPER_ITERATIONS:,}")
        kinds = {settings[x].get("estep_teacher") for x in r.compared if x in settings}
        causes.append(f"world: {world} is a small embedded world, not the paper's ImageNet" +
                      (" (its E-step uses the exact analytic score)" if "analytic" in kinds else ""))
        if r.n < 3:
            causes.append(f"seeds: n={r.n}")
        out.append(f"Paper: {c.text[0].lower() + c.text[1:]}. Ours ({world}, "
                   f"{_plain(metric_name(c.metric, world_def))}): {ours}. "
                   f"Likely causes to check: {'; '.join(causes)}.")
    return out


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


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), *args],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _machine() -> str:
    import platform

    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch threads {torch.get_num_threads()}, GPU: {gpu}")


PROVENANCE_PACKAGES = ("torch", "accelerate", "dvc", "snakemake", "clean-fid", "numpy", "pandas", "matplotlib",
                       "seaborn", "scikit-learn")


def _versions() -> str:
    import platform
    from importlib import metadata

    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join([f"python {platform.python_version()}"] + [f"{p} {v(p)}" for p in PROVENANCE_PACKAGES])


def provenance(entries: Sequence[Entry], src: Sources, params: Params) -> tuple[list[str], Table]:
    """Paragraphs (code, machine, packages) and a per-run table (budget, seeds, samples, wall time).
    Nothing here reads the clock: the date is the commit's, so a rebuild of the same inputs is identical."""
    commit = _git("rev-parse", "HEAD")
    date = _git("log", "-1", "--format=%cI")
    code = (f"Code: commit {commit} of {date} (the commit's date, not the build time; uncommitted changes are "
            "not recorded)." if commit else "Code: not a git checkout; commit unknown.")
    run_machines = sorted({str(e.record["machine"]) for e in entries if e.record and e.record.get("machine")})
    machine = (f"Machine that built this report: {_machine()}. Machine of the runs: "
               + ("; ".join(run_machines) if run_machines else
                  "not recorded in the evaluator records (the tables' timings come from the machine that ran "
                  "each stage)") + ".")
    paras = [code, machine, f"Packages (report build): {_versions()}."]
    rows = []
    for e in entries:
        s = e.setting
        if e.kind == "teacher":
            t = params.teacher(e.name)
            rows.append({"run": e.name, "kind": "teacher", "world": e.world,
                         "iterations": t.iterations if t.kind == "train" else "fetched",
                         "% of paper budget": None, "seeds": t.seed, "eval samples": None, "eval seed": None,
                         "distill wall s": None, "wall time from": "-"})
            continue
        summary = _read_json(src.summary(e.name))
        if summary and _number(summary.get("seconds_this_run")):
            wall, how = summary["seconds_this_run"], "summary.json (last run)"
        elif _number(e.get("sec_per_iter")):
            wall, how = e.get("sec_per_iter") * s["iterations"], "estimate: sec/iter x iterations"
        else:
            wall, how = None, "not recorded"
        seeds = (e.record or {}).get("seeds")
        rows.append({"run": e.name, "kind": "experiment", "world": e.world, "iterations": s["iterations"],
                     "% of paper budget": 100 * s["iterations"] / PAPER_ITERATIONS,
                     "seeds": ", ".join(map(str, seeds)) if isinstance(seeds, list) and seeds else s["seed"],
                     "eval samples": s["eval_samples"], "eval seed": s["eval_seed"], "distill wall s": wall,
                     "wall time from": how})
    note = (f"'% of paper budget': iterations against the paper's >= {PAPER_ITERATIONS:,} distillation "
            "iterations. seeds: the distillation seeds whose records the report read (one unless several are "
            "listed). Teachers: training iterations. "
            "Per-stage wall times other than distillation are not recorded by the stages.")
    return paras, Table("provenance", "Runs: budgets, seeds, sample counts, wall time",
                        pd.DataFrame(rows, dtype=object), note)


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


def fig_k_sweep(world: str, entries: Sequence[Entry], k_members, toy: bool, path: Path,
                world_def: World | None = None) -> None:
    import seaborn as sns

    keys = ["fid", "recall"] + (["modes_covered"] if toy else [])
    metrics = [(k, metric_name(k, world_def)) for k in keys]
    rows = [{"K": k, "metric": label, "value": e.get(key)} for k, group in k_members for e in group
            for key, label in metrics if _number(e.get(key))]
    data = pd.DataFrame(rows, columns=["K", "metric", "value"])
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    teachers = [e for e in entries if e.kind == "teacher"]
    fig, axes = _figure(len(metrics), size=(3.6, 3.2))
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


def _teacher_points(path: Path, world, tcfg, n: int) -> np.ndarray | None:
    """n samples of a trained toy2d teacher (Heun, its evaluation steps, seed 0, CPU); None without the file."""
    import torch

    from mct.diffusion import edm_heun_sample
    from mct.teacher import load_denoiser

    if not path.exists():
        return None
    net, _ = load_denoiser(path, world)
    latents = torch.randn((n, *world.data_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, _ = edm_heun_sample(net.eval(), latents, None, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max)
    return x.numpy()


def fig_toy_samples(world, entries: Sequence[Entry], src: Sources, path: Path, max_points: int = 2000,
                    teachers: Sequence[tuple[str, Any]] = ()) -> None:
    """Panels: the data (a fresh draw from the true mixture), each teacher (``teachers``: (name, TeacherConfig),
    sampled here from its checkpoint), then every experiment, each titled by its name and method."""
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
    panels: list[tuple[str, np.ndarray | None, str]] = [
        ("data (true mixture)", mix.sample(max_points, torch.Generator().manual_seed(0)).numpy(), "C1")]
    for name, tcfg in teachers:
        pts = _teacher_points(src.teacher(name), world, tcfg, max_points)
        panels.append((f"teacher {name}\n{heun_nfe(tcfg.sampler_steps)} NFE", pts, "C2"))
    for e in (e for e in entries if e.kind == "experiment"):
        s = _load_samples(src.samples(e.name))
        panels.append((f"{e.name}\n{_method_label(e)}", None if s is None else s[0], "C0"))
    ncols = min(5, len(panels))
    fig, axes = _figure(ncols, -(-len(panels) // ncols), size=(2.3, 2.45))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (title, x, color) in zip(axes, panels, strict=False):
        ax.contourf(gx, gy, logp, levels=levels, cmap="Greys", alpha=0.5)
        if x is None:
            _not_run(ax, "samples not found")
        else:
            x = x[:max_points]
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.6, color=color, linewidths=0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{world.name}: {max_points:,} samples per panel over the true density (grey: top 10 nats)")
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
    fig, axes = _figure(ncols, -(-len(exps) // ncols), size=(2.7, 2.9))
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
    """Student speed-up over the teacher (samples/s ratio, same process and batch) on a linear axis, with the
    teacher's NFE as the reference line (the speed-up if time were proportional to network evaluations)."""
    rows = [(e.name, e.get("speedup"), e.get("teacher_nfe")) for e in entries
            if e.kind == "experiment" and _number(e.get("speedup"))]
    fig, (ax,) = _figure(size=(8.0, 1.4 + 0.32 * max(1, len(rows))))
    if rows:
        names, ratio, nfe = zip(*rows, strict=True)
        y = np.arange(len(rows))
        ax.barh(y, ratio, color="C0", height=0.6)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        for yi, r in zip(y, ratio, strict=True):
            ax.text(r, yi, f" {r:.1f}x", va="center", fontsize=9)
        for n in sorted({n for n in nfe if _number(n)}):
            ax.axvline(n, ls="--", color="0.3", lw=1, label=f"teacher NFE = {n:g} (time proportional to NFE)")
        ax.set_xlim(0, 1.15 * max(max(ratio), *(n for n in nfe if _number(n))))
        ax.set_xlabel("speed-up: student samples/s / teacher samples/s (linear)")
        if any(_number(n) for n in nfe):
            ax.legend(loc="lower right", fontsize=8)
    else:
        _not_run(ax)
    ax.set_title(f"{world}: one-step student speed-up over the teacher (same process, same batch)")
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
div.table { overflow-x: auto; max-width: 100%; }
table.data { border-collapse: collapse; margin: .5em 0; font-size: 0.9em; }
table.data th, table.data td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td:first-child, table.data th:first-child { text-align: left; min-width: 14em; }
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
            + ("The E-step uses the exact analytic score of the true mixture (distill.estep_teacher: analytic), "
               "not the trained teacher network; the trained teacher is only the student's initialisation and "
               "the speed and quality reference. " if ref.get("estep_teacher") == "analytic" else
               "The E-step uses the trained teacher network's score. ")
            + "Each ablation table varies one factor and keeps the rest at this setting.")


# --- build --------------------------------------------------------------------------------------------------


def _write_table(t: Table, tables: Path) -> None:
    t.frame.to_csv(tables / f"{t.name}.csv", index=False, lineterminator="\n")
    tex = t.display().to_latex(index=False, escape=True, caption=t.title, label=f"tab:{t.name}")
    tex = tex.replace(UP, r"$\uparrow$").replace(DOWN, r"$\downarrow$")
    (tables / f"{t.name}.tex").write_text(tex, encoding="utf-8")


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
    kinds = {w: make_world(w, params.worlds[w]) for w in params.worlds}  # what each world shows and how
    metrics = {e.name: metrics_record(e, kinds[e.world]) for e in entries}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    from mct.claims import CLAIMS, evaluate_claims

    suite_name = suite or params.suite
    page = Page(f"Mode-Covering Training report: suite {suite_name}")
    ran = sum(e.record is not None for e in entries)
    page.p(f"{ran} of {len(entries)} teachers and experiments have metrics; the others show as '{NOT_RUN}'. "
           f"Machine-readable metrics: metrics.json.")
    ran_exps = [e for e in entries if e.kind == "experiment" and e.record is not None]
    no_samples = sum(not src.samples(e.name).exists() for e in ran_exps)
    no_logs = sum(not src.log(e.name).exists() for e in ran_exps)
    if no_samples or no_logs:
        page.p(f"Inputs missing from this build: {no_samples} of {len(ran_exps)} evaluated experiments have no "
               f"samples file and {no_logs} no training log under {src.runs}/ (the runs' large outputs, kept in "
               "the DVC cache, not in git). Their sample panels, gradient-norm columns and training curves are "
               "empty; `dvc repro` (or `dvc pull` from a remote) restores them. Every number in the tables comes "
               "from the evaluator records and is unaffected.")
    worlds = params.suite_worlds(suite)
    results = evaluate_claims(CLAIMS, seed_records(entries, src), worlds)
    page.h(2, "Claims")
    if results:
        page.table(claims_table(results, kinds))
    else:
        page.p("No claim of mct.claims.CLAIMS is testable in this suite: it does not run the experiments they "
               "compare.")
    page.p("Metrics. " + METRIC_DEFINITIONS)
    page.h(2, "Provenance")
    paras, prov = provenance(entries, src, params)
    for text in paras:
        page.p(text)
    page.table(prov)
    from mct.report_convergence import add_convergence  # the 'faster convergence' claim's curves, if runs wrote them

    add_convergence(page, params, suite, src, figures, kinds, worlds)

    def discuss(w: str, table: str, we: Sequence[Entry]) -> None:
        for text in discussion(results, table, w, we, kinds[w]):
            page.p(text)

    per_world: dict[str, dict[str, Any]] = {}
    for w in worlds:
        we = [e for e in entries if e.world == w]
        world = kinds[w]
        toy = bool(world.exact_metric_keys)  # mode-statistics columns
        ref = reference_setting(we)
        logs = {e.name: read_log(src.log(e.name)) for e in we if e.kind == "experiment"}
        members = {ab.name: ablation_members(ab, ref, we) for ab in ABLATIONS}
        per_world[w] = {"entries": we, "reference": ref, "k_members": members["K"]}
        exps = [e for e in we if e.kind == "experiment"]
        floor = noise_floor(world, exps[0].setting["eval_samples"], src.feature_net(w)) if exps else None
        page.h(2, f"World {w} ({world.kind})")
        page.table(main_table(w, we, members["K"], toy, kinds[w], floor))
        if floor is None and world.needs_feature_net:
            page.p("Noise floor (training against held-out split through the same metrics): not computed in this "
                   f"build, which has no {world.kind} feature network ({src.feature_net(w)}).")
        discuss(w, "main", we)
        page.h(3, "Ablations")
        page.p(_describe(ref))
        for ab in ABLATIONS:
            page.table(ablation_table(w, ab, members[ab.name], toy, logs, kinds[w]))
            discuss(w, ab.name, we)
        page.table(cost_table(w, we, members["K"]))
        discuss(w, "cost", we)
        page.h(3, "Figures")
        teachers = [(e.name, params.teacher(e.name)) for e in we if e.kind == "teacher"]
        # Contexts: the caller's matplotlib settings stay as they were.
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
            fig_k_sweep(w, we, members["K"], toy, figures / f"{w}_k_sweep.png", kinds[w])
            fig_noise(w, members["noise"], logs, figures / f"{w}_noise_cancellation.png")
            if world.sample_figure == "points":
                fig_toy_samples(world, we, src, figures / f"{w}_samples.png", teachers=teachers)
                grids = []
            else:
                grids = fig_image_samples(w, we, src, figures)
            fig_speed(w, we, figures / f"{w}_speed.png")
        fd = _plain(metric_name("fid", kinds[w]))
        page.figure(f"{w}_k_sweep.png", f"{w}: {fd}, recall{', modes covered' if toy else ''} against K "
                                        "(Diff-Instruct dashed, teacher dotted)")
        page.figure(f"{w}_noise_cancellation.png", f"{w}: generator gradient norm and loss over training, "
                                                   "with and without noise cancellation (running mean)")
        points = world.sample_figure == "points"
        page.figure(f"{w}_samples.png", f"{w}: the data, the teacher and each experiment over the true "
                                        "mixture density" if points else f"{w}: samples of each experiment, "
                                                                         "as image grids")
        for name in grids:
            page.figure(name, f"{w}: sample grid {name}")
        page.figure(f"{w}_speed.png", f"{w}: speed-up of each one-step student over the teacher (ratio of "
                                      "samples per second; dashed: the teacher's NFE)")
        page.h(3, "All experiments")
        page.table(experiments_table(w, we, toy, kinds[w]))
    # the E-step benchmarks' sections, if they have run
    from mct.report_estep import add_estep_fidelity, add_toy2d_sweep

    add_estep_fidelity(page, src.reports_in / "benchmarks" / "estep_fidelity", figures)
    add_toy2d_sweep(page, src.reports_in / "benchmarks" / "toy2d_sweep")
    page.h(2, "Paper-scale results")
    for t in paper_tables(params, worlds, per_world):
        page.table(t)
    page.table(text_to_image_table(params, worlds, per_world))

    for b in page.blocks:
        if b[0] == "table":
            _write_table(b[1], tables)
    (out / "index.md").write_text(page.markdown(), encoding="utf-8")
    (out / "index.html").write_text(page.html(), encoding="utf-8")


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
           "TEACHER_KEYS"]
