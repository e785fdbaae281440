"""The report's view of the paper's claims (mct.claims): the claims table and, per table of a world, the
discussion paragraphs where our data disagree with the paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mct.report_collect import Entry
from mct.report_tables import PAPER_ITERATIONS, Table, metric_name, plain_metric_name
from mct.worlds.base import World


def judged_metrics(world_def: World) -> tuple[tuple[str, str], ...]:
    """What a claim may rest on in this world: its primary metrics (World.primary_metrics), and convergence_auc when
    the training metric it averages (World.convergence_metric) is itself primary (toy2d's mode TV; not digits'
    pixel FD, which is not the FD of its feature space)."""
    primary = tuple(world_def.primary_metrics)
    if world_def.convergence_metric in dict(primary):
        primary += (("convergence_auc", "lower"),)
    return primary


def _p(v: float | None) -> Any:
    """A p-value cell: 3 significant figures, '< 0.001' below; None (no interval) stays None."""
    if v is None:
        return None
    return "< 0.001" if v < 1e-3 else f"{v:.3g}"


def _effect(r: Any) -> Any:
    from mct.report_tables import Estimate

    if r.mean is None:
        return None
    return Estimate(r.mean, r.lo, r.hi) if r.lo is not None else r.mean


def _compared(r: Any) -> str:
    if r.claim.kind == "paired":
        return " - ".join(r.compared)
    return f"slope over {'log2 ' if r.claim.kind == 'slope' else ''}{r.claim.x}: {', '.join(r.compared)}"


def claims_table(results: Sequence[Any], kinds: dict[str, World], claims: Sequence[Any] | None = None,
                 not_judged: Sequence[tuple[Any, str]] = ()) -> Table:
    """One row per (claim, world, judged metric) result, with the raw and the Holm-adjusted p-value and verdict
    (mct.claims.holm over the page's family); the note names the claims of ``claims`` (default
    mct.claims.CLAIMS) that no world of this suite could test, and ``not_judged`` (claim, world) pairs whose metric
    is not primary there."""
    from mct.claims import CLAIMS

    shown = [r for r in results if r.n > 0]  # a pair without a shared seed with the metric has no data
    caveats = any(r.caveat for r in shown)
    rows = []
    for r in shown:
        row = {"claim": r.claim.text, "world": r.world, "metric": metric_name(r.metric, kinds[r.world]),
               "effect (A - B or slope)": _compared(r), "n": r.n, "mean [95% CI]": _effect(r),
               "p": _p(r.p), "verdict": r.label, "Holm p": _p(r.p_holm), "Holm verdict": r.verdict_holm}
        if caveats:
            row["read with precision"] = r.caveat
        rows.append(row)
    m = sum(r.p is not None for r in results)
    note = ("Paired across the seeds that every compared experiment shares: per seed the difference A - B (or the "
            "least-squares slope against log2 K), then the mean and a two-sided 95% Student-t interval over seeds, "
            "and the two-sided t-test p-value. Verdict, computed: reproduced when the interval excludes 0 on the "
            "paper's side (the metric's arrow), contradicted when it excludes 0 on the other side, inconclusive "
            "otherwise and always with fewer than 2 seeds. Each claim is judged on every primary metric the world "
            "declares (World.primary_metrics) and on nothing else. The "
            f"{m} tests with a p-value are one family: Holm p is Holm's step-down adjustment over all of them, and "
            "the Holm verdict the verdict at family-wise level 0.05. A recall gain whose paired precision interval "
            "lies below 0 is marked 'coverage bought with precision'.")
    tested = {r.claim.key for r in results if r.n > 0}
    blind = {c.key for c, _ in not_judged}
    untested = [c.text for c in (CLAIMS if claims is None else claims) if c.key not in tested | blind]
    if untested:
        note += (" Not tested here (this suite has no data for them): "
                 + "; ".join(f"'{t}'" for t in untested) + ".")
    if not_judged:
        note += (" Not judged (the claim's metric is not a primary metric of the world): "
                 + "; ".join(f"'{c.text}' on {w} ({c.metric})" for c, w in not_judged) + ".")
    return Table("claims", "The paper's claims, tested on this suite's runs", pd.DataFrame(rows, dtype=object),
                 note)


def measurements_table(results: Sequence[Any], kinds: dict[str, World]) -> Table:
    """Properties true by construction (mct.claims.MEASUREMENTS): the fitted slope and R^2, not a verdict, and not
    in the claims' family."""
    from mct.claims import LINEAR_R2

    rows = [{"measurement": r.claim.text, "world": r.world, "metric": metric_name(r.metric, kinds[r.world]),
             "fit": _compared(r).replace("slope over", "slope against"), "n": r.n,
             "slope [95% CI]": _effect(r), "R^2": r.extra.get("r2"),
             f"linear (R^2 >= {LINEAR_R2:g})": r.extra.get("r2", 0) >= LINEAR_R2}
            for r in results if r.n > 0]
    return Table("measurements", "Measurements: properties true by construction (not claims)",
                 pd.DataFrame(rows, dtype=object),
                 "An E-step of K Langevin steps makes K teacher passes, so its cost grows linearly in K by "
                 "construction: the per-seed least-squares fit of sec/iter against K is shown as a measurement of "
                 "this suite's runs (timed inside the training loop, not by a dedicated benchmark), not counted as "
                 "a reproduced claim.")


