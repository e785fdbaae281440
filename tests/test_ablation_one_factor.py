"""One factor per ablation, enforced on params.yaml: every EMD experiment of every suite differs from its world's
reference setting in nothing but one ablation's factor (or is the reference), over every resolved setting (the
optimiser, EMA, sigma distributions, cancellation and z-step schemes, batch, teacher network, ...), and every
Diff-Instruct row differs from it only in what defines the method (K = 1, gamma_z = 0). A row that differs in two
factors is left out of every ablation table and named under them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mct.claims import WALLCLOCK_CLAIMS
from mct.config import METHOD_KEYS, load_params, parse_params
from mct.report_collect import Entry, experiment_setting
from mct.report_cost import cost_record, equal_wallclock_iterations
from mct.report_tables import (
    ABLATIONS,
    ablation_members,
    differs_from_reference,
    outside_every_ablation,
    reference_setting,
)

REPO = Path(__file__).resolve().parents[1]

PARAMS = load_params(REPO / "params.yaml")
DI_DEFINITION = {"distill.K", "distill.gamma_z"}  # Diff-Instruct is EMD with one E-step and no z move
EMD_ONLY = {f"distill.{k}" for k in METHOD_KEYS["emd"]}  # absent from a peer's settings
PEER_OWN = {"distill.method"} | {f"distill.{k}" for m in ("sid", "dmd2") for k in METHOD_KEYS[m]}
# the peers' other keys, each documented in params.yaml: DMD2's two time-scale rule, SiD's lr_g tuned on toy2d
PEER_DOCUMENTED = {"distill.score_steps", "distill.lr_g"}


# Equal wall-clock rows (suite methods_wallclock): another method, or Diff-Instruct, at the iterations that cost the
# training time of the reference EMD row's (test_wallclock_iterations_follow_the_timing_benchmark)
WALLCLOCK = {e: c.compare for c in WALLCLOCK_CLAIMS for e in (pair[1] for pair in c.compare.values())}
BUDGET = {"distill.iterations"}


def _entries(params, suite: str, world: str) -> list[Entry]:
    return [Entry(e, "experiment", world, experiment_setting(params.experiment(e), params), None)
            for e in params.suite_experiments(suite) if params.experiment(e).world == world]


CASES = [(s, w) for s in sorted(PARAMS.suites) for w in PARAMS.suite_worlds(s)]


@pytest.mark.parametrize(("suite", "world"), CASES, ids=[f"{s}-{w}" for s, w in CASES])
def test_every_ablation_row_of_params_yaml_changes_one_factor(suite, world):
    entries = _entries(PARAMS, suite, world)
    ref = reference_setting(entries)
    if ref is None:
        return  # no EMD experiment: no ablation
    assert outside_every_ablation(entries, ref) == {}
    for e in entries:
        budget = BUDGET if e.name in WALLCLOCK else set()
        if e.setting["method"] == "diff_instruct":
            assert set(differs_from_reference(e.setting, ref)) <= DI_DEFINITION | budget, e.name
        elif e.setting["method"] != "emd":  # a peer: the E-step's keys gone, its own keys, and what params.yaml says
            assert set(differs_from_reference(e.setting, ref)) - EMD_ONLY - PEER_OWN <= PEER_DOCUMENTED | budget, e.name


def test_wallclock_iterations_follow_the_timing_benchmark():
    """Each equal-wall-clock row runs the iterations that cost its reference EMD row's training time, by the committed
    timing record (its toy2d record serves toy2d_skewed too: the same networks and batch), and differs from the
    equal-iterations row of its method in the iterations alone."""
    rec = cost_record(REPO / "reports" / "benchmarks" / "estep_cost", "toy2d")
    assert rec is not None
    for c in WALLCLOCK_CLAIMS:
        for world, (ref, wall) in c.compare.items():
            same_iterations = wall.removesuffix("_wall")
            timed = same_iterations.replace("toy2d_skewed_", "toy2d_")
            ref_timed = ref.replace("toy2d_skewed_", "toy2d_")
            ref_iterations = PARAMS.experiment(ref).distill.iterations
            want = equal_wallclock_iterations(rec, timed, ref_timed, ref_iterations)
            assert PARAMS.experiment(wall).distill.iterations == want, (wall, want)
            assert PARAMS.experiment(wall).world == world
            a = experiment_setting(PARAMS.experiment(wall), PARAMS)["settings"]
            b = experiment_setting(PARAMS.experiment(same_iterations), PARAMS)["settings"]
            assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == BUDGET, wall


def test_a_row_that_changes_two_factors_is_in_no_ablation_table(tiny_raw):
    """The (x, z) row with another cancellation scheme (what the committed suite had) is not a sampling-space row:
    it is named, with both settings, as outside every ablation."""
    raw = copy.deepcopy(tiny_raw)
    raw["experiments"]["tiny_x_z"] = {"template": "toy2d", "distill": {"space": "x_z", "cancel_scheme": "antithetic"}}
    raw["experiments"]["tiny_eps"] = {"template": "toy2d", "distill": {"space": "eps"}}
    raw["suites"]["smoke"] += ["tiny_x_z", "tiny_eps"]
    params = parse_params(yaml.safe_load(yaml.safe_dump(raw)))
    entries = _entries(params, "smoke", "toy2d")
    ref = reference_setting(entries)
    space = next(ab for ab in ABLATIONS if ab.name == "space")
    rows = {lab: [e.name for e in group] for lab, group in ablation_members(space, ref, entries)}
    assert rows["eps"] == ["tiny_eps"] and rows["(x, z)"] == [] and rows["(eps, z)"] == ["tiny_emd"]
    assert outside_every_ablation(entries, ref) == {"tiny_x_z": ["distill.space", "distill.cancel_scheme"]}
