"""The paper's claims, tested on per-seed records: a paired comparison across shared seeds and a verdict.

Input: a pandas DataFrame of per-seed records, one row per (experiment, seed), with columns ``experiment``,
``seed`` and metric columns named as in metrics.json (``fid``, ``recall``, ``modes_covered``, ``K``,
``sec_per_iter``, ...). Each claim names a metric (or PRIMARY: each primary metric the world declares,
World.primary_metrics, with its direction of better) and, per world, the experiments it compares. Given the worlds'
primary metrics, a claim is judged only on metrics a world declares primary (a metric blind to the effect, such as
FD (2-D) on a mixture, decides nothing). Three kinds of test, all paired across the seeds that every compared
experiment shares:

  paired  A vs B: per seed d_s = metric(A, s) - metric(B, s).
  slope   a sweep over ``x`` (K): per seed the least-squares slope of the metric against log2(x).
  linear  a sweep over ``x`` (K): per seed the least-squares slope of the metric against x itself, and the
          fit's R^2 (the paper's claim is linear growth; the verdict needs R^2 >= LINEAR_R2).

Across seeds: mean, sample standard deviation, n and the two-sided 95% Student-t interval
mean +- t_{0.975, n-1} sd / sqrt(n). Verdict, computed from the interval alone:
  reproduced    the interval excludes 0 on the paper's side (better = 'lower': the effect is < 0),
  contradicted  the interval excludes 0 on the other side,
  inconclusive  otherwise, and always when n < 2 (no interval from one seed: "inconclusive (n=1)").
Effects are in the metric's own units, A - B (paired) or per doubling of x (slope) or per unit of x (linear).

Multiplicity: the claims of one page are one family. ``holm`` gives each result its two-sided t-test p-value
adjusted by Holm's step-down procedure over the family (Holm 1979; it controls the family-wise error rate at
CONFIDENCE without assumptions on the dependence between tests), and a verdict from the adjusted p-value. A recall
effect is read together with precision on the same seeds: a recall gain whose paired precision interval lies
below 0 is coverage bought with precision, and the result says so (``Result.caveat``).
MEASUREMENTS (cost linear in K) hold by construction of the code path; they are fitted the same way but are not
claims: not in the family, not counted as reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
LINEAR_R2 = 0.9  # a 'linear' claim needs the per-seed linear fits to explain at least this much variance (mean R^2)
VERDICTS = ("reproduced", "contradicted", "inconclusive")
PAPER = "Xie et al. 2024 (arXiv 2405.16852)"
PRIMARY = "primary"  # a claim's metric: each of the world's primary metrics (World.primary_metrics)
COVERAGE_CAVEAT = "coverage bought with precision"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, testable in the worlds listed in ``compare``.

    ``compare`` maps a world to the experiments it compares: (A, B) for 'paired' (A is the paper's better
    one), or the sweep's experiments for 'slope' and 'linear' (their ``x`` values come from the records); or to
    several such tuples, each tested on its own (e.g. EMD-K with either z-step scheme against Diff-Instruct).
    ``table`` names the report table the claim belongs to (main, space, noise, K, init, cost).
    """

    key: str
    text: str
    metric: str  # a metrics.json key, or PRIMARY
    better: Literal["lower", "higher", ""]  # '' with PRIMARY: each primary metric brings its own direction
    compare: Mapping[str, tuple[str, ...] | tuple[tuple[str, ...], ...]]
    kind: Literal["paired", "slope", "linear"] = "paired"
    x: str = "K"
    table: str = "main"
    paper: str = PAPER  # where the paper makes the claim

    def comparisons(self) -> list[tuple[str, tuple[str, ...]]]:
        """(world, compared experiments) for every comparison of the claim, in order."""
        return [(w, group) for w, v in self.compare.items()
                for group in (v if v and isinstance(v[0], tuple) else (v,))]

    def metrics(self, primary: Sequence[tuple[str, str]] | None,
                judged: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """(metric, better) pairs the claim is judged on in a world whose primary metrics are ``primary``: PRIMARY
        expands to them; a fixed metric counts if it is in ``judged`` (default ``primary``; e.g. also a
        convergence summary of a primary metric). None: nothing known, a fixed metric is taken as given."""
        if self.metric == PRIMARY:
            return list(primary or ())
        allowed = primary if judged is None else judged
        if allowed is None or self.metric in dict(allowed):
            return [(self.metric, self.better)]
        return []


@dataclass
class Result:
    claim: Claim
    world: str
    compared: tuple[str, ...]
    n: int  # seeds shared by every compared experiment
    mean: float | None  # effect; None without data
    sd: float | None
    lo: float | None
    hi: float | None
    verdict: str  # one of VERDICTS
    extra: dict[str, float] = field(default_factory=dict)  # e.g. mean R^2 of 'linear' fits
    metric: str = ""  # the metric judged (the claim's, or one primary metric of the world)
    better: str = ""
    p: float | None = None  # two-sided one-sample t-test of the per-seed effects against 0
    p_holm: float | None = None  # p adjusted over the page's family (holm); None until holm ran or without p
    verdict_holm: str = "inconclusive"
    caveat: str = ""  # e.g. COVERAGE_CAVEAT with the precision effect

    def __post_init__(self) -> None:
        self.metric = self.metric or self.claim.metric
        self.better = self.better or self.claim.better

    @property
    def label(self) -> str:
        """The verdict as the report prints it: 'inconclusive (n=1)' says why there is no interval."""
        if self.verdict == "inconclusive" and self.n < 2:
            return f"inconclusive (n={self.n})"
        return self.verdict

    @property
    def opposite(self) -> bool:
        """The point estimate lies on the other side of 0 than the paper's claim (whatever the verdict)."""
        if self.mean is None or self.mean == 0:
            return False
        return (self.mean > 0) == (self.better == "lower")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sd, lo, hi) of a two-sided Student-t interval for the mean; lo = hi = nan for fewer than 2 values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def t_test_p(mean: float, sd: float, n: int) -> float | None:
    """Two-sided p-value of the one-sample t-test of mean 0 (the interval of t_interval excludes 0 exactly when
    p < 1 - CONFIDENCE); None below 2 values. Zero spread: 0 for a non-zero mean, 1 for a zero one."""
    from scipy import stats

    if n < 2 or not (math.isfinite(mean) and math.isfinite(sd)):
        return None
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm_adjust(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: a test without a p-value, not in the family).

    Sorted ascending, the i-th smallest (0-based, of m) becomes max over j <= i of min(1, (m - j) p_(j)); so
    adjusted < alpha rejects exactly the hypotheses Holm's procedure rejects at family-wise level alpha."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, run, out = len(idx), 0.0, [None] * len(pvalues)
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (m - rank) * pvalues[i]))
        out[i] = run
    return out


