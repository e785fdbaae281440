"""The report stage on fixture metrics, logs and samples: tables (real rows only; what did not run is named in a
line), determinism, atomic writes, and the HTML page opened in a real headless Chromium."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mct import report
from mct.config import parse_params
from mct.report import NOT_RUN, build_report
from mct.worlds.toy2d import Toy2D
from tests.conftest import TINY_RAW

ARTIFACTS = Path("/tmp/mct-test-artifacts")
TOY_RUN = ("tiny_di", "tiny_emd", "tiny_emd_k8", "tiny_xz", "tiny_nocancel")  # + tiny_scratch, never run


def report_raw() -> dict:
    raw = copy.deepcopy(TINY_RAW)
    raw["worlds"]["digits"] = {"kind": "digits"}
    raw["worlds"]["imagenet64"] = {"kind": "imagenet", "resolution": 64}
    raw["teachers"]["digits_conv"] = {"world": "digits", "arch": "conv", "sampler_steps": 10}
    raw["teachers"]["edm64"] = {"world": "imagenet64", "kind": "fetch", "arch": "edm", "sampler_steps": 256}
    raw["templates"]["digits"] = {"world": "digits", "teacher": "digits_conv", "distill": {"K": 8}}
    raw["templates"]["in64"] = {"world": "imagenet64", "teacher": "edm64", "distill": {"K": 8}}
    raw["experiments"].update({
        "tiny_emd_k8": {"template": "toy2d", "distill": {"K": 8}},
        "tiny_xz": {"template": "toy2d", "distill": {"space": "x_z"}},
        "tiny_nocancel": {"template": "toy2d", "distill": {"cancel_noise": False}},
        "tiny_scratch": {"template": "toy2d", "student": {"init": "scratch"}},
        "dg_di": {"template": "digits", "distill": {"K": 1, "gamma_z": 0.0}},
        "dg_emd": {"template": "digits"},
        "in_di": {"template": "in64", "distill": {"K": 1, "gamma_z": 0.0}},
        "in_emd": {"template": "in64"},
    })
    raw["suites"]["report"] = [*TOY_RUN, "tiny_scratch", "dg_di", "dg_emd"]
    raw["suites"]["toy_only"] = ["tiny_di", "tiny_emd"]
    raw["suites"]["paper"] = ["in_di", "in_emd"]
    return raw


def exp_record(params, name: str, fid: float, sec: float, toy: bool) -> dict:
    exp = params.experiment(name)
    d = exp.distill
    rec = {"experiment": name, "world": exp.world, "method": exp.method_name, "K": d.K, "nfe": 1,
           "space": d.space, "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial,
           "init": exp.student.init, "gamma_eps": d.gamma_eps, "gamma_z": d.gamma_z,
           "iterations": d.iterations, "fid": fid,
           "precision": 0.5 + fid / 100, "recall": 0.9 - fid / 100, "samples_per_s": 5000.0 + fid,
           "teacher_samples_per_s": 150.0, "teacher_nfe": 35, "speedup": 33.3, "speedup_over_nfe": 0.95,
           "sec_per_iter": sec, "sec_per_iter_estep": sec / 2}
    if toy:
        rec.update(modes_covered=20 + int(fid) % 5, modes_total=25, mode_tv=fid / 50, mode_precision=0.8,
                   nll=1.5)
    return rec


def write_fixtures(root: Path, params) -> None:
    """Evaluator records, training logs and samples as the pipeline would leave them (tiny_scratch and the
    digits teacher deliberately missing)."""
    rep, runs = root / "reports", root / "runs"
    (rep / "experiments").mkdir(parents=True)
    (rep / "teachers").mkdir(parents=True)
    fids = {"tiny_di": 9.0, "tiny_emd": 3.0, "tiny_emd_k8": 2.0, "tiny_xz": 4.0, "tiny_nocancel": 6.0,
            "dg_di": 30.0, "dg_emd": 20.0, "in_di": 5.5, "in_emd": 2.5}
    for i, (name, fid) in enumerate(fids.items()):
        rec = exp_record(params, name, fid, sec=0.01 * (i + 1), toy=name.startswith("tiny"))
        (rep / "experiments" / f"{name}.json").write_text(json.dumps(rec))
    for t, world, fid in (("toy2d_mlp", "toy2d", 1.0), ("edm64", "imagenet64", 2.3)):
        rec = {"teacher": t, "world": world, "method": "teacher", "K": None, "nfe": 35, "fid": fid,
               "precision": 0.7, "recall": 0.7, "samples_per_s": 150.0}
        (rep / "teachers" / f"{t}.json").write_text(json.dumps(rec))
    rng = np.random.default_rng(0)
    for j, name in enumerate(("tiny_emd", "tiny_nocancel", "tiny_di")):
        d = runs / "experiments" / name / "distill"
        d.mkdir(parents=True)
        lines = [json.dumps({"iteration": it, "loss_score": 1.0, "loss_gen": float(rng.normal()),
                             "grad_norm_gen": (1 + j) * (1.0 + it / 10), "grad_norm_score": 1.0,
                             "eps_tilde_norm": 1.0, "z_shift": 0.1, "t_score": 0.01, "t_estep": 0.02,
                             "t_mstep": 0.01}) for it in range(30)]
        (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    from mct.teacher import denoiser_spec, save_denoiser
    from mct.worlds.registry import make_world

    world = make_world("toy2d", params.worlds["toy2d"])
    tcfg = params.teachers["toy2d_mlp"]  # an untrained network: the figure samples it, quality is irrelevant
    save_denoiser(_mk(runs / "teachers" / "toy2d_mlp") / "teacher.pt", world.build_network(tcfg.arch, tcfg.arch_kwargs),
                  denoiser_spec(world, tcfg.arch, tcfg.arch_kwargs))
    mix = world.mixture
    for name in ("tiny_di", "tiny_emd", "tiny_xz"):
        x = mix.sample(600, torch.Generator().manual_seed(1)).numpy()
        np.savez(_mk(runs / "experiments" / name) / "samples.npz", x=x)
    labels = np.eye(10, dtype=np.float32)[np.arange(40) % 10]
    np.savez(_mk(runs / "experiments" / "dg_emd") / "samples.npz",
             x=rng.uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32), labels=labels)
    for name in ("in_di", "in_emd"):
        x = rng.uniform(-1, 1, (6, 3, 8, 8)).astype(np.float32)
        np.savez(_mk(runs / "experiments" / name) / "samples.npz", x=x)


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report of suite 'report' in <root>/reports, beside the evaluator records it reads."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    params = parse_params(report_raw())
    write_fixtures(root, params)
    t0 = time.perf_counter()
    index = build_report(params, "report", root / "reports", reports_in=root / "reports",
                         runs_dir=root / "runs")
    seconds = time.perf_counter() - t0
    print(f"report build: {seconds:.2f} s")
    return root, params, index


def table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / "reports" / "tables" / f"{name}.csv", dtype=str, keep_default_na=False)


def after_table(md: str, title: str) -> str:
    """The paragraph of index.md directly under the table titled ``title``."""
    blocks = md.split("\n\n")
    i = next(k for k, b in enumerate(blocks) if b.startswith(f"**{title}** ([csv]("))
    assert blocks[i + 1].startswith("|")  # the table itself
    return blocks[i + 2]


def md_cells(md: str) -> list[str]:
    """Every cell of every table of index.md."""
    return [c.strip() for line in md.splitlines() if line.startswith("| ") for c in line.strip("|").split(" | ")]


def test_main_table_rows_and_columns(built):
    root, _, index = built
    assert index == root / "reports" / "index.html"
    main = table(root, "toy2d_main")
    # Honest names: a 2-D Frechet distance is not an FID; arrows give the direction of better.
    assert list(main.columns) == ["method", "experiment", "NFE", "FD (2-D) \u2193", "precision \u2191",
                                  "recall \u2191", "modes covered \u2191", "mode TV \u2193", "mode precision \u2191",
                                  "NLL (nats) \u2193", "samples/s \u2191"]
    floor = "Real data: training vs held-out split (noise floor)"
    assert list(main.method) == [floor, "Teacher (35 NFE)", "Diff-Instruct (K=1)", "EMD-4", "EMD-8"]
    assert list(main.experiment) == ["-", "toy2d_mlp", "tiny_di", "tiny_emd", "tiny_emd_k8"]
    fd = main["FD (2-D) \u2193"]
    assert list(fd[1:]) == ["1.0", "9.0", "3.0", "2.0"]
    # The noise floor: training points against the held-out reference through the same metrics.
    assert 0 < float(fd[0]) < 0.05 and float(main["precision \u2191"][0]) > 0.9
    assert main["modes covered \u2191"][0] == "25/25" and main["modes covered \u2191"][3] == "23/25"
    digits = table(root, "digits_main")
    assert "FD (digits classifier) \u2193" in digits.columns and "modes covered \u2191" not in digits.columns
    # The digits teacher has no metrics file: no row; the line under the table names it.
    assert list(digits.method) == ["Diff-Instruct (K=1)", "EMD-8"] and "digits_conv" not in set(digits.experiment)
    md = (root / "reports" / "index.md").read_text()
    assert after_table(md, "digits: one-step students against the teacher") == \
        "Not run in this suite: Teacher (digits_conv: no metrics)."
    assert after_table(md, "toy2d: one-step students against the teacher").startswith("EMD-K rows:")  # all ran


def test_ablation_tables_hold_one_factor_at_a_time(built):
    root, _, _ = built
    md = (root / "reports" / "index.md").read_text()
    # Rows are the levels that ran; the paper's other levels are one line under the table, from the same lists.
    space = table(root, "toy2d_space")
    assert list(space["sampling space"]) == ["(eps, z)", "(x, z)"]
    assert list(space.experiment) == ["tiny_emd", "tiny_xz"]
    assert list(space["FD (2-D) \u2193"]) == ["3.0", "4.0"]
    assert after_table(md, "toy2d: Sampling space of the E-step") == \
        "Not run in this suite: eps, x (the paper's other sampling spaces)."
    noise = table(root, "toy2d_noise")
    assert list(noise.cancellation) == ["none", "injected + initial"]
    assert list(noise.experiment) == ["tiny_nocancel", "tiny_emd"]
    assert after_table(md, "toy2d: Noise cancellation") == \
        "Not run in this suite: injected only (the paper's other cancellation settings)."
    # grad norm: mean of the last 10% (3 of 30) logged values; tiny_emd logs 1 + it/10, tiny_nocancel twice.
    assert float(noise["grad norm"][1]) == pytest.approx(1 + 28 / 10)
    assert float(noise["grad norm"][0]) == pytest.approx(2 * (1 + 28 / 10))
    k = table(root, "toy2d_K")
    assert list(k.K) == ["4", "8"]  # Diff-Instruct (gamma_z=0) is not K=1
    assert list(k.experiment) == ["tiny_emd", "tiny_emd_k8"]
    assert after_table(md, "toy2d: Number of Langevin steps K") == \
        "Not run in this suite: K = 1, 2, 16 (the paper's other K)."
    # Nothing varied (tiny_scratch is configured but has no metrics; one step size): a line, no table, no files.
    tables = root / "reports" / "tables"
    for name in ("toy2d_init", "toy2d_step_size", "digits_space", "digits_noise", "digits_K", "digits_init",
                 "digits_step_size"):
        assert not (tables / f"{name}.csv").exists() and not (tables / f"{name}.tex").exists(), name
        assert f"tables/{name}." not in md and f"tables/{name}." not in (root / "reports" / "index.html").read_text()
    paras = md.split("\n\n")
    assert "toy2d: no initialisation ablation in this suite (only the reference setting ran)." in paras
    assert "toy2d: no step-size ablation in this suite (only the reference setting ran)." in paras
    # digits runs one EMD setting; the line names the world of the report that carries the ablation.
    assert "digits: no sampling-space ablation in this suite (only the reference setting ran); toy2d carries it." \
        in paras
    assert "digits: no K ablation in this suite (only the reference setting ran); toy2d carries it." in paras
    assert "digits: no initialisation ablation in this suite (only the reference setting ran)." in paras
    cost = table(root, "toy2d_cost")
    assert list(cost.method) == ["Diff-Instruct", "EMD-4", "EMD-8"]
    # sec_per_iter fixtures: tiny_di 0.01, tiny_emd 0.02, tiny_emd_k8 0.03
    assert [float(v) for v in cost["x Diff-Instruct"]] == pytest.approx([1.0, 2.0, 3.0])
    assert after_table(md, "toy2d: training cost per iteration") == \
        "Not run in this suite: EMD-1, EMD-2, EMD-16 (the paper's other K)."
    exps = table(root, "toy2d_experiments")
    assert "tiny_scratch" not in set(exps.experiment) and "status" not in exps.columns
    assert after_table(md, "toy2d: every experiment of the suite with metrics") == \
        "Not run in this suite: tiny_scratch (in the suite, no metrics)."


def test_no_table_holds_a_not_run_cell(built):
    """A partial suite (a teacher and an experiment without metrics, most ablation levels absent): no cell of any
    table, in index.md or in any CSV/TeX file, says 'not run'; the page's first line names what has no metrics."""
    root, _, _ = built
    out = root / "reports"
    md = (out / "index.md").read_text()
    cells = md_cells(md)
    assert len(cells) > 200 and not [c for c in cells if NOT_RUN in c]
    for f in sorted((out / "tables").iterdir()):
        assert NOT_RUN not in f.read_text(), f.name
    blocks = md.split("\n\n")
    title, toc = blocks[:2]
    assert title.startswith("# ") and toc.startswith("- [Summary](#summary)\n- [Claims](#claims)")
    first = blocks[blocks.index("## Claims") - 2]  # the inventory line, then the missing-inputs line
    assert blocks.index("## Summary") < blocks.index("## Claims")
    assert first == ("8 of 10 teachers and experiments of the suite have metrics; no metrics, so in no table: "
                     "digits_conv, tiny_scratch. Machine-readable metrics: metrics.json.")
    prov = table(root, "provenance")
    assert "tiny_scratch" not in set(prov.run) and "digits_conv" not in set(prov.run)


