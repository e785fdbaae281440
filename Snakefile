# mct workflow: the same stages as dvc.yaml, read from params.yaml (the single source of truth).
#
#   snakemake --cores all                                  the default suite's report (params.yaml `suite`)
#   snakemake --cores all --config suite=smoke             another suite
#   snakemake --cores all --profile workflow/profiles/slurm   one Slurm job per rule instance
#   snakemake -n                                           dry run: list the jobs, run nothing
#
# params.yaml is validated (mct.config.load_params) while this file is read, so a bad key or an unknown
# suite stops everything with the message naming the key, before any job starts. Each rule calls one
# `mct <stage>`; its `params: settings` hold the resolved settings, so a changed experiment reruns.

configfile: "params.yaml"


include: "workflow/rules/common.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        list(REPORT_OUTPUTS.values()),


include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
