"""The report's "E-step fidelity (toy2d, exact target)" section, from benchmarks/estep_fidelity.py's outputs.

Shown only when <reports>/benchmarks/estep_fidelity/summary.csv exists; the figure is copied into the report's
figures/ (byte for byte, so an unchanged benchmark leaves the report unchanged).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

SECTION = "E-step fidelity (toy2d, exact target)"
FIGURE = "estep_fidelity_tv_vs_k.png"


def _settings(bench: Path) -> dict[str, Any]:
    try:
        return json.loads((bench / "fidelity.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return {}


def add_estep_fidelity(page: Any, bench: Path, figures: Path) -> None:
    """Append the section to ``page`` (mct.report.Page) if the benchmark's outputs are in ``bench``."""
    summary = bench / "summary.csv"
    if not summary.exists():
        return
    from mct.report import Table

    s = _settings(bench)
    page.h(2, SECTION)
    page.p("How close K Langevin steps of the E-step get to the E-step's exact target rho(x, z) = p_t(x) q(z | x), "
           "computed by quadrature for a fixed nonlinear 2-D generator (benchmarks/estep_fidelity.py; "
           f"{s.get('chains', '?')} chains per cell, template step sizes, gamma_z per z-step scheme "
           f"{s.get('gamma_z', '?')}). tv_x: x_K against p_t; tv_z: z_K against rho's z marginal; the floors are "
           "the TVs of exact samples of the same size. grad_rel_err / grad_cos: the chains' mean M-step gradient "
           "against the exact-target gradient (jackknife SE over batches). Score 'exact' is the quadrature student "
           "denoiser (sampler error only), 'learned' a DSM-trained MLP. Full table: "
           "benchmarks/estep_fidelity/fidelity.csv.")
    page.table(Table("estep_fidelity", "E-step fidelity at K = 8 and the largest K (cancellation: antithetic where "
                     "z moves, else linear)", pd.read_csv(summary)))
    canc = bench / "cancel.csv"
    if canc.exists():
        page.table(Table("estep_fidelity_cancel", "Where z moves: the M-step gradient's cosine and relative error "
                         "against the exact target under each noise cancellation", pd.read_csv(canc)))
    conv = bench / "convergence.csv"
    if conv.exists():
        page.table(Table("estep_fidelity_convergence", "Quadrature grids against grids twice as fine",
                         pd.read_csv(conv)))
    fig = bench / "tv_vs_k.png"
    if fig.exists():
        shutil.copyfile(fig, figures / FIGURE)
        page.figure(FIGURE, "E-step fidelity: TV to the exact target against K, per space and z-step scheme "
                            "(dotted: the exact samples' floor)")