def holm(results: Sequence[Result], alpha: float = 1 - CONFIDENCE) -> list[Result]:
    """Set p_holm and verdict_holm on every result of one family (a page's claims) in place; returns them."""
    for r, p in zip(results, holm_adjust([r.p for r in results]), strict=True):
        r.p_holm = p
        side = "reproduced" if not r.opposite else "contradicted"
        # a linear claim whose fit is poor stays inconclusive, as its raw verdict does
        r.verdict_holm = side if p is not None and p < alpha and r.verdict != "inconclusive" else "inconclusive"
    return list(results)


def verdict(lo: float, hi: float, n: int, better: str) -> str:
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if hi < 0:
        return "reproduced" if better == "lower" else "contradicted"
    if lo > 0:
        return "reproduced" if better == "higher" else "contradicted"
    return "inconclusive"


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and the fit's R^2 (1.0 when y is constant and fitted exactly)."""
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return slope, (1.0 - float((resid ** 2).sum()) / ss_tot) if ss_tot > 0 else 1.0


MIN_SWEEP = 3  # a slope over fewer points than this says too little about the trend


def per_seed_effects(claim: Claim, compared: Sequence[str], records: pd.DataFrame,
                     metric: str | None = None) -> pd.DataFrame:
    """One row per seed shared by all ``compared`` experiments that has the metric (default the claim's)
    everywhere: columns seed, effect (and r2 for 'linear')."""
    metric = metric or claim.metric
    need = [metric] + ([claim.x] if claim.kind != "paired" else [])
    rows = records[records["experiment"].isin(compared)].dropna(subset=[c for c in need if c in records])
    if any(c not in rows for c in need):
        return pd.DataFrame(columns=["seed", "effect"])
    have = rows.groupby("seed")["experiment"].nunique()
    seeds = sorted(s for s, k in have.items() if k == len(set(compared)))
    out = []
    for s in seeds:
        r = rows[rows["seed"] == s].drop_duplicates("experiment").set_index("experiment")
        if claim.kind == "paired":
            a, b = compared
            out.append({"seed": s, "effect": float(r.loc[a, metric]) - float(r.loc[b, metric])})
            continue
        x = r.loc[list(compared), claim.x].to_numpy(dtype=float)
        y = r.loc[list(compared), metric].to_numpy(dtype=float)
        if len(np.unique(x)) < 2:
            continue
        slope, r2 = _fit(np.log2(x) if claim.kind == "slope" else x, y)
        out.append({"seed": s, "effect": slope, "r2": r2})
    return pd.DataFrame(out, columns=["seed", "effect"] + (["r2"] if claim.kind == "linear" else []))


