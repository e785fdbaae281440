# mct workflow: the stages of mct/stages.py (the same table dvc.yaml is generated from), read from params.yaml.
#
#   snakemake --cores all                       the default suite's report (params.yaml `suite`)
#   snakemake --cores all --config suite=smoke  another suite
#   snakemake --cores all --profile slurm       one Slurm job per rule instance (workflow/profiles/slurm)
#   snakemake -n -p                             dry run: list the jobs and their commands, run nothing
#   snakemake --configfile other.yaml           another complete params file (every `mct` call reads it)
# Local defaults: --profile workflow/profiles/default (Snakemake does not pick it up by itself).
#
# params.yaml is validated (mct.config.load_params) while this file is read, so a bad key or an unknown
# suite stops everything with the message naming the key, before any job starts. Each rule calls one
# `mct <stage>`; a job reruns when its inputs, its code (the mct modules it imports) or its settings change.

from pathlib import Path


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        # the report, and the suite's own records too: the report files exist for every suite, these say which ran
        [p for (stage, _), j in JOBS.items() if stage in ("report", "evaluate", "teacher_eval")
         for p in j.outputs.values()],


include: "workflow/rules/stages.smk"
