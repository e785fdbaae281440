"""Adding a world is one class plus params, and no edit of mct: a 3-D Gaussian world, defined in a package outside
mct (tests/plugins/g3world), runs the pipeline.

The class subclasses mct.worlds.base.World; nothing in mct learns about it (the test checks that its names appear
in no mct source file). A params file names it in one of three ways: ``kind: "g3world:Gauss3D"`` (importable from
PYTHONPATH), ``kind: gauss3d`` through an installed package's entry point (group ``mct.worlds``), or ``kind:
gauss3d`` after ``register("gauss3d")`` in code that runs first. Every job that the stage table plans for the suite
(prepare, teacher, ref-stats, teacher-eval, init-student, distill, sample, evaluate) runs through the `mct` command
line, as either engine would run it, and Snakemake runs the whole DAG through the report.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mct import paths, stages
from mct.cli import main as mct_main
from mct.config import ConfigError, load_params
from mct.worlds.registry import WORLDS, register, unregister

PLUGINS = Path(__file__).resolve().parent / "plugins"  # folders outside mct that hold worlds of their own
sys.path.insert(0, str(PLUGINS))
from g3world import Gauss3D  # noqa: E402  (importable once its folder is on the path, as a user's module)

KIND = "gauss3d"
SPEC = "g3world:Gauss3D"  # the kind that names the class where it is defined


PARAMS = {
    "suite": "g3",
    "worlds": {"g3": {"kind": KIND, "std": 0.5, "seed": 3}},
    "teachers": {"g3_mlp": {"world": "g3", "arch": "mlp", "arch_kwargs": {"hidden": 32, "depth": 2},
                            "iterations": 60, "batch_size": 128, "sampler_steps": 4}},
    "templates": {"g3": {"world": "g3", "teacher": "g3_mlp", "student": {"sigma_init": 2.0},
                         "distill": {"iterations": 6, "batch_size": 32, "K": 2, "checkpoint_every": 3,
                                     "estep_teacher": "analytic", "log_with": "none", "eval_every": 3,
                                     "eval_samples": 256},
                         "eval": {"num_samples": 600, "batch_size": 300}}},
    "experiments": {"g3_emd": {"template": "g3"}},
    "suites": {"g3": ["g3_emd"]},
}


@pytest.fixture
def gauss3d():
    register(KIND)(Gauss3D)
    yield Gauss3D
    unregister(KIND)


def test_the_world_is_named_only_where_it_is_defined():
    """No mct module knows this world: naming it in params is all it takes (and an unregistered kind is refused)."""
    package = Path(__file__).resolve().parents[1] / "mct"
    assert not [f for f in package.rglob("*.py") if KIND in f.read_text() or "g3world" in f.read_text()]
    assert KIND not in WORLDS


def test_world_classes_answer_the_stage_table_without_torch():
    """Snakemake imports the stage table and the params schema for every job: the world classes they consult must
    not import torch (seconds per job), so their modules import it where it runs."""

    code = ("import sys, mct.stages, mct.config, mct.worlds.registry as r\n"
            "p = mct.config.load_params('params.yaml')\n"
            "mct.stages.jobs(p)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_an_unregistered_kind_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    with pytest.raises(ConfigError, match=rf"worlds\.g3\.kind: unknown value '{KIND}'"):
        load_params(tmp_path / "params.yaml")


def test_a_kind_names_one_class(gauss3d):
    register(KIND)(Gauss3D)  # the same class again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register(KIND)(type("Other", (Gauss3D,), {}))


def test_a_new_world_runs_the_smoke_pipeline_through_the_cli(gauss3d, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    Path("params.yaml").write_text(yaml.safe_dump(PARAMS))
    params = load_params("params.yaml")
    jobs = [j for j in stages.jobs(params) if j.stage != "report"]  # the report's figures are the built-in worlds'
    assert [j.stage for j in jobs] == ["prepare", "teacher", "ref_stats", "teacher_eval", "init_student", "distill",
                                       "sample", "evaluate"]  # no `features`: the world measures in its own space
    assert all("mct/worlds/base.py" in j.code for j in jobs)
    for j in jobs:
        argv = shlex.split(j.command)
        assert argv[0] == "mct", j.command  # one CPU process: the console script, no accelerate launcher
        assert mct_main(argv[1:]) == 0, j.command
        assert all(Path(o).exists() for o in j.outputs.values()), j

    with np.load(paths.samples_file("g3_emd")) as f:
        assert f["x"].shape == (600, 3) and f["x"].dtype == np.float32
    rec = json.loads(paths.experiment_metrics("g3_emd").read_text())
    assert rec["world"] == "g3" and rec["method"] == "emd" and rec["K"] == 2
    assert np.isfinite(rec["fid"]) and 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1
    assert np.isfinite(rec["mean_error"])  # the world's exact metric
    assert rec["convergence_metric"] == "fd_3d" and rec["convergence_points"] == 2
    with np.load(paths.reference_stats("g3")) as ref:
        assert json.loads(str(ref["meta"])) == {"world": "g3", "split": "test", "count": 1000, "features": "identity"}
    teacher = json.loads(paths.teacher_metrics("g3_mlp").read_text())
    assert teacher["nfe"] == 7 and "mean_error" in teacher


def spec_params(kind: str = SPEC) -> dict:
    return {**PARAMS, "worlds": {"g3": {**PARAMS["worlds"]["g3"], "kind": kind}}}


def test_a_module_class_kind_needs_no_registration(tmp_path, monkeypatch):
    """``kind: "module:Class"`` builds the class of that module, with no register() call; the kind is the spec.
    Its file is a job input where it lies inside the project (the working directory), and not elsewhere."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(spec_params()))
    params = load_params(tmp_path / "params.yaml")
    assert WORLDS[SPEC] is Gauss3D and params.worlds["g3"].kind == SPEC
    monkeypatch.chdir(PLUGINS.parent)
    assert stages.world_files(("g3world",)) == ("plugins/g3world/__init__.py",)
    monkeypatch.chdir(tmp_path)
    assert stages.world_files(("g3world",)) == ()


