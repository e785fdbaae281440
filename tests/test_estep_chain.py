"""benchmarks/estep_chain.py (the paper's Figure 1 on digits) on a tiny digits teacher and an untrained student,
and the report section that shows its outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mct.config import TeacherConfig, load_params
from mct.report import Page
from mct.report_estep import CHAIN_FIGURE, CHAIN_SECTION, add_estep_chain
from mct.student import init_student, load_generator
from mct.teacher import train_teacher
from mct.worlds.digits import load_digits_split, one_hot
from mct.worlds.registry import make_world

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("estep_chain", ROOT / "benchmarks" / "estep_chain.py")
estep_chain = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(estep_chain)

ARCH = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1}
PARAMS = {
    "suite": "tiny",
    "worlds": {"digits": {"kind": "digits", "held_out_fraction": 0.2, "seed": 0}},
    "teachers": {"digits_tiny": {"world": "digits", "arch": "conv", "arch_kwargs": ARCH, "iterations": 3,
                                 "batch_size": 16, "lr": 0.002, "sampler_steps": 2}},
    "templates": {"digits": {"world": "digits", "teacher": "digits_tiny", "student": {"sigma_init": 2.5},
                             "distill": {"iterations": 2, "batch_size": 8, "K": 4, "gamma_eps": 0.3,
                                         "gamma_z": 0.02, "z_step_ref": 1.0, "cancel_scheme": "linear",
                                         "mstep_sigma": {"kind": "lognormal", "p_mean": -0.8, "p_std": 1.2}}}},
    "experiments": {"digits_emd_k4": {"template": "digits"}},
    "suites": {"tiny": ["digits_emd_k4"]},
}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict[str, Path]:
    """params.yaml, a 3-step conv teacher saved by mct.teacher.train_teacher (what `mct teacher` runs) and the
    untrained student `mct init-student` writes (generator = teacher copy at sigma_init, score = teacher copy)."""
    root = tmp_path_factory.mktemp("estep_chain")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    params = load_params(params_file)
    world = make_world("digits", params.worlds["digits"])
    split = load_digits_split()
    teacher = root / "runs" / "teachers" / "digits_tiny" / "teacher.pt"
    teacher.parent.mkdir(parents=True)
    tcfg: TeacherConfig = params.teacher("digits_tiny")
    train_teacher(world, tcfg, split.train_x[:64].float(), one_hot(split.train_y[:64]), teacher, progress=False)
    student = root / "runs" / "experiments" / "digits_emd_k4" / "seed0" / "student_init.pt"
    student.parent.mkdir(parents=True)
    init_student(world, params.experiment("digits_emd_k4"), teacher, student)
    return {"root": root, "params": params_file, "teacher": teacher, "student": student}


def run(fx: dict[str, Path], out: Path, *extra: str, generator: Path | None = None) -> dict:
    return estep_chain.main(["--teacher", str(fx["teacher"]), "--generator", str(generator or fx["student"]),
                             "--params", str(fx["params"]), "--experiment", "digits_emd_k4", "--n", "8",
                             "--n-ref", "16", "--steps", "4", "--snapshots", "0,2,4", "--no-progress",
                             "--out", str(out), *extra])


def test_chain_writes_figure_json_and_starts_at_the_students_own_samples(fixture, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default classifier is runs/features/<world>/ of the working directory: none here
    rec = run(fixture, tmp_path / "a")
    for name in ("estep_chain.png", "estep_chain.json", "estep_chain.npz"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "a" / "estep_chain.json").read_text())
    assert [s["step"] for s in data["snapshots"]] == [0, 2, 4] == data["settings"]["snapshots"]
    s = data["settings"]
    assert s["space"] == "x_z" and s["n"] == 8 and s["steps"] == 4
    assert s["sigma"] == pytest.approx(np.exp(-0.8))  # default: the M-step lognormal's median
    assert s["score_source"].startswith("generator file")  # the student-init file holds the score network
    assert rec["snapshots"] == data["snapshots"]

    # snapshot 0 is the student's own sample: z_0 is the seed's first draw and g(z_0) what the generator makes of it
    arrays = np.load(tmp_path / "a" / "estep_chain.npz")
    z0 = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(arrays["z0"], z0.numpy()) and np.array_equal(arrays["z"][0], z0.numpy())
    world = make_world("digits", load_params(fixture["params"]).worlds["digits"])
    gen = load_generator(fixture["student"], world).eval()
    labels = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(arrays["generator"][0]), gen(z0, labels))
    first = data["snapshots"][0]
    assert first["z_move_norm"] == 0 and first["x_move_rms"] == 0

    # the chain moves z (and x), further with more steps
    moves = [snap["z_move_norm"] for snap in data["snapshots"]]
    assert 0 < moves[1] and 0 < moves[2]
    assert not np.array_equal(arrays["z"][2], arrays["z"][0])
    assert all(np.isfinite(snap["fd_pixels_denoised"]) and np.isfinite(snap["fd_pixels_generator"])
               for snap in data["snapshots"])
    assert all(snap["fd_features_denoised"] is None for snap in data["snapshots"])  # no classifier here
    assert data["floors"]["teacher_samples"]["pixels"] > 0

    # the same seed gives the same numbers; another seed other ones
    again = run(fixture, tmp_path / "b")
    assert again["snapshots"] == rec["snapshots"] and again["floors"] == rec["floors"]
    other = run(fixture, tmp_path / "c", "--seed", "1")
    assert other["snapshots"][2]["z_move_norm"] != rec["snapshots"][2]["z_move_norm"]

    # the report section shows the table and the figure
    figures = tmp_path / "figures"
    figures.mkdir()
    page = Page("t")
    add_estep_chain(page, tmp_path / "a", figures)
    md = page.markdown()
    assert CHAIN_SECTION in md and CHAIN_FIGURE in md and (figures / CHAIN_FIGURE).exists()
    table = next(b[1] for b in page.blocks if b[0] == "table")
    assert table.name == "estep_chain" and list(table.frame["step"]) == [0, 2, 4]
    assert "FD features, D(x_k)" not in table.frame.columns  # no classifier: no empty feature columns
    empty = Page("t")
    add_estep_chain(empty, tmp_path / "missing", figures)
    assert empty.blocks == []


def test_distill_output_reads_the_score_network_of_the_runs_work_state_else_fits_one(fixture, tmp_path):
    """generator.pt holds no score network: the newest resume state of the run's work folder (mct.paths layout)
    does; without one, a score network is fitted by DSM."""
    student = torch.load(fixture["student"], weights_only=True)
    runs = tmp_path / "runs"
    gen_file = runs / "experiments" / "digits_emd_k4" / "seed0" / "distill" / "generator.pt"
    gen_file.parent.mkdir(parents=True)
    torch.save({"format": "mct-generator-v1", "spec": student["spec"], "sigma_init": student["sigma_init"],
                "generator": student["generator"], "ema": student["generator"]}, gen_file)
    assert estep_chain.work_dir_of(gen_file) == runs / "work" / "digits_emd_k4" / "seed0"

    rec = run(fixture, tmp_path / "fit", "--score-fit-steps", "2", "--space", "eps_z", generator=gen_file)
    assert rec["settings"]["score_source"].startswith("fitted: 2 DSM steps")
    assert rec["settings"]["space"] == "eps_z" and rec["snapshots"][-1]["z_move_norm"] > 0

    work = runs / "work" / "digits_emd_k4" / "seed0"
    work.mkdir(parents=True)
    state = {"format": "mct-resume-v1", "step": 2, "score": student["score"],
             "generator": {f"denoiser.{k}": v for k, v in student["generator"].items()}}
    torch.save(state, work / "state-000000002.pt")
    # with the digits classifier (here an untrained one) the distances are also measured in its features
    from mct.metrics.features import FeatureNet, save_feature_net

    torch.manual_seed(0)
    save_feature_net(tmp_path / "feature_net.pt", FeatureNet(width=8, feature_dim=16), {})
    rec = run(fixture, tmp_path / "state", "--features", str(tmp_path / "feature_net.pt"), generator=gen_file)
    assert "state-000000002.pt" in rec["settings"]["score_source"]
    assert rec["settings"]["score_matches_generator"] is True
    assert all(np.isfinite(s["fd_features_denoised"]) and np.isfinite(s["fd_features_generator"])
               for s in rec["snapshots"])
    page = Page("t")
    add_estep_chain(page, tmp_path / "state", tmp_path)
    assert "FD features, g(z_k)" in next(b[1] for b in page.blocks if b[0] == "table").frame.columns


def test_missing_inputs_fail_before_any_work(fixture, tmp_path):
    with pytest.raises(SystemExit, match="missing input.*--generator"):
        run(fixture, tmp_path / "x", generator=tmp_path / "nope.pt")
    with pytest.raises(SystemExit, match="outside"):
        run(fixture, tmp_path / "x", "--snapshots", "0,9")
    assert not (tmp_path / "x").exists()
