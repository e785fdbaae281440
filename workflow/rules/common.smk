# Helpers shared by the rule files. The validated params, artifact paths as wildcard patterns, input functions.
#
# Paths come from mct/paths.py (called with "{wildcard}" placeholders), so the CLI, Snakemake and the
# DAG test agree by construction; dvc.yaml spells the same paths out and tests/test_dag.py compares them.

import dataclasses
import json
import re

from mct import paths
from mct.config import ConfigError, Params, load_params
from snakemake.common.configfile import load_configfile

# The params file every `mct` call reads: the last --configfile given on the command line, else the
# Snakefile's `configfile:`. Snakemake merges that file into `config`; `--config` may change `suite` only.
PARAMS_FILE = str((list(workflow.overwrite_configfiles) or list(workflow.configfiles))[-1])


def _validated_params() -> Params:
    """load_params on PARAMS_FILE with the chosen suite; raise ConfigError (naming the key) before any job."""
    suite = config.get("suite")
    overrides = [f"suite={json.dumps(suite)}"] if "suite" in config else []  # `--config suite=` gives None: refused
    try:
        params = load_params(PARAMS_FILE, overrides)
        on_disk = load_configfile(PARAMS_FILE)  # parsed as Snakemake parsed it into `config`
        changed = sorted(k for k in set(config) | set(on_disk) if k != "suite" and config.get(k) != on_disk.get(k))
        if changed:
            raise ConfigError(f"{changed[0]}: differs from {PARAMS_FILE}; `--config` may set only `suite` "
                              f"(edit the params file, or pass a complete one with --configfile)")
    except ConfigError as e:
        raise ConfigError(f"invalid params ({PARAMS_FILE}): {e}") from None
    return params


P = _validated_params()
SUITE = P.suite
EXPERIMENTS = P.suite_experiments()
TEACHERS = P.suite_teachers()
LOGS = paths.RUNS / "logs"


def any_of(names) -> str:
    """Regex matching exactly the given names (so a wildcard never matches a path of another rule)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def pattern(path_fn, *wildcards: str) -> str:
    """An artifact path of mct/paths.py with wildcards in place of names, e.g. runs/teachers/{teacher}/teacher.pt."""
    return str(path_fn(*(f"{{{w}}}" for w in wildcards)))


# paths.world_data picks the suffix by the world's kind (.npz, or .zip for imagenet); {ext} lets one rule make
# either, and the input functions below always ask for the exact file paths.world_data names.
WORLD_DATA = str(paths.world_data("{world}", "toy2d").with_suffix(".{ext}"))

# What `mct report` writes (mct/report.py).
REPORT_OUTPUTS = {
    "metrics": str(paths.metrics_file()),
    "index_md": str(paths.report_index()),
    "index_html": str(paths.REPORTS / "index.html"),
    "tables": str(paths.REPORTS / "tables"),
    "figures": str(paths.REPORTS / "figures"),
}


def mct(command: str, launch: str = "mct", redirect: str = ">") -> str:
    """Shell line of one `mct` stage reading PARAMS_FILE; stdout and stderr go to the rule's log."""
    return f"{launch} {command} --params {PARAMS_FILE} --no-progress {redirect} {{log}} 2>&1"


# --- per-name facts --------------------------------------------------------------------------------------


def world_data(world: str) -> str:
    return str(paths.world_data(world, P.worlds[world].kind))


def feature_nets(world: str) -> list[str]:
    """The trained FID feature network, for digits worlds only (others measure in their own space)."""
    return [str(paths.feature_net(world))] if P.worlds[world].kind == "digits" else []


def settings(*parts) -> str:
    """The resolved settings a job depends on, as canonical JSON: Snakemake reruns the job when it changes
    (`--rerun-triggers params`, on by default), including changes of a template or of a default in mct/config.py."""
    return json.dumps([dataclasses.asdict(p) for p in parts], sort_keys=True)