def evaluate_claim(claim: Claim, world: str, records: pd.DataFrame,
                   compared: Sequence[str] | None = None, metric: str | None = None,
                   better: str | None = None) -> Result:
    """``compared``: the experiments to use (default: the claim's first comparison in ``world``; a sweep may use
    part); ``metric``/``better``: the metric judged (needed for a PRIMARY claim; default the claim's)."""
    compared = tuple(next(g for w, g in claim.comparisons() if w == world) if compared is None else compared)
    metric, better = metric or claim.metric, better or claim.better
    if metric == PRIMARY:
        raise ValueError(f"claim {claim.key!r}: a claim on the primary metrics needs the metric to judge")
    if claim.kind == "paired" and len(compared) != 2:
        raise ValueError(f"claim {claim.key!r}: a paired claim compares two experiments, got {compared}")
    eff = per_seed_effects(claim, compared, records, metric)
    n = len(eff)
    mean, sd, lo, hi = t_interval(eff["effect"].to_numpy(dtype=float))
    extra = {"r2": float(eff["r2"].mean())} if claim.kind == "linear" and n else {}
    v = verdict(lo, hi, n, better)
    if claim.kind == "linear" and v == "reproduced" and extra["r2"] < LINEAR_R2:
        v = "inconclusive"  # it grows, but a line does not describe it
    nan = lambda f: None if f is None or not math.isfinite(f) else f  # noqa: E731
    r = Result(claim, world, compared, n, nan(mean), nan(sd), nan(lo), nan(hi), v, extra, metric, better,
               t_test_p(mean, sd, n))
    if metric == "recall":
        _read_with_precision(r, records)
    return r


def _read_with_precision(r: Result, records: pd.DataFrame) -> None:
    """A recall gain is mode covering only if precision holds: when the paired precision interval on the same
    seeds lies below 0, the result carries COVERAGE_CAVEAT and that interval."""
    if r.mean is None or r.mean <= 0 or "precision" not in records:
        return
    prec = evaluate_claim(r.claim, r.world, records, r.compared, "precision", "higher")
    if prec.hi is not None and prec.hi < 0:
        r.caveat = f"{COVERAGE_CAVEAT}: precision {effect_text(prec)}"


