"""The paper's claims, tested on per-seed records: a paired comparison across shared seeds and a verdict.

Input: a pandas DataFrame of per-seed records, one row per (experiment, seed), with columns ``experiment``,
``seed`` and metric columns named as in metrics.json (``fid``, ``recall``, ``modes_covered``, ``K``,
``sec_per_iter``, ...). Each claim names a metric, the paper's direction of better and, per world, the
experiments it compares. Three kinds of test, all paired across the seeds that every compared experiment shares:

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
    metric: str
    better: Literal["lower", "higher"]
    compare: Mapping[str, tuple[str, ...] | tuple[tuple[str, ...], ...]]
    kind: Literal["paired", "slope", "linear"] = "paired"
    x: str = "K"
    table: str = "main"
    paper: str = PAPER  # where the paper makes the claim

    def comparisons(self) -> list[tuple[str, tuple[str, ...]]]:
        """(world, compared experiments) for every comparison of the claim, in order."""
        return [(w, group) for w, v in self.compare.items()
                for group in (v if v and isinstance(v[0], tuple) else (v,))]


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
        return (self.mean > 0) == (self.claim.better == "lower")


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


def per_seed_effects(claim: Claim, compared: Sequence[str], records: pd.DataFrame) -> pd.DataFrame:
    """One row per seed shared by all ``compared`` experiments that has the metric everywhere: columns seed,
    effect (and r2 for 'linear')."""
    need = [claim.metric] + ([claim.x] if claim.kind != "paired" else [])
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
            out.append({"seed": s, "effect": float(r.loc[a, claim.metric]) - float(r.loc[b, claim.metric])})
            continue
        x = r.loc[list(compared), claim.x].to_numpy(dtype=float)
        y = r.loc[list(compared), claim.metric].to_numpy(dtype=float)
        if len(np.unique(x)) < 2:
            continue
        slope, r2 = _fit(np.log2(x) if claim.kind == "slope" else x, y)
        out.append({"seed": s, "effect": slope, "r2": r2})
    return pd.DataFrame(out, columns=["seed", "effect"] + (["r2"] if claim.kind == "linear" else []))


def evaluate_claim(claim: Claim, world: str, records: pd.DataFrame,
                   compared: Sequence[str] | None = None) -> Result:
    """``compared``: the experiments to use (default: the claim's first comparison in ``world``; a sweep may use
    part)."""
    compared = tuple(next(g for w, g in claim.comparisons() if w == world) if compared is None else compared)
    if claim.kind == "paired" and len(compared) != 2:
        raise ValueError(f"claim {claim.key!r}: a paired claim compares two experiments, got {compared}")
    eff = per_seed_effects(claim, compared, records)
    n = len(eff)
    mean, sd, lo, hi = t_interval(eff["effect"].to_numpy(dtype=float))
    extra = {"r2": float(eff["r2"].mean())} if claim.kind == "linear" and n else {}
    v = verdict(lo, hi, n, claim.better)
    if claim.kind == "linear" and v == "reproduced" and extra["r2"] < LINEAR_R2:
        v = "inconclusive"  # it grows, but a line does not describe it
    nan = lambda f: None if f is None or not math.isfinite(f) else f  # noqa: E731
    return Result(claim, world, compared, n, nan(mean), nan(sd), nan(lo), nan(hi), v, extra)


def evaluate_claims(claims: Sequence[Claim], records: pd.DataFrame,
                    worlds: Sequence[str] | None = None) -> list[Result]:
    """Every (claim, world) pair whose world is in ``worlds`` (default: all the claim names) and whose
    experiments appear in ``records`` (experiments a suite does not run are no evidence either way): a paired
    claim needs both, a sweep (slope, linear) at least MIN_SWEEP of its points and uses those."""
    present = set(records["experiment"]) if len(records) else set()
    out = []
    for c in claims:
        for w, compared in c.comparisons():
            if worlds is not None and w not in worlds:
                continue
            have = [e for e in compared if e in present]
            if len(have) == len(compared) or (c.kind != "paired" and len(have) >= MIN_SWEEP):
                out.append(evaluate_claim(c, w, records, have))
    return out


def effect_text(r: Result, digits: int = 3) -> str:
    """'-0.0012 [-0.003, 0.0006]' (n >= 2) or '-0.0012' (one seed); 'n/a' without data."""
    if r.mean is None:
        return "n/a"
    f = lambda v: f"{v:.{digits}g}"  # noqa: E731
    return f"{f(r.mean)} [{f(r.lo)}, {f(r.hi)}]" if r.lo is not None else f(r.mean)


def effect_unit(r: Result) -> str:
    c = r.claim
    if c.kind == "paired":
        return f"{c.metric}({r.compared[0]}) - {c.metric}({r.compared[1]})"
    if c.kind == "slope":
        return f"d {c.metric} / d log2 {c.x}"
    return f"d {c.metric} / d {c.x}"


# --- the claims of the EMD paper that the embedded worlds can test ------------------------------------------

_TOY_K = ("toy2d_emd_k2", "toy2d_emd_k4", "toy2d_emd_k8", "toy2d_emd_k16")
_SKEWED = ("toy2d_skewed_emd_k8", "toy2d_skewed_di")  # weights over a factor 25: where mode-seeking should fail
# digits: EMD-4 with the template's shrink z step, with the curvature z step that moves z, and at 3x the budget
_DIGITS = (("digits_emd_k4", "digits_di"), ("digits_emd_k4_curvature", "digits_di"),
           ("digits_emd_k4_long", "digits_di_long"))

CLAIMS: tuple[Claim, ...] = (
    Claim("emd_modes", "EMD-K covers more modes than Diff-Instruct", "modes_covered", "higher",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED}),
    Claim("emd_recall", "EMD-K has higher recall than Diff-Instruct (mode covering)", "recall", "higher",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED, "digits": _DIGITS}),
    Claim("emd_fd", "EMD-K reaches a lower FD than Diff-Instruct", "fid", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED, "digits": _DIGITS}),
    # convergence_auc (mct.convergence): the run's convergence metric (toy2d mode TV, digits pixel FD) averaged
    # over the training iterations between its first and last evaluation point; lower = better sooner.
    Claim("emd_converge", "EMD-K converges faster than Diff-Instruct (quality averaged over training)",
          "convergence_auc", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_di"), "toy2d_skewed": _SKEWED,
           "digits": (("digits_emd_k4", "digits_di"), ("digits_emd_k4_long", "digits_di_long"))}),
    Claim("cancel_fd", "Noise cancellation improves FD", "fid", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_cancel_none")}, table="noise"),
    Claim("k_fd", "More Langevin steps K improve FD", "fid", "lower", {"toy2d": _TOY_K}, kind="slope",
          table="K"),
    Claim("k_recall", "More Langevin steps K improve recall", "recall", "higher", {"toy2d": _TOY_K},
          kind="slope", table="K"),
    Claim("space_eps", "Joint (eps, z) sampling beats eps-only sampling on FD", "fid", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_space_eps")}, table="space"),
    Claim("space_xz", "Joint (eps, z) sampling beats (x, z) sampling on FD", "fid", "lower",
          {"toy2d": ("toy2d_emd_k8", "toy2d_space_x_z")}, table="space"),
    Claim("init_fd", "Initialising the generator from the teacher beats training from scratch (FD)", "fid",
          "lower", {"toy2d": ("toy2d_emd_k8", "toy2d_init_scratch")}, table="init"),
    Claim("cost_linear", "Training cost per iteration grows about linearly in K", "sec_per_iter", "higher",
          {"toy2d": _TOY_K}, kind="linear", table="cost"),
)

__all__ = ["Claim", "Result", "CLAIMS", "CONFIDENCE", "LINEAR_R2", "VERDICTS", "t_interval", "verdict",
           "per_seed_effects", "evaluate_claim", "evaluate_claims", "effect_text", "effect_unit"]
