# Helpers shared by the rule files: the validated params and the suite's jobs from the stage table (mct/stages.py).
#
# Every path, command, launcher, input, params section and resource of a job comes from mct.stages, which also
# writes dvc.yaml (workflow/dvc_yaml.py): the two engines cannot drift apart, and tests/test_dag.py checks it.

import json
import re

from mct import stages
from mct.config import ConfigError, Params, load_params

# The params file every `mct` call reads: the last --configfile given on the command line, else the
# Snakefile's `configfile:`. It is read whole by load_params and replaces params.yaml: Snakemake's own merge of
# the two into `config` is not used. `--config` may change `suite` only.
PARAMS_FILE = str((list(workflow.overwrite_configfiles) or list(workflow.configfiles))[-1])


def _validated_params() -> Params:
    """load_params on PARAMS_FILE with the chosen suite; raise ConfigError (naming the key) before any job."""
    given = dict(workflow.config_settings.config or {})  # what --config set, nothing from any file
    overrides = [f"suite={json.dumps(given['suite'])}"] if "suite" in given else []  # `--config suite=`: refused
    try:
        others = sorted(k for k in given if k != "suite")
        if others:
            raise ConfigError(f"{others[0]}: `--config` may set only `suite` (edit the params file, or pass a "
                              f"complete one with --configfile)")
        params = load_params(PARAMS_FILE, overrides)
        params.suite_experiments()  # an unknown suite fails here
    except ConfigError as e:
        raise ConfigError(f"invalid params ({PARAMS_FILE}): {e}") from None
    return params


# The chosen suite runs, but P keeps the params file's own default suite: a suite's page folder
# (paths.report_dir) depends on that default, so `--config suite=smoke` and `mct report --suite smoke` agree.
SUITE = _validated_params().suite
P = load_params(PARAMS_FILE)
JOBS = {(j.stage, j.name): j for j in stages.jobs(P, SUITE, PARAMS_FILE)}


def any_of(names) -> str:
    """Regex matching exactly the given names (so a wildcard never matches a path of another rule)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def as_pattern(path: str, name: str | None, wildcard: str) -> str:
    """A job's path with its instance name, where it stands as whole path components (a file name may add a
    suffix), replaced by the rule's wildcard: runs/experiments/toy2d_di/seed1/distill -> runs/experiments/{run}/distill
    for the run toy2d_di/seed1."""
    if name is None:
        return path
    return re.sub(r"(?:(?<=/)|^)" + re.escape(name) + r"(?=[/.]|$)", "{" + wildcard + "}", path)


def rule_groups(stage):
    """The stage's jobs grouped by output pattern, one Snakemake rule each: (rule name, patterns, instances).
    One group, named after the stage, unless a suite mixes patterns (e.g. .npz and .zip world data)."""
    groups: dict[tuple, list] = {}
    for (name, inst), j in JOBS.items():
        if name == stage.name:
            key = tuple((k, as_pattern(v, inst, stage.over)) for k, v in j.outputs.items())
            groups.setdefault(key, []).append(inst)
    return [(stage.name if i == 0 else f"{stage.name}_{i + 1}", dict(key), insts)
            for i, (key, insts) in enumerate(groups.items())]


def job_of(stage):
    """wildcards -> the job of that instance (the report has no wildcard: the suite's one report)."""
    return lambda wc: JOBS[(stage.name, wc.get(stage.over) if stage.over else None)]
