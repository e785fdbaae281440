"""The commands README documents for a fresh clone, which need no data, run as typed; docs name no outside files."""

from __future__ import annotations

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
