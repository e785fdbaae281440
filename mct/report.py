"""Report stage: the paper's tables and figures, rebuilt from the suite's metrics, logs and samples.

Inputs, per experiment E and teacher T of the suite (one without metrics is no table row; the page names it):
  <reports_in>/experiments/E.json, <reports_in>/teachers/T.json   (written by the evaluate stages)
  <runs>/experiments/E/distill/log.jsonl, <runs>/experiments/E/samples.npz
Outputs, under ``out_dir`` (reports/ by default):
  metrics.json          name -> flat record, see ``metrics_record`` (the file DVC declares as metrics)
  tables/*.csv, *.tex   one pair per table; the same tables as markdown in index.md and as HTML in index.html
  figures/*.png         stable names: <world>_k_sweep, <world>_noise_cancellation, <world>_samples,
                        <world>_speed, and for image worlds <world>_grid_<experiment> (where samples exist)
  index.md, index.html  the page a reviewer reads; index.html needs nothing outside the folder
Everything is deterministic (no timestamps, sorted keys, fixed PNG metadata), so unchanged inputs give
byte-identical files. The build happens in a temporary folder inside ``out_dir``; only a complete build is
moved into place, so a failure leaves the previous report as it was.

Modules: report_collect (inputs, metrics.json records), report_tables (tables), report_claims (claims table,
discussion), report_provenance, report_figures, report_convergence and report_estep (optional sections); this
module holds the page (``Page``: index.md and index.html) and ``build_report``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mct import paths
from mct.config import Params
from mct.report_claims import claims_table, discussion, judged_metrics, likely_causes, measurements_table, summary
from mct.report_collect import (
    EXPERIMENT_KEYS,
    NOT_RUN,
    TEACHER_KEYS,
    Entry,
    Sources,
    collect,
    metrics_record,
    read_log,
    seed_records,
)
from mct.report_cost import cost_record, slope_text, speed_text
from mct.report_cost import cost_table as benchmark_cost_table
from mct.report_figures import (
    fig_image_samples,
    fig_k_sweep,
    fig_noise,
    fig_points,
    fig_speed,
    image_samples,
    k_sweep_metrics,
)
from mct.report_provenance import provenance
from mct.report_tables import (
    ABLATIONS,
    DOWN,
    METRIC_DEFINITIONS,
    SPACE_LABELS,
    UP,
    Table,
    ablation_line,
    ablation_members,
    ablation_table,
    ablation_varied,
    cost_table,
    experiments_table,
    fmt,
    headline_table,
    main_table,
    metric_name,
    noise_floor,
    outside_every_ablation,
    paper_tables,
    plain_metric_name,
    ran,
    reference_setting,
    settings_table,
    text_to_image_table,
)
from mct.worlds.base import World


@dataclass
class Page:
    """Blocks rendered twice: markdown (index.md) and self-contained HTML (index.html)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, t: Table) -> None:
        self.blocks.append(("table", t))

    def figure(self, name: str, caption: str) -> None:
        self.blocks.append(("figure", name, caption))

    def link(self, label: str, href: str) -> None:
        """A line linking another page; ``href`` without its suffix: index.md links .md, index.html links .html."""
        self.blocks.append(("link", label, href))

    def lead(self, heading: str, paragraphs: Sequence[str], tables: Sequence[Table] = ()) -> None:
        """A section that opens the page (after its links), whatever was added before it: the answer comes first
        although it is computed last."""
        at = next((i for i, b in enumerate(self.blocks) if b[0] != "link"), len(self.blocks))
        self.blocks[at:at] = [("h", 2, heading), *(("p", t) for t in paragraphs), *(("table", t) for t in tables)]

    def sections(self) -> list[str]:
        return [b[2] for b in self.blocks if b[0] == "h" and b[1] == 2]

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        out += [f"- [{s}](#{slug(s)})" for s in self.sections()] + [""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "link":
                out += [f"[{b[1]}]({b[2]}.md)", ""]
            elif b[0] == "figure":
                out += [f"![{b[2]}](figures/{b[1]})", "", f"*{b[2]}*", ""]
            else:
                t: Table = b[1]
                csv, tex = f"tables/{t.name}.csv", f"tables/{t.name}.tex"
                out += [f"**{t.title}** ([csv]({csv}), [tex]({tex}))", "", markdown_table(t.display()), ""]
                if t.missing:
                    out += [t.missing, ""]
                if t.note:
                    out += [t.note, ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>", '<nav><ul>']
        body += [f'<li><a href="#{slug(s)}">{e(s)}</a></li>' for s in self.sections()] + ["</ul></nav>"]
        for b in self.blocks:
            if b[0] == "h":
                anchor = f' id="{slug(b[2])}"' if b[1] == 2 else ""
                body.append(f"<h{b[1]}{anchor}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "link":
                body.append(f'<p class="link"><a href="{e(b[2])}.html">{e(b[1])}</a></p>')
            elif b[0] == "figure":
                body.append(f'<figure><img src="figures/{e(b[1])}" alt="{e(b[2])}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
            else:
                t = b[1]
                body.append(f'<div class="table"><p class="caption">{e(t.title)}</p>')
                body.append(t.display().to_html(index=False, border=0, escape=True, classes="data"))
                if t.missing:
                    body.append(f'<p class="missing">{e(t.missing)}</p>')
                if t.note:
                    body.append(f'<p class="note">{e(t.note)}</p>')
                body.append(f'<p class="files">Files: <a href="tables/{e(t.name)}.csv">{e(t.name)}.csv</a> '
                            f'<a href="tables/{e(t.name)}.tex">{e(t.name)}.tex</a></p></div>')
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{e(self.title)}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


# 1340 px: a 1400 px window shows every table of a main page whole (tests/test_report.py); wider appendix tables scroll
CSS = """body { font-family: system-ui, sans-serif; max-width: 1340px; margin: 2em auto; padding: 0 1em;
  color: #222; line-height: 1.45; }
h1, h2, h3 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
div.table { overflow-x: auto; max-width: 100%; }
table.data { border-collapse: collapse; margin: .5em 0; font-size: 0.9em; }
table.data th, table.data td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td:first-child, table.data th:first-child { text-align: left; min-width: 14em; }
p.caption { font-weight: bold; margin-bottom: .2em; }
p.note, p.files, p.missing { font-size: 0.85em; color: #555; margin-top: .2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
"""


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading; index.html uses the same ids."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _describe(ref: dict[str, Any] | None) -> str:
    if ref is None:
        return "This world has no EMD experiment in the suite, so it has no ablation."
    cancel = "injected + initial" if ref["cancel_noise"] and ref["cancel_initial"] else \
        "injected only" if ref["cancel_noise"] else "none"
    return (f"Reference EMD setting (most common value of each key among this world's EMD experiments): "
            f"space {SPACE_LABELS[ref['space']]}, noise cancellation {cancel}, K={ref['K']}, "
            f"init {ref['init']}, gamma_eps={ref['gamma_eps']:g}, gamma_z={ref['gamma_z']:g}"
            + (f" ({ref['z_step']} z step)" if ref.get("z_step") else "")
            + f", teacher {ref['teacher']}, {ref['iterations']} iterations, batch {ref['batch_size']}. "
            + ("The E-step uses the world's exact analytic score (distill.estep_teacher: analytic), "
               "not the trained teacher network; the trained teacher is only the student's initialisation and "
               "the speed and quality reference. " if ref.get("estep_teacher") == "analytic" else
               "The E-step uses the trained teacher network's score. ")
            + "Each ablation table varies one factor and keeps every other resolved setting at this setting's "
              "(a row that differs in more is in no ablation table; the world's settings table lists them all).")


def _outside_line(entries: Sequence[Entry], ref: dict[str, Any] | None) -> str:
    """The EMD experiments that no ablation table shows, because they differ from the reference in more than one
    factor, each with the settings that differ; '' when there are none."""
    out = outside_every_ablation(entries, ref)
    if not out:
        return ""
    return ("In no ablation table (they differ from the reference in more than one factor): "
            + "; ".join(f"{name} ({', '.join(diff)})" for name, diff in sorted(out.items())) + ".")


# --- build --------------------------------------------------------------------------------------------------


def _write_table(t: Table, tables: Path) -> None:
    t.frame.to_csv(tables / f"{t.name}.csv", index=False, lineterminator="\n")
    tex = t.display().to_latex(index=False, escape=True, caption=t.title, label=f"tab:{t.name}")
    tex = tex.replace(UP, r"$\uparrow$").replace(DOWN, r"$\downarrow$")
    (tables / f"{t.name}.tex").write_text(tex, encoding="utf-8")


def _put(page: Page, t: Table) -> None:
    """A table with rows; one without is a line that says so (and has no CSV/TeX files)."""
    if len(t.frame):
        page.table(t)
    else:
        page.p(f"{t.title}: no row has results in this suite. {t.missing}".rstrip())


def _add_world(page: Page, params: Params, w: str, entries: Sequence[Entry], src: Sources, figures: Path,
               kinds: dict[str, World], results: Sequence[Any], carriers: dict[str, list[str]],
               bench_cost: dict[str, Any] | None, appendix: Page | None = None) -> dict[str, Any]:
    """The section of world ``w``: main table, ablations, cost, figures, all experiments (in ``appendix`` when the
    page has one). ``carriers``: per ablation, the worlds of the report whose table of it is printed;
    ``bench_cost``: the timing benchmark's record of ``w``, if it ran. Returns what the paper tables need of it
    (its entries, reference setting and K sweep)."""
    import seaborn as sns

    we = [e for e in entries if e.world == w]

    def discuss(table: str) -> None:
        for text in discussion(results, table, w, we, kinds[w]):
            page.p(text)

    world = kinds[w]
    ref = reference_setting(we)
    logs = {e.name: read_log(src.log(e.shown_run)) for e in we if e.kind == "experiment"}
    members = {ab.name: ablation_members(ab, ref, we) for ab in ABLATIONS}
    exps = [e for e in we if e.kind == "experiment"]
    floor = noise_floor(world, exps[0].setting["eval_samples"], src.feature_net(w)) if exps else None
    page.h(2, f"World {w} ({world.kind})")
    main = main_table(w, we, members["K"], kinds[w], floor)
    _put(page, main)
    if world.needs_feature_net and src.feature_net(w).exists():
        from mct.metrics.features import load_feature_net

        meta = load_feature_net(src.feature_net(w))[1]
        page.p(f"The features behind FD, precision and recall here: a classifier trained on the training split of {w} "
               f"(`mct features`), held-out accuracy {meta['held_out_accuracy']:.4f}"
               + (f" after {meta['epochs']} epochs" if "epochs" in meta else "") + ".")
    if floor is None and world.needs_feature_net:
        page.p("Noise floor (training against held-out split through the same metrics): not computed in this "
               f"build, which has no {world.kind} feature network ({src.feature_net(w)}).")
    discuss("main")
    page.h(3, "Ablations")
    page.p(_describe(ref))
    for ab in ABLATIONS:
        if ablation_varied(members[ab.name]):
            page.table(ablation_table(w, ab, members[ab.name], logs, kinds[w]))
        else:  # nothing varied: one line, no table and no files
            page.p(ablation_line(w, ab, members[ab.name], ref, carriers[ab.name]))
        discuss(ab.name)
    if _outside_line(we, ref):
        page.p(_outside_line(we, ref))
    if bench_cost is not None:  # timing from the dedicated benchmark, not from the suite's loaded runs
        page.table(benchmark_cost_table(w, bench_cost))
        page.p(speed_text(w, bench_cost))
    else:
        _put(page, cost_table(w, we, members["K"]))
    discuss("cost")
    page.h(3, "Figures")
    teachers = [(e.name, params.teacher(e.name)) for e in we if e.kind == "teacher"]
    # Contexts: the caller's matplotlib settings stay as they were.
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig_k_sweep(w, we, members["K"], figures / f"{w}_k_sweep.png", kinds[w])
        fig_noise(w, members["noise"], logs, figures / f"{w}_noise_cancellation.png")
        figure_kind, samples_caption, grids = world.figure_kind(), None, []
        if figure_kind == "points":
            samples_caption = fig_points(world, we, src, figures / f"{w}_samples.png", teachers=teachers)
        elif figure_kind == "grid":
            grids = fig_image_samples(w, we, src, figures)
            samples_caption = f"{w}: samples of each experiment, as image grids"
        if bench_cost is None:  # with the benchmark, the speed-up is its one side-by-side number
            fig_speed(w, we, figures / f"{w}_speed.png")
    swept = ", ".join(plain_metric_name(metric_name(k, kinds[w])) for k in k_sweep_metrics(kinds[w]))
    page.figure(f"{w}_k_sweep.png", f"{w}: {swept} against K (Diff-Instruct dashed, teacher dotted)")
    page.figure(f"{w}_noise_cancellation.png", f"{w}: generator gradient norm and loss over training, "
                                               "with and without noise cancellation (running mean)")
    if samples_caption is not None:
        page.figure(f"{w}_samples.png", samples_caption)
    else:
        page.p(f"{w}: no sample figure: its samples have shape {world.data_shape}, neither a vector (points) nor "
               "(C, H, W) images (grids); a world may set `sample_figure` to choose one.")
    for name in grids:
        page.figure(name, f"{w}: sample grid {name}")
    if bench_cost is None:
        page.figure(f"{w}_speed.png", f"{w}: speed-up of each one-step student over the teacher (ratio of "
                                      "samples per second timed by the evaluate stage, machine load not controlled; "
                                      "dashed: the teacher's NFE)")
    if appendix is not None:
        page.p(f"Every experiment of {w}, with its metrics and the settings in which they differ: the appendix.")
        appendix.h(2, f"All experiments: {w}")
        detail = appendix
    else:
        page.h(3, "All experiments")
        detail = page
    _put(detail, experiments_table(w, we, kinds[w]))
    _put(detail, settings_table(w, we))
    return {"entries": we, "reference": ref, "k_members": members["K"], "main": main}


def _build(params: Params, suite: str | None, src: Sources, out: Path,
           links: Sequence[tuple[str, str]] = ()) -> None:
    from mct.worlds.registry import make_world

    tables, figures = out / "tables", out / "figures"
    tables.mkdir()
    figures.mkdir()
    entries = collect(params, suite, src)
    names = Counter(e.name for e in entries)
    clash = sorted(n for n, c in names.items() if c > 1)
    if clash:
        raise ValueError(f"report: {clash[0]!r} names both a teacher and an experiment; metrics.json needs "
                         f"unique names")
    kinds = {w: make_world(w, params.worlds[w]) for w in params.worlds}  # what each world shows and how
    metrics = {e.name: metrics_record(e, kinds[e.world]) for e in entries}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    from mct.claims import CLAIMS, MEASUREMENTS, evaluate_claims, holm, not_judged

    suite_name = suite or params.suite
    page = Page(f"Mode-Covering Training report: suite {suite_name}")
    for label, href in links:
        page.link(label, href)
    absent = [e.name for e in entries if not ran(e)]
    if absent:
        page.p(f"{len(entries) - len(absent)} of {len(entries)} teachers and experiments of the suite have "
               f"metrics; no metrics, so in no table: {', '.join(absent)}. Machine-readable metrics: metrics.json.")
    else:
        page.p(f"All {len(entries)} teachers and experiments of the suite have metrics. "
               "Machine-readable metrics: metrics.json.")
    ran_exps = [e for e in entries if e.kind == "experiment" and e.record is not None]
    no_samples = sum(not src.samples(e.shown_run).exists() for e in ran_exps)
    no_logs = sum(not src.log(e.shown_run).exists() for e in ran_exps)
    if no_samples or no_logs:
        page.p(f"Inputs missing from this build: {no_samples} of {len(ran_exps)} evaluated experiments have no "
               f"samples file and {no_logs} no training log under {src.runs}/ (the runs' large outputs, kept in "
               "the DVC cache, not in git). Their sample panels, gradient-norm columns and training curves are "
               "empty; `dvc repro` (or `dvc pull` from a remote) restores them. Every number in the tables comes "
               "from the evaluator records and is unaffected.")
    stray = [e.name for e in entries if e.kind == "experiment" and e.runs
             and (src.summary(e.name).exists() or Path(src.experiment_metrics(e.name)).exists())]
    if stray:  # e.g. `mct distill --experiment E` without --run-seed: a run of no seed of the suite
        page.p(f"Outputs of a run without a seed (a hand run without --run-seed) exist for {', '.join(stray)} "
               f"(under {src.runs}/experiments/E/ or reports/experiments/E.json); this page reads only the "
               "suite's seeds (E/seed<k>) and leaves those out.")
    worlds = params.suite_worlds(suite)
    records = seed_records(entries, src)
    primary = {w: kinds[w].primary_metrics for w in worlds}
    judged = {w: judged_metrics(kinds[w]) for w in worlds}
    results = holm(evaluate_claims(CLAIMS, records, worlds, primary, judged))  # the page's claims: one family
    measured = evaluate_claims(MEASUREMENTS, records, worlds)
    page.h(2, "Claims")
    if any(r.n > 0 for r in results):
        page.table(claims_table(results, kinds, CLAIMS, not_judged(CLAIMS, worlds, primary, judged)))
        tested = {r.claim.key: r.claim for r in results if r.n > 0}
        page.p("Where the paper makes each claim, and how sure that reading is: "
               + "; ".join(f"{c.text}: {c.paper}" for c in tested.values()) + ".")
    else:
        page.p("No claim of mct.claims.CLAIMS is testable in this suite: it does not run the experiments they "
               "compare.")
    from mct.report_exact import excluded_causes

    causes = likely_causes(results, entries, excluded_causes(src.reports_in / "benchmarks" / "toy2d_exact", worlds))
    if causes:
        page.p(causes)
    cost_bench = src.reports_in / "benchmarks" / "estep_cost"  # read once: the pages and claims share it
    timed = {w: rec for w in worlds if (rec := cost_record(cost_bench, w)) is not None}
    measured = [r for r in measured if r.world not in timed]  # the dedicated benchmark replaces the suite's timing
    if any(r.n > 0 for r in measured):
        page.table(measurements_table(measured, kinds))
    for w, rec in timed.items():
        page.p("Measurement (not a claim): " + slope_text(w, rec))
    page.p("Metrics. " + METRIC_DEFINITIONS)
    page.h(2, "Provenance")
    paras, prov = provenance([e for e in entries if ran(e)], src, params)
    for text in paras:
        page.p(text)
    page.table(prov)
    from mct.report_convergence import add_convergence  # the 'faster convergence' claim's curves, if runs wrote them

    add_convergence(page, params, suite, src, figures, kinds, worlds)

    members = {}  # per world, per ablation: its levels; a world 'carries' an ablation whose table is printed
    for w in worlds:
        we = [e for e in entries if e.world == w]
        members[w] = {ab.name: ablation_members(ab, reference_setting(we), we) for ab in ABLATIONS}
    carriers = {ab.name: [w for w in worlds if ablation_varied(members[w][ab.name])] for ab in ABLATIONS}
    appendix = None  # the default suite's page has one: the long tables and the benchmarks in full
    if suite_name == params.suite:
        appendix = Page(f"Appendix to the report of suite {suite_name}: every experiment, the E-step benchmarks and "
                        "the paper's numbers in full")
        appendix.link("Back to the report", "index")
    per_world: dict[str, dict[str, Any]] = {}
    for w in worlds:
        per_world[w] = _add_world(page, params, w, entries, src, figures, kinds, results, carriers, timed.get(w),
                                  appendix)
    # the E-step benchmarks' sections, if they have run
    from mct.report_estep import add_estep_chain, add_estep_fidelity, add_toy2d_sweep
    from mct.report_exact import add_toy2d_exact
    from mct.report_precision import add_toy2d_precision

    default_page = next((href for label, href in links if label.endswith("(the default suite)")), None)
    if appendix is not None:  # the benchmarks are the same for every suite: on the default suite's page only
        first = len(appendix.blocks)
        bench = src.reports_in / "benchmarks"
        add_estep_fidelity(appendix, bench / "estep_fidelity", figures)
        add_toy2d_sweep(appendix, bench / "toy2d_sweep")
        add_toy2d_precision(appendix, bench / "toy2d_precision")
        add_toy2d_exact(appendix, bench / "toy2d_exact", figures)
        add_estep_chain(appendix, bench / "estep_chain", figures)
        summarise_appendix(page, appendix, first)
    elif default_page is not None:
        page.h(2, "E-step benchmarks")
        page.p("The E-step benchmarks (committed runs on both toy2d worlds) are on the default suite's page and its "
               "appendix, not repeated here:")
        page.link(f"Report of suite {params.suite} (the default suite)", default_page)
    scale = [*paper_tables(params, worlds, per_world), text_to_image_table(params, worlds, per_world)]
    page.h(2, "Paper-scale results")
    if appendix is not None and not any(_has_ours(t) for t in scale):  # nothing of ours to set beside the paper's
        appendix.h(2, "Paper-scale results")
        for t in scale:
            _put(appendix, t)
        page.p("This suite runs none of the paper's rows (the summary names them); the paper's numbers, other "
               "methods' and the text-to-image table are in the appendix's last section.")
        page.link("Appendix: the E-step benchmarks and the paper-scale results", "appendix")
    else:
        for t in scale:
            _put(page, t)
    settings = {e.name: e.setting for e in entries if e.kind == "experiment"}
    answer = summary(results, kinds, worlds, settings)
    # the EMD paper's own rows: what of them this page lacks, and why (the paper table's line, computed)
    answer.append(f"Paper scale: {scale[0].missing}" if scale[0].missing else
                  "Paper scale: every row of the EMD paper's table has ours beside it.")
    headlines = [headline_table(w, per_world[w]["main"], kinds[w]) for w in worlds if len(per_world[w]["main"].frame)]
    page.lead("Summary", answer, headlines)

    for b in page.blocks + (appendix.blocks if appendix else []):
        if b[0] == "table":
            _write_table(b[1], tables)
    (out / "index.md").write_text(page.markdown(), encoding="utf-8")
    (out / "index.html").write_text(page.html(), encoding="utf-8")
    if appendix is not None:  # the default suite's page always has one (a declared output of the report stage)
        if not any(b[0] == "h" for b in appendix.blocks):
            appendix.p("No E-step benchmark has committed outputs in this build (reports/benchmarks/).")
        (out / "appendix.md").write_text(appendix.markdown(), encoding="utf-8")
        (out / "appendix.html").write_text(appendix.html(), encoding="utf-8")


def _has_ours(table: Table) -> bool:
    """Whether a paper-scale table has a number of ours in any '(ours)' column."""
    cols = [c for c in table.frame.columns if "(ours)" in str(c)]
    return any(v not in (None, "-", NOT_RUN) and not (isinstance(v, float) and v != v)
               for c in cols for v in table.frame[c])


def summarise_appendix(page: Page, appendix: Page, first: int = 0) -> None:
    """The main page's short form of the appendix: one section with, per appendix section, its computed
    paragraphs (all but the first, which says how the benchmark ran) and its figures; the tables and the method
    paragraphs stay in the appendix, which the section links."""
    sections: list[list[tuple]] = []
    for b in appendix.blocks[first:]:  # the benchmarks' blocks, from ``first`` on
        if b[0] == "h" and b[1] == 2:
            sections.append([b])
        elif sections:
            sections[-1].append(b)
    if not sections:
        return
    page.h(2, "E-step benchmarks")
    page.p("Committed runs of the E-step benchmarks (benchmarks/, both toy2d worlds): the computed verdicts and "
           "figures; how each ran and its tables are in the appendix.")
    page.link("Appendix: the E-step benchmarks in full", "appendix")
    for sec in sections:
        page.h(3, sec[0][2])
        paragraphs = [b for b in sec if b[0] == "p"]
        for b in sec[1:]:
            if (b[0] == "p" and b is not paragraphs[0]) or b[0] == "figure":
                page.blocks.append(b)


def suite_links(params: Params, suite: str, out_dir: Path, root: Path) -> list[tuple[str, str]]:
    """(label, href without suffix) of every other suite's page that exists under ``root`` (laid out as
    paths.report_dir lays out reports/), relative to ``out_dir``: the pages of one folder link each other. A page
    built elsewhere (``--out``) links nothing, so where it is written does not change what it says."""
    here = Path(out_dir).resolve()
    if here != (Path(root) / paths.report_dir(suite, params.suite).relative_to(paths.REPORTS)).resolve():
        return []
    links = []
    for s in params.suites:
        d = (Path(root) / paths.report_dir(s, params.suite).relative_to(paths.REPORTS)).resolve()
        if s == suite or d.resolve() == here or not (d / "index.html").exists():
            continue
        label = f"Report of suite {s}" + (" (the default suite)" if s == params.suite else "")
        links.append((label, Path(os.path.relpath(d / "index", here)).as_posix()))
    return links


OWNED_DIRS = ("tables", "figures")
OWNED_FILES = ("metrics.json", "appendix.md", "appendix.html", "index.md", "index.html")  # index.html last


def build_report(params: Params, suite: str | None, out_dir: str | os.PathLike = paths.REPORTS, *,
                 reports_in: str | os.PathLike | None = None,
                 runs_dir: str | os.PathLike | None = None) -> Path:
    """Build the report of ``suite`` into ``out_dir``; returns the path of index.html.

    ``reports_in`` (default paths.REPORTS) holds the evaluator records experiments/*.json and
    teachers/*.json; ``runs_dir`` (default paths.RUNS) holds the logs and samples. Only tables/, figures/,
    metrics.json, index.md and index.html in ``out_dir`` are replaced, and only once the whole build has
    succeeded; anything else there (the evaluator records among it) is left alone.
    """
    out_dir = Path(out_dir)
    src = Sources(Path(paths.REPORTS if reports_in is None else reports_in),
                  Path(paths.RUNS if runs_dir is None else runs_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-build.", dir=out_dir))
    try:
        new = tmp / "new"
        new.mkdir()
        _build(params, suite, src, new, suite_links(params, suite or params.suite, out_dir, src.reports_in))
        old = tmp / "old"
        old.mkdir()
        # Publish: swap each owned folder by rename (the old copy goes to tmp and is deleted), then the files;
        # index.html last, so a reader never sees a page that points at missing files.
        for d in OWNED_DIRS:
            if (out_dir / d).exists():
                os.replace(out_dir / d, old / d)
            os.replace(new / d, out_dir / d)
        for f in OWNED_FILES:
            if (new / f).exists():
                os.replace(new / f, out_dir / f)
            elif (out_dir / f).exists():  # a page without an appendix leaves no stale one beside it
                os.replace(out_dir / f, old / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "index.html"


# build_report and the page; the rest re-exported from the modules that define them
__all__ = ["build_report", "Page", "markdown_table", "metrics_record", "reference_setting", "ablation_members",
           "ABLATIONS", "Entry", "Sources", "Table", "fmt", "image_samples", "seed_records", "noise_floor", "NOT_RUN",
           "EXPERIMENT_KEYS", "TEACHER_KEYS"]
