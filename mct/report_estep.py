"""The report's "E-step fidelity (toy2d, exact target)" section, from benchmarks/estep_fidelity.py's outputs (and
the optional sections of benchmarks/toy2d_sweep.py and benchmarks/estep_chain.py, the paper's Figure 1 on digits).

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
    from mct.report_tables import Table

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


SWEEP_SECTION = "E-step settings against Diff-Instruct (toy2d worlds, paired seeds)"


def sweep_verdicts(summary: pd.DataFrame) -> list[str]:
    """One sentence per world, computed from the sweep's paired intervals (never written by hand)."""
    out = []
    for world, grp in summary.groupby("world", sort=False):
        rows = grp[grp.setting != "di"]
        winners = rows[rows.beats_di_on_all_three.astype(str) == "True"].setting.tolist()
        n = int(grp.n.min()) if len(grp) else 0
        if winners:
            out.append(f"{world}: {', '.join(winners)} beat Diff-Instruct on modes, mode TV and mode precision "
                       f"together (every paired 95% interval excludes 0 in EMD's favour; n >= {n} seeds).")
        else:
            out.append(f"{world}: no EMD setting beats Diff-Instruct on modes, mode TV and mode precision together "
                       f"(no setting has all three paired 95% intervals excluding 0 in its favour; n >= {n} seeds).")
    return out


def add_toy2d_sweep(page: Any, bench: Path) -> None:
    """Append the sweep's section (benchmarks/toy2d_sweep.py) to ``page`` if its summary exists."""
    summary = bench / "summary.csv"
    if not summary.exists():
        return
    from mct.report_tables import Table

    table = pd.read_csv(summary)
    page.h(2, SWEEP_SECTION)
    page.p("Each row: the toy2d template's budget (1,500 iterations, batch 256, analytic teacher score in the E-step) "
           "with one E-step setting, over the same seeds for every setting, scored by the exact mode statistics of "
           "20,000 EMA samples; mean [95% t-interval]; '- di' columns: the paired difference against Diff-Instruct "
           "on the same seeds. Settings: di = K 1, gamma_z 0; eps_k8 = z fixed; shrink = the old z step "
           "gamma_z sigma^2/(sigma^2+1) (gamma_z 0.005); curv = the curvature z step (gamma_z in posterior widths); "
           "'_linear' = linear noise cancellation where z moves (biased), otherwise antithetic. The toy2d rows were "
           "run with the 256-wide toy2d teacher of their time, the toy2d_skewed rows with the 128-wide one of "
           "params.yaml. Produced by benchmarks/toy2d_sweep.py.")
    for sentence in sweep_verdicts(table):
        page.p(sentence)
    page.table(Table("toy2d_sweep", "E-step settings against Diff-Instruct, paired seeds", table))


CHAIN_SECTION = "E-step chain towards the teacher (the paper's Figure 1)"
CHAIN_FIGURE = "estep_chain.png"
CHAIN_COLUMNS = {  # estep_chain.json snapshot key -> the table's column
    "step": "step", "z_move_norm": "mean |z_k - z_0|", "z_move_rms": "z move (RMS/coord)",
    "x_move_rms": "x move (RMS/coord)", "fd_pixels_denoised": "FD pixels, D(x_k)",
    "fd_pixels_generator": "FD pixels, g(z_k)", "fd_features_denoised": "FD features, D(x_k)",
    "fd_features_generator": "FD features, g(z_k)", "chains_reset": "chains reset"}


def add_estep_chain(page: Any, bench: Path, figures: Path) -> None:
    """Append the section (benchmarks/estep_chain.py's outputs) to ``page`` if estep_chain.json is in ``bench``."""
    try:
        data = json.loads((bench / "estep_chain.json").read_text())
        s, snaps, floors = data["settings"], data["snapshots"], data.get("floors", {})
    except (OSError, ValueError, KeyError):
        return
    from mct.report_tables import Table

    frame = pd.DataFrame(snaps)
    frame = frame[[c for c in CHAIN_COLUMNS if c in frame.columns]]
    if frame[[c for c in frame.columns if c.startswith("fd_features")]].isna().all().all():
        frame = frame.drop(columns=[c for c in frame.columns if c.startswith("fd_features")])
    frame = frame.rename(columns=CHAIN_COLUMNS)

    def floor(key: str, space: str) -> str:
        v = floors.get(key, {}).get(space)
        return "n/a" if v is None else f"{v:.4g}"

    page.h(2, CHAIN_SECTION)
    page.p(f"From the one-step student's own samples ({s.get('n', '?')} chains, z_0 and eps_0 ~ N(0, I), seed "
           f"{s.get('seed', '?')}), {s.get('steps', '?')} Langevin steps of the E-step (mct.emd.langevin_estep, space "
           f"{s.get('space', '?')}, the step sizes of experiment {s.get('experiment', '?')}, noise cancellation off) "
           f"at sigma = {s.get('sigma', float('nan')):.3g} ({s.get('sigma_rule', '?')}) towards the target "
           "p_teacher(x_t) q(z | x_t). Per snapshot: how far the chains moved, and the Frechet distance to "
           f"{s.get('n_ref', '?')} teacher samples of the teacher's denoising D(x_k, sigma) and of the generator's "
           "image g(z_k) of the moved latent. Floors (the same distance for a set of teacher samples of the same "
           f"size): g(z_k) {floor('teacher_samples', 'pixels')}, D(x_k) {floor('teacher_denoised', 'pixels')} "
           "(teacher samples noised to sigma and denoised) in pixels. "
           f"World {s.get('world', '?')}; generator {s.get('generator', '?')} ({s.get('generator_key', '?')} "
           f"weights); score network: {s.get('score_source', '?')}. Produced by benchmarks/estep_chain.py.")
    page.table(Table("estep_chain", "E-step chain: movement and distance to the teacher per snapshot", frame))
    fig = bench / "estep_chain.png"
    if fig.exists():
        shutil.copyfile(fig, figures / CHAIN_FIGURE)
        page.figure(CHAIN_FIGURE, f"E-step chain ({s.get('space', '?')}, sigma {s.get('sigma', float('nan')):.3g}): "
                                  "top D_teacher(x_k, sigma), bottom g(z_k), per snapshot; last column the teacher")
