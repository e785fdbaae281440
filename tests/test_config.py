"""params.yaml validation: each class of bad input stops with its own message naming the key, before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mct.config import ConfigError, parse_params, set_dotted


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("experiments.tiny_emd.distill.KK", 3, r"experiments\.tiny_emd\.distill\.KK: unknown key"),
        ("experiments.tiny_emd.distill.K", "eight", r"experiments\.tiny_emd\.distill\.K: expected an integer"),
        ("experiments.tiny_emd.distill.K", -1, r"experiments\.tiny_emd\.distill\.K: must be >= 0"),
        ("experiments.tiny_emd.distill.gamma_eps", -0.1, r"distill\.gamma_eps: must be >= 0"),
        ("experiments.tiny_emd.distill.space", "zx", r"distill\.space: unknown value 'zx'"),
        ("experiments.tiny_emd.distill.cancel_noise", "yes", r"distill\.cancel_noise: expected true/false"),
        ("experiments.tiny_emd.distill.betas_g", [0.0, 1.5], r"distill\.betas_g: Adam betas must be in \[0, 1\)"),
        ("experiments.tiny_emd.distill.betas_g", [0.9], r"distill\.betas_g: expected a list of 2 numbers"),
        ("experiments.tiny_emd.teacher", "nope", r"experiments\.tiny_emd\.teacher: unknown teacher 'nope'"),
        ("experiments.tiny_emd.template", "nope", r"experiments\.tiny_emd\.template: unknown template"),
        ("experiments.tiny_emd.student.init", "random", r"student\.init: unknown value 'random'"),
        ("experiments.tiny_emd.student.sigma_init", 0.0, r"student\.sigma_init: must be > 0"),
        ("teachers.toy2d_mlp.world", "mars", r"teachers\.toy2d_mlp\.world: unknown world 'mars'"),
        ("worlds.toy2d.kind", "cifar", r"worlds\.toy2d\.kind: unknown value 'cifar'"),
        ("suites.smoke", ["tiny_emd", "ghost"], r"suites\.smoke\[1\]: unknown experiment 'ghost'"),
        ("suite", "nightly", r"suite: unknown suite 'nightly'"),
        ("colour", "blue", r"colour: unknown top-level key"),
    ],
)
def test_bad_params_name_the_key(tiny_raw, key, value, message):
    set_dotted(tiny_raw, key, value)
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_raw)


def test_valid_params_resolve_templates(tiny_raw):
    params = parse_params(tiny_raw)
    di, emd = params.experiment("tiny_di"), params.experiment("tiny_emd")
    assert di.method_name == "diff_instruct" and emd.method_name == "emd"
    assert di.distill.K == 1 and emd.distill.K == 4 and emd.distill.batch_size == 64
    assert params.suite_teachers() == ["toy2d_mlp"]


def test_both_sigma_and_log_snr_is_refused(tiny_raw):
    set_dotted(tiny_raw, "experiments.tiny_emd.student.log_snr_init", -2.0)
    with pytest.raises(ConfigError, match=r"experiments\.tiny_emd\.student: give sigma_init or log_snr_init"):
        parse_params(tiny_raw)


def test_cli_bad_params_exit_nonzero_and_write_nothing(tiny_raw, tmp_path):
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.K", -3)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(tiny_raw))
    out = tmp_path / "student.pt"
    proc = subprocess.run([sys.executable, "-m", "mct.cli", "init-student", "--params", str(pfile),
                           "--experiment", "tiny_emd", "--teacher", str(tmp_path / "t.pt"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "experiments.tiny_emd.distill.K: must be >= 0" in proc.stderr
    assert list(tmp_path.iterdir()) == [pfile]


def test_cli_override_is_validated(tiny_raw, tmp_path):
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(tiny_raw))
    ok = subprocess.run([sys.executable, "-m", "mct.cli", "validate", "--params", str(pfile), "-S",
                         "experiments.tiny_emd.distill.K=16"], capture_output=True, text=True)
    assert ok.returncode == 0 and "tiny_emd" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mct.cli", "validate", "--params", str(pfile), "-S",
                          "experiments.tiny_emd.distill.space=q"], capture_output=True, text=True)
    assert bad.returncode == 2 and "distill.space: unknown value 'q'" in bad.stderr


def test_repo_params_yaml_is_valid():
    from pathlib import Path

    from mct.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.suite in params.suites
    for suite in params.suites:
        assert params.suite_experiments(suite)
