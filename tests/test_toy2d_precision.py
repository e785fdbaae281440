"""The precision diagnosis' report section reads what benchmarks/toy2d_sweep.py's summary writes, and its sentences
follow the paired intervals: a change that moves precision on every seed is named on its side, one whose seeds
disagree is named as unresolved. The benchmark itself needs trained toy2d teachers (minutes) and runs by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from mct.report import Page
from mct.report_precision import SECTION, add_toy2d_precision, parse_interval, precision_findings

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("toy2d_sweep", ROOT / "benchmarks" / "toy2d_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs() -> pd.DataFrame:
    base = {0: 0.50, 1: 0.55, 2: 0.45}  # Diff-Instruct's precision per seed
    shift = {"di": lambda s: 0.0, "di_better": lambda s: 0.20 + 0.01 * s, "di_worse": lambda s: -0.10 - 0.01 * s,
             "di_mixed": lambda s: (-0.05, 0.06, -0.01)[s], "init": lambda s: -0.43 + 0.0 * s,
             "ode_regression": lambda s: 0.25 + 0.02 * s}
    rows = []
    for s, p in base.items():
        for name, f in shift.items():
            rows.append({"world": "toy2d", "setting": name, "seed": s, "modes_covered": 20, "mode_tv": 0.3,
                         "mode_precision": p + f(s), "mode_dist_median": 3.0, "seconds": 1.0, "status": "ok"})
    return pd.DataFrame(rows)


def test_findings_follow_the_paired_intervals(tmp_path):
    summary = _sweep_module().summarise(_runs())
    assert parse_interval(summary.set_index("setting").loc["di", "mode_precision"])[0] == pytest.approx(0.5)
    text = " ".join(precision_findings(summary))
    raises = text.split("Raises it: ")[1].split(". Lowers it")[0]
    lowers = text.split("Lowers it: ")[1].split(". No change")[0]
    unresolved = text.split("resolve: ")[1].split(".")[0]
    assert "di_better" in raises and "di_worse" in lowers and "di_mixed" in unresolved
    assert "init" not in raises + lowers + unresolved  # references are reported apart, not as changes
    assert "reaches 0.770" in text and "above Diff-Instruct (paired difference +0.270" in text  # 0.5 + 0.27

    bench = tmp_path / "toy2d_precision"
    bench.mkdir()
    summary.to_csv(bench / "summary.csv", index=False)
    page = Page("t")
    add_toy2d_precision(page, bench)
    assert SECTION in page.markdown() and "di_mixed" in page.markdown()
    empty = Page("t")
    add_toy2d_precision(empty, tmp_path / "missing")
    assert empty.blocks == []


def test_parse_interval_rejects_what_it_cannot_read():
    assert parse_interval("+0.010 [-0.020, +0.040]") == (0.01, -0.02, 0.04)
    assert all(v != v for v in parse_interval("n/a"))  # nan, not an exception


def test_emd_is_paired_with_diff_instruct_at_the_same_settings_and_the_target_needs_all_three():
    from mct.report_precision import matched_findings, target_finding

    runs = _runs()
    emd = runs[runs.setting == "di"].assign(setting="emd8", modes_covered=25, mode_tv=0.04,
                                           mode_precision=lambda f: f.mode_precision + 0.45)
    runs = pd.concat([runs, emd], ignore_index=True)
    (sentence,) = matched_findings(runs)
    assert "emd8 - di (n = 3): modes +5.000" in sentence and "mode precision +0.450 [+0.450, +0.450]" in sentence
    summary = _sweep_module().summarise(runs)
    assert target_finding(summary).startswith(
        "Target (25 of 25 modes, mode TV <= 0.05 and mode precision >= 0.9 at once, seed means): met by emd8.")
    # precision alone is not enough: the same row with mode TV 0.06 misses the target
    summary_tv = _sweep_module().summarise(runs.assign(mode_tv=lambda f: f.mode_tv.where(f.setting != "emd8", 0.06)))
    assert "met by no row" in target_finding(summary_tv)
