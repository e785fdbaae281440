"""The report's cost numbers from the dedicated timing benchmark (benchmarks/estep_cost.py): Diff-Instruct and
EMD-K trained side by side in one process, the one-step student and the teacher's sampler likewise, as ratios with
95% t-intervals over repeats, with the machine and its load. The suite's own runs are timed on a machine whose load
nobody controls, so the page takes training cost, the cost-against-K slope and the speed-up from here when the
benchmark has a record for the world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from mct.report_tables import DOWN, PEER_LABELS, Estimate, Table, fmt

SCRIPT = "benchmarks/estep_cost.py"


def cost_record(bench: Path, world: str) -> dict[str, Any] | None:
    """The benchmark's record of ``world`` (<bench>/<world>.json), or None."""
    path = Path(bench) / f"{world}.json"
    return json.loads(path.read_text()) if path.exists() else None


def equal_wallclock_iterations(rec: dict[str, Any], experiment: str, reference: str, reference_iterations: int) -> int:
    """The iterations of ``experiment`` that cost the training time of ``reference_iterations`` of ``reference``, by
    the benchmark's mean seconds per iteration (the record's own experiment names, e.g. toy2d_sid for
    toy2d_sid_wall)."""
    sec = rec["sec_per_iter"]
    return round(reference_iterations * sec[reference]["mean"] / sec[experiment]["mean"])


def _est(s: dict[str, Any]) -> Estimate:
    return Estimate(s["mean"], s["ci95_lo"], s["ci95_hi"])


def machine_text(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    return (f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + f"; 1-min load average {m['load_average_1min_before']:.2f} before, {m['load_average_1min_after']:.2f}"
            + " after" + (f"; {m['note']}" if m.get("note") else "; what else ran was not recorded"))


def cost_table(world: str, rec: dict[str, Any]) -> Table:
    """sec/iter of each experiment and its ratio to Diff-Instruct, over the benchmark's repeats."""
    ratio, passes = rec["ratio_to_diff_instruct"], rec.get("network_passes_per_iter", {})
    labels = {"diff_instruct": "Diff-Instruct", **PEER_LABELS}
    rows = [{"method": labels.get(s["method"], f"EMD-{s['K']}"), "K": s["K"] if s["method"] == "emd" else "-",
             "experiment": e, f"sec/iter {DOWN}": _est(s),
             "x Diff-Instruct": _est(ratio[e]) if e in ratio else 1.0,
             **({"forward passes (generator, score, teacher)": "{generator}, {score}, {teacher}".format(**passes[e])}
                if e in passes else {})}
            for e, s in rec["sec_per_iter"].items()]
    note = (f"Timed by {SCRIPT}: every experiment built as `mct distill` builds it (batch {rec['batch_size']}, "
            f"teacher {rec['teacher']}, E-step score: {rec['estep_teacher']}), {rec['iterations_per_repeat']} "
            f"training iterations per experiment per repeat, {rec['repeats']} repeats in rotated order in one "
            f"process; mean [95% t-interval] over repeats, the ratio taken per repeat. Machine: {machine_text(rec)}. "
            "The suite's own runs' sec/iter (experiments table) were timed under uncontrolled load."
            + (" Forward passes: calls of each network in one iteration (score steps, E-step or generator loss, "
               "M-step), counted by forward hooks." if passes else ""))
    return Table(f"{world}_cost", f"{world}: training cost per iteration (dedicated benchmark)",
                 pd.DataFrame(rows, dtype=object), note)


def slope_text(world: str, rec: dict[str, Any]) -> str:
    s = rec["slope_sec_per_K"]
    return (f"{world}: training cost per iteration grows by {fmt(s['mean'])} s per Langevin step "
            f"[{fmt(s['ci95_lo'])}, {fmt(s['ci95_hi'])}] (least-squares slope over the EMD rows per repeat, median "
            f"R^2 {s['r2_median']:.3f}, n = {s['n']} repeats; {SCRIPT}): linear in K by construction, a measurement, "
            "not a claim.")


def speed_text(world: str, rec: dict[str, Any]) -> str:
    s = rec["sampling"]
    return (f"{world}: sampling, side by side in one process: the one-step student takes "
            f"{fmt(s['student_sec_per_sample']['mean'])} s per sample, the teacher's sampler ({s['teacher_nfe']} NFE) "
            f"{fmt(s['teacher_sec_per_sample']['mean'])}; speed-up {_est(s['speedup'])} (mean [95% t] over "
            f"{s['speedup']['n']} repeats; {SCRIPT}). Every one-step student of a world runs the same network, so "
            "this one number holds for all of them.")
