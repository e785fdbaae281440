"""The CIFAR-10 world on tiny inputs in the release's real layouts (tests/cifar_fixture.py): every source format
prepares the same archive, bytes for bytes of pixels; a pickle that asks for anything beyond arrays is refused before
a file is written; bad settings stop params validation; the paper-scale suites plan in both engines and through the
Slurm profile; and the whole tiny cifar10 DAG runs through Snakemake with a random-weight EDM CIFAR-10 teacher of the
real class (VPPrecond over SongUNet), the report included."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from mct import paths
from mct.checkpoint import sha256_file
from mct.config import ConfigError, parse_params
from mct.fetch import KNOWN_TEACHERS
from mct.metrics import fid as fidlib
from mct.worlds.cifar10 import prepare_cifar10, unpickle_arrays
from mct.worlds.imagenet import DatasetError, ImageZipDataset
from tests.cifar_fixture import (
    CLASSES,
    release_arrays,
    write_binary_release,
    write_cifar_teacher,
    write_python_release,
)
from tests.inception_fixture import write_inception_standin
from tests.test_dag import (
    REPO,
    assert_same_dag,
    dry_run,
    dvc_stages,
    env_for,
    no_slurm_probe,  # noqa: F401 - module fixture: no Slurm controller probe in these engine runs
    parse_dry_run,
    scratch_copy,
    set_params,
)

PER_BATCH = 40  # 200 training images


def _archive(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = ImageZipDataset(path, one_hot=False)
    return np.stack([ds.image(i) for i in range(len(ds))]), ds.labels, ds.class_names


@pytest.mark.parametrize("fmt", ["binary", "binary_tar", "python", "parent_folder"])
def test_every_release_format_prepares_the_training_set_in_order(tmp_path, fmt):
    """The five training batches in the release's order, pixels and labels exact (planes -> HWC), class names from
    the release's meta file; the test batch is not part of it."""
    if fmt == "python":
        source = write_python_release(tmp_path / "src", PER_BATCH)
    else:
        source = write_binary_release(tmp_path / "src", PER_BATCH, tar=fmt == "binary_tar")
        if fmt == "parent_folder":
            source = source.parent  # the folder holding cifar-10-batches-bin/, as the tarball unpacks
    assert prepare_cifar10(source, tmp_path / "out.zip", progress=False) == 5 * PER_BATCH
    images, labels, names = _archive(tmp_path / "out.zip")
    want_images, want_labels = release_arrays(PER_BATCH)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    assert names == CLASSES


def test_max_images_keeps_the_first_images(tmp_path):
    source = write_binary_release(tmp_path / "src", PER_BATCH)
    assert prepare_cifar10(source, tmp_path / "out.zip", max_images=55, progress=False) == 55
    images, labels, _ = _archive(tmp_path / "out.zip")
    np.testing.assert_array_equal(images, release_arrays(PER_BATCH)[0][:55])  # spans batches 1 and 2