def test_ablation_line_and_rows_from_entries():
    """The table/line decision on hand-made entries: a level with a configured run but no metrics is named with
    it; a run without log.jsonl shows 'no log'; a single level that is not the reference says which ran."""
    from mct import report_tables as rt

    base = {"method": "emd", "space": "eps_z", "cancel_noise": True, "cancel_initial": True, "K": 8,
            "init": "teacher", "gamma_eps": 0.3, "gamma_z": 0.01, "teacher": "t", "iterations": 10,
            "batch_size": 4, "estep_teacher": "network"}
    rec = {"fid": 1.0, "precision": 0.5, "recall": 0.5}
    es = [report.Entry("ref", "experiment", "w", dict(base), rec),
          report.Entry("none", "experiment", "w", {**base, "cancel_noise": False}, None)]
    ref = report.reference_setting(es)
    noise = next(ab for ab in rt.ABLATIONS if ab.name == "noise")
    members = report.ablation_members(noise, ref, es)
    assert not rt.ablation_varied(members)
    t = rt.ablation_table("w", noise, members, {})
    assert list(t.frame.experiment) == ["ref"] and list(t.frame["grad norm"]) == ["no log"]
    assert t.missing == ("Not run in this suite: none (none: no metrics), injected only (the paper's other "
                         "cancellation settings).")
    assert rt.ablation_line("w", noise, members, ref, ["w", "a", "b"]) == \
        "w: no noise-cancellation ablation in this suite (only the reference setting ran); a and b carry it."
    es[1].record, es[0].record = rec, None  # only the non-reference level has metrics
    assert rt.ablation_line("w", noise, report.ablation_members(noise, ref, es), ref, []) == \
        "w: no noise-cancellation ablation in this suite (only cancellation none ran)."


