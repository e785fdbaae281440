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
