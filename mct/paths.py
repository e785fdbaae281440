"""Where every stage reads and writes: one function per artifact, shared by the CLI, Snakemake and DVC."""

from __future__ import annotations

from pathlib import Path

RUNS = Path("runs")
REPORTS = Path("reports")
# benchmark outputs the report shows (written by the benchmarks/ script of the same name)
REPORT_BENCHMARKS = tuple(REPORTS / "benchmarks" / name
                          for name in ("estep_fidelity", "toy2d_sweep", "toy2d_precision", "estep_chain",
                                       "toy2d_exact"))


def world_data(world: str, suffix: str = ".npz") -> Path:
    """A world's prepared data file; its class names the suffix (World.data_file: .npz arrays, .zip archives)."""
    return RUNS / "data" / f"{world}{suffix}"


def teacher_file(teacher: str) -> Path:
    """A trained teacher (mct checkpoint) or a fetched one (EDM pickle); loaders tell them apart by content."""
    return RUNS / "teachers" / teacher / "teacher.pt"


def run_name(exp: str, seed: int | None) -> str:
    """The name of one run of an experiment, which the per-run paths below take in place of the experiment:
    ``exp`` for an experiment without ``seeds`` (one run), ``exp/seed<k>`` for seed k. So seed 1 of toy2d_di
    writes runs/experiments/toy2d_di/seed1/{student_init.pt,distill/,samples.npz}, runs/work/toy2d_di/seed1 and
    reports/experiments/toy2d_di/seed1.json."""
    return exp if seed is None else f"{exp}/seed{seed}"


def student_init(exp: str) -> Path:
    return RUNS / "experiments" / exp / "student_init.pt"


def distill_dir(exp: str) -> Path:
    return RUNS / "experiments" / exp / "distill"


def work_dir(exp: str) -> Path:
    return RUNS / "work" / exp


def samples_file(exp: str) -> Path:
    return RUNS / "experiments" / exp / "samples.npz"


def experiment_metrics(exp: str) -> Path:
    return REPORTS / "experiments" / f"{exp}.json"


def feature_net(world: str) -> Path:
    return RUNS / "features" / world / "feature_net.pt"


def reference_stats(world: str) -> Path:
    return RUNS / "refstats" / f"{world}.npz"


def teacher_metrics(teacher: str) -> Path:
    return REPORTS / "teachers" / f"{teacher}.json"


def report_dir(suite: str, default_suite: str) -> Path:
    """A suite's report folder: reports/ for params.yaml's default suite, reports/suites/<suite>/ for any other, so
    that building one suite's page (`mct report --suite smoke`) never overwrites another suite's."""
    return REPORTS if suite == default_suite else REPORTS / "suites" / suite