def test_z_step_ablation_keeps_schemes_apart():
    """A curvature-z-step run is a level of the z-step ablation only: the step-size ablation and the K rows (which
    hold z_step at the reference) must not take its gamma_z = 0.3 for a step size of the shrink scheme."""
    from mct import report_tables as rt

    base = {"method": "emd", "space": "eps_z", "cancel_noise": True, "cancel_initial": True, "K": 4,
            "init": "teacher", "gamma_eps": 0.3, "gamma_z": 0.02, "z_step": "shrink", "teacher": "t",
            "iterations": 10, "batch_size": 4, "estep_teacher": "network"}
    rec = {"fid": 1.0, "precision": 0.5, "recall": 0.5}
    es = [report.Entry("ref", "experiment", "w", dict(base), rec),
          report.Entry("curv", "experiment", "w", {**base, "z_step": "curvature", "gamma_z": 0.3}, rec)]
    ref = report.reference_setting(es)
    assert ref["z_step"] == "shrink"  # a tie goes to the first experiment
    by_name = {ab.name: ab for ab in rt.ABLATIONS}
    z_members = report.ablation_members(by_name["z_step"], ref, es)
    assert [(label, [e.name for e in g]) for label, g in z_members] == [
        ("curvature, gamma_z=0.3", ["curv"]), ("shrink, gamma_z=0.02", ["ref"])]
    assert rt.ablation_varied(z_members)
    steps = report.ablation_members(by_name["step_size"], ref, es)
    assert [e.name for _, g in steps for e in g] == ["ref"]
    k_rows = report.ablation_members(by_name["K"], ref, es)
    assert [e.name for _, g in k_rows for e in g] == ["ref"]

