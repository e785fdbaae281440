"""Jobs through a real one-node Slurm cluster: plain sbatch, and a Snakemake workflow with the slurm profile."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    SlurmUnavailable,
    cluster_running,
    cluster_unavailable_reason,
    start_cluster,
    stop_cluster,
)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    reason = cluster_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    was_running = cluster_running()
    try:
        start_cluster()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    yield
    if not was_running:  # leave a cluster someone else started as it was
        stop_cluster()


def _squeue(*args: str) -> list[list[str]]:
    """Rows of `squeue --states=all --noheader`, split on '|'; finished jobs stay listed for MinJobAge."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", *args], capture_output=True, text=True, check=True
    ).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _wait_final(job_id: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _squeue("--jobs", job_id, "--format=%T")
        if rows and rows[0][0] in FINAL:
            return rows[0][0]
        time.sleep(0.2)
    raise AssertionError(f"Slurm job {job_id} did not finish within {timeout_s} s")


def test_sbatch_wrap_runs_and_writes_output(cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job_id = (
        subprocess.run(
            ["sbatch", "--parsable", "--output", str(out), "--wrap", "echo hello from job $SLURM_JOB_ID"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        .stdout.strip()
        .split(";")[0]
    )
    assert job_id.isdigit()
    assert _wait_final(job_id) == "COMPLETED"
    assert out.read_text() == f"hello from job {job_id}\n"


SNAKEFILE = """\
rule all:
    input: "shout.txt"

rule greet:
    output: "greet.txt"
    threads: 2
    resources: gpu=0, runtime=5, mem_mb=100
    shell: "echo hello > {output}; echo $SLURM_JOB_ID > {output}.jobid"

rule shout:
    input: "greet.txt"
    output: "shout.txt"
    shell: "tr a-z A-Z < {input} > {output}; echo $SLURM_JOB_ID > {output}.jobid"
"""


def test_snakemake_profile_runs_rules_as_slurm_jobs(cluster: None, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    # A copy named "slurm" in the working directory: that is where `--profile slurm` looks first.
    shutil.copytree(REPO / "workflow" / "profiles" / "slurm", tmp_path / "slurm")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "all", "--profile", "slurm"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "shout.txt").read_text() == "HELLO\n"

    # Each rule ran inside its own Slurm job: it saw a job id, and the executor kept a log per rule and job.
    ids = {rule: (tmp_path / f"{rule}.txt.jobid").read_text().strip() for rule in ("greet", "shout")}
    assert all(i.isdigit() for i in ids.values()) and ids["greet"] != ids["shout"]
    for rule, job_id in ids.items():
        assert (tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job_id}.log").is_file()

    # slurmctld saw both jobs finish, with the rule's own resources (5 min, 100 MB, 2 CPUs) or the
    # profile's defaults (60 min, 2000 MB, 1 CPU).
    rows = {r[0]: r[1:] for r in _squeue("--jobs", ",".join(ids.values()), "--format=%i|%T|%k|%l|%m|%C")}
    assert rows[ids["greet"]] == ["COMPLETED", "rule_greet", "5:00", "100M", "2"]
    assert rows[ids["shout"]] == ["COMPLETED", "rule_shout", "1:00:00", "2000M", "1"]


def _copy_repo(dest: Path) -> Path:
    """The tracked files of this checkout (what a user clones), without any run outputs."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(src.readlink())
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_smoke_suite_runs_on_slurm_with_the_repo_profile(cluster, tmp_path):
    """`snakemake --cores all --profile slurm --config suite=smoke`, typed at the repo root, finds the profile
    through the root `slurm` link, runs every stage as a Slurm job and produces the smoke suite's report."""
    repo = _copy_repo(tmp_path / "repo")
    snakemake = shutil.which("snakemake") or f"{sys.executable} -m snakemake"
    proc = subprocess.run(f"{snakemake} --cores all --profile slurm --config suite=smoke", shell=True, cwd=repo,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import json

    # smoke is not params.yaml's default suite: its page is reports/suites/smoke/ (paths.report_dir)
    metrics = json.loads((repo / "reports" / "suites" / "smoke" / "metrics.json").read_text())
    for name in ("smoke_toy2d_di", "smoke_toy2d_emd"):
        assert metrics[name]["status"] == "ok", metrics[name]
        assert metrics[name]["modes_total"] == 25
    page = repo / "reports" / "suites" / "smoke"
    assert (page / "index.html").exists()
    logs = repo / ".snakemake" / "slurm_logs"
    ran = {p.name for p in logs.iterdir()} if logs.exists() else set()
    for rule in ("rule_prepare", "rule_teacher", "rule_distill", "rule_evaluate", "rule_report"):
        assert rule in ran, sorted(ran)
    # Snakemake's own HTML report embeds the same figures.
    rep = subprocess.run(f"{snakemake} --config suite=smoke --report sm_report.html", shell=True, cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (repo / "sm_report.html").read_text(errors="replace")
    for fig in sorted((page / "figures").glob("*.png")):
        assert fig.stem in html, fig.name