def evaluate_claims(claims: Sequence[Claim], records: pd.DataFrame, worlds: Sequence[str] | None = None,
                    primary: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                    judged: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> list[Result]:
    """Every (claim, world, metric) whose world is in ``worlds`` (default: all the claim names) and whose
    experiments appear in ``records`` (experiments a suite does not run are no evidence either way): a paired
    claim needs both, a sweep (slope, linear) at least MIN_SWEEP of its points and uses those. ``primary``: per
    world its primary (metric, better) pairs, ``judged`` what a fixed-metric claim may rest on (default: the
    primary ones; Claim.metrics); a world missing from them has none."""
    present = set(records["experiment"]) if len(records) else set()
    out = []
    for c in claims:
        for w, compared in c.comparisons():
            if worlds is not None and w not in worlds:
                continue
            have = [e for e in compared if e in present]
            if len(have) == len(compared) or (c.kind != "paired" and len(have) >= MIN_SWEEP):
                allowed = None if judged is None else judged.get(w, ())
                for metric, better in c.metrics(None if primary is None else primary.get(w, ()), allowed):
                    out.append(evaluate_claim(c, w, records, have, metric, better))
    return out


def not_judged(claims: Sequence[Claim], worlds: Sequence[str], primary: Mapping[str, Sequence[tuple[str, str]]],
               judged: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> list[tuple[Claim, str]]:
    """(claim, world) pairs of ``worlds`` that the claim names but cannot be judged on: its metric is not one of
    the world's primary metrics."""
    return [(c, w) for c in claims for w in dict.fromkeys(w for w, _ in c.comparisons())
            if w in worlds and not c.metrics(primary.get(w, ()), None if judged is None else judged.get(w, ()))]


def effect_text(r: Result, digits: int = 3) -> str:
    """'-0.0012 [-0.003, 0.0006]' (n >= 2) or '-0.0012' (one seed); 'n/a' without data."""
    if r.mean is None:
        return "n/a"
    f = lambda v: f"{v:.{digits}g}"  # noqa: E731
    return f"{f(r.mean)} [{f(r.lo)}, {f(r.hi)}]" if r.lo is not None else f(r.mean)


def effect_unit(r: Result) -> str:
    c, m = r.claim, r.metric
    if c.kind == "paired":
        return f"{m}({r.compared[0]}) - {m}({r.compared[1]})"
    if c.kind == "slope":
        return f"d {m} / d log2 {c.x}"
    return f"d {m} / d {c.x}"


# --- the claims of the EMD paper that the embedded worlds can test ------------------------------------------

_TOY_K = ("toy2d_emd_k2", "toy2d_emd_k4", "toy2d_emd_k8", "toy2d_emd_k16")
# digits, where the students are too narrow (precision above the teacher's, recall below): does K buy recall?
_DIGITS_K = ("digits_emd_k1", "digits_emd_k2", "digits_emd_k4", "digits_emd_k8")
_SKEWED = ("toy2d_skewed_emd_k8", "toy2d_skewed_di")  # weights over a factor 25: where mode-seeking should fail
# digits: EMD-4 with the template's shrink z step, with the curvature z step that moves z, and at 3x the budget
_DIGITS = (("digits_emd_k4", "digits_di"), ("digits_emd_k4_curvature", "digits_di"),
           ("digits_emd_k4_long", "digits_di_long"))

# Judged on each primary metric of the world (World.primary_metrics): toy2d's exact mode statistics and NLL,
# digits' FD, precision and recall in the classifier's features. FD (2-D) and toy2d's k-NN recall are secondary.
_EMD_CLAIMS: tuple[Claim, ...] = (
    Claim("emd_beats_di", "EMD-K beats Diff-Instruct (mode covering, sample quality)", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED, "digits": _DIGITS},
          paper=(PAPER + ": abstract (read) and Section 5's one-step results tables on ImageNet 64x64 and 128x128 "
                         "(read from a secondary summary; table numbers not verified); judged there on FID, here "
                         "on each world's primary metrics")),
    # convergence_auc (mct.convergence): the run's convergence metric (toy2d mode TV, digits pixel FD) averaged
    # over the training iterations between its first and last evaluation point; lower = better sooner. Judged
    # where the metric it averages is primary (mct.report_claims.judged_metrics): toy2d's mode TV, not digits'
    # pixel FD.
    Claim("emd_converge", "EMD-K converges faster than Diff-Instruct (quality averaged over training)",
          "convergence_auc", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED,
           "digits": (("digits_emd_k4", "digits_di"), ("digits_emd_k4_long", "digits_di_long"))},
          paper=(PAPER + ": listed among the method's practical benefits (faster convergence); the figure or table"
                         " behind it not located (unverified)")),
    Claim("cancel", "Noise cancellation improves the student", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", "toy2d_cancel_none")}, table="noise",
          paper=(PAPER + ": abstract (read: noise cancellation stabilises distillation) and Section 5's ablation "
                         "of cancellation strategies on ImageNet 64x64, gradient norm and FID (secondary summary; "
                         "figure number not verified)")),
    Claim("k_better", "More Langevin steps K improve the student", PRIMARY, "", {"toy2d": _TOY_K, "digits": _DIGITS_K},
          kind="slope",
          table="K",
          paper=(PAPER + ": Section 5's ablation of the number of Langevin steps on ImageNet 64x64, FID and recall"
                         " against K (secondary summary; figure number not verified)")),
    Claim("space_eps", "Joint (eps, z) sampling beats eps-only sampling", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", "toy2d_space_eps")}, table="space",
          paper=(PAPER + ": Section 5's sampling-space table on ImageNet 64x64 (EMD-8 after 100k steps; (x, z), "
                         "(eps, z), x and eps by FID and IS; secondary summary, table number not verified)")),
    Claim("space_xz", "Joint (eps, z) sampling beats (x, z) sampling", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", "toy2d_space_x_z")}, table="space",
          paper=(PAPER + ": the same sampling-space table as the eps-only claim (secondary summary; table number "
                         "not verified)")),
    Claim("init", "Initialising the generator from the teacher beats training from scratch", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", "toy2d_init_scratch")}, table="init",
          paper=(PAPER + ": the brief's reading (teacher initialisation is crucial, scratch not competitive); no "
                         "experiment comparing the two was located in the paper (unverified)")),
)

