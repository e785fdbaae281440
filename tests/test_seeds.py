"""Seeds: the params syntax and its checks, run names, and the per-experiment aggregate the report reads."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from mct import paths
from mct.aggregate import aggregate_records, read_experiment, t_interval
from mct.config import ConfigError, parse_params


def test_seeds_from_experiment_template_or_suite(tiny_raw):
    assert parse_params(tiny_raw).suite_runs() == [("tiny_di", None), ("tiny_emd", None)]  # no seeds: one run each

    tiny_raw["suites"]["smoke"] = {"experiments": ["tiny_di", "tiny_emd"], "seeds": [0, 1, 2]}
    tiny_raw["experiments"]["tiny_di"]["seeds"] = [7]
    p = parse_params(tiny_raw)
    assert p.suites["smoke"] == ["tiny_di", "tiny_emd"]
    assert p.suite_runs() == [("tiny_di", 7), ("tiny_emd", 0), ("tiny_emd", 1), ("tiny_emd", 2)]

    tiny_raw["templates"]["toy2d"]["seeds"] = [4, 5]  # a template's seeds reach experiments without their own
    assert parse_params(tiny_raw).experiment_seeds("tiny_emd") == [4, 5]


def test_a_run_sets_distill_seed_and_drops_the_seed_list(tiny_raw):
    tiny_raw["experiments"]["tiny_emd"]["seeds"] = [3, 9]
    p = parse_params(tiny_raw)
    run = p.run_config("tiny_emd", 9)
    assert run.distill.seed == 9 and run.seeds is None
    assert run.distill.K == p.experiment("tiny_emd").distill.K
    assert p.run_config("tiny_di", None) is p.experiment("tiny_di")


@pytest.mark.parametrize(("where", "value", "message"), [
    ("experiment", [1, 1], r"experiments\.tiny_emd\.seeds: must be a non-empty list of distinct seeds"),
    ("experiment", [], r"experiments\.tiny_emd\.seeds: must be a non-empty list"),
    ("experiment", [-1], r"experiments\.tiny_emd\.seeds: must be a non-empty list of distinct seeds >= 0"),
    ("experiment", ["a"], r"experiments\.tiny_emd\.seeds\[0\]: expected an integer"),
    ("suite", [0, 0], r"suites\.smoke\.seeds: must be a non-empty list"),
])
def test_bad_seeds_name_their_key(tiny_raw, where, value, message):
    if where == "experiment":
        tiny_raw["experiments"]["tiny_emd"]["seeds"] = value
    else:
        tiny_raw["suites"]["smoke"] = {"experiments": ["tiny_emd"], "seeds": value}
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_raw)


def test_a_suite_mapping_with_an_unknown_key_or_experiment_is_refused(tiny_raw):
    tiny_raw["suites"]["smoke"] = {"experiments": ["tiny_emd"], "seed": [0]}
    with pytest.raises(ConfigError, match=r"suites\.smoke\.seed: unknown key"):
        parse_params(tiny_raw)
    tiny_raw["suites"]["smoke"] = {"experiments": ["ghost"], "seeds": [0]}
    with pytest.raises(ConfigError, match=r"suites\.smoke\[0\]: unknown experiment 'ghost'"):
        parse_params(tiny_raw)


def test_run_names_and_their_paths():
    assert paths.run_name("toy2d_di", None) == "toy2d_di"
    assert paths.run_name("toy2d_di", 1) == "toy2d_di/seed1"
    assert str(paths.distill_dir(paths.run_name("toy2d_di", 1))) == "runs/experiments/toy2d_di/seed1/distill"
    assert str(paths.experiment_metrics(paths.run_name("toy2d_di", 1))) == "reports/experiments/toy2d_di/seed1.json"
    assert str(paths.work_dir(paths.run_name("toy2d_di", 1))) == "runs/work/toy2d_di/seed1"


def test_t_interval_matches_scipy():
    xs = [0.31, 0.25, 0.40, 0.28]
    st = t_interval(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 4, scale=stats.sem(xs))
    assert st["n"] == 4 and math.isclose(st["mean"], 0.31)
    assert math.isclose(st["std"], stats.tstd(xs)) and math.isclose(st["lo"], lo) and math.isclose(st["hi"], hi)
    assert t_interval([2.0]) == {"mean": 2.0, "std": None, "n": 1, "lo": None, "hi": None}


def test_aggregate_averages_metrics_and_keeps_settings():
    recs = {0: {"experiment": "e", "method": "emd", "K": 4, "fid": 1.0, "modes_covered": 20, "status": "ok"},
            1: {"experiment": "e", "method": "emd", "K": 4, "fid": 3.0, "modes_covered": 22, "status": "ok"},
            2: {"experiment": "e", "method": "emd", "K": 4, "fid": None, "modes_covered": 24, "status": "ok"}}
    out = aggregate_records(recs)
    assert out["K"] == 4 and out["method"] == "emd" and out["seeds"] == [0, 1, 2]
    assert out["fid"] == 2.0 and out["fid_n"] == 2  # a seed without a value does not count
    assert out["modes_covered"] == 22 and out["modes_covered_n"] == 3
    assert math.isclose(out["modes_covered_std"], 2.0)
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert math.isclose(out["modes_covered_ci95_lo"], 22 - half)
    assert math.isclose(out["modes_covered_ci95_hi"], 22 + half)


def test_read_experiment(tmp_path):
    def path_of(run: str):
        return tmp_path / f"{run}.json"

    assert read_experiment("e", None, path_of) is None
    path_of("e").write_text(json.dumps({"fid": 5.0}))
    assert read_experiment("e", None, path_of) == {"fid": 5.0}  # no seeds: the one record, unchanged

    assert read_experiment("e", [0, 1], path_of) is None
    (tmp_path / "e").mkdir()
    path_of("e/seed1").write_text(json.dumps({"fid": 4.0}))
    out = read_experiment("e", [0, 1], path_of)
    assert out["fid"] == 4.0 and out["fid_n"] == 1 and out["seeds"] == [1] and out["seeds_missing"] == [0]
