"""Tracking (mct.tracking): accelerate's trackers with DVCLive by default, convergence points during training.

The claims these tests stand for: evaluating during training leaves the training bitwise unchanged (its samples
come from their own torch.Generator); a resumed run's trackers and convergence file hold each step once, as the
uninterrupted run's; DVCLive writes inside the distill output and never touches git or DVC (a plain git repository
around the run stays without .dvc/, where dvclive's own Live would `dvc init` it); a tracker asked for and absent
stops the run with an install hint instead of accelerate's silent skip.
"""

from __future__ import annotations

import copy
import json
import subprocess

import numpy as np
import pytest
import torch

from mct.config import ConfigError, parse_params, set_dotted
from mct.convergence import convergence_summary
from mct.io import load_torch
from mct.student import init_student
from mct.teacher import train_teacher
from mct.tracking import TrackerUnavailableError, require_tracker, world_metric
from mct.train import distill
from mct.worlds.registry import make_world
from tests.conftest import TINY_RAW


@pytest.fixture(scope="module")
def quick_teacher(tmp_path_factory):
    """A toy2d MLP teacher after 100 steps: a poor teacher is enough here, the tests compare runs with each other."""
    raw = copy.deepcopy(TINY_RAW)
    raw["teachers"]["toy2d_mlp"]["iterations"] = 100
    params = parse_params(raw)
    world = make_world("toy2d", params.worlds["toy2d"])
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    x = world.mixture.sample(5_000, torch.Generator().manual_seed(0))
    train_teacher(world, params.teachers["toy2d_mlp"], x, None, out, progress=False)
    return out


def _run(raw, teacher, root, tag, **overrides):
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(raw, f"experiments.tiny_emd.distill.{key}", value)
    exp = parse_params(raw).experiment("tiny_emd")
    world = make_world("toy2d", parse_params(raw).worlds["toy2d"])
    student = root / "student.pt"
    if not student.exists():
        init_student(world, exp, teacher, student)
    return world, exp, student, root / tag, root / f"work_{tag}"


def _tsv_steps(path):
    lines = path.read_text().splitlines()
    cols = lines[0].split("\t")
    return [int(row.split("\t")[cols.index("step")]) for row in lines[1:]]