def test_paper_table(built, tmp_path):
    root, params, _ = built
    paper, other = table(root, "paper"), table(root, "paper_other")
    rep, ours_col = "FID \u2193 (reported)", "FID \u2193 (ours)"
    assert list(paper.columns) == ["dataset", "method", "NFE", rep, ours_col, "source"]
    # the paper does not state the K behind 2.20: the row carries the paper's own label, and ours the reference K's
    emd64 = paper[(paper.dataset == "ImageNet 64x64") & (paper.method == "EMD")].iloc[0]
    assert (emd64[rep], emd64[ours_col]) == ("2.20", "-")  # published precision; no ImageNet in 'report'
    md = (root / "reports" / "index.md").read_text()
    # The paper's numbers stay; ours not run is one line under the table, not a column of 'not run'.
    assert after_table(md, "Paper-scale results: the EMD paper's numbers beside ours") == (
        "Not run here: EMD on ImageNet 64x64; EMD-16 on ImageNet 128x128; EMD on COCO-2014 30k, SD v1.5 "
        "(paper-scale rows: they need a GPU cluster; suite paper plans them).")
    assert paper[paper.method == "EMD-16"].iloc[0][rep] == "6.0"
    # Only the EMD paper's own rows sit in its table; every other number names the paper it was read from.
    assert set(paper.source.str.startswith("Xie et al. 2024")) == {True}
    assert not other.source.str.startswith("Xie et al.").any() and (other.source.str.len() > 10).all()
    assert other[other.method == "DMD2"].iloc[0][ours_col] == "-"
    assert other[other.method == "DMD2"].iloc[0].source.startswith("Lu & Song 2024, sCM")
    assert other[other.method == "Diff-Instruct"].iloc[0].source == "Yin et al. 2024, DMD, arXiv 2311.18828, Table 1"
    # A suite with an ImageNet-64 world fills 'ours' for the methods it runs; ImageNet 128 stays not run.
    build_report(params, "paper", tmp_path, reports_in=root / "reports", runs_dir=root / "runs")
    assert after_table((tmp_path / "index.md").read_text(), "Paper-scale results: the EMD paper's numbers beside "
                       "ours").startswith("Not run here: EMD-16 on ImageNet 128x128; EMD on COCO-2014 30k, SD v1.5 (")
    ours = pd.concat([pd.read_csv(tmp_path / "tables" / f"{n}.csv", dtype=str, keep_default_na=False)
                      for n in ("paper", "paper_other")])
    by = dict(zip(zip(ours.dataset, ours.method, strict=True), ours[ours_col], strict=True))
    assert by[("ImageNet 64x64", "EMD")] == "2.5"  # the suite's reference K (8) stands in for the unstated one
    assert by[("ImageNet 64x64", "Diff-Instruct")] == "5.5"
    assert by[("ImageNet 64x64", "EDM teacher")] == "2.3"
    assert by[("ImageNet 128x128", "EMD-16")] == "-"
    in64 = pd.read_csv(tmp_path / "tables" / "imagenet64_main.csv", dtype=str, keep_default_na=False)
    assert "FID \u2193" in in64.columns  # only Inception features make an FID
    assert (tmp_path / "figures" / "imagenet64_grid_in_emd.png").exists()  # RGB grids go through image_grid


def test_metrics_json(built):
    root, params, _ = built
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert sorted(metrics) == sorted(params.suite_experiments("report") + params.suite_teachers("report"))
    assert metrics["tiny_emd"]["status"] == "ok" and metrics["tiny_emd"]["fid"] == 3.0
    missing = metrics["tiny_scratch"]
    assert missing["status"] == NOT_RUN and missing["fid"] is None and missing["init"] == "scratch"
    assert missing["K"] == 4 and missing["nfe"] == 1
    # Stable keys: every record of a kind has every documented key, whether or not it ran.
    toy_keys = set(report.EXPERIMENT_KEYS + Toy2D.exact_metric_keys) | {"status", "settings"}
    assert set(missing) == toy_keys and set(metrics["tiny_emd"]) == toy_keys
    assert set(metrics["dg_emd"]) == set(report.EXPERIMENT_KEYS) | {"status", "settings"}
    # every resolved setting of the row, the teacher's network included, and none that cannot change the numbers
    settings = metrics["tiny_emd"]["settings"]
    assert settings["distill.K"] == 4
    assert settings["distill.cancel_scheme"] == params.experiment("tiny_emd").distill.cancel_scheme
    assert {"distill.lr_g", "distill.ema_decay", "distill.mstep_sigma.kind", "distill.dsm_sigma.kind",
            "distill.score_steps", "distill.z_step", "distill.batch_size", "teacher_net.arch"} <= set(settings)
    assert not any(k.startswith(("eval.", "distill.log_")) for k in settings)
    assert metrics["digits_conv"] == {"teacher": "digits_conv", "world": "digits", "method": "teacher",
                                      "K": None, "nfe": 19, "fid": None, "precision": None, "recall": None,
                                      "samples_per_s": None, "status": NOT_RUN}