def test_an_edm_dataset_tool_folder_is_read_as_it_is(tmp_path):
    """EDM's dataset_tool layout (00000/img00000000.png and dataset.json labels) prepares unchanged at 32x32."""
    images, labels = release_arrays(4)
    root = tmp_path / "edm"
    (root / "00000").mkdir(parents=True)
    entries = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        name = f"00000/img{i:08d}.png"
        PIL.Image.fromarray(img).save(root / name)
        entries.append([name, int(y)])
    (root / "dataset.json").write_text(json.dumps({"labels": entries}))
    assert prepare_cifar10(root, tmp_path / "out.zip", progress=False) == len(images)
    got, got_labels, _ = _archive(tmp_path / "out.zip")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_batch_pickle_that_asks_for_code_is_refused_and_nothing_is_written(tmp_path, capsys):
    source = write_python_release(tmp_path / "src", PER_BATCH)
    batch = pickle.loads((source / "data_batch_3").read_bytes())
    batch["filenames"] = _RunsCode()
    (source / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    dest = tmp_path / "out.zip"
    dest.write_bytes(b"kept")
    with pytest.raises(DatasetError, match=r"data_batch_3: the pickle asks for (__builtin__|builtins)\.print"):
        prepare_cifar10(source, dest, progress=False)
    assert "this ran" not in capsys.readouterr().out
    assert dest.read_bytes() == b"kept" and list(tmp_path.glob(".out.zip*")) == []


class _HugeArray:
    """Pickles as numpy's own reconstruct call for a 16 GiB array: a few bytes that ask for memory of any size."""

    def __reduce__(self):
        multiarray = getattr(np, "_core", None) or np.core
        return (multiarray.multiarray._reconstruct, (np.ndarray, (1 << 34,), "b"))


def test_the_unpickler_admits_arrays_and_holds_them_to_the_files_budget():
    """Plain arrays, lists and strings come back; an object array, or an array far larger than the file, is
    refused (the checkpoint loader's budget: 4x the file plus 1 MiB)."""
    ok = unpickle_arrays(pickle.dumps({"data": np.arange(6, dtype=np.uint8), "labels": [1, 2]}, protocol=2), "x")
    np.testing.assert_array_equal(ok["data"], np.arange(6))
    with pytest.raises(DatasetError, match="refused|not on the allow-list|asks for"):
        unpickle_arrays(pickle.dumps(np.array([{}], dtype=object), protocol=2), "obj")
    with pytest.raises(DatasetError, match="allocation budget"):
        unpickle_arrays(pickle.dumps(_HugeArray(), protocol=2), "huge")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a whole number of 3073-byte records"),
    (lambda p: p.write_bytes(b"\x0c" + p.read_bytes()[1:]), r"labels must lie in \[0, 10\)"),
])
def test_a_broken_binary_batch_is_named_and_keeps_the_old_archive(tmp_path, edit, message):
    source = write_binary_release(tmp_path / "src", PER_BATCH)
    edit(source / "data_batch_2.bin")
    dest = tmp_path / "out.zip"
    dest.write_bytes(b"kept")
    with pytest.raises(DatasetError, match=message) as err:
        prepare_cifar10(source, dest, progress=False)
    assert "data_batch_2.bin" in str(err.value) and dest.read_bytes() == b"kept"


def test_a_missing_source_is_named(tmp_path):
    with pytest.raises(DatasetError, match="source not found"):
        prepare_cifar10(tmp_path / "nowhere", tmp_path / "out.zip", progress=False)


def _world_params(**world) -> dict:
    return {"suite": "s", "worlds": {"c": {"kind": "cifar10", "source": "x", "resolution": 32, **world}},
            "teachers": {"t": {"world": "c", "kind": "fetch", "arch": "edm", "source": "x.pkl", "sha256": None}},
            "templates": {}, "experiments": {"e": {"world": "c", "teacher": "t"}}, "suites": {"s": ["e"]}}


@pytest.mark.parametrize(("world", "message"), [({"resolution": 64}, "CIFAR-10 is 32x32"),
                                                ({"num_classes": 1000}, r"10 \(class-conditional")])