# EMD among its peers (mct.methods): the same loop, teacher, generator initialisation and iterations, paired seeds
_PEERS_SID = {"toy2d": ("toy2d_emd_k8", "toy2d_sid"), "toy2d_skewed": ("toy2d_skewed_emd_k8", "toy2d_skewed_sid"),
              "digits": ("digits_emd_k4", "digits_sid")}
_PEERS_DMD2 = {"toy2d": ("toy2d_emd_k8", "toy2d_dmd2"), "toy2d_skewed": ("toy2d_skewed_emd_k8", "toy2d_skewed_dmd2"),
               "digits": ("digits_emd_k4", "digits_dmd2")}
PEER_CLAIMS: tuple[Claim, ...] = (
    Claim("emd_beats_sid", "EMD-K beats SiD at equal iterations", PRIMARY, "", _PEERS_SID,
          paper=(PAPER + " compares with SiD only through numbers other papers measured (ImageNet 64x64 table, "
                         "secondary summary); SiD: Zhou et al., ICML 2024")),
    Claim("emd_beats_dmd2", "EMD-K beats DMD2 at equal iterations", PRIMARY, "", _PEERS_DMD2,
          paper=(PAPER + " compares with DMD2 only through numbers other papers measured (secondary summary); DMD2: "
                         "Yin et al., NeurIPS 2024")),
    Claim("sid_beats_di", "SiD beats Diff-Instruct at equal iterations", PRIMARY, "",
          {"toy2d": ("toy2d_sid", "toy2d_di"), "toy2d_skewed": ("toy2d_skewed_sid", "toy2d_skewed_di"),
           "digits": ("digits_sid", "digits_di")},
          paper="Zhou et al., ICML 2024 (SiD): its one-step FIDs against Diff-Instruct's, as its tables quote them "
                "(unverified here)"),
)

# Equal wall-clock (suite methods_wallclock): EMD-8 at the template's iterations against each other method given
# the iterations that cost the same training time by the timing benchmark (mct.report_cost.equal_wallclock_iterations)
_WALL = {"di": ("Diff-Instruct", "toy2d_di_wall", "toy2d_skewed_di_wall"),
         "sid": ("SiD", "toy2d_sid_wall", "toy2d_skewed_sid_wall"),
         "dmd2": ("DMD2", "toy2d_dmd2_wall", "toy2d_skewed_dmd2_wall")}
WALLCLOCK_CLAIMS: tuple[Claim, ...] = tuple(
    Claim(f"emd_beats_{m}_wall", f"EMD-K beats {name} at equal wall-clock", PRIMARY, "",
          {"toy2d": ("toy2d_emd_k8", toy), "toy2d_skewed": ("toy2d_skewed_emd_k8", skewed)},
          paper=(PAPER + ": the brief's reading (practical benefits include lower training cost, with extra cost "
                         "per iteration from the sampling steps); no equal-wall-clock comparison was located in the "
                         "paper (unverified)"))
    for m, (name, toy, skewed) in _WALL.items())

CLAIMS: tuple[Claim, ...] = _EMD_CLAIMS + PEER_CLAIMS + WALLCLOCK_CLAIMS

# True by construction (an E-step of K Langevin steps costs K network passes): fitted and shown, never a claim.
MEASUREMENTS: tuple[Claim, ...] = (
    Claim("cost_linear", "Training cost per iteration grows about linearly in K", "sec_per_iter", "higher",
          {"toy2d": _TOY_K}, kind="linear", table="cost",
          paper=(PAPER + ": Section 5's table of seconds per training step for Diff-Instruct and EMD-1 to EMD-16 "
                         "(secondary summary; table number not verified)")),
)

__all__ = ["Claim", "Result", "CLAIMS", "PEER_CLAIMS", "WALLCLOCK_CLAIMS", "MEASUREMENTS", "PRIMARY",
           "COVERAGE_CAVEAT", "CONFIDENCE", "LINEAR_R2", "VERDICTS", "t_interval", "t_test_p", "holm_adjust", "holm",
           "verdict", "per_seed_effects", "evaluate_claim", "evaluate_claims", "not_judged", "effect_text",
           "effect_unit"]
