# One rule per stage of mct/stages.py (the table dvc.yaml is generated from): the rule reads the job's inputs, its
# code (the mct modules its command imports, so a changed module reruns exactly the jobs that run it), the
# command line with its launcher, the resolved settings (a changed setting reruns the job) and its resources.
# Resume state of distill lives in paths.work_dir, which is not an output: Snakemake deletes a failed job's
# outputs and clears output folders before a job starts, but never touches other paths, so a killed job resumes.


def _inputs(stage):
    job = job_of(stage)
    return lambda wc: {**job(wc).inputs, "code": list(job(wc).code)}


def _outputs(stage, patterns):
    out = {}
    for role, path in patterns.items():
        out[role] = path if Path(path).suffix else directory(path)  # paths without a suffix are folders
    if stage.name == "report":  # `snakemake --report report.html` embeds every PNG of the figures folder
        out["figures"] = report(out["figures"], patterns=["{name}.png"], caption="../report/figures.rst",
                                category="Figures")
    return out


def _resources(stage):
    """mem_mb, runtime, gpu and, for a job on several nodes, the Slurm plugin's nodes/tasks/gres/mpi
    (stages.snakemake_resources; a key a job leaves unset is None, which Snakemake drops)."""
    job = job_of(stage)
    return {k: (lambda wc, k=k: stages.snakemake_resources(job(wc).resources)[k]) for k in stages.SNAKEMAKE_RESOURCES}


def _log(stage):
    return str(stages.log_file(stage.name, "{" + stage.over + "}" if stage.over else None, SUITE))


for _stage in stages.STAGES:
    for _rule, _patterns, _names in rule_groups(_stage):

        rule:
            name: _rule
            input:
                unpack(_inputs(_stage)),
            output:
                **_outputs(_stage, _patterns),
            params:
                cmd=lambda wc, job=job_of(_stage): job(wc).command,
                settings=lambda wc, job=job_of(_stage): job(wc).settings,
            log:
                _log(_stage),
            wildcard_constraints:
                **({_stage.over: any_of(_names)} if _stage.over else {}),
            retries: _stage.retries
            threads: lambda wc, job=job_of(_stage): job(wc).resources.threads
            resources:
                **_resources(_stage),
            shell:
                "{params.cmd} >> {log} 2>&1" if _stage.append_log else "{params.cmd} > {log} 2>&1"