@pytest.mark.parametrize("kind, says", [
    ("g3world_missing:Gauss3D", "cannot import module 'g3world_missing'.*PYTHONPATH"),
    ("g3world:Gauss4D", "module 'g3world' has no 'Gauss4D'"),
    ("g3world:SCALES", "g3world:SCALES is not a World subclass"),
])
def test_a_wrong_module_class_kind_is_refused_naming_it(tmp_path, kind, says):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(spec_params(kind)))
    with pytest.raises(ConfigError, match=rf"worlds\.g3\.kind: world kind '{kind}': {says}"):
        load_params(tmp_path / "params.yaml")
    assert kind not in list(WORLDS)  # a wrong name leaves no kind behind


def test_an_installed_entry_point_names_the_world(tmp_path, monkeypatch):
    """A package that declares ``gauss3d = "g3world:Gauss3D"`` under the entry-point group mct.worlds (here its
    metadata folder, as pip installs it, on the path) makes ``kind: gauss3d`` valid without any import by the user."""
    dist = tmp_path / "site" / "g3world-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: g3world\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mct.worlds]\n{KIND} = {SPEC}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    try:
        assert KIND in list(WORLDS)
        params = load_params(tmp_path / "params.yaml")
        assert params.worlds["g3"].kind == KIND and WORLDS[KIND] is Gauss3D
    finally:
        unregister(KIND)


def test_a_world_outside_mct_runs_the_whole_dag_through_snakemake_and_the_report(tmp_path):
    """The user's path: a project (the workflow and mct, as a clone has them) with the world's package in it, a
    params file that names the class, and `snakemake`: every stage runs, through the report, whose page shows the
    world's metrics, its exact metric and a points figure of its 3-D samples; the world's own file is a job input,
    so editing it reruns the jobs of that world."""
    from tests.test_dag import ENV, scratch_copy

    root = scratch_copy(tmp_path / "project")
    shutil.copytree(PLUGINS / "g3world", root / "g3world", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(spec_params()))
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(root), ENV.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    page = (root / "reports" / "index.md").read_text()
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["g3_emd"]["world"] == "g3" and np.isfinite(metrics["g3_emd"]["mean_error"])
    assert "g3_emd" in page and "mean_error" in page.lower().replace(" ", "_")
    assert (root / "reports" / "figures" / "g3_samples.png").stat().st_size > 10_000
    dry = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--touch"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
    (root / "g3world" / "__init__.py").write_text((root / "g3world" / "__init__.py").read_text() + "\n# edited\n")
    dry = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "prepare" in dry.stdout and "report" in dry.stdout, dry.stdout[-2000:]