def test_settings_cifar10_cannot_take_stop_validation(world, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(_world_params(**world))


def test_conditional_and_unconditional_worlds_and_their_teachers():
    from mct.worlds.registry import make_world

    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    cond, uncond = (make_world(w, params.worlds[w]) for w in ("cifar10", "cifar10_uncond"))
    assert (cond.label_dim, uncond.label_dim) == (10, 0) and cond.data_shape == (3, 32, 32)
    assert cond.paper_dataset == "CIFAR-10 32x32, conditional"
    for c in ("cond", "uncond"):
        entry = KNOWN_TEACHERS[f"edm-cifar10-32x32-{c}-vp"]
        assert entry["sha256"] is None and entry["url"] == params.teachers[f"cifar10_edm_{c}"].source
        assert params.teachers[f"cifar10_edm_{c}"].sha256 is None  # a user pastes the hash `mct teacher` prints


@pytest.mark.parametrize(("suite", "experiment", "processes"), [("cifar10", "cifar10_emd_k16", 8),
                                                                ("cifar10_1gpu", "cifar10_1gpu_emd_k8", 1)])
def test_cifar10_suites_plan_gpu_jobs_in_both_engines_and_on_slurm(tmp_path, suite, experiment, processes):
    root = scratch_copy(tmp_path / "repo")
    set_params(root, lambda raw: raw.update(suite=suite))
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    assert ("ref_stats", "cifar10") in smk and ("teacher", "cifar10_edm_cond") in smk
    command = smk[("distill", experiment)].command
    if processes > 1:
        assert command.startswith(f"accelerate launch --multi_gpu --num_processes {processes}")
    else:
        assert command.startswith("accelerate launch --num_processes 1 ")
    text = dry_run(root, "--profile", str(REPO / "workflow" / "profiles" / "slurm"))
    assert "rule distill" in text and experiment in text and "gpu" in text


# --- the tiny cifar10 DAG, for real ------------------------------------------------------------------------------


def _tiny_params(source: Path, teacher: Path) -> dict:
    return {
        "suite": "cifar_tiny",
        "worlds": {"cifar_tiny": {"kind": "cifar10", "source": str(source), "resolution": 32, "num_classes": 10}},
        "teachers": {"cifar_tiny_edm": {"world": "cifar_tiny", "kind": "fetch", "arch": "edm", "source": str(teacher),
                                        "sha256": sha256_file(teacher), "sampler_steps": 2}},
        "templates": {"cifar_tiny": {
            "world": "cifar_tiny", "teacher": "cifar_tiny_edm", "student": {"log_snr_init": -2.0},
            "distill": {"iterations": 2, "batch_size": 2, "K": 2, "checkpoint_every": 1, "log_with": "none"},
            "eval": {"num_samples": 12, "batch_size": 6, "seed": 3}}},
        "experiments": {"cifar_tiny_di": {"template": "cifar_tiny", "distill": {"K": 1, "gamma_z": 0.0}},
                        "cifar_tiny_emd_k2": {"template": "cifar_tiny"}},
        "suites": {"cifar_tiny": ["cifar_tiny_di", "cifar_tiny_emd_k2"]},
    }


@pytest.mark.slow  # a real run of every stage at toy size; CI runs it after the default suite (.ci/run)
def test_tiny_cifar10_suite_runs_through_snakemake(tmp_path):
    """prepare (binary tarball) -> ref-stats -> teacher (pinned EDM pickle, VPPrecond) -> teacher-eval ->
    init-student -> distill (Diff-Instruct and EMD-2) -> sample -> evaluate -> report, for real, in Snakemake."""
    inputs = tmp_path / "inputs"
    source = write_binary_release(inputs, PER_BATCH, tar=True)
    teacher = inputs / "edm-tiny-cifar10.pkl"
    write_cifar_teacher(teacher)
    inception = write_inception_standin(inputs / "inception")
    root = scratch_copy(tmp_path / "repo")
    set_params(root, lambda raw: raw.clear() or raw.update(_tiny_params(source, teacher)))
    assert_same_dag(parse_dry_run(dry_run(root)), dvc_stages(root))
    env = {**env_for(root), "MCT_INCEPTION_PATH": str(inception), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    images, labels, _ = _archive(root / paths.world_data("cifar_tiny", ".zip"))
    np.testing.assert_array_equal(images, release_arrays(PER_BATCH)[0])
    _, _, meta = fidlib.load_stats(root / paths.reference_stats("cifar_tiny"))
    assert meta["count"] == 5 * PER_BATCH and meta["split"] == "train"  # the FID reference: the training set
    for exp in ("cifar_tiny_di", "cifar_tiny_emd_k2"):
        with np.load(root / paths.samples_file(exp)) as f:
            x, ids = f["x"], f["labels"]
        assert x.dtype == np.uint8 and x.shape == (12, 3, 32, 32) and set(ids) <= set(range(10))
        rec = json.loads((root / paths.experiment_metrics(exp)).read_text())
        assert np.isfinite(rec["fid"]) and rec["nfe"] == 1 and 0 <= rec["recall"] <= 1
    trec = json.loads((root / paths.teacher_metrics("cifar_tiny_edm")).read_text())
    assert trec["nfe"] == 3 and np.isfinite(trec["fid"])
    page = (root / paths.REPORTS / "index.md").read_text()
    assert "cifar_tiny_emd_k2" in page and "CIFAR-10 32x32, conditional" in page


def test_a_folder_that_is_neither_a_release_nor_images_names_both(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a CIFAR-10 release .* nor an image folder"):
        prepare_cifar10(tmp_path / "empty", tmp_path / "out.zip", progress=False)
    assert not (tmp_path / "out.zip").exists()
