# Teachers: trained by a stage (toy2d MLP, digits conv net) or fetched and checked against a pinned sha256.


rule teacher:
    input:
        unpack(teacher_inputs),
    output:
        pattern(paths.teacher_file, "teacher"),
    params:
        settings=teacher_settings,
    log:
        str(LOGS / "teacher" / "{teacher}.log"),
    threads: 2
    resources:
        mem_mb=lambda wc: 16000 if P.teacher(wc.teacher).arch == "adm" else 8000,  # 422M params, converted
        runtime=240,
        gpu=0,
    shell:
        mct("teacher --teacher {wildcards.teacher}")
