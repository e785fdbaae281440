"""The report's provenance: the code's commit, the machine, the package versions and a per-run table of
budgets, seeds, sample counts and wall times. Nothing here reads the clock."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mct.config import Params
from mct.report_collect import Entry, Sources, is_number, read_json
from mct.report_tables import PAPER_ITERATIONS, Table


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


def _short_digest(value: Any) -> str | None:
    """A code digest as the table shows it: its first 10 hex digits, each of several seeds' if they differ."""
    if isinstance(value, list):
        return " / ".join(v[:10] for v in value if v)
    return value[:10] if value else None


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
    digests = [e.record.get("code_sha256") for e in entries if e.kind == "experiment" and e.record]
    versions = {d for v in digests for d in (v if isinstance(v, list) else [v]) if d}
    unrecorded = sum(not v for v in digests)
    runs_code = (f"Code of the runs: {len(versions)} version{'s' if len(versions) != 1 else ''} of the distill "
                 "run's mct modules (mct.resume.loaded_code_sha256, the 'code' column)"
                 + (f"; {unrecorded} experiment record(s) carry no digest (distilled by an older mct)"
                    if unrecorded else "") + ".") if digests else None
    paras = [code, *([runs_code] if runs_code else []), machine, f"Packages (report build): {_versions()}."]
    rows = []
    for e in entries:
        s = e.setting
        if e.kind == "teacher":
            t = params.teacher(e.name)
            rows.append({"run": e.name, "kind": "teacher", "world": e.world,
                         "iterations": t.iterations if t.kind == "train" else "fetched",
                         "% of paper budget": None, "seeds": t.seed, "eval samples": None, "eval seed": None,
                         "distill wall s": None, "wall time from": "-", "code": None})
            continue
        summary = read_json(src.summary(e.shown_run))
        if summary and is_number(summary.get("seconds_this_run")):
            wall = summary["seconds_this_run"]
            how = f"summary.json of {e.shown_run} (last run)" if e.runs else "summary.json (last run)"
        elif is_number(e.get("sec_per_iter")):
            wall, how = e.get("sec_per_iter") * s["iterations"], "estimate: sec/iter x iterations"
        else:
            wall, how = None, "not recorded"
        seeds = (e.record or {}).get("seeds")
        rows.append({"run": e.name, "kind": "experiment", "world": e.world, "iterations": s["iterations"],
                     "% of paper budget": 100 * s["iterations"] / PAPER_ITERATIONS,
                     "seeds": ", ".join(map(str, seeds)) if isinstance(seeds, list) and seeds else s["seed"],
                     "eval samples": s["eval_samples"], "eval seed": s["eval_seed"], "distill wall s": wall,
                     "wall time from": how, "code": _short_digest(e.get("code_sha256"))})
    note = (f"'% of paper budget': iterations against the paper's >= {PAPER_ITERATIONS:,} distillation "
            "iterations. seeds: the distillation seeds whose records the report read (one unless several are "
            "listed). Teachers: training iterations. "
            "Per-stage wall times other than distillation are not recorded by the stages.")
    return paras, Table("provenance", "Runs: budgets, seeds, sample counts, wall time",
                        pd.DataFrame(rows, dtype=object), note)
