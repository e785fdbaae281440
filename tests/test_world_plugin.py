"""Adding a world is one class plus params: a 3-D Gaussian world, defined only in this file, runs the pipeline.

The class below subclasses mct.worlds.base.World and registers its kind; nothing else in mct learns about it (the
test checks that its kind appears in no mct source file). A params file then uses ``kind: gauss3d``, and every job
that the stage table plans for the suite (prepare, teacher, ref-stats, teacher-eval, init-student, distill, sample,
evaluate) runs through the `mct` command line, as either engine would run it. The world also shows the optional
answers: an exact denoiser (so the E-step can use ``estep_teacher: analytic``), exact metrics in the evaluation
record and a training metric whose convergence_auc the evaluate stage reports.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mct import paths, stages
from mct.cli import main as mct_main
from mct.config import ConfigError, load_params
from mct.worlds.base import World
from mct.worlds.registry import WORLDS, register, unregister

KIND = "gauss3d"
SCALES = (1.0, 2.0, 3.0)  # the Gaussian's standard deviations per axis, in units of cfg.std


class Gauss3D(World):
    """worlds.<name>: {kind: gauss3d, std, seed}: N(0, diag((std * (1, 2, 3))^2)) in R^3, known in closed form."""

    has_analytic_denoiser = True
    exact_metric_keys = ("mean_error",)
    convergence_metric = "fd_3d"
    convergence_panels = ("fd_3d",)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3,)

    @property
    def cov(self) -> torch.Tensor:
        return torch.diag((self.cfg.std * torch.tensor(SCALES)) ** 2)

    @property
    def sigma_data(self) -> float:
        return float(self.cov.diagonal().mean().sqrt())

    def _draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 3, generator=gen) * self.cov.diagonal().sqrt()

    def prepare(self, out: Path) -> None:
        gen = torch.Generator().manual_seed(self.cfg.seed)
        train, test = self._draw(4000, gen), self._draw(1000, gen)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, train_x=train.numpy(), test_x=test.numpy())

    def load_split(self, path: Path, split: str = "train"):
        with np.load(path) as f:
            return torch.from_numpy(f[f"{split}_x"]).float(), None

    def analytic_denoiser(self):
        from mct.worlds.mixture import GaussianDenoiser

        return GaussianDenoiser(torch.zeros(3), self.cov)

    def exact_metrics(self, x: torch.Tensor) -> dict[str, float]:
        return {"mean_error": float(x.double().mean(0).norm())}

    def training_metric(self):
        from mct.metrics.frechet import frechet_to_gaussian

        cov = self.cov.double().numpy()
        return lambda x: {"fd_3d": frechet_to_gaussian(x.double().numpy(), np.zeros(3), cov)}


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
    """No mct module knows this world: registering it is all it takes (and an unregistered kind is refused)."""
    package = Path(__file__).resolve().parents[1] / "mct"
    assert not [f for f in package.rglob("*.py") if KIND in f.read_text()]
    assert KIND not in WORLDS


def test_world_classes_answer_the_stage_table_without_torch():
    """Snakemake imports the stage table and the params schema for every job: the world classes they consult must
    not import torch (seconds per job), so their modules import it where it runs."""
    import subprocess
    import sys

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
