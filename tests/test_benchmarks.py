"""The GPU distillation benchmark runs the library's own distill loop; on a CPU its toy-size mode must work, so the
script a GPU session runs once is known to run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 140 s measured on the shared 2-core machine
def test_gpu_distill_benchmark_tiny_runs_and_reports_every_k(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_distill.py", "--tiny", "--ks", "1,2", "--batch", "2",
                        "--iterations", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["K"] for row in result["rows"]] == [1, 2]
    assert all(row["sec_per_iter"] > 0 and row["timed_iterations"] == 1 for row in result["rows"])
    assert result["teacher_parameters"] > 0 and result["tiny"] is True


def test_gpu_distill_benchmark_refuses_real_size_without_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real-size benchmark would run")
    r = subprocess.run([sys.executable, "benchmarks/gpu_distill.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no GPU" in r.stderr
