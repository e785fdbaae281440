"""Convergence points of a distillation run (``<distill>/convergence.jsonl``, written by :mod:`mct.tracking`) and
the one number per run that the claims engine compares: a light module (numpy only), read by the evaluate stage
and the report, which must not import the training's trackers.

A point is a JSON object: ``iteration`` (iterations done), ``train_seconds`` (training time so far, evaluation
excluded), ``eval_seconds`` (its own cost) and the world's metrics (toy2d: ``modes_covered``, ``mode_tv``,
``mode_precision``, ``fd_2d``; digits: ``fd_pixels``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FILE = "convergence.jsonl"


def read_convergence(path: Path) -> list[dict[str, Any]]:
    """The points of a convergence file, in file order; [] when the run wrote none (eval_every = 0)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def convergence_summary(points: list[dict[str, Any]], key: str | None) -> dict[str, Any]:
    """``convergence_auc``: the time-average over iterations of the world's convergence metric ``key``
    (World.convergence_metric: mode TV on toy2d, the pixel-space FD to the held-out split on digits; lower is better
    for both), by the trapezoid rule from the first to the last evaluation point, divided by that span.

    Lower is better. A student that reaches a given quality sooner spends less of the run above it, so the paired
    difference of this average between two methods evaluated at the same points is the 'faster convergence'
    effect; it also rewards a better end point, so it is read beside the final value. An area needs no threshold,
    where 'iterations to reach TV 0.1' is undefined for every run that never does. Empty without a metric for the
    world or with fewer than two points."""
    pts = sorted((p["iteration"], p[key]) for p in points if key and _finite(p.get(key)))
    if len(pts) < 2:
        return {}
    it = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    auc = float(((y[1:] + y[:-1]) / 2 * np.diff(it)).sum() / (it[-1] - it[0]))
    return {"convergence_auc": auc, "convergence_metric": key, "convergence_points": len(pts)}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
