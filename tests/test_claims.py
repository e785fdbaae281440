"""The claims engine on synthetic per-seed records with known answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mct.claims import CLAIMS, Claim, effect_text, evaluate_claim, evaluate_claims, t_interval, verdict

T_975_3 = 3.182446305284263  # Student t, 97.5 % quantile, 3 degrees of freedom


def records(rows: list[tuple[str, int, dict]]) -> pd.DataFrame:
    return pd.DataFrame([{"experiment": e, "seed": s, **m} for e, s, m in rows])


def paired(diffs: list[float], base: float = 10.0) -> pd.DataFrame:
    """A and B on seeds 0..n-1 with metric(A) - metric(B) = diffs (B varies per seed: pairing must cancel it)."""
    rows = []
    for s, d in enumerate(diffs):
        rows += [("A", s, {"m": base + s + d}), ("B", s, {"m": base + s})]
    return records(rows)


def claim(better: str, kind: str = "paired", compare=("A", "B")) -> Claim:
    return Claim("c", "a claim", "m", better, {"w": compare}, kind=kind)


def test_t_interval_known_values():
    mean, sd, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx(math.sqrt(5 / 3))
    half = T_975_3 * math.sqrt(5 / 3) / 2
    assert (lo, hi) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert math.isnan(t_interval([3.0])[2]) and t_interval([3.0])[0] == 3.0


def test_paired_difference_interval_and_direction():
    data = paired([1.0, 2.0, 3.0, 4.0])
    half = T_975_3 * math.sqrt(5 / 3) / 2
    up = evaluate_claim(claim("higher"), "w", data)
    assert (up.n, up.mean, up.sd) == (4, 2.5, pytest.approx(math.sqrt(5 / 3)))
    assert (up.lo, up.hi) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert up.verdict == "reproduced" and not up.opposite
    down = evaluate_claim(claim("lower"), "w", data)  # the same data against the opposite claim
    assert down.verdict == "contradicted" and down.opposite
    # Swapping A and B flips the sign of the effect and, for the same claim, the verdict.
    assert evaluate_claim(claim("higher", compare=("B", "A")), "w", data).verdict == "contradicted"
    assert evaluate_claim(claim("lower", compare=("B", "A")), "w", data).verdict == "reproduced"


def test_interval_across_zero_is_inconclusive():
    r = evaluate_claim(claim("lower"), "w", paired([-1.0, 1.0, -0.5, 0.6]))
    assert r.lo < 0 < r.hi and r.verdict == "inconclusive" and r.label == "inconclusive"


def test_one_seed_is_inconclusive_whatever_the_difference():
    r = evaluate_claim(claim("lower"), "w", paired([-100.0]))
    assert (r.n, r.mean, r.lo, r.hi) == (1, -100.0, None, None)
    assert r.verdict == "inconclusive" and r.label == "inconclusive (n=1)"
    assert effect_text(r) == "-100"


def test_only_shared_seeds_are_paired():
    data = pd.concat([paired([1.0, 2.0, 3.0, 4.0]),
                      records([("A", 7, {"m": 0.0}), ("B", 8, {"m": 99.0}), ("B", 9, {"m": None})])])
    r = evaluate_claim(claim("higher"), "w", data)
    assert r.n == 4 and r.mean == 2.5


def test_zero_spread_decides_by_sign():
    assert evaluate_claim(claim("higher"), "w", paired([2.0, 2.0, 2.0])).verdict == "reproduced"
    assert evaluate_claim(claim("higher"), "w", paired([0.0, 0.0])).verdict == "inconclusive"


def test_slope_claim_per_seed_fit_in_log2_k():
    rows = []
    for s, slope in enumerate([-1.8, -2.0, -2.2]):  # metric = 5 + slope * log2 K + seed offset
        rows += [(f"k{k}", s, {"m": 5.0 + s + slope * math.log2(k), "K": k}) for k in (2, 4, 8, 16)]
    data = records(rows)
    sweep = ("k2", "k4", "k8", "k16")
    r = evaluate_claim(claim("lower", kind="slope", compare=sweep), "w", data)
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 0.2
    assert r.n == 3 and r.mean == pytest.approx(-2.0)
    assert (r.lo, r.hi) == pytest.approx((-2.0 - half, -2.0 + half))
    assert r.verdict == "reproduced"
    assert evaluate_claim(claim("higher", kind="slope", compare=sweep), "w", data).verdict == "contradicted"


def test_a_sweep_uses_the_points_a_suite_ran_if_there_are_enough():
    """A suite that runs K = 2, 4, 8 of the sweep 2..16 still tests the trend on those three (same exact slope);
    with two points left it is no evidence, and a paired claim needs both of its experiments."""
    rows = []
    for s, slope in enumerate([-1.8, -2.0, -2.2]):
        rows += [(f"k{k}", s, {"m": 5.0 + s + slope * math.log2(k), "K": k}) for k in (2, 4, 8)]
    sweep = claim("lower", kind="slope", compare=("k2", "k4", "k8", "k16"))
    (r,) = evaluate_claims([sweep], records(rows))
    assert r.compared == ("k2", "k4", "k8") and r.n == 3 and r.mean == pytest.approx(-2.0)
    assert evaluate_claims([sweep], records([r for r in rows if r[0] != "k8"])) == []
    assert evaluate_claims([claim("lower", compare=("k2", "k16"))], records(rows)) == []


def test_linear_claim_needs_a_good_fit():
    ks = (1, 2, 4, 8, 16)
    lin = records([(f"k{k}", s, {"m": 0.1 * (1 + s / 10) + 0.01 * k * (1 + s / 10), "K": k})
                   for s in range(3) for k in ks])
    sweep = tuple(f"k{k}" for k in ks)
    r = evaluate_claim(claim("higher", kind="linear", compare=sweep), "w", lin)
    assert r.mean == pytest.approx(0.011) and r.extra["r2"] == pytest.approx(1.0)
    assert r.verdict == "reproduced"
    expo = records([(f"k{k}", s, {"m": 2.0 ** k * (1 + s / 10), "K": k}) for s in range(3) for k in ks])
    r = evaluate_claim(claim("higher", kind="linear", compare=sweep), "w", expo)
    assert r.lo > 0 and r.extra["r2"] < 0.9 and r.verdict == "inconclusive"


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError):
        verdict(1.0, 2.0, 3, "sideways")


def _params_primary():
    """Per world of params.yaml: its primary metrics and what claims may rest on, as the report passes them."""
    from mct.config import load_params
    from mct.report_claims import judged_metrics
    from mct.worlds.registry import make_world

    params = load_params("params.yaml")
    kinds = {w: make_world(w, params.worlds[w]) for w in params.worlds}
    return ({w: k.primary_metrics for w, k in kinds.items()}, {w: judged_metrics(k) for w, k in kinds.items()})


ALL_METRICS = ("fid", "precision", "recall", "modes_covered", "mode_tv", "mode_precision", "nll", "convergence_auc")


def test_paper_claims_on_one_seed_records_are_inconclusive():
    """One seed per experiment: every claim the records can test says n=1, on each primary metric of its world."""
    primary, judged = _params_primary()
    names = sorted({e for c in CLAIMS for _, comp in c.comparisons() for e in comp})
    data = records([(e, 0, {**{m: 1.0 + i for m in ALL_METRICS}, "K": 2 ** (1 + i % 4)})
                    for i, e in enumerate(names)])
    results = evaluate_claims(CLAIMS, data, primary=primary, judged=judged)
    want = {(c.key, w, comp, m) for c in CLAIMS for w, comp in c.comparisons()
            for m, _ in c.metrics(primary[w], judged[w])}
    assert {(r.claim.key, r.world, r.compared, r.metric) for r in results} == want
    assert {r.label for r in results} == {"inconclusive (n=1)"} and {r.p for r in results} == {None}
    digits = evaluate_claims(CLAIMS, data, worlds=["digits"], primary=primary, judged=judged)
    assert digits and all(r.world == "digits" for r in digits)
    assert evaluate_claims(CLAIMS, data[data.experiment != "toy2d_di"], worlds=["toy2d"], primary=primary,
                           judged=judged)  # others remain


def test_no_verdict_rests_on_a_metric_the_world_does_not_declare_primary():
    """toy2d's FD (2-D) and k-NN recall see neither mode coverage nor sample quality: no claim is judged on them;
    the EMD-vs-Diff-Instruct claim is judged on modes covered, mode TV, mode precision and NLL; digits' convergence
    (pixel FD, not its feature space's FD) is named as not judged."""
    primary, judged = _params_primary()
    names = sorted({e for c in CLAIMS for _, comp in c.comparisons() for e in comp})
    data = records([(e, s, {**{m: 1.0 + i + 0.1 * s for m in ALL_METRICS}, "K": 2 ** (1 + i % 4)})
                    for i, e in enumerate(names) for s in range(3)])
    results = evaluate_claims(CLAIMS, data, primary=primary, judged=judged)
    toy = [r for r in results if r.world.startswith("toy2d")]
    assert toy and not [r for r in toy if r.metric in ("fid", "recall", "precision")]
    assert [r.metric for r in toy if r.claim.key == "emd_beats_di" and r.world == "toy2d"] == \
        ["modes_covered", "mode_tv", "mode_precision", "nll"]
    assert {r.metric for r in results if r.world == "digits"} == {"fid", "precision", "recall"}
    from mct.claims import not_judged

    assert [(c.key, w) for c, w in not_judged(CLAIMS, list(primary), primary, judged)] == [("emd_converge", "digits")]
    # The direction of better comes from the world: mode TV and NLL lower, the others higher.
    assert {r.metric: r.better for r in toy} == {"modes_covered": "higher", "mode_tv": "lower",
                                                 "mode_precision": "higher", "nll": "lower",
                                                 "convergence_auc": "lower"}


def test_cost_linear_in_k_is_a_measurement_not_a_claim():
    from mct.claims import MEASUREMENTS

    assert not [c for c in CLAIMS if c.kind == "linear" or c.metric == "sec_per_iter"]
    assert [c.key for c in MEASUREMENTS] == ["cost_linear"]


def test_t_test_p_agrees_with_scipy_and_the_interval():
    from scipy import stats

    from mct.claims import t_test_p

    for diffs in ([1.0, 2.0, 3.0, 4.0], [-1.0, 1.0, -0.5, 0.6], [0.2, 0.25, 0.22]):
        r = evaluate_claim(claim("higher"), "w", paired(diffs))
        assert r.p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-9)
        assert (r.p < 0.05) == (r.verdict != "inconclusive")
    assert t_test_p(2.0, 0.0, 3) == 0.0 and t_test_p(0.0, 0.0, 3) == 1.0 and t_test_p(1.0, 1.0, 1) is None


