"""benchmarks/estep_fidelity.py --quick runs end to end and writes what the report's section reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from mct.report import Page
from mct.report_estep import FIGURE, SECTION, add_estep_fidelity

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_tables_figure_json_and_the_report_section(tmp_path):
    out = tmp_path / "estep_fidelity"
    r = subprocess.run([sys.executable, "benchmarks/estep_fidelity.py", "--quick", "--no-progress", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("fidelity.csv", "summary.csv", "fidelity.md", "fidelity.json", "tv_vs_k.png"):
        assert (out / name).stat().st_size > 0, name
    df = pd.read_csv(out / "fidelity.csv")
    # every space; both z-step schemes where z moves; both score networks; every cancellation the runs support
    assert set(df["space"]) == {"eps_z", "x_z", "eps", "x"}
    assert set(df.loc[df["space"].isin(["eps_z", "x_z"]), "z_step"]) == {"shrink", "curvature"}
    assert set(df["score"]) == {"exact", "learned"}
    assert {"none", "linear", "antithetic"} <= set(df["cancel"])
    k0 = df[df["K"] == 0]
    assert (k0["z_shift"] == 0).all()  # K = 0 is the student's own sample
    assert df[["tv_x", "tv_z"]].apply(lambda c: c.between(0, 1)).all().all()
    assert df["grad_cos"].between(-1, 1).all()
    data = json.loads((out / "fidelity.json").read_text())
    assert data["settings"]["quick"] is True and len(data["rows"]) == len(df)
    assert data["grids"][0]["rho_z_edge_mass"] < 1e-3

    figures = tmp_path / "figures"
    figures.mkdir()
    page = Page("t")
    add_estep_fidelity(page, out, figures)
    md = page.markdown()
    assert SECTION in md and FIGURE in md and (figures / FIGURE).exists()
    empty = Page("t")
    add_estep_fidelity(empty, tmp_path / "missing", figures)
    assert empty.blocks == []