SUMMARY_CLAIM = "emd_beats_di"  # the claim the page's answer is about
# the paired comparisons with the peers (mct.claims.PEER_CLAIMS) that the answer adds where a suite runs them:
# claim -> (A's name, B's name[, how they are compared]), A the side the claim says is better
PEER_SUMMARY = {"emd_beats_sid": ("EMD", "SiD"), "emd_beats_dmd2": ("EMD", "DMD2"),
                "sid_beats_di": ("SiD", "Diff-Instruct"),
                "emd_beats_di_wall": ("EMD", "Diff-Instruct", "at equal wall-clock"),
                "emd_beats_sid_wall": ("EMD", "SiD", "at equal wall-clock"),
                "emd_beats_dmd2_wall": ("EMD", "DMD2", "at equal wall-clock")}


def _metric_list(rs: Sequence[Any], kinds: dict[str, World]) -> str:
    from mct.claims import effect_text

    return "; ".join(f"{plain_metric_name(metric_name(r.metric, kinds[r.world]))} {effect_text(r)}" for r in rs)


def summary(results: Sequence[Any], kinds: dict[str, World], worlds: Sequence[str],
            settings: dict[str, dict[str, Any]]) -> list[str]:
    """The page's answer, one paragraph per world: does EMD beat Diff-Instruct on the world's primary metrics,
    after Holm correction over the page's family and before it, with each effect and its interval. Every word
    follows from ``results`` (holm already applied); ``settings``: experiment name -> its setting (for K)."""
    m = sum(r.p is not None for r in results)
    out = []
    for w in worlds:
        mine = [r for r in results if r.world == w and r.claim.key == SUMMARY_CLAIM and r.n > 0]
        at_equal_time = any(r.world == w and r.claim.key == "emd_beats_di_wall" and r.n > 0 for r in results)
        if not mine and not at_equal_time:
            out.append(f"{w}: no comparison of EMD with Diff-Instruct in this suite.")
        out += _answers(mine, kinds[w], w, m, settings, ("EMD", "Diff-Instruct"))
        for key, names in PEER_SUMMARY.items():
            out += _answers([r for r in results if r.world == w and r.claim.key == key and r.n > 0], kinds[w], w,
                            m, settings, names)
    return out


