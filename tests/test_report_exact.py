"""The exact E-step's report section (mct.report_exact): verdicts and the recovered share follow the paired data."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mct.report_exact import add_toy2d_exact, findings, recovered, verdict, wins


def _runs(exact_shift: dict[str, float], emd_share: float, seeds: int = 5) -> pd.DataFrame:
    """Diff-Instruct with seed noise; the exact E-step shifted from it per metric; EMD-8 exactly ``emd_share`` of the
    way from Diff-Instruct to the exact E-step on every seed."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(seeds):
        di = {"modes_covered": 20 + rng.normal(), "mode_tv": 0.3 + 0.02 * rng.normal(),
              "mode_precision": 0.5 + 0.02 * rng.normal()}
        ex = {m: v + exact_shift[m] + 0.001 * rng.normal() for m, v in di.items()}
        emd = {m: di[m] + emd_share * (ex[m] - di[m]) for m in di}
        for setting, vals in (("di", di), ("exact", ex), ("emd8", emd)):
            rows.append({"world": "toy2d", "budget": "1x", "setting": setting, "seed": k, **vals, "status": "ok"})
    return pd.DataFrame(rows)


def test_verdict_and_recovered_share_follow_the_data():
    runs = _runs({"modes_covered": 3.0, "mode_tv": -0.1, "mode_precision": 0.1}, emd_share=0.5)
    assert verdict(wins(runs, "exact", "di")).startswith("beats Diff-Instruct")
    share = recovered(runs, "emd8", "exact", "di", "mode_tv")
    assert abs(share[0] - 0.5) < 1e-9 and share[1] <= 0.5 <= share[2] and share[2] - share[1] < 1e-6
    text = " ".join(findings(runs))
    assert "wins at: toy2d (1x, exact E-step + control variate)" in text


def test_precision_paid_for_coverage_is_no_win():
    """More modes and better weights bought with lower precision: not a win, and no ratio where a gain is absent."""
    runs = _runs({"modes_covered": 3.0, "mode_tv": -0.1, "mode_precision": -0.15}, emd_share=0.2)
    w = wins(runs, "exact", "di")
    assert w == {"modes_covered": "better", "mode_tv": "better", "mode_precision": "worse"}
    assert verdict(w).startswith("does not beat")
    assert recovered(runs, "emd8", "exact", "di", "mode_precision") is None  # the exact E-step lost precision
    assert "makes even the exact E-step beat Diff-Instruct" in " ".join(findings(runs))


def test_section_is_added_with_its_figure(tmp_path):
    from mct.report import Page

    bench = tmp_path / "toy2d_exact"
    bench.mkdir()
    _runs({"modes_covered": 1.0, "mode_tv": -0.05, "mode_precision": -0.1}, 0.3).to_csv(bench / "runs.csv",
                                                                                        index=False)
    page = Page("t")
    add_toy2d_exact(page, bench, tmp_path)
    assert any("exact E-step" in s for s in page.sections())
    assert (tmp_path / "toy2d_exact_tradeoff.png").stat().st_size > 1000
    empty = Page("t")
    add_toy2d_exact(empty, tmp_path / "absent", tmp_path)  # not run: no section
    assert empty.blocks == []
