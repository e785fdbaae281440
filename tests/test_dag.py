"""Snakefile and dvc.yaml are one pipeline: the same stage instances, commands, inputs and outputs.

Only dry runs: Snakemake plans jobs (`snakemake -n -p`) and DVC loads its stages, each in a scratch copy of the
workflow files, since both write state (.snakemake/, .dvc/tmp) beside the files they read.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mct import paths
from mct.config import load_params

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "dvc.yaml", "params.yaml", ".dvcignore")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "DVC_NO_ANALYTICS": "1"}
ENV.pop("SNAKEMAKE_PROFILE", None)
ARTIFACT_ROOTS = (paths.RUNS.name, paths.REPORTS.name)


@dataclass(frozen=True)
class Stage:
    outputs: frozenset[str]
    inputs: frozenset[str]  # artifacts only (runs/, reports/), not code or params
    command: str  # without the log redirection


def scratch_copy(dst: Path) -> Path:
    """The files both engines read, without workflow/profiles (the test pins its own flags)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "workflow", dst / "workflow", ignore=shutil.ignore_patterns("__pycache__", "profiles"))
    (dst / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", dst / ".dvc" / "config")
    (dst / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")  # the copy is no git repo
    return dst


@pytest.fixture(scope="module", autouse=True)
def no_slurm_probe(tmp_path_factory):
    """The Slurm executor plugin runs `scontrol show config` when Snakemake loads it, which waits up to 10 s for
    a controller when none runs. These dry runs never use Slurm: a stub that fails at once stands in for it."""
    bin_dir = tmp_path_factory.mktemp("bin")
    stub = bin_dir / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    path = ENV["PATH"]
    ENV["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    yield
    ENV["PATH"] = path


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return scratch_copy(tmp_path_factory.mktemp("dag") / "repo")


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def dry_run(cwd: Path, *args: str) -> str:
    r = snakemake(cwd, "-n", "-p", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def parse_dry_run(text: str) -> dict[tuple[str, str | None], Stage]:
    """(rule, world/teacher/experiment wildcard) -> Stage, from the job blocks of `snakemake -n -p`."""
    jobs: dict[tuple[str, str | None], Stage] = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M)[1:]:
        lines = block.splitlines()
        rule = re.match(r"(?:local)?rule (\w+):", lines[0]).group(1)
        fields: dict[str, str] = {}
        for line in lines[1:]:
            if m := re.match(r"    (\w+): (.*)$", line):
                fields[m.group(1)] = m.group(2)
            elif line.startswith("Shell command: "):
                fields["shell"] = line.removeprefix("Shell command: ")
            else:
                break
        if rule == "all":
            continue
        wildcards = dict(w.split("=", 1) for w in fields.get("wildcards", "").split(", ") if w)
        instance = wildcards.get("world") or wildcards.get("teacher") or wildcards.get("experiment")
        command = re.sub(r"\s+>>?\s*\S+ 2>&1$", "", fields["shell"])
        assert (rule, instance) not in jobs, f"job {rule} {instance} planned twice"
        jobs[(rule, instance)] = Stage(frozenset(fields["output"].split(", ")),
                                       frozenset(fields.get("input", "").split(", ")) - {""}, command)
    total = int(re.search(r"^total\s+(\d+)$", text, flags=re.M).group(1))
    assert len(jobs) == total - 1, f"parsed {len(jobs)} jobs besides `all`, snakemake planned {total}"
    return jobs


def dvc_stages(root: Path) -> dict[tuple[str, str | None], Stage]:
    """(stage kind, foreach key) -> Stage, from dvc.yaml as DVC resolves it. `x_fnet` stages are kind `x`
    (the loop over worlds measured through a trained feature network)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
    outs_of = {o.def_path: st.name for st in stages for o in st.outs}
    result: dict[tuple[str, str | None], Stage] = {}
    for st in stages:
        name, _, key = st.name.partition("@")
        inputs: set[str] = set()
        for dep in (d.def_path for d in st.deps):
            if dep in outs_of:
                inputs.add(dep)
            else:  # code or params
                assert Path(dep).parts[0] not in ARTIFACT_ROOTS, f"{st.name}: no stage makes its dependency {dep}"
                assert (root / dep).exists() or (REPO / dep).exists(), f"{st.name}: no such dependency {dep}"
        kind = name.removesuffix("_fnet")
        assert (kind, key or None) not in result, f"stage {kind} {key} defined twice"
        result[(kind, key or None)] = Stage(frozenset(o.def_path for o in st.outs), frozenset(inputs), st.cmd)
    return result


def load_dvc_vars():
    spec = importlib.util.spec_from_file_location("dvc_vars", REPO / "workflow" / "dvc_vars.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_snakemake_and_dvc_have_the_same_dag(repo_copy):
    smk = parse_dry_run(dry_run(repo_copy))
    dvc = dvc_stages(repo_copy)
    assert sorted(smk, key=str) == sorted(dvc, key=str)
    differing = {k: (smk[k], dvc[k]) for k in smk if smk[k] != dvc[k]}
    assert not differing, "stages whose (outputs, inputs, command) differ, Snakemake then DVC:\n" + "\n".join(
        f"{k}:\n  {a}\n  {b}" for k, (a, b) in differing.items())

    # ... and it is the default suite's pipeline, not merely the same wrong one twice.
    p = load_params(REPO / "params.yaml")
    exps, teachers, worlds = set(p.suite_experiments()), set(p.suite_teachers()), set(p.suite_worlds())
    by_kind: dict[str, set] = {}
    for kind, inst in smk:
        by_kind.setdefault(kind, set()).add(inst)
    expected = {"prepare": worlds, "ref_stats": worlds, "teacher": teachers, "teacher_eval": teachers,
                "init_student": exps, "distill": exps, "sample": exps, "evaluate": exps, "report": {None}}
    if digits := {w for w in worlds if p.worlds[w].kind == "digits"}:
        expected["features"] = digits
    assert by_kind == expected
    assert smk[("report", None)].command.startswith(f"mct report --suite {p.suite} ")


def test_generated_dvc_parts_are_up_to_date():
    """workflow/dvc_vars.yaml and dvc.yaml's report stage are what workflow/dvc_vars.py makes of params.yaml."""
    mod = load_dvc_vars()
    params = load_params(REPO / "params.yaml")
    hint = "stale: run `python workflow/dvc_vars.py --write`"
    assert (REPO / "workflow" / "dvc_vars.yaml").read_text() == mod.render(mod.dvc_tables(params)), hint
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    assert mod.with_report_stage(dvc_yaml, mod.report_stage(params)) == dvc_yaml, hint


def test_unknown_suite_stops_before_any_job(repo_copy):
    r = snakemake(repo_copy, "-n", "--config", "suite=nonexistent")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "suite: unknown suite 'nonexistent'" in out, out
    assert "Job stats" not in out and not (repo_copy / "runs").exists()


def test_bad_key_stops_snakemake_and_mct_validate(repo_copy, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    teacher = sorted(raw["teachers"])[0]
    raw["teachers"][teacher]["learning_rate_typo"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    key = f"teachers.{teacher}.learning_rate_typo"

    r = snakemake(repo_copy, "-n", "--configfile", str(bad))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and f"{key}: unknown key" in out, out
    assert "Job stats" not in out

    # `python -m mct.cli validate` (how accelerate launches distill), run in this process
    with pytest.raises(SystemExit) as stop, monkeypatch.context() as m:
        m.setattr(sys, "argv", ["mct", "validate", "--params", str(bad)])
        runpy.run_module("mct.cli", run_name="__main__", alter_sys=True)
    assert stop.value.code == 2 and f"{key}: unknown key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_copy(tmp_path_factory) -> tuple[Path, str, str, str]:
    """A copy whose smoke suite has one GPU experiment; (root, its dry run, GPU experiment, CPU experiment)."""
    root = scratch_copy(tmp_path_factory.mktemp("smoke") / "repo")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    gpu_exp, cpu_exp = raw["suites"]["smoke"][:2]
    raw["experiments"][gpu_exp].setdefault("distill", {}).update(gpus=2, num_processes=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root, dry_run(root, "--config", "suite=smoke"), gpu_exp, cpu_exp


def test_gpu_experiments_launch_through_accelerate(smoke_copy):
    """distill.gpus > 0 or num_processes > 1: `accelerate launch -m mct.cli`, and Slurm is asked for the GPUs."""
    root, text, gpu_exp, cpu_exp = smoke_copy
    jobs = parse_dry_run(text)
    assert jobs[("distill", gpu_exp)].command == (
        f"accelerate launch --multi_gpu --num_processes 2 -m mct.cli distill --experiment {gpu_exp} "
        f"--work runs/work/{gpu_exp} --params params.yaml --no-progress")
    assert jobs[("distill", cpu_exp)].command.startswith(f"mct distill --experiment {cpu_exp} ")
    dvc_vars = load_dvc_vars()  # dvc.yaml's distill command starts with the launcher of workflow/dvc_vars.py
    params = load_params(root / "params.yaml")
    for exp in (gpu_exp, cpu_exp):
        assert jobs[("distill", exp)].command.startswith(f"{dvc_vars.distill_launcher(params, exp)} distill ")
    gpus = dict(re.findall(r"rule (\w+):\n(?:    .*\n)*?    wildcards: experiment=" + re.escape(gpu_exp)
                           + r"\n    resources: .*?gpu=(\d+)", text))
    assert gpus == {"init_student": "0", "distill": "2", "sample": "1", "evaluate": "1"}


def test_changed_settings_rerun_only_that_experiment(smoke_copy):
    """Snakemake records each job's resolved settings (`params:`), so editing one experiment reruns its chain."""
    root, text, changed, same = smoke_copy
    for st in parse_dry_run(text).values():  # stand-ins for every output; `--touch -F` records a run's metadata
        for out in st.outputs:
            path = root / out
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
    r = snakemake(root, "--touch", "-F", "--config", "suite=smoke")
    assert r.returncode == 0, r.stdout + r.stderr

    raw = yaml.safe_load((root / "params.yaml").read_text())
    distill = raw["experiments"][changed].setdefault("distill", {})
    distill["iterations"] = distill.get("iterations", 10) + 1
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    rerun = set(parse_dry_run(dry_run(root, "--config", "suite=smoke")))
    assert rerun == {("init_student", changed), ("distill", changed), ("sample", changed), ("evaluate", changed),
                     ("report", None)}
    assert not any(inst == same for _, inst in rerun)


@pytest.mark.parametrize(("suite", "experiment"), [("imagenet64", "imagenet64_emd_k8"),
                                                    ("imagenet128", "imagenet128_emd_k16")])
def test_paper_scale_suite_plans_the_same_dag_in_both_engines(tmp_path, suite, experiment):
    """The paper-scale suites are dry-runnable: with one as the default suite, both engines plan the same stages,
    and the distill stage launches through accelerate on 8 GPUs."""
    root = scratch_copy(tmp_path / "repo")
    params = root / "params.yaml"
    params.write_text(re.sub(r"^suite: \w+", f"suite: {suite}", params.read_text(), count=1, flags=re.M))
    r = subprocess.run([sys.executable, "workflow/dvc_vars.py", "--write"], cwd=root, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    smk = parse_dry_run(dry_run(root))
    dvc = dvc_stages(root)
    assert sorted(smk, key=str) == sorted(dvc, key=str)
    assert {k: v for k, v in smk.items()} == dvc
    assert ("distill", experiment) in smk and ("ref_stats", suite) in smk
    assert smk[("distill", experiment)].command.startswith("accelerate launch --multi_gpu --num_processes 8")
