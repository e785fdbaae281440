"""Snakefile and dvc.yaml are one pipeline, generated from one stage table (mct/stages.py).

Both engines must plan the same stage instances with the same commands, artifact inputs, code files and outputs;
dvc.yaml must be what workflow/dvc_yaml.py makes of params.yaml; seeds expand into separate runs in both; and a
changed mct module reruns, in both engines, exactly the stages whose command imports it.

Engines run in scratch copies of the workflow files and the mct package, since both write state (.snakemake/,
.dvc/tmp) beside the files they read.
"""

from __future__ import annotations

import json
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

from mct import paths, stages
from mct.config import load_params

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "dvc.yaml", "params.yaml", ".dvcignore")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
ENV.pop("SNAKEMAKE_PROFILE", None)
ARTIFACT_ROOTS = (paths.RUNS.name, paths.REPORTS.name)
# committed outputs of the benchmark scripts (not stages) that the report shows: inputs from git, like params.yaml
SCRIPT_OUTPUTS = {str(d) for d in stages.REPORT_INPUT_BENCHMARKS}  # committed outputs of benchmarks/ scripts

GUARD = runpy.run_path(str(REPO / "workflow" / "dvc_yaml.py"))["GUARD"]  # DVC's stale-pipeline stage (no job)

@dataclass(frozen=True)
class Stage:
    outputs: frozenset[str]
    inputs: frozenset[str]  # artifacts (runs/, reports/)
    code: frozenset[str]  # mct source files
    command: str  # without the log redirection


def env_for(root: Path) -> dict[str, str]:
    """The copy's own mct package comes first on the path (so its files are the ones that run and are hashed)."""
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(root), ENV.get("PYTHONPATH", "")])}


def scratch_copy(dst: Path) -> Path:
    """The files both engines read, the mct package, and no workflow/profiles (the tests pin their own flags)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        shutil.copy2(REPO / name, dst / name)
    for pipeline in (REPO / "pipelines").glob("*/dvc.yaml"):  # each experiment's runs (workflow/dvc_yaml.py)
        (dst / pipeline.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pipeline, dst / pipeline.relative_to(REPO))
    ignore = shutil.ignore_patterns("__pycache__", "profiles", "*.pyc")
    shutil.copytree(REPO / "workflow", dst / "workflow", ignore=ignore)
    shutil.copytree(REPO / "mct", dst / "mct", ignore=ignore)
    for bench in stages.REPORT_INPUT_BENCHMARKS:  # committed benchmark outputs the report stage reads
        if (REPO / bench).exists():
            shutil.copytree(REPO / bench, dst / bench)
    (dst / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", dst / ".dvc" / "config")
    (dst / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")  # the copy is no git repo
    return dst


def set_params(root: Path, edit) -> None:
    """Edit the copy's params.yaml (a function of the raw mapping) and regenerate its dvc.yaml."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    edit(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = subprocess.run([sys.executable, "workflow/dvc_yaml.py", "--write"], cwd=root, env=env_for(root),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module", autouse=True)
def no_slurm_probe(tmp_path_factory):
    """The Slurm executor plugin runs `scontrol show config` when Snakemake loads it, which waits up to 10 s for
    a controller when none runs. These runs never use Slurm: a stub that fails at once stands in for it."""
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


def snakemake(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=cwd, env=env_for(cwd),
                          capture_output=True, text=True, timeout=timeout)


def dry_run(cwd: Path, *args: str) -> str:
    r = snakemake(cwd, "-n", "-p", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env_for(cwd), capture_output=True,
                          text=True, timeout=300)


def rule_stage(rule: str) -> str:
    """Snakemake rule -> stage: one rule per stage, `<stage>_<n>` when a suite mixes output patterns."""
    return rule if rule in stages.BY_NAME else re.sub(r"_\d+$", "", rule)


