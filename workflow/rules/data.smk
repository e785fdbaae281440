# World data: `mct prepare` (toy2d mixture samples, sklearn digits split, or the user's ImageNet folder).


rule prepare:
    output:
        WORLD_DATA,
    params:
        settings=world_settings,
    log:
        str(LOGS / "prepare" / "{world}.{ext}.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    shell:
        mct("prepare --world {wildcards.world}")
