"""The report's inputs: the suite's evaluator records, logs and samples read into ``Entry`` objects, per-seed
records for the claims engine, and the flat metrics.json record of each entry.

Per experiment E and teacher T of the suite (a missing one shows as "not run"):
  <reports_in>/experiments/E.json, <reports_in>/teachers/T.json   (written by the evaluate stages)
  <runs>/experiments/E/distill/log.jsonl, <runs>/experiments/E/samples.npz
(with seeds: E/seed<k>.json and <runs>/experiments/E/seed<k>/...; samples, logs and summaries of the first seed)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mct import paths
from mct.aggregate import read_experiment  # seeds: mean, std, n, 95% t-interval
from mct.config import ExperimentConfig, Params, flatten_settings, numeric_settings
from mct.diffusion import heun_nfe
from mct.worlds.base import World

NOT_RUN = "not run"
NA = "n/a"  # the run exists but the evaluator left this value null

EXPERIMENT_KEYS = ("experiment", "world", "method", "K", "nfe", "space", "cancel_noise", "cancel_initial",
                   "init", "gamma_eps", "gamma_z", "iterations", "fid", "precision", "recall",
                   "samples_per_s", "teacher_samples_per_s", "teacher_nfe", "speedup", "speedup_over_nfe",
                   "sec_per_iter", "sec_per_iter_estep", "code_sha256")
TEACHER_KEYS = ("teacher", "world", "method", "K", "nfe", "fid", "precision", "recall", "samples_per_s")


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
    runs: tuple[str, ...] = ()  # an experiment's runs (paths.run_name), one per seed; empty for teachers

    @property
    def shown_run(self) -> str:
        """The run whose samples, log and summary the report shows for an experiment: its first seed's, or the
        experiment itself when it runs once (its outputs are then not under a seed folder)."""
        return self.runs[0] if self.runs else self.name

    def get(self, key: str) -> Any:
        """A metric: NOT_RUN without a record, None where the evaluator wrote null or nothing."""
        return NOT_RUN if self.record is None else self.record.get(key)


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    return rec


def resolved_settings(exp: ExperimentConfig, params: Params | None = None) -> dict[str, Any]:
    """Every setting of an experiment that can change its numbers (mct.config.numeric_settings: optimiser, EMA,
    sigma distributions, score steps, cancellation and z-step schemes, batch, ...) and, given ``params``, its
    teacher's architecture and width (``teacher_net.*``)."""
    out = numeric_settings(exp)
    if params is not None:
        t = params.teacher(exp.teacher)
        out.update({"teacher_net.arch": t.arch,
                    **{f"teacher_net.{k}": v for k, v in flatten_settings(dict(t.arch_kwargs or {})).items()}})
    return out


def experiment_setting(exp: ExperimentConfig, params: Params | None = None) -> dict[str, Any]:
    """The short keys the tables and ablations name, and under ``settings`` every resolved setting of the row."""
    d = exp.distill
    return {"settings": resolved_settings(exp, params), "method": exp.method_name, "space": d.space,
            "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial, "K": d.K, "init": exp.student.init,
            "gamma_eps": d.gamma_eps, "gamma_z": d.gamma_z, "z_step": d.z_step, "teacher": exp.teacher,
            "iterations": d.iterations, "batch_size": d.batch_size, "estep_teacher": d.estep_teacher, "seed": d.seed,
            "eval_samples": exp.eval.num_samples, "eval_seed": exp.eval.seed}


def collect(params: Params, suite: str | None, src: Sources) -> list[Entry]:
    entries = []
    for t in params.suite_teachers(suite):
        tcfg = params.teacher(t)
        entries.append(Entry(t, "teacher", tcfg.world, {"nfe": heun_nfe(tcfg.sampler_steps)},
                             read_json(src.teacher_metrics(t))))
    for e in params.suite_experiments(suite):
        exp = params.experiment(e)
        seeds = params.experiment_seeds(e, suite)
        entries.append(Entry(e, "experiment", exp.world, experiment_setting(exp, params),
                             read_experiment(e, seeds, src.experiment_metrics),
                             tuple(paths.run_name(e, k) for k in seeds or ())))
    return entries


def read_log(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, dtype=object) if rows else None


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

            per_seed = {s: read_json(src.experiment_metrics(run_name(e.name, s))) for s in seeds}
        else:
            per_seed = {e.record.get("seed", e.setting.get("seed", 0)): e.record}
        for seed, rec in per_seed.items():
            if rec is not None:
                row = {"experiment": e.name, "world": e.world, "seed": seed}
                row.update({k: float(v) for k, v in rec.items() if is_number(v) and k not in row})
                rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["experiment", "world", "seed"])


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): a value a table, figure or claim can use."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    if entry.kind == "experiment":
        rec["settings"] = entry.setting["settings"]  # every resolved setting of the row (params.yaml's, not the run's)
    rec["status"] = "ok" if entry.record is not None else NOT_RUN
    return rec
