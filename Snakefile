# mct workflow: the same stages as dvc.yaml, read from params.yaml (the single source of truth).
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
# `mct <stage>`; its `params: settings` hold the resolved settings, so a changed experiment reruns.

configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    world=any_of(P.worlds),
    teacher=any_of(P.teachers),
    experiment=any_of(P.experiments),
    ext="npz|zip",


localrules:
    all,


rule all:
    default_target: True
    input:
        list(REPORT_OUTPUTS.values()),
        # the suite's own records too: the report files exist for every suite, these say which suite ran
        [str(paths.experiment_metrics(e)) for e in EXPERIMENTS],
        [str(paths.teacher_metrics(t)) for t in TEACHERS],


include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
