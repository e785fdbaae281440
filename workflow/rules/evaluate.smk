# Measuring: the digits FID feature network, reference statistics, teacher and student metrics.


rule features:
    input:
        lambda wc: world_data(wc.world),
    output:
        pattern(paths.feature_net, "world"),
    params:
        settings=world_settings,
    log:
        str(LOGS / "features" / "{world}.log"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    shell:
        mct("features --world {wildcards.world}")


rule ref_stats:
    input:
        unpack(ref_stats_inputs),
    output:
        pattern(paths.reference_stats, "world"),
    params:
        settings=world_settings,
    log:
        str(LOGS / "ref_stats" / "{world}.log"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    shell:
        mct("ref-stats --world {wildcards.world}")


rule teacher_eval:
    input:
        unpack(teacher_eval_inputs),
    output:
        pattern(paths.teacher_metrics, "teacher"),
    params:
        settings=teacher_settings,
    log:
        str(LOGS / "teacher_eval" / "{teacher}.log"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    shell:
        mct("teacher-eval --teacher {wildcards.teacher}")


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        pattern(paths.experiment_metrics, "experiment"),
    params:
        settings=evaluate_settings,
    log:
        str(LOGS / "evaluate" / "{experiment}.log"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wc: one_gpu_if_any(wc.experiment),
    shell:
        mct("evaluate --experiment {wildcards.experiment}")