def distill_launcher(experiment: str) -> str:
    """accelerate for GPU or multi-process runs; the plain console script for one CPU process.
    (workflow/dvc_vars.py applies the same rule for dvc.yaml; tests/test_dag.py checks both.)"""
    d = P.experiment(experiment).distill
    if d.num_processes > 1:  # --multi_gpu: N processes (torchrun) on GPU and CPU hosts; without it a CPU host gets 1
        return f"accelerate launch --multi_gpu --num_processes {d.num_processes} -m mct.cli"
    if d.gpus > 0:
        return "accelerate launch --num_processes 1 -m mct.cli"
    return "mct"


def experiment_gpus(experiment: str) -> int:
    return P.experiment(experiment).distill.gpus


CPUS_PER_GPU = 4  # data-free distillation: CPUs only launch kernels and write checkpoints
HOST_MEM_MB_PER_GPU = 24000  # per process: teacher, generator, score net, EMA and Adam states are staged on the host


def distill_threads(experiment: str) -> int:
    d = P.experiment(experiment).distill
    return CPUS_PER_GPU * d.gpus if d.gpus else max(2, d.num_processes)


def distill_mem_mb(experiment: str) -> int:
    d = P.experiment(experiment).distill
    return HOST_MEM_MB_PER_GPU * d.gpus if d.gpus else 16000


def one_gpu_if_any(experiment: str) -> int:
    """Sampling and evaluation run in one process: one GPU when the experiment trains on GPUs."""
    return min(1, experiment_gpus(experiment))


def paper_scale(world: str) -> bool:
    """ImageNet worlds: Inception over 50k samples or the whole training set wants a GPU, memory and hours."""
    return P.worlds[world].kind == "imagenet"


def eval_gpu(world: str) -> int:
    return 1 if paper_scale(world) else 0


def eval_mem_mb(world: str) -> int:
    return 32000 if paper_scale(world) else 8000


def eval_runtime(world: str) -> int:
    return 720 if paper_scale(world) else 120


def teacher_world(teacher: str) -> str:
    return P.teacher(teacher).world


# --- input functions (wildcards -> input files) ----------------------------------------------------------


def teacher_inputs(wc) -> dict[str, str]:
    return {"data": world_data(P.teacher(wc.teacher).world)}


def ref_stats_inputs(wc) -> dict:
    return {"data": world_data(wc.world), "features": feature_nets(wc.world)}


def teacher_eval_inputs(wc) -> dict:
    world = P.teacher(wc.teacher).world
    return {"teacher": str(paths.teacher_file(wc.teacher)), "features": feature_nets(world),
            "ref": str(paths.reference_stats(world))}


def experiment_teacher(wc) -> str:
    return str(paths.teacher_file(P.experiment(wc.experiment).teacher))


def evaluate_inputs(wc) -> dict:
    exp = P.experiment(wc.experiment)
    return {"samples": str(paths.samples_file(wc.experiment)), "distill": str(paths.distill_dir(wc.experiment)),
            "teacher": str(paths.teacher_file(exp.teacher)), "features": feature_nets(exp.world),
            "ref": str(paths.reference_stats(exp.world))}


def world_settings(wc) -> str:
    return settings(P.worlds[wc.world])


def teacher_settings(wc) -> str:
    t = P.teacher(wc.teacher)
    return settings(t, P.worlds[t.world])


def experiment_settings(wc) -> str:
    exp = P.experiment(wc.experiment)
    return settings(exp, P.worlds[exp.world])


def evaluate_settings(wc) -> str:
    exp = P.experiment(wc.experiment)
    return settings(exp, P.worlds[exp.world], P.teacher(exp.teacher))


def report_settings() -> str:
    """The report labels and groups experiments by their settings (ablations, reference rows)."""
    return settings(*(P.experiment(e) for e in EXPERIMENTS), *(P.teacher(t) for t in TEACHERS),
                    *(P.worlds[w] for w in P.suite_worlds()))