def test_holm_adjust_known_values():
    from mct.claims import holm_adjust

    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04); None is not in the family
    assert holm_adjust([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm_adjust([0.9, 0.3]) == pytest.approx([0.9, 0.6])
    assert holm_adjust([0.6, 0.7, 0.1]) == pytest.approx([1.0, 1.0, 0.3])


def test_holm_verdicts_over_a_family():
    """A raw 'reproduced' that does not survive the family-wise correction reads 'inconclusive' after Holm; a strong
    effect stays; a contradicted one keeps its side."""
    from mct.claims import holm

    strong = evaluate_claim(claim("higher"), "w", paired([2.0, 2.1, 1.9, 2.05]))
    weak = evaluate_claim(claim("higher"), "w", paired([0.3, 1.0, 0.5, 0.9]))
    against = evaluate_claim(claim("lower"), "w", paired([2.0, 2.1, 1.9, 2.05]))
    nulls = [evaluate_claim(claim("higher"), "w", paired([-1.0, 1.0, -0.5, 0.6])) for _ in range(6)]
    fam = holm([strong, weak, against, *nulls])
    assert weak.verdict == "reproduced" and 0.01 < weak.p < 0.05
    assert weak.p_holm == pytest.approx(min(1.0, 7 * weak.p)) and weak.verdict_holm == "inconclusive"
    assert strong.verdict_holm == "reproduced" and against.verdict_holm == "contradicted"
    assert all(r.verdict_holm == "inconclusive" for r in fam[3:])
    alone = holm([evaluate_claim(claim("higher"), "w", paired([0.3, 1.0, 0.5, 0.9]))])[0]
    assert alone.p_holm == pytest.approx(alone.p) and alone.verdict_holm == "reproduced"


def test_primary_claim_takes_each_metric_and_its_direction_from_the_world():
    from mct.claims import PRIMARY, not_judged

    rows = []
    for s in range(3):
        rows += [("A", s, {"a": 2.0 + s, "b": 2.0 + s, "fd": 0.0}), ("B", s, {"a": 1.0 + s, "b": 1.0 + s, "fd": 1.0})]
    c = Claim("p", "A beats B", PRIMARY, "", {"w": ("A", "B")})
    primary = {"w": (("a", "higher"), ("b", "lower"))}
    res = evaluate_claims([c], records(rows), primary=primary)
    assert [(r.metric, r.better, r.verdict) for r in res] == [("a", "higher", "reproduced"),
                                                              ("b", "lower", "contradicted")]
    blind = Claim("fd", "A has lower FD", "fd", "lower", {"w": ("A", "B")})
    assert evaluate_claims([blind], records(rows), primary=primary) == []
    assert evaluate_claims([blind], records(rows))[0].verdict == "reproduced"  # no primary metrics given: as named
    assert [(x.key, w) for x, w in not_judged([c, blind], ["w"], primary)] == [("fd", "w")]
    with pytest.raises(ValueError, match="primary"):
        evaluate_claim(c, "w", records(rows))


def test_recall_gain_bought_with_precision_is_named():
    from mct.claims import COVERAGE_CAVEAT

    def data(prec_drop: float):
        rows = []
        for s in range(3):
            rows += [("A", s, {"recall": 0.9 + 0.01 * s, "precision": 0.8 - prec_drop + 0.001 * s * s}),
                     ("B", s, {"recall": 0.8, "precision": 0.8})]
        return records(rows)

    c = Claim("r", "A has higher recall", "recall", "higher", {"w": ("A", "B")})
    bought = evaluate_claim(c, "w", data(0.3))
    assert bought.verdict == "reproduced" and bought.caveat.startswith(COVERAGE_CAVEAT + ": precision -0.298 [")
    assert evaluate_claim(c, "w", data(0.0)).caveat == ""  # precision held: plain mode covering


def test_claim_with_two_comparisons_in_a_world_tests_each():
    """A world may list several (A, B) pairs: each is evaluated on its own seeds, in order, and a pair whose
    experiment the records lack is skipped rather than failing the other."""
    c = Claim("two", "A beats B", "fid", "lower", {"w": (("a1", "b"), ("a2", "b"))})
    assert c.comparisons() == [("w", ("a1", "b")), ("w", ("a2", "b"))]
    data = records([(e, s, {"fid": v + s * 0.1}) for s in range(3)
                    for e, v in (("a1", 1.0), ("a2", 3.0), ("b", 2.0))])
    results = evaluate_claims([c], data)
    assert [(r.compared, r.verdict) for r in results] == [(("a1", "b"), "reproduced"), (("a2", "b"), "contradicted")]
    assert [r.compared for r in evaluate_claims([c], data[data.experiment != "a2"])] == [("a1", "b")]
    assert evaluate_claim(c, "w", data).compared == ("a1", "b")  # the default is the first comparison
