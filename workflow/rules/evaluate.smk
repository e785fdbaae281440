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
    threads: lambda wc: 8 if paper_scale(wc.world) else 2  # ImageNet: PNG decoding in DataLoader workers
    resources:
        mem_mb=lambda wc: eval_mem_mb(wc.world),
        runtime=lambda wc: eval_runtime(wc.world),
        gpu=lambda wc: eval_gpu(wc.world),
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
        mem_mb=lambda wc: eval_mem_mb(teacher_world(wc.teacher)),
        runtime=lambda wc: eval_runtime(teacher_world(wc.teacher)),
        gpu=lambda wc: eval_gpu(teacher_world(wc.teacher)),
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
        mem_mb=lambda wc: eval_mem_mb(P.experiment(wc.experiment).world),
        runtime=lambda wc: eval_runtime(P.experiment(wc.experiment).world),
        gpu=lambda wc: one_gpu_if_any(wc.experiment),
    shell:
        mct("evaluate --experiment {wildcards.experiment}")