def _answers(mine: Sequence[Any], world_def: World, w: str, m: int, settings: dict[str, dict[str, Any]],
             names: tuple[str, ...]) -> list[str]:
    """One paragraph per compared pair of one paired claim: is A better than B on the world's primary metrics."""
    out = []
    for pair in dict.fromkeys(r.compared for r in mine):
        rs = [r for r in mine if r.compared == pair]
        a, b = pair
        label_a = f"EMD-{settings.get(a, {}).get('K')}" if names[0] == "EMD" else names[0]
        won = [plain_metric_name(metric_name(r.metric, world_def)) for r in rs if r.verdict_holm == "reproduced"]
        lost = [plain_metric_name(metric_name(r.metric, world_def)) for r in rs
                if r.verdict_holm == "contradicted"]
        raw_won = sum(r.verdict == "reproduced" for r in rs)
        raw_lost = sum(r.verdict == "contradicted" for r in rs)
        n = sorted({r.n for r in rs})
        answer = ("yes, better on " + ", ".join(won) if won and not lost else
                  "mixed: better on " + ", ".join(won) + ", worse on " + ", ".join(lost) if won else
                  "no, worse on " + ", ".join(lost) if lost else
                  "not shown: no primary metric differs beyond its interval")
        how = "".join(f" {q}" for q in names[2:])
        text = (f"{w}: does {label_a} ({a}) beat {names[1]} ({b}){how}? {answer.capitalize()}, after Holm "
                f"correction over the page's {m} tests ({len(rs)} primary metrics, {'/'.join(map(str, n))} "
                f"paired seeds). Without the correction: better on {raw_won} and worse on {raw_lost} of "
                f"{len(rs)}. {names[0]} - {names[1]}, mean [95% t-interval]: {_metric_list(rs, {w: world_def})}.")
        caveats = [f"{r.metric}: {r.caveat}" for r in rs if r.caveat]
        if caveats:
            text += " " + "; ".join(caveats) + "."
        out.append(text)
    return out


def discussion(results: Sequence[Any], table: str, world: str, entries: Sequence[Entry],
               world_def: World | None = None) -> list[str]:
    """One sentence per claim of ``table`` in ``world`` where our data disagree with the paper on some primary
    metric: a contradicted verdict, or a point estimate on the other side of 0, with every such metric's effect.
    What may explain it is said once per page (:func:`likely_causes`). The text follows from the results."""
    from mct.claims import effect_text

    out = []
    by_claim: dict[str, list[Any]] = {}
    for r in results:
        if r.world == world and r.claim.table == table and (r.verdict == "contradicted" or r.opposite):
            by_claim.setdefault(r.claim.text, []).append(r)
    for text, rs in by_claim.items():
        parts = []
        for r in rs:
            name = plain_metric_name(metric_name(r.metric, world_def))
            how = ("contradicted" if r.verdict == "contradicted" else
                   "one seed, no interval" if r.n < 2 else "the other way, interval includes 0")
            parts.append(f"{name} {effect_text(r)} ({how})")
        n = "/".join(str(k) for k in sorted({r.n for r in rs}))
        lead = text if text[1:2].isupper() else text[0].lower() + text[1:]  # 'EMD-K ...' keeps its case
        compared = " - ".join(rs[0].compared) if len(rs[0].compared) == 2 else "slope over log2 K"
        out.append(f"Paper: {lead}. Ours ({world}, {compared}, n={n} paired seeds) points the other way on: "
                   + "; ".join(parts) + ".")
    return out


def likely_causes(results: Sequence[Any], entries: Sequence[Entry], excluded: dict[str, str]) -> str:
    """One paragraph for the page: what may explain the claims where our data disagree with the paper, naming only
    causes that the page's own evidence (``excluded``: cause -> evidence, e.g. from the exact E-step benchmark) has
    not ruled out, and saying which it has. '' when no claim disagrees."""
    against = [r for r in results if r.verdict == "contradicted" or r.opposite]
    if not against:
        return ""
    settings = {e.name: e.setting for e in entries if e.kind == "experiment"}
    names = {x for r in against for x in r.compared if x in settings}
    iters = sorted({settings[x]["iterations"] for x in names})
    worlds = sorted({r.world for r in against})
    n_min = min(r.n for r in against)
    open_causes = []
    if iters and max(iters) < PAPER_ITERATIONS and "budget" not in excluded:
        open_causes.append(f"budget ({'/'.join(f'{i:,}' for i in iters)} iterations against the paper's "
                           f">= {PAPER_ITERATIONS:,})")
    open_causes.append(f"world ({', '.join(worlds)}: small embedded worlds, not the paper's ImageNet)")
    if "estep" not in excluded:
        open_causes.append("the short-run E-step (K steps of Langevin from the student's own samples)")
    if n_min < 5:
        open_causes.append(f"seeds (as few as n={n_min}: small effects stay inside the intervals)")
    text = ("Where our data point against the paper (the claims above), what may explain it and is not yet ruled out "
            "by this page's evidence: " + "; ".join(open_causes) + ".")
    if excluded:
        text += " Ruled out by the page's own runs: " + "; ".join(excluded.values()) + "."
    return text