def test_page_links_tables_and_figures(built):
    root, _, _ = built
    out = root / "reports"
    md = (out / "index.md").read_text()
    for name in ("toy2d_k_sweep", "toy2d_noise_cancellation", "toy2d_samples", "toy2d_speed",
                 "digits_samples", "digits_grid_dg_emd"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"](figures/{name}.png)" in md
    assert not (out / "figures" / "digits_grid_dg_di.png").exists()  # dg_di has no samples file
    assert "| Diff-Instruct (K=1) | tiny_di | 1 | 9 |" in md
    tex = (out / "tables" / "toy2d_space.tex").read_text()
    assert "not run" not in tex and "Not run" not in tex  # the line under the table is the page's, not the file's
    assert "(eps, z)" in tex and r"\begin{tabular}" in tex
    assert (out / "experiments" / "tiny_emd.json").exists()  # the inputs beside the report are untouched
    assert not list(out.glob(".report-build.*"))


def test_two_builds_are_byte_identical(built, tmp_path):
    root, params, _ = built
    build_report(params, "report", tmp_path / "a", reports_in=root / "reports", runs_dir=root / "runs")
    build_report(params, "report", tmp_path / "b", reports_in=root / "reports", runs_dir=root / "runs")
    a, b = hashes(tmp_path / "a"), hashes(tmp_path / "b")
    assert len(a) > 30 and a == b
    built_files = {k: v for k, v in hashes(root / "reports").items()
                   if not k.startswith(("experiments", "teachers"))}
    assert built_files == a


def test_failed_build_keeps_previous_report_and_drops_stale_files(built, tmp_path, monkeypatch):
    root, params, _ = built
    out = tmp_path / "out"
    build_report(params, "report", out, reports_in=root / "reports", runs_dir=root / "runs")
    before = hashes(out)

    def boom(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report, "fig_speed", boom)
    with pytest.raises(RuntimeError, match="figure failed"):
        build_report(params, "toy_only", out, reports_in=root / "reports", runs_dir=root / "runs")
    assert hashes(out) == before
    assert not list(out.glob(".report-build.*"))
    monkeypatch.undo()
    build_report(params, "toy_only", out, reports_in=root / "reports", runs_dir=root / "runs")
    assert not (out / "figures" / "digits_samples.png").exists()  # a smaller suite leaves no stale figures
    assert not (out / "tables" / "digits_main.csv").exists()


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'),
                                               ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')).map(h => ({href: h,
    // an in-page link must name an element of the page
    target: h.startsWith('#') ? !!document.getElementById(h.slice(1)) : null}));
  // a table whose content is wider than its box would need a scroll bar to be read whole
  const tables = [...document.querySelectorAll('div.table')].map(d => ({
    title: (d.previousElementSibling || {}).textContent || '', w: d.querySelector('table').scrollWidth,
    box: d.clientWidth}));
  const pre = document.createElement('pre');
  pre.id = 'mct-check';
  pre.textContent = JSON.stringify({imgs, links, tables});
  document.body.appendChild(pre);
});
</script>"""


def test_html_in_headless_chromium(built, tmp_path):
    """Open the page in Chromium: every <img> must decode (naturalWidth > 0), every link must name a file, and in a
    1400 px window every table is shown whole (none wider than its box, so none needs a scroll bar).

    A copy of the page with a checking script and one deliberately broken image (the control) is loaded from
    the report folder, so relative paths resolve as for a reader; the control proves that the check can fail.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    out = built[0] / "reports"
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing to fetch
    check = out / "_check.html"
    control = '<img id="control" src="figures/no-such-file.png" alt="control">'
    check.write_text(page.replace("</body>", f"{control}\n{CHECK_SCRIPT}\n</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'ud'}", "--window-size=1400,3000"]
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60).stdout
    try:
        t0 = time.perf_counter()
        dom = subprocess.run([chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                             capture_output=True, text=True, timeout=120)
        t_dom = time.perf_counter() - t0
    finally:
        check.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="mct-check">') + len('<pre id="mct-check">')
    import html as htmllib

    result = json.loads(htmllib.unescape(dom.stdout[start:dom.stdout.index("</pre>", start)]))
    assert len(result["tables"]) >= 10
    wide = [(t["title"][:70], t["w"], t["box"]) for t in result["tables"] if t["w"] > t["box"] + 1]
    assert not wide, wide
    imgs = {i["src"]: i["ok"] for i in result["imgs"]}
    assert imgs.pop("figures/no-such-file.png") is False  # the control image fails to load
    assert len(imgs) >= 9 and all(imgs.values()), [s for s, ok in imgs.items() if not ok]
    files = [a["href"] for a in result["links"] if a["target"] is None]
    anchors = [a for a in result["links"] if a["target"] is not None]
    n_tables = (out / "index.md").read_text().count("** ([csv](tables/")
    assert n_tables >= 12 and len(files) == 2 * n_tables  # csv + tex per table
    assert all((out / h).is_file() for h in files), files
    want = ["#summary", "#claims", "#provenance", "#world-digits-digits", "#world-toy2d-toy2d", "#paper-scale-results"]
    assert [a["href"] for a in anchors] == want
    assert all(a["target"] for a in anchors)

    shot = tmp_path / "report.png"
    t0 = time.perf_counter()
    run = subprocess.run([chromium, *flags, f"--screenshot={shot}", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    t_shot = time.perf_counter() - t0
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import PIL.Image

    with PIL.Image.open(shot) as im:
        assert im.size == (1400, 3000)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # a rendered page with figures, not a blank sheet
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    print(f"{version.strip()}: dump-dom {t_dom:.1f} s, screenshot {t_shot:.1f} s")


def test_claims_table_and_generated_discussion(built, tmp_path, monkeypatch):
    """Claims on the fixture's experiments (one seed each): every verdict is 'inconclusive (n=1)', and a claim
    whose point estimate points against the paper gets a discussion paragraph beside its table."""
    from mct import claims

    root, params, _ = built
    monkeypatch.setattr(claims, "CLAIMS", (
        claims.Claim("agree", "EMD-K reaches a lower mode TV than Diff-Instruct", "mode_tv", "lower",
                     {"toy2d": ("tiny_emd", "tiny_di")}),  # 0.06 - 0.18 < 0: the paper's side
        claims.Claim("disagree", "More steps help", "mode_tv", "lower",
                     {"toy2d": ("tiny_emd", "tiny_emd_k8")}, table="K"),  # 0.06 - 0.04 > 0: the other side
        claims.Claim("absent", "Scratch", "mode_tv", "lower", {"toy2d": ("tiny_emd", "tiny_scratch")}),  # no metrics
        claims.Claim("blind", "EMD-K reaches a lower FD", "fid", "lower", {"toy2d": ("tiny_emd", "tiny_di")}),
    ))
    build_report(params, "report", tmp_path, reports_in=root / "reports", runs_dir=root / "runs")
    c = pd.read_csv(tmp_path / "tables" / "claims.csv", dtype=str, keep_default_na=False)
    assert list(c.claim) == ["EMD-K reaches a lower mode TV than Diff-Instruct", "More steps help"]
    assert list(c["n"]) == ["1", "1"] and [float(v) for v in c["mean [95% CI]"]] == pytest.approx([-0.12, 0.02])
    assert list(c.verdict) == ["inconclusive (n=1)"] * 2 and list(c["p"]) == ["", ""]
    assert list(c["Holm verdict"]) == ["inconclusive"] * 2
    md = (tmp_path / "index.md").read_text()
    assert md.index("## Claims") < md.index("## Provenance") < md.index("## World")
    assert md.count("Paper: more steps help.") == 1 and "Paper: eMD-K" not in md and "Paper: EMD-K" not in md
    k_table = md.index("**toy2d: Number of Langevin steps K** (")
    assert k_table < md.index("Paper: more steps help.") < md.index("toy2d: no initialisation ablation")
    assert "1,500" not in md and "iterations against the paper's >= 100,000" in md
    # The claims that no world of the suite could test are named in the note; tested ones are not.
    assert "Not tested here (this suite has no data for them): 'Scratch'." in md
    # FD (2-D) is no primary metric of toy2d: the claim on it is named, never judged
    assert "Not judged (the claim's metric is not a primary metric of the world): 'EMD-K reaches a lower FD' on " \
        "toy2d (fid)." in md
    assert "faster convergence" not in md


def test_provenance_is_from_git_not_the_clock(built):
    root, _, _ = built
    md = (root / "reports" / "index.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = subprocess.run(["git", "log", "-1", "--format=%cI"], capture_output=True, text=True).stdout.strip()
    if commit:
        assert f"Code: commit {commit} of {date}" in md
    assert "Machine that built this report:" in md and "torch " in md and "clean-fid " in md
    prov = table(root, "provenance")
    tiny = prov[prov.run == "tiny_emd"].iloc[0]
    assert (tiny.iterations, tiny.seeds, tiny["% of paper budget"]) == ("30", "0", "0.03")
    assert tiny["wall time from"] == "estimate: sec/iter x iterations"
    assert "The E-step uses the world's exact analytic score" in md  # the toy2d reference setting says so
    assert "NLL (nats) \u2193" in table(root, "toy2d_experiments").columns


def test_tex_arrows_and_scrolling_tables(built):
    root, _, _ = built
    tex = (root / "reports" / "tables" / "toy2d_main.tex").read_text()
    assert r"FD (2-D) $\downarrow$" in tex and "\u2193" not in tex
    page = (root / "reports" / "index.html").read_text()
    assert "div.table { overflow-x: auto" in page


def test_seed_records_read_each_seed_of_an_aggregated_experiment(tmp_path):
    """An experiment with several seeds gives the claims engine one row per seed (its own record), so claims are
    paired across seeds; a one-record experiment gives one row."""
    from mct import paths
    from mct.claims import Claim, evaluate_claim

    if not hasattr(paths, "run_name"):
        pytest.skip("seeds as an axis (mct.paths.run_name) not in this checkout")
    src = report.Sources(tmp_path / "reports", tmp_path / "runs")
    for exp, base in (("a", 1.0), ("b", 2.0)):
        for s in (0, 1, 2):
            p = src.experiment_metrics(paths.run_name(exp, s))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"fid": base + 0.1 * s + (0.05 * s * s if exp == "b" else 0.0)}))
    entries = [report.Entry(x, "experiment", "w", {"seed": 0}, {"fid": 0.0, "seeds": [0, 1, 2]}) for x in "ab"]
    entries.append(report.Entry("c", "experiment", "w", {"seed": 5}, {"fid": 7.0}))
    recs = report.seed_records(entries, src)
    assert sorted(zip(recs.experiment, recs.seed, strict=True)) == [("a", 0), ("a", 1), ("a", 2), ("b", 0),
                                                                     ("b", 1), ("b", 2), ("c", 5)]
    r = evaluate_claim(Claim("k", "a beats b", "fid", "lower", {"w": ("a", "b")}), "w", recs)
    assert r.n == 3 and r.mean == pytest.approx(-1.0 - 0.05 * 5 / 3) and r.verdict == "reproduced"


def test_digits_noise_floor_through_the_feature_network(tmp_path):
    """Real against real on digits: the training split against the held-out split, in the features of the
    world's feature network (an untrained one here: the plumbing, not the value, is under test)."""
    from mct.config import WorldConfig
    from mct.metrics.features import FeatureNet, save_feature_net
    from mct.worlds.registry import make_world

    world = make_world("digits", WorldConfig(kind="digits"))
    torch.manual_seed(0)
    save_feature_net(tmp_path / "f.pt", FeatureNet(), {"held_out_accuracy": 0.1})
    assert report.noise_floor(world, 2000, tmp_path / "missing.pt") is None  # no network, no floor
    floor = report.noise_floor(world, 2000, tmp_path / "f.pt")
    assert (floor["count"], floor["reference_count"]) == (1438, 359)  # sklearn's 1,797 digits, 20% held out
    assert 0 <= floor["fid"] < 1 and 0 < floor["precision"] <= 1 and 0 < floor["recall"] <= 1


def test_each_suite_has_its_own_folder_and_the_pages_link_each_other(built, tmp_path):
    """The default suite's page is reports/, any other suite's reports/suites/<suite>/ (both engines' outputs and
    `mct report`'s default): building one never touches the other, and each links the other once it exists."""
    from mct import paths
    from mct.stages import BY_NAME

    root, params, _ = built
    assert paths.report_dir("smoke", params.suite) == paths.REPORTS
    report_stage = BY_NAME["report"]
    assert report_stage.outputs(params, "toy_only")["index_html"] == "reports/suites/toy_only/index.html"
    assert report_stage.outputs(params, "smoke")["metrics"] == "reports/metrics.json"
    copy_root = tmp_path / "r"
    shutil.copytree(root, copy_root)
    reports = copy_root / "reports"
    build_report(params, "smoke", reports, reports_in=reports, runs_dir=copy_root / "runs")
    before = hashes(reports / "tables")
    other = reports / "suites" / "toy_only"
    build_report(params, "toy_only", other, reports_in=reports, runs_dir=copy_root / "runs")
    assert hashes(reports / "tables") == before  # the default page is untouched
    assert "[Report of suite smoke (the default suite)](../../index.md)" in (other / "index.md").read_text()
    build_report(params, "smoke", reports, reports_in=reports, runs_dir=copy_root / "runs")
    assert '<a href="suites/toy_only/index.html">Report of suite toy_only</a>' in (reports / "index.html").read_text()
    # built elsewhere (--out), a page links nothing
    elsewhere = tmp_path / "elsewhere"
    build_report(params, "toy_only", elsewhere, reports_in=reports, runs_dir=copy_root / "runs")
    assert "Report of suite" not in (elsewhere / "index.md").read_text()


def test_benchmarks_go_to_the_default_pages_appendix_with_a_short_form_on_the_page(built, tmp_path):
    """The E-step benchmarks' sections in full (method paragraph, tables) are in appendix.md of the default
    suite's page; the page itself has their computed verdicts and figures and links the appendix; another suite's
    page repeats none of it and links the default page."""
    from mct.report_exact import SECTION

    root, params, _ = built
    copy_root = tmp_path / "r"
    shutil.copytree(root, copy_root)
    reports = copy_root / "reports"
    shutil.copytree(Path(__file__).resolve().parents[1] / "reports" / "benchmarks" / "toy2d_exact",
                    reports / "benchmarks" / "toy2d_exact")
    build_report(params, "smoke", reports, reports_in=reports, runs_dir=copy_root / "runs")
    md, appendix = (reports / "index.md").read_text(), (reports / "appendix.md").read_text()
    assert f"## {SECTION}" in appendix and f"### {SECTION}" in md and "[Appendix: the E-step benchmarks in full]" \
        "(appendix.md)" in md
    assert "**Exact E-step, EMD-8 and Diff-Instruct per world and budget** (" in appendix
    assert "**Exact E-step, EMD-8 and Diff-Instruct per world and budget**" not in md
    assert "EMD with an exact E-step (distill.estep: exact" in appendix and "distill.estep: exact" not in md
    assert "No budget tried" in md  # the computed verdict is on the page
    assert "[Back to the report](index.md)" in appendix
    other = reports / "suites" / "toy_only"
    build_report(params, "toy_only", other, reports_in=reports, runs_dir=copy_root / "runs")
    assert not (other / "appendix.md").exists() and SECTION not in (other / "index.md").read_text()
    assert "E-step benchmarks" in (other / "index.md").read_text()
    # the summary opens with the headline table of the world's primary metrics
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "**toy2d: the world's primary metrics" in summary
    assert ("| method | NFE | modes covered \u2191 | mode TV \u2193 | mode precision \u2191 | NLL (nats) \u2193 |"
            in summary)


def test_cost_comes_from_the_timing_benchmark_when_it_has_run(built, tmp_path):
    """benchmarks/estep_cost.py times Diff-Instruct and EMD-K side by side (ratios over repeats, machine and load
    recorded); with its record the page's cost table, cost-against-K measurement and speed-up are the benchmark's,
    and the suite's own timings (taken under uncontrolled load) make no cost table, measurement or speed figure."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "estep_cost"
    r = subprocess.run([sys.executable, "benchmarks/estep_cost.py", "--world", "toy2d", "--repeats", "2",
                        "--iterations", "1", "--threads", "1", "--note", "test run", "--out", str(out)],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "toy2d.json").read_text())
    assert set(rec["sec_per_iter"]) == {"toy2d_di", "toy2d_emd_k2", "toy2d_emd_k4", "toy2d_emd_k8", "toy2d_emd_k16",
                                        "toy2d_sid", "toy2d_dmd2"}
    assert "toy2d_di" not in rec["ratio_to_diff_instruct"] and rec["ratio_to_diff_instruct"]["toy2d_emd_k8"]["n"] == 2
    assert rec["machine"]["note"] == "test run" and rec["machine"]["logical_cpus"] >= 1
    runs = pd.read_csv(out / "toy2d_runs.csv")
    assert len(runs[runs.kind == "train"]) == 2 * 7 and len(runs[runs.kind == "sample"]) == 2 * 2
    # forward calls per iteration, by construction of each method (toy2d template: 1 score step, K = 8 for EMD-8;
    # DMD2: 5 score steps): each score step samples the generator once and runs the score net once; EMD-K's chain
    # reads teacher and score K times and g K times, plus the M-step's g; DMD2 and SiD read each network once more
    passes = rec["network_passes_per_iter"]
    assert passes["toy2d_emd_k8"] == {"generator": 1 + 8 + 1, "score": 1 + 8, "teacher": 8}
    assert passes["toy2d_di"] == {"generator": 1 + 1 + 1, "score": 1 + 1, "teacher": 1}
    assert passes["toy2d_dmd2"] == {"generator": 5 + 1, "score": 5 + 1, "teacher": 1}
    assert passes["toy2d_sid"] == {"generator": 1 + 1, "score": 1 + 1, "teacher": 1}

    root, params, _ = built
    copy_root = tmp_path / "r"
    shutil.copytree(root, copy_root)
    reports = copy_root / "reports"
    shutil.copytree(out, reports / "benchmarks" / "estep_cost")
    build_report(params, "toy_only", tmp_path / "page", reports_in=reports, runs_dir=copy_root / "runs")
    md = (tmp_path / "page" / "index.md").read_text()
    assert "**toy2d: training cost per iteration (dedicated benchmark)** (" in md
    assert "Measurement (not a claim): toy2d: training cost per iteration grows by" in md
    assert "sampling, side by side in one process" in md and "toy2d_speed.png" not in md
    assert "Measurements: properties true by construction" not in md  # the suite-timed fit is replaced
    cost = pd.read_csv(tmp_path / "page" / "tables" / "toy2d_cost.csv", dtype=str)
    assert list(cost.experiment) == list(rec["sec_per_iter"]) and cost["x Diff-Instruct"][0] == "1.0"


def test_an_image_worlds_page_gives_its_feature_classifiers_held_out_accuracy(built, tmp_path):
    from mct import paths
    from mct.metrics.features import FeatureNet, save_feature_net

    root, params, _ = built
    copy_root = tmp_path / "r"
    shutil.copytree(root, copy_root)
    net = copy_root / "runs" / paths.feature_net("digits").relative_to(paths.RUNS)
    net.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_feature_net(net, FeatureNet(), {"held_out_accuracy": 0.9875, "epochs": 30})
    build_report(params, "report", tmp_path / "page", reports_in=copy_root / "reports", runs_dir=copy_root / "runs")
    md = (tmp_path / "page" / "index.md").read_text()
    assert "a classifier trained on the training split of digits (`mct features`), held-out accuracy 0.9875 after 30 " \
           "epochs." in md


def test_a_run_without_a_seed_beside_a_seeded_suite_is_named_not_read(built, tmp_path):
    """`mct distill --experiment E` without --run-seed writes runs/experiments/E/; a page of a suite that runs E's
    seeds says that run exists and that it is not read, instead of passing over it in silence."""
    root, _, _ = built
    raw = report_raw()
    raw["suites"]["toy_only"] = {"experiments": ["tiny_di", "tiny_emd"], "seeds": [0]}
    params = parse_params(raw)
    copy_root = tmp_path / "r"
    shutil.copytree(root, copy_root)
    for name in ("tiny_di", "tiny_emd"):  # the fixture's unseeded records and runs: none for this suite
        (copy_root / "reports" / "experiments" / f"{name}.json").unlink(missing_ok=True)
        shutil.rmtree(copy_root / "runs" / "experiments" / name / "distill", ignore_errors=True)
    build_report(params, "toy_only", tmp_path / "a", reports_in=copy_root / "reports", runs_dir=copy_root / "runs")
    assert "a run without a seed" not in (tmp_path / "a" / "index.md").read_text()
    (copy_root / "runs" / "experiments" / "tiny_emd" / "distill").mkdir(parents=True, exist_ok=True)
    (copy_root / "runs" / "experiments" / "tiny_emd" / "distill" / "summary.json").write_text("{}")
    build_report(params, "toy_only", tmp_path / "b", reports_in=copy_root / "reports", runs_dir=copy_root / "runs")
    md = (tmp_path / "b" / "index.md").read_text()
    assert "Outputs of a run without a seed (a hand run without --run-seed) exist for tiny_emd" in md
