"""The pipeline's stage table: every stage declared once, for both engines.

Each :class:`Stage` names its `mct` subcommand, what it runs over (a world, a teacher, a run of an experiment or
the suite), and functions of the validated params giving an instance's inputs, outputs (mct/paths.py), the
params.yaml sections it reads, the settings Snakemake records and the resources a scheduler needs.
:func:`jobs` expands the table for a suite. From it:

  * workflow/dvc_yaml.py writes dvc.yaml (one stage per job; `--check` fails when the file is stale);
  * the Snakefile's rules (workflow/rules/stages.smk) are thin loops over the same table;
  * :func:`launcher` is the one place that decides how a command is launched (accelerate or the console script).

A stage's code dependencies are not listed by hand: :func:`code_deps` follows the import graph of the `mct.cli`
function that runs the stage (its own imports, those of the cli helpers it calls and of cli.py's module level),
then every import, module-level or inside a function, of each mct module reached, transitively. The world registry
names its built-in worlds as strings and imports one when it is looked up, so that graph reaches no world module;
a job adds the whole graph of the world(s) it runs (:func:`job_worlds`: its world, its teacher's or experiment's,
the suite's for the report), and the module-level graph of every world of params.yaml, whose classes params
validation (mct.config.parse_params) consults in every process. A module that may run is a dependency, so the list
errs towards a rerun, never towards a stale result. Both engines list these files (DVC as `deps`, Snakemake as
inputs, so a newer file reruns the job).

Torch-free: Snakemake imports this module while it parses the workflow.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mct import paths
from mct.config import DistillConfig, Params, check_nodes

PACKAGE = Path(__file__).resolve().parent  # the mct package these stages run
LOGS = paths.RUNS / "logs"


# --- how a command is launched -------------------------------------------------------------------------------


MAIN_PORT = 29500  # accelerate's default; a multi-node job adds SLURM_JOB_ID % 1000 (two jobs on one main node)


def launcher(distill: DistillConfig, multinode: bool = False, module: str = "mct.cli") -> str:
    """How `mct distill` starts: `accelerate launch` for GPUs or several processes, the console script for one
    CPU process, and for distill.nodes > 1 one `accelerate launch` per node through srun (:func:`node_launcher`).
    The one place both engines take the launch command from; the rest of the command line follows it.

    ``multinode`` forces the per-node form for nodes == 1 too (the tests run it on a one-node cluster); ``module``
    is what accelerate runs with -m (a test passes its own probe)."""
    problem = check_nodes(distill)
    if problem:
        raise ValueError(f"distill.{problem}")
    if multinode or distill.nodes > 1:
        return node_launcher(distill, module)
    if distill.num_processes > 1:  # --multi_gpu: N processes (torchrun) on GPU and CPU hosts; without it, CPU gets 1
        return f"accelerate launch --multi_gpu --num_processes {distill.num_processes} -m {module}"
    if distill.gpus > 0:
        return f"accelerate launch --num_processes 1 -m {module}"
    return "mct" if module == "mct.cli" else f"python -m {module}"


def node_command(distill: DistillConfig, module: str = "mct.cli") -> str:
    """What each node runs (bash, inside the Slurm step, the job's arguments as "$@"): one accelerate launcher
    starting num_processes / nodes processes, machine rank = the node's index in the allocation ($SLURM_NODEID),
    the main process (rank 0) on the allocation's first host, on a port fixed per job."""
    return (f"accelerate launch --multi_gpu --num_machines {distill.nodes} --machine_rank $SLURM_NODEID"
            ' --main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
            f" --main_process_port $(({MAIN_PORT} + SLURM_JOB_ID % 1000))"
            f' --num_processes {distill.num_processes} -m {module} "$@"')


def node_launcher(distill: DistillConfig, module: str = "mct.cli") -> str:
    """`srun` inside the job's allocation of distill.nodes nodes: one task per node, each running
    :func:`node_command` under `bash -c '...' mct`, so the arguments after it reach every node as "$@". Single
    quotes keep the $ expansions from the engine's shell (DVC's or Snakemake's) until each node's bash; nothing in
    it is a DVC ${...} interpolation. --kill-on-bad-exit: a node that fails stops the others."""
    inner = node_command(distill, module)
    assert "'" not in inner, inner
    return f"srun --nodes {distill.nodes} --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c '{inner}' mct"


# --- resources ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What a scheduler reserves for one job (Snakemake `threads`/`resources`, the Slurm profile's sbatch flags).
    threads, mem_mb and gpu are per node; a job on nodes > 1 gets them on each node (:func:`snakemake_resources`)."""

    threads: int = 1
    mem_mb: int = 4000
    runtime: int = 60  # minutes
    gpu: int = 0
    nodes: int = 1


CPUS_PER_GPU = 4  # data-free distillation: CPUs only launch kernels and write checkpoints
HOST_MEM_MB_PER_GPU = 24000  # per process: teacher, generator, score net, EMA and Adam states are staged on the host


def _world(params: Params, world: str):
    """The world's class instance (mct.worlds.registry): the stage table asks it, never its kind."""
    from mct.worlds.registry import make_world

    return make_world(world, params.worlds[world])


def has_feature_net(params: Params, world: str) -> bool:
    """Worlds that measure FID through a trained feature network (digits) run the `features` stage."""
    return _world(params, world).needs_feature_net


def eval_resources(params: Params, world: str, gpu: int | None = None, threads: int | None = None) -> Resources:
    """The evaluation stages' reservation, as the world states it (World.eval_needs: ImageNet's Inception over 50k
    samples or a whole training set wants a GPU, memory and hours); ``gpu`` and ``threads`` (default 2) override."""
    needs = _world(params, world).eval_needs
    return Resources(2 if threads is None else threads, needs.mem_mb, needs.runtime, needs.gpu if gpu is None else gpu)


def distill_resources(d: DistillConfig) -> Resources:
    """Per node (distill.gpus is per node, num_processes the total over d.nodes nodes)."""
    if d.gpus:
        return Resources(CPUS_PER_GPU * d.gpus, HOST_MEM_MB_PER_GPU * d.gpus, 24 * 60, d.gpus, d.nodes)
    return Resources(max(2, d.num_processes // d.nodes), 16000, 24 * 60, 0, d.nodes)


# The rule's `resources:` names (workflow/rules/stages.smk); a None value is left unset (Snakemake drops it).
SNAKEMAKE_RESOURCES = ("mem_mb", "runtime", "gpu", "nodes", "tasks", "tasks_per_gpu", "gres", "mpi")


def snakemake_resources(r: Resources) -> dict[str, int | str | None]:
    """Snakemake resources of a job, as snakemake-executor-plugin-slurm 2.x turns them into sbatch flags (threads
    become --cpus-per-task through the profile's `cpus_per_task: threads`). One node: mem_mb, runtime, gpu
    (--gpus), nothing else. Several nodes: --nodes=N --ntasks=N (one launcher per node, `tasks`), per node
    --cpus-per-task, --mem and --gres=gpu:G (`gpu` would be --gpus, a count over the whole job; tasks_per_gpu 0
    keeps the plugin from turning `tasks` into --ntasks-per-gpu), and `mpi`, which makes the plugin run the job's
    shell in the batch step instead of under `srun -n1`, so the launcher's own srun spans all nodes."""
    out: dict[str, int | str | None] = dict.fromkeys(SNAKEMAKE_RESOURCES)
    out.update(mem_mb=r.mem_mb, runtime=r.runtime)
    if r.nodes == 1:
        out["gpu"] = r.gpu
        return out
    out.update(nodes=r.nodes, tasks=r.nodes, mpi="srun")
    if r.gpu:
        out.update(gres=f"gpu:{r.gpu}", tasks_per_gpu=0)
    return out


# --- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One instance of a stage: everything either engine needs to run it."""

    stage: str
    name: str | None  # the world, teacher or run (paths.run_name); None for the suite's report
    command: str  # the full command line, without the log redirection
    inputs: dict[str, list[str]]  # artifact inputs by role
    outputs: dict[str, str]  # by role; a path without suffix is a directory
    params: list[str]  # params.yaml sections read (DVC `params:`)
    settings: str  # resolved settings as canonical JSON (Snakemake reruns a job when they change)
    resources: Resources
    code: tuple[str, ...]  # mct source files the command may run (job_code)


@dataclass(frozen=True)
class Stage:
    name: str  # rule / DVC stage name
    command: str  # `mct <command>`
    over: str  # wildcard: 'world', 'teacher', 'run', or '' for the suite
    names: Callable[[Params, str], list]  # instances in a suite
    args: Callable[[Params, Any], str]
    inputs: Callable[[Params, Any], dict[str, list[str]]]
    outputs: Callable[[Params, Any], dict[str, str]]
    params: Callable[[Params, Any], list[str]]
    settings: Callable[[Params, Any], tuple]
    resources: Callable[[Params, Any], Resources]
    launch: Callable[[Params, Any], str] = lambda p, n: "mct"
    append_log: bool = False  # distill: every attempt (a resumed run) keeps its log
    retries: int = 0


def _data(p: Params, world: str) -> str:
    return str(_world(p, world).data_file)


def _fnet(p: Params, world: str) -> list[str]:
    return [str(paths.feature_net(world))] if has_feature_net(p, world) else []


def _world_data(p: Params, world: str) -> dict[str, list[str]]:
    """The world's data file, for worlds whose distillation, sampling and evaluation read it (text2image's
    prompts); other worlds' jobs after `teacher` read none."""
    return {"data": [_data(p, world)]} if _world(p, world).training_reads_data else {}


def _run_data(p: Params, run: tuple[str, int | None]) -> dict[str, list[str]]:
    return _world_data(p, p.experiment(run[0]).world)


def _run_sections(p: Params, run: tuple[str, int | None]) -> list[str]:
    exp = p.experiment(run[0])
    return [f"experiments.{run[0]}"] + ([f"templates.{exp.template}"] if exp.template else []) + [f"worlds.{exp.world}"]


def _run_cfg(p: Params, run: tuple[str, int | None]):
    return p.run_config(*run)


def _rn(run: tuple[str, int | None]) -> str:
    return paths.run_name(*run)


def _run_args(run: tuple[str, int | None]) -> str:
    return f"--experiment {run[0]}" + ("" if run[1] is None else f" --run-seed {run[1]}")


def _teacher_world(p: Params, t: str) -> str:
    return p.teacher(t).world


# what the report stage writes into its suite's folder
DEFAULT_PAGE_ONLY = ("appendix_md", "appendix_html")
# the benchmarks whose committed outputs the report reads: the sections' (paths.REPORT_BENCHMARKS) and the timing
# benchmark behind the cost tables (mct.report_cost)
REPORT_INPUT_BENCHMARKS = (*paths.REPORT_BENCHMARKS, paths.REPORTS / "benchmarks" / "estep_cost")
REPORT_OUTPUTS = {"metrics": "metrics.json", "index_md": "index.md", "index_html": "index.html",
                  "appendix_md": "appendix.md", "appendix_html": "appendix.html",
                  "tables": "tables", "figures": "figures"}

STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepare", "world",
          names=lambda p, s: p.suite_worlds(s),
          args=lambda p, w: f"--world {w}",
          inputs=lambda p, w: {},
          outputs=lambda p, w: {"data": _data(p, w)},
          params=lambda p, w: [f"worlds.{w}"],
          settings=lambda p, w: (p.worlds[w],),
          resources=lambda p, w: Resources(1, 4000, 60)),
    Stage("teacher", "teacher", "teacher",
          names=lambda p, s: p.suite_teachers(s),
          args=lambda p, t: f"--teacher {t}",
          inputs=lambda p, t: {"data": [_data(p, _teacher_world(p, t))]},
          outputs=lambda p, t: {"teacher": str(paths.teacher_file(t))},
          params=lambda p, t: [f"teachers.{t}", f"worlds.{_teacher_world(p, t)}"],
          settings=lambda p, t: (p.teacher(t), p.worlds[_teacher_world(p, t)]),
          # ADM: 422M parameters, converted on the host
          resources=lambda p, t: Resources(2, 16000 if p.teacher(t).arch == "adm" else 8000, 240)),
    Stage("features", "features", "world",
          names=lambda p, s: [w for w in p.suite_worlds(s) if has_feature_net(p, w)],
          args=lambda p, w: f"--world {w}",
          inputs=lambda p, w: {"data": [_data(p, w)]},
          outputs=lambda p, w: {"features": str(paths.feature_net(w))},
          params=lambda p, w: [f"worlds.{w}"],
          settings=lambda p, w: (p.worlds[w],),
          resources=lambda p, w: Resources(2, 4000, 60)),
    Stage("ref_stats", "ref-stats", "world",
          names=lambda p, s: p.suite_worlds(s),
          args=lambda p, w: f"--world {w}",
          inputs=lambda p, w: {"data": [_data(p, w)], "features": _fnet(p, w)},
          outputs=lambda p, w: {"ref": str(paths.reference_stats(w))},
          params=lambda p, w: [f"worlds.{w}"],
          settings=lambda p, w: (p.worlds[w],),
          # ImageNet: PNG decoding in DataLoader workers
          resources=lambda p, w: eval_resources(p, w, threads=_world(p, w).eval_needs.ref_threads)),
    Stage("teacher_eval", "teacher-eval", "teacher",
          names=lambda p, s: p.suite_teachers(s),
          args=lambda p, t: f"--teacher {t}",
          inputs=lambda p, t: {"teacher": [str(paths.teacher_file(t))], "features": _fnet(p, _teacher_world(p, t)),
                               "ref": [str(paths.reference_stats(_teacher_world(p, t)))],
                               **_world_data(p, _teacher_world(p, t))},
          outputs=lambda p, t: {"metrics": str(paths.teacher_metrics(t))},
          params=lambda p, t: [f"teachers.{t}", f"worlds.{_teacher_world(p, t)}"],
          settings=lambda p, t: (p.teacher(t), p.worlds[_teacher_world(p, t)]),
          resources=lambda p, t: eval_resources(p, _teacher_world(p, t))),
    Stage("init_student", "init-student", "run",
          names=lambda p, s: p.suite_runs(s),
          args=lambda p, r: _run_args(r),
          inputs=lambda p, r: {"teacher": [str(paths.teacher_file(p.experiment(r[0]).teacher))]},
          outputs=lambda p, r: {"student": str(paths.student_init(_rn(r)))},
          params=_run_sections,
          settings=lambda p, r: (_run_cfg(p, r), p.worlds[p.experiment(r[0]).world]),
          resources=lambda p, r: Resources(1, 4000, 30)),
    # Resume state (checkpoint, RNG, running log) lives in paths.work_dir, passed as an argument and deliberately
    # not an output: both engines delete a stage's outputs before running it, never other paths, so a killed or
    # preempted job keeps its state and the next attempt resumes from the last checkpoint.
    Stage("distill", "distill", "run",
          names=lambda p, s: p.suite_runs(s),
          args=lambda p, r: f"{_run_args(r)} --work {paths.work_dir(_rn(r))}",
          inputs=lambda p, r: {"teacher": [str(paths.teacher_file(p.experiment(r[0]).teacher))],
                               "student": [str(paths.student_init(_rn(r)))], **_run_data(p, r)},
          outputs=lambda p, r: {"distill": str(paths.distill_dir(_rn(r)))},
          params=_run_sections,
          settings=lambda p, r: (_run_cfg(p, r), p.worlds[p.experiment(r[0]).world]),
          resources=lambda p, r: distill_resources(_run_cfg(p, r).distill),
          launch=lambda p, r: launcher(_run_cfg(p, r).distill),
          append_log=True, retries=1),
    Stage("sample", "sample", "run",
          names=lambda p, s: p.suite_runs(s),
          args=lambda p, r: _run_args(r),
          inputs=lambda p, r: {"distill": [str(paths.distill_dir(_rn(r)))], **_run_data(p, r)},
          outputs=lambda p, r: {"samples": str(paths.samples_file(_rn(r)))},
          params=_run_sections,
          settings=lambda p, r: (_run_cfg(p, r), p.worlds[p.experiment(r[0]).world]),
          # one process: one GPU when the experiment trains on GPUs
          resources=lambda p, r: Resources(2, 8000, 60, min(1, _run_cfg(p, r).distill.gpus))),
    Stage("evaluate", "evaluate", "run",
          names=lambda p, s: p.suite_runs(s),
          args=lambda p, r: _run_args(r),
          inputs=lambda p, r: {"samples": [str(paths.samples_file(_rn(r)))],
                               "distill": [str(paths.distill_dir(_rn(r)))],
                               "teacher": [str(paths.teacher_file(p.experiment(r[0]).teacher))],
                               "features": _fnet(p, p.experiment(r[0]).world),
                               "ref": [str(paths.reference_stats(p.experiment(r[0]).world))], **_run_data(p, r)},
          outputs=lambda p, r: {"metrics": str(paths.experiment_metrics(_rn(r)))},
          params=lambda p, r: _run_sections(p, r) + [f"teachers.{p.experiment(r[0]).teacher}"],
          settings=lambda p, r: (_run_cfg(p, r), p.worlds[p.experiment(r[0]).world],
                                 p.teacher(p.experiment(r[0]).teacher)),
          resources=lambda p, r: eval_resources(p, p.experiment(r[0]).world,
                                                gpu=min(1, _run_cfg(p, r).distill.gpus))),
    # The suite's report: tables, figures and an index from the evaluator records, samples and training logs of
    # every run of the suite (seeds aggregated by mct.aggregate).
    Stage("report", "report", "",
          names=lambda p, s: [s],
          args=lambda p, s: f"--suite {s}",
          inputs=lambda p, s: {
              "experiments": [str(paths.experiment_metrics(paths.run_name(*r))) for r in p.suite_runs(s)],
              "samples": [str(paths.samples_file(paths.run_name(*r))) for r in p.suite_runs(s)],
              "distill": [str(paths.distill_dir(paths.run_name(*r))) for r in p.suite_runs(s)],
              "teachers": [str(paths.teacher_metrics(t)) for t in p.suite_teachers(s)],
              # the toy2d panels draw the teacher's own samples
              "teacher_nets": [str(paths.teacher_file(t)) for t in p.suite_teachers(s)],
              # the E-step benchmarks' committed outputs, shown in their own sections when present
              "benchmarks": [str(d) for d in REPORT_INPUT_BENCHMARKS if Path(d).exists()]},
          # the default suite's page is reports/, any other suite's reports/suites/<suite>/ (paths.report_dir)
          # the default suite's page also has the benchmarks' appendix (mct.report.summarise_appendix)
          outputs=lambda p, s: {k: str(paths.report_dir(s, p.suite) / f) for k, f in REPORT_OUTPUTS.items()
                                if s == p.suite or k not in DEFAULT_PAGE_ONLY},
          params=lambda p, s: _unique([f"suites.{s}"] + [f"experiments.{e}" for e in p.suite_experiments(s)]
                                      + [f"templates.{t}" for t in sorted({p.experiment(e).template
                                                                          for e in p.suite_experiments(s)} - {""})]
                                      + [f"teachers.{t}" for t in p.suite_teachers(s)]
                                      + [f"worlds.{w}" for w in p.suite_worlds(s)]),
          # the report labels and groups experiments by their settings (ablations, reference rows)
          settings=lambda p, s: (*(p.experiment(e) for e in p.suite_experiments(s)),
                                 *(p.teacher(t) for t in p.suite_teachers(s)),
                                 *(p.worlds[w] for w in p.suite_worlds(s)), {"seeds": p.suite_runs(s)}),
          resources=lambda p, s: Resources(1, 4000, 30)),
)
BY_NAME = {s.name: s for s in STAGES}


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _json(parts: tuple) -> str:
    return json.dumps([dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in parts], sort_keys=True)


def instance_name(stage: Stage, name: Any) -> str | None:
    """The job's instance as both engines name it: world, teacher, run name (exp or exp/seed<k>), None (report)."""
    if stage.over == "run":
        return paths.run_name(*name)
    return name if stage.over else None


def job(params: Params, stage: Stage | str, name: Any, params_file: str = "params.yaml") -> Job:
    stage = BY_NAME[stage] if isinstance(stage, str) else stage
    cmd = (f"{stage.launch(params, name)} {stage.command} {stage.args(params, name)} "
           f"--params {params_file} --no-progress")
    return Job(stage.name, instance_name(stage, name), cmd, stage.inputs(params, name), stage.outputs(params, name),
               stage.params(params, name), _json(stage.settings(params, name)), stage.resources(params, name),
               job_code(params, stage, name))


def jobs(params: Params, suite: str | None = None, params_file: str = "params.yaml") -> list[Job]:
    """Every job of a suite (default: params.suite), stage by stage in table order."""
    suite = suite or params.suite
    return [job(params, st, n, params_file) for st in STAGES for n in st.names(params, suite)]


def log_file(stage: str, name: str | None, suite: str) -> Path:
    return LOGS / stage / f"{name if name is not None else suite}.log"


# --- code dependencies from the import graph -----------------------------------------------------------------


def _module_file(module: str, root: Path = PACKAGE) -> Path | None:
    """The source file of an mct module (a .py file or a package's __init__.py), None outside mct."""
    parts = module.split(".")
    if parts[0] != "mct":
        return None
    base = root.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(file: Path, root: Path = PACKAGE) -> str:
    rel = file.relative_to(root).with_suffix("")
    parts = ["mct", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(nodes: list[ast.AST], module: str, is_package: bool, root: Path = PACKAGE) -> set[str]:
    """mct modules imported anywhere under ``nodes`` (``from mct import paths`` names the module mct.paths)."""
    found: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # a submodule, when it is one
    return {m for m in found if _module_file(m, root) is not None}


def _module_level(nodes: list[ast.stmt]) -> list[ast.AST]:
    """The imports that run when a module is imported: all but those in function bodies (class bodies run) and
    in ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in (getattr(node.test, "id", None),
                                                             getattr(node.test, "attr", None)):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


@cache
def _module_imports(file: Path, module_level: bool = False) -> frozenset[str]:
    """mct modules ``file`` imports: anywhere, or (``module_level``) only those its import runs."""
    tree = ast.parse(file.read_text(), str(file))
    nodes = _module_level(tree.body) if module_level else [tree]
    return frozenset(_imports(nodes, _module_name(file), file.name == "__init__.py"))


def _closure(modules: set[str] | frozenset[str], root: Path = PACKAGE, module_level: bool = False) -> set[Path]:
    """Files of the modules, their parent packages' __init__.py and everything they import, transitively
    (``module_level``: only the imports that importing them runs)."""
    files: set[Path] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            f = _module_file(".".join(parts[:i]), root)
            if f is not None and f not in files:
                files.add(f)
                todo.extend(_module_imports(f, module_level))
    return files


def _repo_paths(files: set[Path]) -> tuple[str, ...]:
    return tuple(sorted(f"mct/{f.relative_to(PACKAGE).as_posix()}" for f in files))


def job_worlds(params: Params, stage: Stage, name: Any) -> list[str]:
    """The worlds (params.yaml names) a job runs: its own, its teacher's or experiment's, the suite's (report)."""
    if stage.over == "world":
        return [name]
    if stage.over == "teacher":
        return [_teacher_world(params, name)]
    if stage.over == "run":
        return [params.experiment(name[0]).world]
    return list(params.suite_worlds(name))


def job_code(params: Params, stage: Stage, name: Any) -> tuple[str, ...]:
    """A job's code: its command's import graph with that of the worlds it runs, and what importing every world
    module of params.yaml runs (params validation looks up every world's class, in every stage process)."""
    from mct.worlds.registry import world_module

    def modules(kinds) -> tuple[str, ...]:
        return tuple(sorted({world_module(k) for k in kinds}))

    used = modules(params.worlds[w].kind for w in job_worlds(params, stage, name))
    return code_deps(stage.command, used, modules(w.kind for w in params.worlds.values())) + world_files(used)


def world_files(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The source files of world modules outside mct that lie in the project (the working directory), as paths
    relative to it: a job reruns when its world's own file changes. A world installed elsewhere is not tracked
    (reinstalling it reruns nothing: `snakemake --forceall` or `dvc repro --force`, or keep the module in the
    project)."""
    import importlib.util

    out = []
    for module in modules:
        if module.split(".")[0] == "mct":
            continue
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and origin.is_relative_to(Path.cwd().resolve()):
            out.append(origin.relative_to(Path.cwd().resolve()).as_posix())
    return tuple(sorted(out))


@cache
def code_deps(command: str, worlds: tuple[str, ...] = (), checked: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The mct source files `mct <command>` may run, as repository paths (mct/...), sorted: the import graph of
    its cli function, the whole graph of the world modules ``worlds`` (mct.worlds.toy2d) it runs, and the
    module-level graph of the world modules ``checked`` (params validation imports them). A world module outside
    mct adds nothing here (:func:`world_files` adds its own file, where it lies in the project)."""
    files = set(_command_deps(command)) | _closure(set(worlds)) | _closure(set(checked), module_level=True)
    return _repo_paths(files)


@cache
def _command_deps(command: str) -> frozenset[Path]:
    """The files the import graph of `mct <command>`'s cli function reaches (no world module: the registry
    imports worlds by name, on lookup)."""
    cli = PACKAGE / "cli.py"
    tree = ast.parse(cli.read_text(), str(cli))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    handler = "cmd_" + command.replace("-", "_")
    if handler not in funcs:
        raise KeyError(f"mct.cli has no {handler}() for stage command {command!r}")
    reached, todo = set(), [handler]
    while todo:  # the handler and the cli helpers it calls
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo.extend(n.id for n in ast.walk(funcs[name]) if isinstance(n, ast.Name) and n.id in funcs)
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = _imports(top + [funcs[n] for n in reached], "mct.cli", False)
    return frozenset(_closure(modules) | {cli})  # cli.py runs, but only the imports of the functions above


def module_users(params: Params, module: str, suite: str | None = None) -> set[tuple[str, str | None]]:
    """(stage, instance) of every job whose code includes ``module`` (a repository path such as mct/emd.py)."""
    return {(j.stage, j.name) for j in jobs(params, suite) if module in j.code}
