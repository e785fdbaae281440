"""The text-to-image iteration benchmark (benchmarks/t2i_iteration.py): the real-size SD v1.5 UNet's parameter count
and memory plan without memory (meta device), and a toy-size CPU run whose counted UNet passes per iteration must
equal the formula exactly, so the script a GPU session runs once is known to run and to count right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/t2i_iteration.py"
SD15_PARAMETERS = 859_520_964


def _run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_count_only_prints_the_sd15_parameter_count_and_memory_plan(tmp_path):
    r = _run("--count-only", "--out", str(tmp_path))
    n = SD15_PARAMETERS
    trained, teacher = 2 * 16 * n, 2 * n  # generator + score: fp32 weights, grads, Adam m and v; teacher bf16
    total_gb = (trained + teacher) / 1e9
    assert "UNet parameters: 859,520,964" in r.stdout
    assert f"{trained / 1e9:.2f} GB" in r.stdout and f"{teacher / 1e9:.2f} GB" in r.stdout
    assert f"total {total_gb:.2f} GB ({(trained + teacher) / 2**30:.2f} GiB)" in r.stdout
    assert 28.0 < total_gb < 30.0  # about 28-29 GB before activations
    plan = json.loads((tmp_path / "memory_plan.json").read_text())["memory_plan"]
    assert plan["parameters_per_unet"] == n
    assert plan["generator_and_score_bytes"] == trained and plan["teacher_bytes"] == teacher
    assert plan["total_bytes"] == trained + teacher and plan["total_gb"] == total_gb
    assert "859,520,964" in (tmp_path / "memory_plan.md").read_text()


def _expected(K: int, b: int) -> dict:
    # the E-step moves z (eps_z, gamma_z > 0): each step is a generator forward + VJP, a score pass and one guided
    # teacher call on 2B inputs; the score step draws one generator sample; the M-step is a generator forward
    per_net = {"generator": {"calls": K + 2, "samples": (K + 2) * b, "backward": K + 1},
               "score": {"calls": K + 1, "samples": (K + 1) * b, "backward": 1},
               "teacher": {"calls": K, "samples": 2 * K * b, "backward": 0}}
    return {"per_network": per_net, "calls": 3 * K + 3, "forward_passes": 4 * K + 3, "backward_passes": K + 2}


def test_tiny_cpu_run_reports_every_k_and_counts_the_unet_passes_of_the_formula(tmp_path):
    b = 2
    _run("--tiny", "--K", "1", "2", "--iters", "1", "--batch", str(b), "--device", "cpu", "--out", str(tmp_path),
         "--threads", "1", "--no-progress")
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["tiny"] is True and result["batch"] == b and result["text_embeddings"] == [b, 77, 32]
    n = result["unet_parameters"]
    assert result["memory_plan"]["total_bytes"] == 34 * n
    assert [row["K"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        K = row["K"]
        assert row["sec_per_iter_mean"] > 0 and row["sec_per_iter_min"] > 0 and row["timed_iterations"] == 1
        assert row["peak_gpu_mem_gib"] is None and row["peak_rss_gib"] > 0
        want = _expected(K, b)
        counted = row["unet_passes_counted"]
        assert counted["per_network"] == want["per_network"]
        for key in ("calls", "forward_passes", "backward_passes"):
            assert counted[key] == want[key] and isinstance(counted[key], int), (K, key, counted[key])
            assert row["unet_passes_expected"][key] == want[key]
        assert counted["same_every_iteration"] is True and row["passes_match"] is True
    md = (tmp_path / "results.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md and "4K + 3" in md
