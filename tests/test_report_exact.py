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


def _with_4x(runs: pd.DataFrame, emd_shift: float) -> pd.DataFrame:
    """The same runs again as budget '4x', EMD-8 moved by ``emd_shift`` in every metric's better direction."""
    x4 = runs.copy()
    x4["budget"] = "4x"
    x4["setting"] = x4.setting + "_x4"  # as the benchmark names them: one name per budget
    sign = {"modes_covered": 1, "mode_tv": -1, "mode_precision": 1}
    for m, s in sign.items():
        x4.loc[x4.setting == "emd8_x4", m] += s * emd_shift * (3.0 if m == "modes_covered" else 0.1)
    return pd.concat([runs, x4], ignore_index=True)


def test_the_page_names_as_ruled_out_only_what_the_runs_rule_out(tmp_path):
    """'estep' is ruled out when not even the exact E-step beats Diff-Instruct, never when it does; 'budget' when
    EMD-8 at the larger budget still does not; the causes paragraph then leaves both out of what remains open."""
    from mct.report_claims import likely_causes
    from mct.report_exact import excluded_causes

    bench = tmp_path / "b"
    bench.mkdir()
    losing = _runs({"modes_covered": 3.0, "mode_tv": -0.1, "mode_precision": -0.15}, emd_share=0.2)
    _with_4x(losing, 0.0).to_csv(bench / "runs.csv", index=False)
    ex = excluded_causes(bench, ["toy2d"])
    assert set(ex) == {"budget", "estep"} and "toy2d 4x: EMD-8 does not beat" in ex["budget"]
    assert excluded_causes(bench, ["digits"]) == {}  # another world's page: this benchmark rules out nothing

    winning = _runs({"modes_covered": 3.0, "mode_tv": -0.1, "mode_precision": 0.1}, emd_share=0.2)
    _with_4x(winning, 2.0).to_csv(bench / "runs.csv", index=False)  # EMD-8 at 4x beats DI on all three
    assert excluded_causes(bench, ["toy2d"]) == {}

    class R:  # one claim result against the paper, as mct.claims makes them
        verdict, opposite, n, world, compared = "inconclusive", True, 3, "toy2d", ("a", "b")

    from mct.report_collect import Entry
    entries = [Entry(n, "experiment", "toy2d", {"iterations": 1500}, None) for n in ("a", "b")]
    open_only = likely_causes([R()], entries, {})
    assert "budget (1,500 iterations" in open_only and "short-run E-step" in open_only and "Ruled out" not in open_only
    ruled = likely_causes([R()], entries, ex)
    assert "budget (" not in ruled and "short-run E-step" not in ruled and "Ruled out by the page's own runs" in ruled
    assert likely_causes([], entries, ex) == ""


def test_an_interval_outside_the_metric_range_is_cut_and_starred():
    from mct.report_collect import Entry
    from mct.report_tables import fmt, with_interval

    rec = {"mode_tv": 0.242, "mode_tv_ci95_lo": -0.0307, "mode_tv_ci95_hi": 0.514, "modes_covered": 21.3,
           "modes_covered_ci95_lo": 17.5, "modes_covered_ci95_hi": 25.1, "modes_total": 25,
           "precision": 0.5, "precision_ci95_lo": 0.4, "precision_ci95_hi": 0.6}
    e = Entry("x", "experiment", "toy2d", {}, rec)
    assert fmt(with_interval(e, "mode_tv", rec["mode_tv"])) == "0.242 [0, 0.514]*"
    assert fmt(with_interval(e, "modes_covered", rec["modes_covered"])) == "21.3 [17.5, 25]*"
    assert fmt(with_interval(e, "precision", rec["precision"])) == "0.5 [0.4, 0.6]"  # inside: unchanged
