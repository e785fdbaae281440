"""The GPU distillation benchmark runs the library's own distill loop; on a CPU its toy-size mode must work, so the
script a GPU session runs once is known to run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_distill():
    spec = importlib.util.spec_from_file_location("gpu_distill", ROOT / "benchmarks" / "gpu_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 50 s on the idle 2-core machine (three worlds, two K each)
def test_gpu_distill_benchmark_tiny_runs_every_world_and_reports_every_k(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_distill.py", "--tiny", "--ks", "1,2", "--batch", "2",
                        "--iterations", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [w["world"] for w in result["worlds"]] == ["cifar10", "imagenet64", "imagenet128"]
    for w in result["worlds"]:
        assert [row["K"] for row in w["rows"]] == [1, 2] and w["teacher_parameters"] > 0 and w["peak_rss_gib"] > 0
        assert all(row["sec_per_iter"] > 0 and row["timed_iterations"] == 1 for row in w["rows"])
    assert result["tiny"] is True and "| cifar10 |" in r.stdout  # the one table a GPU session copies


def test_readme_quotes_the_committed_real_size_record():
    """README's real-size table is the committed record rendered by the benchmark's own table()."""
    record = json.loads((ROOT / "reports" / "benchmarks" / "real_size_cpu.json").read_text())
    assert [w["world"] for w in record["worlds"]] == ["cifar10", "imagenet64", "imagenet128"]
    assert not record["tiny"] and all(w["teacher_parameters"] > 50_000_000 for w in record["worlds"])
    assert _gpu_distill().table(record) in (ROOT / "README.md").read_text()


def test_gpu_distill_benchmark_refuses_an_odd_batch():
    r = subprocess.run([sys.executable, "benchmarks/gpu_distill.py", "--tiny", "--batch", "3"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "even number" in r.stderr


def test_gpu_distill_benchmark_refuses_real_size_without_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real-size benchmark would run")
    r = subprocess.run([sys.executable, "benchmarks/gpu_distill.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no GPU" in r.stderr
