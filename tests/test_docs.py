"""The commands README documents for a fresh clone, which need no data, run as typed; docs name no outside files."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.test_dag import REPO, env_for, no_slurm_probe, scratch_copy  # noqa: F401  (autouse fixture)

README = (REPO / "README.md").read_text()

# (command as README spells it, a line its output must contain); run in a scratch copy of the repository.
FRESH_CLONE_CHECKS = [
    ("snakemake -n --config suite=imagenet64", "wildcards: run=imagenet64_emd_k8"),
    ("snakemake -n --config suite=imagenet128", "wildcards: run=imagenet128_emd_k16"),
    ("dvc dag", "report"),
    ("python workflow/dvc_yaml.py --write", ""),
    ("python -m mct validate --suite imagenet64", "imagenet64_emd_k8"),
]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return scratch_copy(tmp_path_factory.mktemp("docs") / "repo")


@pytest.mark.parametrize(("command", "expect"), FRESH_CLONE_CHECKS)
def test_documented_fresh_clone_check_runs(clone, command, expect):
    assert command in README, f"README no longer documents {command!r}: update FRESH_CLONE_CHECKS"
    r = subprocess.run(shlex.split(command), cwd=clone, env=env_for(clone), capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert expect in out, out


def test_python_dash_m_mct_is_the_cli():
    r = subprocess.run(["python", "-m", "mct", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for stage in ("prepare", "distill", "report", "validate", "inspect-checkpoint"):
        assert stage in r.stdout


def test_docs_and_code_name_no_files_outside_the_repository():
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "mct").rglob("*.py"),
             *(REPO / "workflow").rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), REPO / "Snakefile"]
    for f in files:
        text = f.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, f
    for link in re.findall(r"\]\(([^)#]+)\)", README):  # README's relative links resolve in the repository
        if not re.match(r"https?://", link):
            assert (REPO / link).exists(), link


def test_method_page_states_the_papers_numbers():
    text = (REPO / "docs" / "method.md").read_text()
    for number in ("2.20", "6.0", "9.66"):
        assert number in text


def test_readme_result_blocks_are_the_report_pages_summaries():
    """Every README number of the suites' results is generated from the committed pages (whose Summary the report
    builds from the same records as its CSVs): a block that differs from its page fails here."""
    r = subprocess.run(["python", "scripts/readme_results.py", "--check"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert {"embedded", "skewed", "digits"} <= set(re.findall(r"<!-- results:([\w-]+) -->", README))


def test_a_hand_edited_readme_number_is_caught(tmp_path):
    """The check compares text: one changed digit inside a block makes the rendered README differ."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", REPO / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    block = mod.BLOCK.search(README)
    assert block is not None and mod.render(README) == README
    body = block.group("body")
    digit = re.search(r"\d", body.split("\n\n", 1)[1])
    assert digit is not None
    i = len(body.split("\n\n", 1)[0]) + 2 + digit.start()
    edited = body[:i] + str((int(body[i]) + 1) % 10) + body[i + 1:]
    tampered = README.replace(body, edited, 1)
    assert tampered != README and mod.render(tampered) == README


def run_snippet(clone: Path, first_line: str) -> str:
    """Run README's python block that starts with ``first_line`` (indented in a list item) in ``clone``; its last
    printed line (a digest)."""
    block = re.search(r"```python\n(\s*" + re.escape(first_line) + r".*?)```", README, re.S)
    assert block is not None, f"README's snippet '{first_line}' is gone"
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in block.group(1).splitlines())
    r = subprocess.run(["python", "-c", code], cwd=clone, env=env_for(clone), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_bring_your_own_teacher_snippet_runs_as_documented(clone):
    """README's snippets write a random-weight mct-format teacher, a random-weight EDM pickle of CIFAR-10's size and a
    tiny diffusers folder; pinned in a params file as README says, `mct teacher` takes the first two in (checking the
    pin), `mct teacher-eval` samples the first, the converted EDM teacher is bitwise the network the pickle holds,
    and the folder's printed pins pass the text2image world's check."""
    import hashlib

    import yaml

    digest = run_snippet(clone, "# bring your own teacher")
    assert digest == hashlib.sha256((clone / "my_teacher.pt").read_bytes()).hexdigest()
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    raw["teachers"]["mine"] = {"world": "toy2d", "kind": "fetch", "arch": "mlp",
                               "arch_kwargs": {"hidden": 128, "depth": 4}, "source": "my_teacher.pt",
                               "sha256": digest}
    (clone / "mine.yaml").write_text(yaml.safe_dump(raw))
    for argv in (["teacher", "--teacher", "mine"], ["prepare", "--world", "toy2d"], ["ref-stats", "--world", "toy2d"],
                 ["teacher-eval", "--teacher", "mine", "--num", "500"]):
        r = subprocess.run(["python", "-m", "mct", *argv, "--params", "mine.yaml", "--no-progress"], cwd=clone,
                           env=env_for(clone), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
    assert (clone / "runs" / "teachers" / "mine" / "teacher.pt").read_bytes() == (clone / "my_teacher.pt").read_bytes()
    assert json.loads((clone / "reports" / "teachers" / "mine.json").read_text())["modes_total"] == 25

    digest = run_snippet(clone, "# bring your own EDM teacher")
    raw["worlds"]["cifar10"] = {"kind": "imagenet", "resolution": 32, "num_classes": 10, "source": "cifar10.zip"}
    raw["teachers"]["cifar10_edm"] = {"world": "cifar10", "kind": "fetch", "arch": "edm", "source": "my_edm.pkl",
                                      "sha256": digest}
    (clone / "mine.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run(["python", "-m", "mct", "inspect-checkpoint", "my_edm.pkl"], cwd=clone, env=env_for(clone),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "EDMPrecond(SongUNet)" in r.stdout and digest in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["python", "-m", "mct", "teacher", "--teacher", "cifar10_edm", "--params", "mine.yaml",
                        "--no-progress"], cwd=clone, env=env_for(clone), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import torch

    from mct.checkpoint import load_edm_pickle
    from mct.config import load_params
    from mct.teacher import load_denoiser
    from mct.worlds.registry import make_world

    world = make_world("cifar10", load_params(clone / "mine.yaml").worlds["cifar10"])
    converted, _ = load_denoiser(clone / "runs" / "teachers" / "cifar10_edm" / "teacher.pt", world)
    original = load_edm_pickle(clone / "my_edm.pkl", digest)["ema"]
    x, sigma = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 2.0])
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    with torch.no_grad():
        assert torch.equal(converted(x, sigma, labels), original(x, sigma, labels))  # the same network, bitwise

    import ast

    from mct.nets.sd import check_sd_folder

    pins = ast.literal_eval(run_snippet(clone, "# bring your own diffusers teacher"))
    assert set(pins) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                         "text_encoder/model.safetensors"}
    assert check_sd_folder(clone / "my_sd", pins) == pins  # the printed pins are what the world's check accepts
