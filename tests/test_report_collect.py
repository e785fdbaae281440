"""mct.report_collect: which files the report reads for an experiment that runs once and for one with seeds."""

from __future__ import annotations

from mct import paths
from mct.config import parse_params
from mct.report_collect import Sources, collect


def test_an_experiment_with_seeds_shows_its_first_seeds_samples_log_and_summary(tiny_raw, tmp_path):
    """Samples, logs and summaries of a seeded experiment live under E/seed<k>/: the report reads the first seed's
    (once, the whole 3-seed embedded report came out without panels, curves or wall times because it looked for
    E/samples.npz); an experiment without seeds keeps reading E/ itself."""
    tiny_raw["suites"]["smoke"] = {"experiments": ["tiny_di", "tiny_emd"], "seeds": [3, 5]}
    tiny_raw["experiments"]["tiny_emd"]["seeds"] = None
    params = parse_params(tiny_raw)
    src = Sources(tmp_path / "reports", tmp_path / "runs")
    by_name = {e.name: e for e in collect(params, "smoke", src) if e.kind == "experiment"}
    di = by_name["tiny_di"]
    assert di.runs == ("tiny_di/seed3", "tiny_di/seed5") and di.shown_run == "tiny_di/seed3"
    assert src.samples(di.shown_run) == tmp_path / "runs" / paths.samples_file("tiny_di/seed3").relative_to(paths.RUNS)
    assert src.log(di.shown_run).parts[-3:] == ("seed3", "distill", "log.jsonl")
    plain = parse_params({**tiny_raw, "suites": {"smoke": ["tiny_di", "tiny_emd"]}})
    once = {e.name: e for e in collect(plain, "smoke", src) if e.kind == "experiment"}["tiny_di"]
    assert once.runs == () and once.shown_run == "tiny_di"
    assert "seed3" not in src.samples(once.shown_run).parts


def test_a_seeded_row_shows_its_interval_and_a_single_run_its_value():
    """Table cells: mean [95% t-interval] where the record aggregates seeds (mct.aggregate's _ci95_lo/_hi keys),
    the bare value otherwise; the CSV keeps the same text."""
    from mct.report_collect import Entry
    from mct.report_tables import Estimate, fmt, with_interval

    seeded = Entry("e", "experiment", "w", {}, {"fid": 0.25, "fid_ci95_lo": 0.125, "fid_ci95_hi": 0.375})
    once = Entry("f", "experiment", "w", {}, {"fid": 0.25})
    cell = with_interval(seeded, "fid", seeded.get("fid"))
    assert cell == Estimate(0.25, 0.125, 0.375) and fmt(cell) == "0.25 [0.125, 0.375]" == str(cell)
    assert with_interval(once, "fid", once.get("fid")) == 0.25
    assert with_interval(seeded, "recall", None) is None


def test_the_cost_table_shows_seed_intervals_and_the_ratio_of_means():
    from mct.report_collect import Entry
    from mct.report_tables import Estimate, cost_table

    base = {"method": "diff_instruct"}
    di = Entry("di", "experiment", "w", base, {"sec_per_iter": 0.01, "sec_per_iter_ci95_lo": 0.009,
                                                  "sec_per_iter_ci95_hi": 0.011, "sec_per_iter_estep": 0.002})
    emd = Entry("emd8", "experiment", "w", {"method": "emd"}, {"sec_per_iter": 0.03})
    frame = cost_table("w", [di, emd], [(8, [emd])]).frame.set_index("experiment")
    assert frame.loc["di", "sec/iter \u2193"] == Estimate(0.01, 0.009, 0.011)
    assert frame.loc["di", "E-step sec/iter"] == 0.002  # no interval recorded: the value alone
    assert frame.loc["emd8", "x Diff-Instruct"] == 3.0