def test_eval_and_trackers_leave_training_bitwise_unchanged_and_resume_replays(quick_teacher, tmp_path,
                                                                                 monkeypatch):
    """Three runs of 30 iterations: (a) no evaluation, no tracker; (b) a convergence point every 5 iterations with
    DVCLive; (c) as (b), killed at 20 and resumed. All end with bitwise the same generator and EMA; (b) and (c)
    write the same convergence points (up to timings) and DVCLive steps, each once. The runs happen inside a fresh
    git repository without DVC, which must stay without .dvc/ and dvc.yaml."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    world, exp, student, out_a, work_a = _run(TINY_RAW, quick_teacher, tmp_path, "a", log_with="none")
    distill(world, exp, quick_teacher, student, out_a, work_a, progress=False)
    world, exp, _, out_b, work_b = _run(TINY_RAW, quick_teacher, tmp_path, "b", eval_every=5, eval_samples=500,
                                        log_every=3)
    distill(world, exp, quick_teacher, student, out_b, work_b, progress=False)
    _, _, _, out_c, work_c = _run(TINY_RAW, quick_teacher, tmp_path, "c", eval_every=5, eval_samples=500,
                                  log_every=3)
    distill(world, exp, quick_teacher, student, out_c, work_c, progress=False, stop_after=20)
    distill(world, exp, quick_teacher, student, out_c, work_c, progress=False)

    a = load_torch(out_a / "generator.pt")
    for out in (out_b, out_c):
        other = load_torch(out / "generator.pt")
        for key in ("ema", "generator"):
            assert all(torch.equal(a[key][k], other[key][k]) for k in a[key]), (out.name, key)
    assert not (out_a / "convergence.jsonl").exists() and not (out_a / "dvclive").exists()

    pts_b = [json.loads(line) for line in (out_b / "convergence.jsonl").read_text().splitlines()]
    pts_c = [json.loads(line) for line in (out_c / "convergence.jsonl").read_text().splitlines()]
    assert [p["iteration"] for p in pts_b] == [p["iteration"] for p in pts_c] == [5, 10, 15, 20, 25, 30]
    timing = {"train_seconds", "eval_seconds"}
    assert [{k: v for k, v in p.items() if k not in timing} for p in pts_b] == \
           [{k: v for k, v in p.items() if k not in timing} for p in pts_c]
    seconds = [p["train_seconds"] for p in pts_c]
    assert all(0 < s1 < s2 for s1, s2 in zip(seconds, seconds[1:], strict=False))
    assert {"modes_covered", "mode_tv", "mode_precision", "fd_2d"} <= set(pts_b[0])

    for out in (out_b, out_c):  # DVCLive's files inside the distill output, each step once
        metrics = out / "dvclive" / "plots" / "metrics"
        assert _tsv_steps(metrics / "eval" / "mode_tv.tsv") == [5, 10, 15, 20, 25, 30]
        assert _tsv_steps(metrics / "eval" / "train_seconds.tsv") == [5, 10, 15, 20, 25, 30]
        assert _tsv_steps(metrics / "train" / "loss_gen.tsv") == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
        assert json.loads((out / "dvclive" / "metrics.json").read_text())["eval"]["mode_tv"] == pts_b[-1]["mode_tv"]
    assert not (tmp_path / ".dvc").exists()
    assert not list(tmp_path.rglob("dvc.yaml"))


def test_a_missing_tracker_stops_with_an_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackerUnavailableError, match=r"pip install wandb"):
        require_tracker("wandb")
    require_tracker("dvclive")  # a default dependency
    require_tracker("none")


def test_log_with_is_validated(tiny_raw):
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.log_with", "mlflow")
    with pytest.raises(ConfigError, match=r"experiments\.tiny_emd\.distill\.log_with"):
        parse_params(tiny_raw)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.log_with", "tensorboard")
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.eval_every", -1)
    with pytest.raises(ConfigError, match=r"experiments\.tiny_emd\.distill\.eval_every"):
        parse_params(tiny_raw)


def test_convergence_summary_is_the_trapezoid_time_average():
    """Points (10, 0.5), (20, 0.3), (40, 0.1): area 10*0.4 + 20*0.2 = 8 over a span of 30."""
    pts = [{"iteration": 40, "mode_tv": 0.1}, {"iteration": 10, "mode_tv": 0.5}, {"iteration": 20, "mode_tv": 0.3}]
    s = convergence_summary(pts, "mode_tv")
    assert s["convergence_auc"] == pytest.approx(8 / 30) and s["convergence_points"] == 3
    assert convergence_summary(pts[:1], "mode_tv") == {} and convergence_summary(pts, None) == {}


def test_world_metrics_tell_the_data_from_noise(tiny_raw):
    """toy2d: samples of the true mixture cover every mode at TV and FD near 0; Gaussian noise does not. digits:
    the training split is closer to the held-out split in pixel FD than uniform noise is."""
    params = parse_params(tiny_raw)
    toy = make_world("toy2d", params.worlds["toy2d"])
    metric = world_metric(toy)
    good = metric(toy.mixture.sample(4000, torch.Generator().manual_seed(1)))
    bad = metric(torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)))
    assert good["modes_covered"] == 25 and good["mode_tv"] < 0.05 and good["fd_2d"] < 0.01
    assert bad["mode_precision"] < 0.2 and bad["fd_2d"] > 10 * good["fd_2d"]

    from mct.config import WorldConfig
    from mct.worlds.digits import load_digits_split

    digits = make_world("digits", WorldConfig(kind="digits"))
    fd = world_metric(digits)
    train = torch.as_tensor(load_digits_split(0.2, 0).train_x[:500]).float()
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fd(train)["fd_pixels"] < 0.2 * fd(noise)["fd_pixels"]
    assert np.isfinite(fd(train)["fd_pixels"])


def test_report_section_draws_both_methods_with_seed_bands(tiny_raw, tmp_path, monkeypatch):
    """Three seeds each of a fast and a slow synthetic run: the section draws them, its table's convergence_auc is
    the mean of the per-seed time-averages, and the claims engine, fed the same per-seed numbers, finds the fast
    run ahead (all seeds agree, so the interval excludes 0)."""
    import pandas as pd

    from mct import claims
    from mct.claims import Claim, evaluate_claims
    from mct.paths import distill_dir, run_name
    from mct.report import Page, Sources
    from mct.report_convergence import add_convergence

    for name in ("tiny_di", "tiny_emd"):
        tiny_raw["experiments"][name]["seeds"] = [0, 1, 2]
    params = parse_params(tiny_raw)
    toy2d_world = make_world("toy2d", params.worlds["toy2d"])
    runs = tmp_path / "runs"
    auc = {}
    for name, rate in (("tiny_di", 0.01), ("tiny_emd", 0.05)):
        for s in (0, 1, 2):
            pts = [{"iteration": it, "train_seconds": 0.01 * it * (1 + s / 10), "eval_seconds": 0.01,
                    "mode_tv": 0.5 * np.exp(-rate * it) + 0.01 * s, "fd_2d": 1.0 / it, "modes_covered": 20.0}
                   for it in (10, 20, 30, 40)]
            d = runs / distill_dir(run_name(name, s)).relative_to("runs")
            d.mkdir(parents=True)
            (d / "convergence.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pts))
            auc[name, s] = convergence_summary(pts, "mode_tv")["convergence_auc"]
    claim = Claim("emd_converge", "faster", "convergence_auc", "lower", {"toy2d": ("tiny_emd", "tiny_di")})
    monkeypatch.setattr(claims, "CLAIMS", (claim,))
    page, figures = Page("t"), tmp_path / "figures"
    figures.mkdir()
    add_convergence(page, params, "smoke", Sources(tmp_path / "reports", runs), figures, {"toy2d": toy2d_world},
                    ["toy2d"])
    assert page.sections() == ["Convergence"] and (figures / "toy2d_convergence.png").stat().st_size > 10_000
    table = next(b[1] for b in page.blocks if b[0] == "table")
    assert table.name == "toy2d_convergence"  # its CSV/TeX stem: one comparison in the world keeps the world's name
    table = table.frame.set_index("experiment")
    assert table.loc["tiny_emd", "seeds"] == 3
    for name in ("tiny_di", "tiny_emd"):
        expect = sum(auc[name, s] for s in (0, 1, 2)) / 3
        assert table.loc[name, "convergence_auc (mean over seeds)"] == pytest.approx(expect)
    records = pd.DataFrame([{"experiment": n, "seed": s, "convergence_auc": v} for (n, s), v in auc.items()])
    (result,) = evaluate_claims((claim,), records)
    assert result.n == 3 and result.verdict == "reproduced" and result.mean < 0
