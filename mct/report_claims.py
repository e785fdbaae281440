"""The report's view of the paper's claims (mct.claims): the claims table and, per table of a world, the
discussion paragraphs where our data disagree with the paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mct.report_collect import Entry
from mct.report_tables import PAPER_ITERATIONS, Table, metric_name, plain_metric_name
from mct.worlds.base import World


def claims_table(results: Sequence[Any], kinds: dict[str, World], claims: Sequence[Any] | None = None) -> Table:
    """One row per (claim, world) result; the note names the claims of ``claims`` (default mct.claims.CLAIMS)
    that no world of this suite could test (no result with at least one seed)."""
    from mct.claims import CLAIMS, effect_unit

    rows = []
    for r in (r for r in results if r.n > 0):  # a pair without a shared seed with the metric has no data
        c = r.claim
        side = "< 0" if c.better == "lower" else "> 0"
        rows.append({"claim": c.text, "world": r.world, "verdict": r.label, "n (seeds)": r.n, "mean": r.mean,
                     "95% CI low": r.lo, "95% CI high": r.hi, "paper predicts": side,
                     "effect": effect_unit(r) + (f" (linear fit R^2 {r.extra['r2']:.3f})" if "r2" in r.extra else ""),
                     "metric": plain_metric_name(metric_name(c.metric, kinds[r.world])),
                     "compared": " vs ".join(r.compared) if c.kind == "paired" else ", ".join(r.compared)})
    from mct.claims import LINEAR_R2

    note = ("Paired across the seeds that every compared experiment shares: per seed the difference A - B "
            "(or the least-squares slope against log2 K; for cost, against K), then the mean and a two-sided 95% "
            "Student-t interval over seeds. Verdict, computed: reproduced when the interval excludes 0 on the "
            "paper's side, contradicted when it excludes 0 on the other side, inconclusive otherwise and always "
            f"with fewer than 2 seeds (no interval). A linear-cost claim also needs mean R^2 >= {LINEAR_R2:g}.")
    tested = {r.claim.key for r in results if r.n > 0}
    untested = [c.text for c in (CLAIMS if claims is None else claims) if c.key not in tested]
    if untested:
        note += (" Not tested here (this suite has no data for them): "
                 + "; ".join(f"'{t}'" for t in untested) + ".")
    return Table("claims", "The paper's claims, tested on this suite's runs", pd.DataFrame(rows, dtype=object),
                 note)


def discussion(results: Sequence[Any], table: str, world: str, entries: Sequence[Entry],
               world_def: World | None = None) -> list[str]:
    """One sentence group per claim of ``table`` in ``world`` where our data disagree with the paper: a
    contradicted verdict, or a point estimate on the other side of 0. The text follows from the results."""
    out = []
    settings = {e.name: e.setting for e in entries if e.kind == "experiment"}
    for r in results:
        if r.world != world or r.claim.table != table or not (r.verdict == "contradicted" or r.opposite):
            continue
        from mct.claims import effect_text, effect_unit

        c = r.claim
        if r.verdict == "contradicted":
            ours = (f"our runs contradict it: {effect_unit(r)} = {effect_text(r)} (mean [95% t-interval], "
                    f"n={r.n} seeds), on the other side of 0")
        elif r.n < 2:
            ours = (f"our one run points the other way ({effect_unit(r)} = {effect_text(r)}), but one seed "
                    f"gives no interval, so the difference may be run-to-run spread (verdict {r.label})")
        else:
            ours = (f"our mean points the other way ({effect_unit(r)} = {effect_text(r)}, n={r.n}), but the "
                    f"95% interval includes 0 (verdict {r.label})")
        iters = sorted({settings[x]["iterations"] for x in r.compared if x in settings})
        causes = []
        if iters and max(iters) < PAPER_ITERATIONS:
            causes.append(f"budget: {'/'.join(f'{i:,}' for i in iters)} iterations against the paper's "
                          f">= {PAPER_ITERATIONS:,}")
        kinds = {settings[x].get("estep_teacher") for x in r.compared if x in settings}
        causes.append(f"world: {world} is a small embedded world, not the paper's ImageNet" +
                      (" (its E-step uses the exact analytic score)" if "analytic" in kinds else ""))
        if r.n < 3:
            causes.append(f"seeds: n={r.n}")
        lead = c.text if c.text[1:2].isupper() else c.text[0].lower() + c.text[1:]  # 'EMD-K ...' keeps its case
        out.append(f"Paper: {lead}. Ours ({world}, "
                   f"{plain_metric_name(metric_name(c.metric, world_def))}): {ours}. "
                   f"Likely causes to check: {'; '.join(causes)}.")
    return out
