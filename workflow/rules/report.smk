# The suite's report: tables (the paper's beside ours), figures and an index, from the evaluator records,
# the samples and the training logs of every experiment in the suite.


rule report:
    input:
        experiments=[str(paths.experiment_metrics(e)) for e in EXPERIMENTS],
        samples=[str(paths.samples_file(e)) for e in EXPERIMENTS],
        distill=[str(paths.distill_dir(e)) for e in EXPERIMENTS],
        teachers=[str(paths.teacher_metrics(t)) for t in TEACHERS],
    output:
        metrics=REPORT_OUTPUTS["metrics"],
        index_md=REPORT_OUTPUTS["index_md"],
        index_html=REPORT_OUTPUTS["index_html"],
        tables=directory(REPORT_OUTPUTS["tables"]),
        # `snakemake --report report.html` embeds every PNG of the figures folder, with the same names.
        figures=report(directory(REPORT_OUTPUTS["figures"]), patterns=["{name}.png"],
                       caption="../report/figures.rst", category="Figures"),
    params:
        suite=SUITE,
        settings=report_settings(),
    log:
        str(LOGS / "report" / f"{SUITE}.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    shell:
        mct("report --suite {params.suite}")
