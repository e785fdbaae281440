"""Bad inputs are refused cleanly (issue 11, findings 5 and 6): each class of malformed params or data gets its own
case and its expected message; params problems stop `mct` with exit status 2 naming the dotted key or the file.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from mct import config
from mct.cli import main
from mct.worlds.imagenet import DatasetError, ImageSource, prepare_imagenet

from .conftest import TINY_RAW


def _raw() -> dict:
    raw = copy.deepcopy(TINY_RAW)
    raw["worlds"]["imnet"] = {"kind": "imagenet", "resolution": 64, "source": "in.zip"}
    raw["teachers"]["imnet_edm"] = {"world": "imnet", "kind": "fetch", "arch": "edm", "source": "t.pkl"}
    return raw


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_raw()))
    return path


def _validate(capsys, params: Path | str, *overrides: str) -> tuple[int, str]:
    argv = ["validate", "--params", str(params)]
    for o in overrides:
        argv += ["-S", o]
    code = main(argv)
    return code, capsys.readouterr().err


E = "experiments.tiny_emd"
# (override, expected message after "mct: invalid params: "): one per class of bad value the campaign found.
BAD_VALUES = [
    # infinity passed every `> 0` check (22 values); these are the ones the issue names, plus a teacher's lr
    (f"{E}.distill.lr_g=.inf", f"{E}.distill.lr_g: must be a finite number (got inf)"),
    (f"{E}.distill.gamma_eps=.inf", f"{E}.distill.gamma_eps: must be a finite number"),
    (f"{E}.distill.z_step_ref=.inf", f"{E}.distill.z_step_ref: must be a finite number"),
    (f"{E}.student.sigma_init=.inf", f"{E}.student.sigma_init: must be a finite number"),
    (f"{E}.distill.dsm_sigma.p_std=.inf", f"{E}.distill.dsm_sigma.p_std: must be a finite number"),
    ("worlds.toy2d.spacing=.inf", "worlds.toy2d.spacing: must be a finite number"),
    ("teachers.toy2d_mlp.lr=.inf", "teachers.toy2d_mlp.lr: must be a finite number"),
    (f"{E}.distill.grad_clip=-.inf", f"{E}.distill.grad_clip: must be a finite number"),
    # NaN was unchecked where no range check existed
    (f"{E}.distill.dsm_sigma.p_mean=.nan", f"{E}.distill.dsm_sigma.p_mean: must be a finite number (got nan)"),
    (f"{E}.student.log_snr_init=.nan", f"{E}.student.log_snr_init: must be a finite number"),
    (f"{E}.distill.seed=.nan", f"{E}.distill.seed: expected an integer"),
    # no upper bounds: 10^9 hung or failed to allocate later
    (f"{E}.distill.K=1000000000", f"{E}.distill.K: must be <= {config.MAX_K:,}"),
    (f"{E}.distill.batch_size=1000000000", f"{E}.distill.batch_size: must be <= {config.MAX_BATCH:,}"),
    (f"{E}.distill.iterations=1000000000", f"{E}.distill.iterations: must be <= {config.MAX_ITERATIONS:,}"),
    (f"{E}.eval.num_samples=1000000000", f"{E}.eval.num_samples: must be <= {config.MAX_SAMPLES:,}"),
    (f"{E}.distill.num_processes=100000", f"{E}.distill.num_processes: must be <= {config.MAX_PROCESSES:,}"),
    ("teachers.toy2d_mlp.batch_size=1000000000", f"teachers.toy2d_mlp.batch_size: must be <= {config.MAX_BATCH:,}"),
    ("teachers.toy2d_mlp.arch_kwargs.hidden=1000000000",
     f"teachers.toy2d_mlp.arch_kwargs.hidden: must be <= {config.MAX_ARCH_INT:,} in magnitude"),
    ("teachers.toy2d_mlp.arch_kwargs.scale=.nan", "teachers.toy2d_mlp.arch_kwargs.scale: must be a finite number"),
    # checks that failed later, without the key
    ("worlds.imnet.max_images=-5", "worlds.imnet.max_images: must be >= 0 (got -5)"),
    ("worlds.imnet.resolution=48", "worlds.imnet.resolution: the U-Nets take a power of two >= 8"),
    ("teachers.imnet_edm.sha256=abc123", "teachers.imnet_edm.sha256: must be 64 hex digits"),
    # -S values and keys that are not what they must be
    (f"{E}.distill.K=[1", f"{E}.distill.K: the value '[1' (-S) is not valid YAML"),
    ("suites.smoke.extra=1", "suites.smoke.extra: cannot set a key below a non-mapping"),
    ("=3", "<empty>: not a dotted key"),
    # the key where the user wrote it: a typo under the template is the template's, not every experiment's
    ("templates.toy2d.distill.gama_z=1", "templates.toy2d.distill.gama_z: unknown key; allowed keys:"),
    ("templates.toy2d.distill.K=-1", "templates.toy2d.distill.K: must be >= 0 (got -1) (in experiment"),
    # an override below an entry that does not exist is a typo of its name, not a new entry
    (f"{E}5.distill.K=4", f"{E}5.distill.K: unknown experiment 'tiny_emd5'; known: ['tiny_di', 'tiny_emd']"),
    ("teachers.toy2d_mpl.lr=0.1",
     "teachers.toy2d_mpl.lr: unknown teacher 'toy2d_mpl'; known: ['imnet_edm', 'toy2d_mlp']"),
    ("templates.toy2dd.distill.K=4", "templates.toy2dd.distill.K: unknown template 'toy2dd'; known: ['toy2d']"),
    ("suite=", "suite: empty; name one of the suites"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_exits_2_naming_the_key(capsys, params_file, override, expected):
    code, err = _validate(capsys, params_file, override)
    assert code == 2 and f"mct: invalid params: {expected}" in err, err


def test_good_params_still_validate(capsys, params_file):
    code, _ = _validate(capsys, params_file, "teachers.imnet_edm.sha256=" + "ab" * 32, "worlds.imnet.max_images=0")
    assert code == 0


# (file contents or a callable making the path, expected message): one per class of malformed params file.
BAD_FILES = {
    "list": (b"- suite\n- worlds\n", "must hold a mapping at the top level, not a list"),
    "scalar": (b"42\n", "must hold a mapping at the top level, not a int"),
    "empty": (b"", "is empty"),
    "comments-only": (b"# nothing\n", "is empty"),
    "yaml-error": (b"suite: [smoke\n", "is not valid YAML"),
    "tab-indent": (b"suite: smoke\n\tworlds: {}\n", "is not valid YAML"),
    "non-utf8": (b"suite: \xff\xfe\n", "is not UTF-8 text"),
    "directory": (None, "is not a regular file"),
    "missing": (None, "file not found"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_params_file_exits_2_naming_the_file(capsys, tmp_path, kind):
    data, expected = BAD_FILES[kind]
    path = tmp_path / "params.yaml"
    if kind == "directory":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    code, err = _validate(capsys, path)
    assert code == 2 and "mct: invalid params: params: " in err and expected in err and str(path) in err, err


def test_snakemake_empty_suite_is_an_error(tmp_path):
    """`snakemake --config suite=` ran the default suite silently; now it stops naming the key."""
    from tests.test_dag import scratch_copy, snakemake

    root = scratch_copy(tmp_path / "repo")
    r = snakemake(root, "-n", "--config", "suite=")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "suite: empty" in out, out[-2000:]


# --- image data --------------------------------------------------------------------------------------------


def _png(rgb: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    import io

    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def test_a_fifo_named_like_an_image_is_skipped(tmp_path):
    """A FIFO named b.png made `prepare` wait forever on open(); only regular files are listed now."""
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(_png())
    os.mkfifo(src / "b.png")
    assert ImageSource(tmp_path / "src").names == ["cls/a.png"]
    out = prepare_imagenet(tmp_path / "src", tmp_path / "out.zip", 8, progress=False)
    assert out.num_images == 1


@pytest.mark.parametrize(("labels", "expected"), [
    ([["c/a.png", -3]], "label -3 of c/a.png is outside [0, 10)"),
    ([["c/a.png", 10_000_000]], "label 10000000 of c/a.png is outside [0, 10)"),
    ([["c/a.png", "x"]], "labels must be [name, integer] pairs"),
    ([["c/a.png", 1.5]], "labels must be [name, integer] pairs"),
])
def test_labels_outside_the_class_count_are_refused(tmp_path, labels, expected):
    """dataset.json labels -3 or 10^7 were archived as they were."""
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("c/a.png", _png())
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    with pytest.raises(DatasetError, match=None) as err:
        prepare_imagenet(src, tmp_path / "out.zip", 8, progress=False, num_classes=10)
    assert expected in str(err.value)
    assert not (tmp_path / "out.zip").exists()


def test_truncated_and_non_image_files_are_refused_naming_them(tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("c/a.png", _png()[:40])
    with pytest.raises(DatasetError, match=r"cannot read image c/a\.png"):
        prepare_imagenet(src, tmp_path / "out.zip", 8, progress=False)


@pytest.mark.parametrize(("meta", "expected"), [
    (b"{not json", "dataset.json is not valid JSON"),
    (b"[1, 2]", "dataset.json must be a mapping with a list of labels"),
    (b"\xff\xfe{}", "dataset.json is not UTF-8 text"),
])
@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_malformed_dataset_json_is_refused_naming_it(tmp_path, meta, expected, layout):
    src = tmp_path / ("src.zip" if layout == "zip" else "src")
    if layout == "zip":
        with zipfile.ZipFile(src, "w") as z:
            z.writestr("c/a.png", _png())
            z.writestr("dataset.json", meta)
    else:
        (src / "c").mkdir(parents=True)
        (src / "c" / "a.png").write_bytes(_png())
        (src / "dataset.json").write_bytes(meta)
        expected = expected.replace("dataset.json is not UTF-8", "not UTF-8")
    with pytest.raises(DatasetError) as err:
        prepare_imagenet(src, tmp_path / "out.zip", 8, progress=False)
    assert expected in str(err.value) and str(src) in str(err.value)


@pytest.mark.parametrize("argv, made_by", [
    (["distill", "--experiment", "tiny_emd"], "mct teacher --teacher toy2d_mlp"),
    (["init-student", "--experiment", "tiny_emd", "--run-seed", "1"], "mct teacher --teacher toy2d_mlp"),
    (["sample", "--experiment", "tiny_emd", "--run-seed", "1"], "mct distill --experiment tiny_emd --run-seed 1"),
    (["evaluate", "--experiment", "tiny_di"], "mct sample --experiment tiny_di"),
    (["teacher-eval", "--teacher", "toy2d_mlp"], "mct teacher --teacher toy2d_mlp"),
    (["teacher", "--teacher", "toy2d_mlp"], "mct prepare --world toy2d"),
])
def test_a_missing_input_names_the_command_that_makes_it(capsys, params_file, monkeypatch, argv, made_by):
    """On a fresh clone a stage run by hand stops before any work, naming the file and the stage that makes it; it
    leaves no work or output folder behind."""
    monkeypatch.chdir(params_file.parent)
    assert main([*argv, "--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert ": missing; it is made by `" + made_by + "`" in err, err
    assert not (params_file.parent / "runs").exists()


def test_sample_and_evaluate_refuse_a_generator_of_other_settings(capsys, params_file, monkeypatch):
    """A hand run distilled with `-S ...iterations=20` and then sampled or evaluated without it would label its
    record with the params' 30 iterations: both stages stop before any work (exit 2) naming the key, recorded -> now;
    the same overrides pass, and --allow-settings-mismatch goes on with a warning."""
    monkeypatch.chdir(params_file.parent)
    quick = ["--params", str(params_file), "-S", "teachers.toy2d_mlp.iterations=20", "--no-progress"]
    short = [*quick, "-S", "experiments.tiny_emd.distill.iterations=20"]
    for argv in (["prepare", "--world", "toy2d"], ["teacher", "--teacher", "toy2d_mlp"],
                 ["init-student", "--experiment", "tiny_emd"], ["distill", "--experiment", "tiny_emd"]):
        assert main([*argv, *(short if argv[0] == "distill" else quick)]) == 0, argv
    capsys.readouterr()
    summary = json.loads(Path("runs/experiments/tiny_emd/distill/summary.json").read_text())
    assert len(summary["code_sha256"]) == 64  # the code it ran (mct.resume.loaded_code_sha256)
    samples = Path("runs/experiments/tiny_emd/samples.npz")
    assert main(["sample", "--experiment", "tiny_emd", "--num", "64", *quick]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "distill.iterations: 20 -> 30" in err and "--allow-settings-mismatch" in err, err
    assert not samples.exists()
    assert main(["sample", "--experiment", "tiny_emd", "--num", "64", *short]) == 0
    assert samples.exists()
    assert main(["evaluate", "--experiment", "tiny_emd", *quick]) == 2
    assert "distill.iterations: 20 -> 30" in capsys.readouterr().err
    assert not Path("reports/experiments/tiny_emd.json").exists()
    assert main(["sample", "--experiment", "tiny_emd", "--num", "64", "--allow-settings-mismatch", *quick]) == 0
    assert "going on (--allow-settings-mismatch)" in capsys.readouterr().err
