# The student: initialise from the teacher, EM-distill (resumable), draw one-step samples.


rule init_student:
    input:
        teacher=experiment_teacher,
    output:
        pattern(paths.student_init, "experiment"),
    params:
        settings=experiment_settings,
    log:
        str(LOGS / "init_student" / "{experiment}.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    shell:
        mct("init-student --experiment {wildcards.experiment}")


# Resume state (checkpoint, RNG, running log) lives in paths.work_dir, passed as a param and deliberately
# not an output: Snakemake deletes a failed job's outputs and clears the output folder before a job starts,
# but never touches a path that is not an output (nor would `shadow:`, which must not be used here, keep it).
# So a killed or preempted job keeps its state, and the next attempt resumes from the last checkpoint: a
# retry (`retries: 1`, or the profile's), Slurm's requeue, or a later run with --rerun-incomplete.
rule distill:
    input:
        teacher=experiment_teacher,
        student=pattern(paths.student_init, "experiment"),
    output:
        directory(pattern(paths.distill_dir, "experiment")),
    params:
        settings=experiment_settings,
        work=lambda wc: str(paths.work_dir(wc.experiment)),
        launch=lambda wc: distill_launcher(wc.experiment),
    log:
        str(LOGS / "distill" / "{experiment}.log"),
    retries: 1
    threads: lambda wc: distill_threads(wc.experiment)
    resources:
        mem_mb=lambda wc: distill_mem_mb(wc.experiment),
        runtime=24 * 60,
        gpu=lambda wc: experiment_gpus(wc.experiment),
    shell:  # the log is appended to, so it keeps every attempt
        mct("distill --experiment {wildcards.experiment} --work {params.work}", "{params.launch}", ">>")


rule sample:
    input:
        pattern(paths.distill_dir, "experiment"),
    output:
        pattern(paths.samples_file, "experiment"),
    params:
        settings=experiment_settings,
    log:
        str(LOGS / "sample" / "{experiment}.log"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=lambda wc: one_gpu_if_any(wc.experiment),
    shell:
        mct("sample --experiment {wildcards.experiment}")