def job_blocks(text: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, fields) of each job block of `snakemake -n -p`."""
    blocks = []
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
        blocks.append((rule, fields))
    return blocks


def instance_of(fields: dict[str, str]) -> str | None:
    wildcards = dict(w.split("=", 1) for w in fields.get("wildcards", "").split(", ") if w)
    return wildcards.get("world") or wildcards.get("teacher") or wildcards.get("run")


def parse_dry_run(text: str) -> dict[tuple[str, str | None], Stage]:
    """(stage, world/teacher/run) -> Stage, from the job blocks of `snakemake -n -p`."""
    jobs: dict[tuple[str, str | None], Stage] = {}
    blocks = job_blocks(text)
    for rule, fields in blocks:
        if rule == "all":
            continue
        key = (rule_stage(rule), instance_of(fields))
        command = re.sub(r"\s+>>?\s*\S+ 2>&1$", "", fields["shell"])
        inputs = set(fields.get("input", "").split(", ")) - {""}
        code = {p for p in inputs if Path(p).parts[0] == "mct"}
        assert key not in jobs, f"job {key} planned twice"
        jobs[key] = Stage(frozenset(fields["output"].split(", ")), frozenset(inputs - code), frozenset(code), command)
    if blocks:
        total = int(re.search(r"^total\s+(\d+)$", text, flags=re.M).group(1))
        assert len(blocks) == total, f"parsed {len(blocks)} jobs, snakemake planned {total}"
    return jobs


def dvc_instance(params_file: Path, name: str) -> tuple[str, str | None]:
    """DVC stage name (workflow/dvc_yaml.py's stage_name) -> (stage, instance), through the stage table. DVC
    prefixes the stages of pipelines/<experiment>/dvc.yaml with that file ('pipelines/e/dvc.yaml:distill-e')."""
    name = name.rpartition(":")[2]
    if name == GUARD:  # DVC's own staleness check: no job of the stage table
        return name, None
    params = load_params(params_file)
    names = {f"{j.stage}-{j.name.replace('/', '-')}" if j.name else j.stage: (j.stage, j.name)
             for j in stages.jobs(params)}
    assert name in names, f"DVC stage {name} is no job of the stage table"
    return names[name]


def dvc_stages(root: Path) -> dict[tuple[str, str | None], Stage]:
    """(stage, instance) -> Stage, from dvc.yaml as DVC itself loads it."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        loaded = list(repo.index.stages)
    outs_of = {o.def_path: st.name for st in loaded for o in st.outs}
    result: dict[tuple[str, str | None], Stage] = {}
    for st in (st for st in loaded if st.name != GUARD):
        inputs, code = set(), set()
        for dep in (d.def_path for d in st.deps if not isinstance(d, ParamsDependency)):
            if dep in outs_of or dep in SCRIPT_OUTPUTS:
                inputs.add(dep)
            else:
                assert Path(dep).parts[0] not in ARTIFACT_ROOTS, f"{st.name}: no stage makes its dependency {dep}"
                assert (root / dep).is_file(), f"{st.name}: no such file {dep}"
                code.add(dep)
        key = dvc_instance(root / "params.yaml", st.name)
        assert key not in result, f"stage {key} defined twice"
        result[key] = Stage(frozenset(o.def_path for o in st.outs), frozenset(inputs), frozenset(code), st.cmd)
    return result


def assert_same_dag(smk: dict, dvc_: dict) -> None:
    assert sorted(smk, key=str) == sorted(dvc_, key=str)
    differing = {k: (smk[k], dvc_[k]) for k in smk if smk[k] != dvc_[k]}
    assert not differing, "stages whose (outputs, inputs, code, command) differ, Snakemake then DVC:\n" + "\n".join(
        f"{k}:\n  {a}\n  {b}" for k, (a, b) in differing.items())


def test_snakemake_and_dvc_have_the_same_dag(repo_copy):
    smk = parse_dry_run(dry_run(repo_copy))
    assert_same_dag(smk, dvc_stages(repo_copy))

    # ... and it is the default suite's pipeline, not merely the same wrong one twice.
    p = load_params(REPO / "params.yaml")
    runs = {paths.run_name(*r) for r in p.suite_runs()}
    teachers, worlds = set(p.suite_teachers()), set(p.suite_worlds())
    by_kind: dict[str, set] = {}
    for kind, inst in smk:
        by_kind.setdefault(kind, set()).add(inst)
    expected = {"prepare": worlds, "ref_stats": worlds, "teacher": teachers, "teacher_eval": teachers,
                "init_student": runs, "distill": runs, "sample": runs, "evaluate": runs, "report": {None}}
    if digits := {w for w in worlds if p.worlds[w].kind == "digits"}:
        expected["features"] = digits
    assert by_kind == expected
    assert smk[("report", None)].command.startswith(f"mct report --suite {p.suite} ")
    # every job's code is what the import graph of its command and its world give
    for (kind, inst), st in smk.items():
        name = {"run": next((r for r in p.suite_runs() if paths.run_name(*r) == inst), None), "": p.suite}.get(
            stages.BY_NAME[kind].over, inst)
        assert st.code == frozenset(stages.job_code(p, stages.BY_NAME[kind], name)), (kind, inst)


def test_dvc_yaml_is_generated_and_up_to_date():
    """dvc.yaml is what workflow/dvc_yaml.py makes of params.yaml and the stage table (hint: run it with --write)."""
    r = subprocess.run([sys.executable, "workflow/dvc_yaml.py", "--check"], cwd=REPO, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr + "stale: run `python workflow/dvc_yaml.py --write`"


def test_a_stale_pipeline_stops_dvc_repro_with_the_command_that_fixes_it(repo_copy):
    """Setting params.yaml's suite without regenerating the pipeline files: `dvc status` is not 'up to date' and
    `dvc repro` stops at DVC's check stage, naming `python workflow/dvc_yaml.py --write`; after it, the check passes."""
    params = repo_copy / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("\nsuite: embedded", "\nsuite: skewed", 1))
        assert "suite: skewed" in params.read_text()
        assert GUARD in dvc(repo_copy, "status").stdout
        r = dvc(repo_copy, "repro", GUARD)
        assert r.returncode != 0 and "run: python workflow/dvc_yaml.py --write" in r.stdout + r.stderr, r.stdout
        r = subprocess.run([sys.executable, "workflow/dvc_yaml.py", "--write"], cwd=repo_copy, env=env_for(repo_copy),
                           capture_output=True, text=True)
        assert r.returncode == 0 and "removed pipelines/toy2d_di/dvc.yaml" in r.stdout, r.stdout + r.stderr
        r = dvc(repo_copy, "repro", GUARD)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:  # the module's other tests share the copy
        params.write_text(original)
        shutil.rmtree(repo_copy / "pipelines")
        for pipeline in (REPO / "pipelines").glob("*/dvc.yaml"):
            (repo_copy / pipeline.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pipeline, repo_copy / pipeline.relative_to(REPO))
        shutil.copy2(REPO / "dvc.yaml", repo_copy / "dvc.yaml")


def test_code_deps_follow_the_import_graph():
    """Each stage's code: cli.py, the modules its cli function imports (also inside helpers it calls), and what
    those import, transitively, module level or inside functions; nothing its command cannot reach."""
    deps = {st.name: set(stages.code_deps(st.command)) for st in stages.STAGES}
    for name, files in deps.items():
        assert {"mct/cli.py", "mct/__init__.py", "mct/config.py", "mct/paths.py"} <= files, name
        assert all((REPO / f).is_file() for f in files), name
        assert "mct/stages.py" not in files  # the table itself runs in the engines, not in a stage
    # _world() (a cli helper every world stage calls) imports the world registry, which names the worlds (strings)
    # and imports none: a world's module is the code of the jobs that run it (test_a_job_depends_on_its_world_only)
    assert {"mct/worlds/registry.py", "mct/worlds/base.py", "mct/nets/mlp.py"} <= deps["prepare"]
    assert not any(f in files for f in ("mct/worlds/toy2d.py", "mct/worlds/text2image.py", "mct/nets/sd.py")
                   for files in deps.values())
    assert "mct/report.py" in deps["report"] and not any("mct/report.py" in v for k, v in deps.items() if k != "report")
    assert "mct/aggregate.py" in deps["report"]  # imported by report.py
    assert "mct/train.py" in deps["distill"] and "mct/train.py" not in deps["prepare"]
    assert "mct/evaluate.py" in deps["evaluate"] and "mct/evaluate.py" not in deps["prepare"]
    # a deep module reaches every stage whose command imports it, and only those
    users = {s for s, files in deps.items() if "mct/diffusion.py" in files}
    assert users == set(deps)


def test_a_job_depends_on_its_world_only():
    """A job's code adds the whole import graph of the world(s) it runs (its world, teacher's or experiment's world;
    the suite's for the report) to its command's, and the module files of every world of params.yaml (params
    validation imports each world's class, in every process), not what those import inside functions."""
    from mct.worlds.registry import world_module

    p = load_params(REPO / "params.yaml")
    kinds = {w.kind for w in p.worlds.values()}
    assert {"toy2d", "text2image"} <= kinds
    world_files = {world_module(k).replace(".", "/") + ".py" for k in kinds}
    toy, t2i = stages.jobs(p, "smoke"), stages.jobs(p, "t2i_sd15")
    assert toy and t2i
    for j in toy + t2i:
        assert world_files <= set(j.code), (j.stage, j.name)  # validation imports every world module
        assert set(stages.code_deps(stages.BY_NAME[j.stage].command)) < set(j.code)
    for j in toy:  # the text-to-image world's networks and data code are no toy2d job's code
        assert {"mct/nets/sd.py", "mct/coco.py", "mct/metrics/clip_score.py"}.isdisjoint(j.code), (j.stage, j.name)
        assert "mct/worlds/mixture.py" in j.code  # toy2d's own math (inside its functions)
    for j in t2i:
        assert {"mct/nets/sd.py", "mct/coco.py"} <= set(j.code), (j.stage, j.name)
        assert "mct/worlds/mixture.py" not in j.code  # only a TYPE_CHECKING/in-function import of toy2d's
    distill = next(j for j in toy if j.stage == "distill")
    assert set(distill.code) == set(stages.code_deps("distill", ("mct.worlds.toy2d",),
                                                     tuple(sorted({world_module(k) for k in kinds}))))


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


def test_a_complete_params_file_given_with_configfile_replaces_params_yaml(repo_copy, tmp_path):
    """`snakemake --configfile mine.yaml` with a self-contained file (its own worlds, teachers, template, two
    experiments and a suite) plans exactly that file's jobs: it is not merged into params.yaml. `--config` still
    refuses any key but `suite`."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    smoke = raw["suites"]["smoke"]
    exps = {f"mine_{i}": raw["experiments"][e] for i, e in enumerate(smoke)}
    teachers = {raw["experiments"][e]["teacher"] for e in smoke}
    template = raw["templates"]["toy2d"]
    mine = {"suite": "mine", "worlds": {"toy2d": raw["worlds"]["toy2d"]},
            "teachers": {t: raw["teachers"][t] for t in teachers},
            "templates": {"toy2d": {**template, "teacher": sorted(teachers)[0]}},
            "experiments": exps, "suites": {"mine": sorted(exps)}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(mine))
    r = snakemake(repo_copy, "-n", "-p", "--configfile", str(path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    planned = set(re.findall(r"run=(\S+)", out))
    assert planned == set(exps), planned
    assert "toy2d_emd_k8" not in out and "mct report --suite mine --params " + str(path) in out

    r = snakemake(repo_copy, "-n", "--configfile", str(path), "--config", "suite=mine", "extra=1")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "extra: `--config` may set only `suite`" in out, out


@pytest.fixture(scope="module")
def smoke_copy(tmp_path_factory) -> tuple[Path, str, str, str]:
    """A copy whose smoke suite has one GPU experiment; (root, its dry run, GPU experiment, CPU experiment)."""
    root = scratch_copy(tmp_path_factory.mktemp("smoke") / "repo")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    gpu_exp, cpu_exp = raw["suites"]["smoke"][:2]

    def edit(raw):
        raw["experiments"][gpu_exp].setdefault("distill", {}).update(gpus=2, num_processes=2)
    set_params(root, edit)
    return root, dry_run(root, "--config", "suite=smoke"), gpu_exp, cpu_exp


def test_gpu_experiments_launch_through_accelerate(smoke_copy):
    """distill.gpus > 0 or num_processes > 1: `accelerate launch -m mct.cli` (mct.stages.launcher, the one place
    both engines take it from), and Slurm is asked for the GPUs."""
    root, text, gpu_exp, cpu_exp = smoke_copy
    jobs = parse_dry_run(text)
    assert jobs[("distill", gpu_exp)].command == (
        f"accelerate launch --multi_gpu --num_processes 2 -m mct.cli distill --experiment {gpu_exp} "
        f"--work runs/work/{gpu_exp} --params params.yaml --no-progress")
    assert jobs[("distill", cpu_exp)].command.startswith(f"mct distill --experiment {cpu_exp} ")
    params = load_params(root / "params.yaml")
    for exp in (gpu_exp, cpu_exp):
        launch = stages.launcher(params.experiment(exp).distill)
        assert jobs[("distill", exp)].command.startswith(f"{launch} distill ")
    gpus = dict(re.findall(r"rule (\w+):\n(?:    .*\n)*?    wildcards: run=" + re.escape(gpu_exp)
                           + r"\n    resources: .*?gpu=(\d+)", text))
    assert gpus == {"init_student": "0", "distill": "2", "sample": "1", "evaluate": "1"}


def make_stand_ins(root: Path, jobs) -> None:
    """A file (or a folder with a file) for every output: what a completed run leaves, for planning only."""
    for st in jobs:
        for out in st.outputs:
            path = root / out
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(out + "\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "stand_in.txt").write_text(out + "\n")


def test_changed_settings_rerun_only_that_experiment(smoke_copy):
    """Snakemake records each job's resolved settings (`params:`), so editing one experiment reruns its chain."""
    root, text, changed, same = smoke_copy
    make_stand_ins(root, parse_dry_run(text).values())
    r = snakemake(root, "--touch", "-F", "--config", "suite=smoke")  # records a run's metadata
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
    """The paper-scale suites plan in both engines: with one as the default suite, both have the same stages,
    and the distill stage launches through accelerate on 8 GPUs."""
    root = scratch_copy(tmp_path / "repo")
    set_params(root, lambda raw: raw.update(suite=suite))
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    assert ("distill", experiment) in smk and ("ref_stats", suite) in smk
    assert smk[("distill", experiment)].command.startswith("accelerate launch --multi_gpu --num_processes 8")
    if suite == "imagenet64":  # the peers' paper-scale rows run in the same loop, on the same launcher
        for peer in ("imagenet64_sid", "imagenet64_dmd2"):
            assert smk[("distill", peer)].command.startswith("accelerate launch --multi_gpu --num_processes 8")


@pytest.mark.parametrize(("suite", "peers"), [("methods", ("toy2d_sid", "toy2d_dmd2", "toy2d_skewed_sid")),
                                               ("methods_digits", ("digits_sid", "digits_dmd2")),
                                               # ~1 min each: slow-marked, CI runs them in its slow part
                                               pytest.param("methods_wallclock",
                                                            ("toy2d_di_wall", "toy2d_skewed_dmd2_wall"),
                                                            marks=pytest.mark.slow),
                                               pytest.param("dmd_regression", ("toy2d_dmd2_reg",),
                                                            marks=pytest.mark.slow)])
def test_methods_suites_plan_the_same_dag_in_both_engines(tmp_path, suite, peers):
    """SiD and DMD2 (also at equal wall-clock, and with DMD's regression) are experiments like any other: both
    engines plan the same jobs for the methods suites, each peer seed with its own distill stage (`mct distill`,
    which picks the method from distill.method)."""
    root = scratch_copy(tmp_path / "repo")
    set_params(root, lambda raw: raw.update(suite=suite))
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    for peer in peers:
        assert ("distill", f"{peer}/seed0") in smk and ("evaluate", f"{peer}/seed1") in smk
        assert smk[("distill", f"{peer}/seed0")].command.startswith(f"mct distill --experiment {peer} --run-seed 0")


# --- seeds ---------------------------------------------------------------------------------------------------


SEEDED_SUITE = {"experiments": ["smoke_toy2d_di", "smoke_toy2d_emd"], "seeds": [0, 1, 2]}


def seeded(raw: dict) -> None:
    """The smoke suite with three seeds per experiment, except smoke_toy2d_di, which sets its own two."""
    raw["suite"] = "smoke"
    raw["suites"]["smoke"] = dict(SEEDED_SUITE)
    raw["experiments"]["smoke_toy2d_di"]["seeds"] = [3, 4]


def test_seeds_are_separate_runs_in_both_engines(tmp_path):
    root = scratch_copy(tmp_path / "repo")
    set_params(root, seeded)
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    runs = {inst for kind, inst in smk if kind == "distill"}
    assert runs == {"smoke_toy2d_di/seed3", "smoke_toy2d_di/seed4", "smoke_toy2d_emd/seed0",
                    "smoke_toy2d_emd/seed1", "smoke_toy2d_emd/seed2"}
    d = smk[("distill", "smoke_toy2d_emd/seed1")]
    assert d.command == ("mct distill --experiment smoke_toy2d_emd --run-seed 1 --work runs/work/smoke_toy2d_emd/seed1 "
                         "--params params.yaml --no-progress")
    assert d.outputs == {"runs/experiments/smoke_toy2d_emd/seed1/distill"}
    assert smk[("evaluate", "smoke_toy2d_di/seed4")].outputs == {"reports/experiments/smoke_toy2d_di/seed4.json"}
    assert {f"reports/experiments/smoke_toy2d_emd/seed{k}.json" for k in range(3)} <= smk[("report", None)].inputs
    # one teacher and one world for all seeds
    assert sum(kind == "teacher" for kind, _ in smk) == 1

    # the run's settings: distill.seed is the run's seed
    params = load_params(root / "params.yaml")
    assert params.run_config("smoke_toy2d_emd", 2).distill.seed == 2
    job = stages.job(params, "distill", ("smoke_toy2d_emd", 2))
    assert json.loads(job.settings)[0]["distill"]["seed"] == 2

    # a seed added to the suite adds its own runs and reruns nothing else (settings are per run in Snakemake)
    make_stand_ins(root, smk.values())
    r = snakemake(root, "--touch", "-F")
    assert r.returncode == 0, r.stdout + r.stderr
    set_params(root, lambda raw: raw["suites"]["smoke"].update(seeds=[0, 1, 2, 5]))
    rerun = set(parse_dry_run(dry_run(root)))
    assert rerun == {(k, "smoke_toy2d_emd/seed5") for k in ("init_student", "distill", "sample", "evaluate")} | {
        ("report", None)}


# --- code dependencies: a changed module reruns exactly the stages that import it ---------------------------


def completed_copy(root: Path, real: bool) -> dict:
    """Both engines' records of a completed smoke-suite run (seeded) in the copy: run for real by Snakemake, or
    stand-in outputs recorded by `snakemake --touch`; then `dvc commit` records the same files in dvc.lock."""
    set_params(root, seeded)
    smk = parse_dry_run(dry_run(root))
    if real:
        r = snakemake(root, "--cores", "2", timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    else:
        make_stand_ins(root, smk.values())
        r = snakemake(root, "--touch", "-F")
        assert r.returncode == 0, r.stdout + r.stderr
    r = dvc(root, "commit", "-f")
    assert r.returncode == 0, r.stdout + r.stderr
    assert parse_dry_run(dry_run(root)) == {}, "snakemake: a completed run has nothing to do"
    assert dvc_changed(root) == set(), "dvc: a completed run is up to date"
    return smk


def dvc_changed(root: Path) -> set[tuple[str, str | None]]:
    """Stages `dvc status` reports changed (a dependency modified), as (stage, instance)."""
    r = dvc(root, "status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {dvc_instance(root / "params.yaml", name) for name in json.loads(r.stdout or "{}")} - {(GUARD, None)}


def dvc_dry(root: Path) -> set[tuple[str, str | None]]:
    """Stages `dvc repro --dry` would run."""
    r = dvc(root, "repro", "--dry")
    assert r.returncode == 0, r.stdout + r.stderr
    return {dvc_instance(root / "params.yaml", n)
            for n in re.findall(r"^Running stage '([^']+)'", r.stdout, re.M)} - {(GUARD, None)}


def snakemake_plan(root: Path) -> set:
    """Every job `snakemake -n` plans: the stale jobs and every job that reads their outputs."""
    return set(parse_dry_run(dry_run(root, "--rerun-triggers", "mtime", "input", "code", "params")))


def snakemake_stale(root: Path, smk: dict, module: str) -> set:
    """The jobs Snakemake finds stale because ``module`` changed, each judged on its own: a job downstream of
    another planned job only says "Input files updated by another job", so each rule is planned alone
    (`--allowed-rules`, its outputs as targets) and its jobs' reasons read."""
    stale = set()
    for rule in sorted({k for k, _ in smk}):
        targets = sorted(o for (k, _), st in smk.items() if k == rule for o in st.outputs)
        # targets first: --allowed-rules and --rerun-triggers take every word after them
        text = dry_run(root, *targets, "--allowed-rules", rule, "--rerun-triggers", "mtime", "input", "code", "params")
        for r, fields in job_blocks(text):
            reason = fields.get("reason", "").partition("Updated input files: ")[2].partition(";")[0]
            if r != "all" and module in reason.split(", "):
                stale.add((rule_stage(r), instance_of(fields)))
    return stale


def descendants(smk: dict, roots: set) -> set:
    """The jobs that read (transitively) an output of ``roots``."""
    out, changed = set(roots), True
    while changed:
        changed = False
        made = {o for k in out for o in smk[k].outputs}
        for k, st in smk.items():
            if k not in out and st.inputs & made:
                out.add(k)
                changed = True
    return out


MODULES = ("mct/diffusion.py", "mct/train.py", "mct/metrics/modes.py", "mct/report.py")


def check_module_changes(root: Path, smk: dict, modules=MODULES, each_job: bool = False) -> dict[str, set]:
    """Append a comment to each module in turn: DVC finds exactly the jobs whose code includes it changed (and
    `dvc repro --dry` would run them), Snakemake plans those and what reads their outputs, and nothing else;
    with ``each_job``, Snakemake's per-job reasons name the module for exactly those jobs too."""
    params = load_params(root / "params.yaml")
    results = {}
    for module in modules:
        users = stages.module_users(params, module)
        assert users, module
        src = root / module
        original = src.read_text()
        src.write_text(original + "# a comment: the code changed, its behaviour did not\n")
        try:
            assert dvc_changed(root) == users, module
            assert dvc_dry(root) == users, module
            planned = snakemake_plan(root)
            assert planned == descendants(smk, users), (module, planned ^ descendants(smk, users))
            if each_job:
                assert snakemake_stale(root, smk, module) == users, module
        finally:
            src.write_text(original)
            # back to the recorded state: DVC compares content hashes; Snakemake's mtime trigger still sees a newer
            # file, so its records are refreshed without running anything
            r = snakemake(root, "--touch")
            assert r.returncode == 0, r.stdout + r.stderr
        assert dvc_changed(root) == set() and snakemake_plan(root) == set(), module
        results[module] = users
    return results


def test_a_changed_module_reruns_exactly_the_stages_that_import_it(tmp_path):
    """Stand-in outputs; in both engines, appending a comment to a module deep in the graph (mct/diffusion.py,
    which every stage imports) or to one only one stage imports (mct/train.py: distill) reruns exactly the stages
    whose command imports it and (Snakemake) what reads their outputs. The slow test below adds more modules."""
    root = scratch_copy(tmp_path / "repo")
    smk = completed_copy(root, real=False)
    users = check_module_changes(root, smk, modules=("mct/diffusion.py", "mct/train.py"))
    assert len(users["mct/diffusion.py"]) == len(smk)
    assert {k for k, _ in users["mct/train.py"]} == {"distill"}


IMPORT_LOG = """\
import atexit, json, os, sys

def _dump():
    mods = sorted(m for m in sys.modules if m == "mct" or m.startswith("mct."))
    path = os.path.join(os.environ["MCT_IMPORT_LOG"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"argv": sys.argv, "modules": mods}, f)

if os.environ.get("MCT_IMPORT_LOG"):
    atexit.register(_dump)
"""


@pytest.mark.slow
def test_a_changed_module_reruns_exactly_the_stages_that_import_it_after_a_real_run(tmp_path):
    """The same on a real smoke-suite run (three seeds); also, every mct module a stage process actually imported
    (recorded at exit) is among the stage's computed code dependencies."""
    root = scratch_copy(tmp_path / "repo")
    hook, log = tmp_path / "hook", tmp_path / "imports"
    hook.mkdir()
    log.mkdir()
    (hook / "sitecustomize.py").write_text(IMPORT_LOG)
    ENV["PYTHONPATH"] = os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")])
    ENV["MCT_IMPORT_LOG"] = str(log)
    try:
        smk = completed_copy(root, real=True)
    finally:
        ENV["PYTHONPATH"] = ENV["PYTHONPATH"].split(os.pathsep, 1)[1]
        del ENV["MCT_IMPORT_LOG"]
    params = load_params(root / "params.yaml")
    by_args = {}  # a job's arguments from its subcommand on (what the stage process sees after argv[0])
    for j in stages.jobs(params):
        argv = j.command.split()
        by_args[tuple(argv[argv.index(stages.BY_NAME[j.stage].command):])] = j
    seen = 0
    for rec in (json.loads(p.read_text()) for p in log.glob("*.json")):
        job = by_args.get(tuple(rec["argv"][1:]))
        if job is None:
            continue  # snakemake, dvc and helpers
        command, deps = job.command, set(job.code)
        missing = set()
        for m in rec["modules"]:
            base = "/".join(m.split("."))
            if (root / f"{base}.py").is_file() or (root / base / "__init__.py").is_file():  # a module, not a name
                if f"{base}.py" not in deps and f"{base}/__init__.py" not in deps:
                    missing.add(m)
        assert not missing, (command, missing)
        seen += 1
    assert seen >= len(smk)
    check_module_changes(root, smk, each_job=True)
