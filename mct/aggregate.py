"""Seeds of one experiment into one record: mean, standard deviation, n and a 95% Student-t interval per metric.

An experiment with ``seeds`` runs once per seed (records at reports/experiments/<exp>/seed<k>.json, see
mct.paths.run_name); the report reads one record per experiment through :func:`read_experiment`. For every
numeric metric it holds the mean over the seeds that measured it, and beside it

  <key>_std      sample standard deviation (ddof = 1; None for n = 1)
  <key>_n        seeds with a finite value
  <key>_ci95_lo, <key>_ci95_hi   mean -/+ t_{0.975, n-1} * std / sqrt(n) (None for n = 1)

plus ``seeds`` (those read) and ``seeds_missing`` (declared, no record yet). Settings (K, iterations, ...) are
equal across seeds and kept as they are. An experiment without ``seeds`` keeps its one record unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Equal across the seeds of an experiment by construction: kept, not averaged.
SETTING_KEYS = frozenset({"K", "nfe", "teacher_nfe", "iterations", "gamma_eps", "gamma_z", "modes_total", "seed"})


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """mean, std (ddof 1), n and the two-sided Student-t interval of the mean at ``level``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "lo": None, "hi": None}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "lo": None, "hi": None}
    from scipy.stats import t

    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate_records(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One record from the records of several seeds (seed -> record), as described in the module docstring."""
    seeds = sorted(records)
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for s in seeds for k in records[s]))
    for key in keys:
        values = [records[s].get(key) for s in seeds]
        present = [v for v in values if v is not None]
        if key in SETTING_KEYS or not present or not all(_number(v) for v in present):
            distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in present))
            # settings, names, flags: the same in every seed; a text that differs (e.g. the code digest) keeps each
            out[key] = (present[0] if len(distinct) <= 1 or key in SETTING_KEYS
                        else [json.loads(v) for v in distinct])
            continue
        finite = [v for v in present if math.isfinite(v)]
        st = t_interval(finite)
        out.update({key: st["mean"], f"{key}_std": st["std"], f"{key}_n": st["n"],
                    f"{key}_ci95_lo": st["lo"], f"{key}_ci95_hi": st["hi"]})
    out["seeds"] = seeds
    return out


def read_experiment(exp: str, seeds: Sequence[int] | None,
                    record_path: Callable[[str], Path]) -> dict[str, Any] | None:
    """The report's record of an experiment: its one record (no ``seeds``), or the aggregate of its seeds'
    records; None while no record exists. ``record_path(run_name)`` is where a run's record lies."""
    from mct.paths import run_name

    if not seeds:
        path = record_path(exp)
        return json.loads(path.read_text()) if path.exists() else None
    records = {}
    for s in seeds:
        path = record_path(run_name(exp, s))
        if path.exists():
            records[s] = json.loads(path.read_text())
    if not records:
        return None
    out = aggregate_records(records)
    out["seeds_missing"] = [s for s in seeds if s not in records]
    return out
