"""The ImageNet world end to end on CPU at toy size: a generated ImageFolder is prepared, its Inception reference
statistics are streamed from the archive, an EDM-pickle teacher is fetched and evaluated, and a distilled student is
sampled (uint8, as EDM saves images) and evaluated; all through the CLI stages the pipeline runs.

Inception is a stand-in TorchScript file written by the tests (tests/inception_fixture.py) with the real file's
interface, loaded through the same path as the real weights ($MCT_INCEPTION_PATH, clean-fid's InceptionV3W)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from mct import paths
from mct.checkpoint import sha256_file
from mct.cli import main
from mct.metrics import fid as fidlib
from tests.inception_fixture import InceptionStandIn, write_inception_standin
from tests.test_paper_scale import _tiny_edm_pickle

CLASSES = ["n01", "n02", "n03"]
PER_CLASS = 5


@pytest.fixture()
def inception(tmp_path, monkeypatch):
    path = write_inception_standin(tmp_path / "inception")
    monkeypatch.setenv("MCT_INCEPTION_PATH", str(path))
    return path


def _imagefolder(root, seed=0):
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for j in range(PER_CLASS):
            arr = rng.integers(0, 256, size=(20 + j, 24, 3), dtype=np.uint8)
            PIL.Image.fromarray(arr).save(root / c / f"{c}_{j}.JPEG")


def _params(source, teacher, sha, ref_images=0) -> dict:
    return {
        "suite": "tiny",
        "worlds": {"inet": {"kind": "imagenet", "resolution": 16, "num_classes": 3, "source": str(source),
                            "ref_images": ref_images}},
        "teachers": {"edm": {"world": "inet", "kind": "fetch", "arch": "edm", "source": str(teacher), "sha256": sha,
                             "sampler_steps": 3}},
        "templates": {},
        "experiments": {"inet_emd": {"world": "inet", "teacher": "edm", "student": {"log_snr_init": -2.0},
                                     "distill": {"iterations": 2, "batch_size": 2, "K": 2, "checkpoint_every": 1},
                                     "eval": {"num_samples": 10, "batch_size": 4, "seed": 3}}},
        "suites": {"tiny": ["inet_emd"]},
    }


def _archive_features(zip_path) -> np.ndarray:
    """Features of every archived image in one batch, straight through the stand-in (no mct code in between)."""
    from mct.worlds.imagenet import ImageZipDataset

    ds = ImageZipDataset(zip_path)
    images = torch.stack([torch.from_numpy(ds.image(i)).permute(2, 0, 1) for i in range(len(ds))]).float()
    with torch.no_grad():
        return InceptionStandIn().eval()(images).double().numpy()


@pytest.mark.slow  # 650 s measured on the shared 2-core machine
def test_imagenet_world_stages_end_to_end(tmp_path, monkeypatch, inception):
    _imagefolder(tmp_path / "train")
    teacher = tmp_path / "edm-tiny.pkl"
    _tiny_edm_pickle(teacher, tmp_path, label_dim=3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text(yaml.safe_dump(_params(tmp_path / "train", teacher, sha256_file(teacher))))

    assert main(["prepare", "--world", "inet", "--no-progress"]) == 0
    assert main(["ref-stats", "--world", "inet", "--no-progress"]) == 0
    mu, sigma, meta, pr = fidlib.load_stats(paths.reference_stats("inet"), with_pr_features=True)
    # Streamed in a shuffled order and in batches, the statistics equal those of all images at once.
    ref_mu, ref_sigma = fidlib.feature_stats(_archive_features(paths.world_data("inet", ".zip")))
    np.testing.assert_allclose(mu, ref_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=1e-12)
    assert meta["count"] == len(CLASSES) * PER_CLASS and meta["features"] == "inception-legacy-tf"
    assert pr.shape == (len(CLASSES) * PER_CLASS, 2048)

    assert main(["teacher", "--teacher", "edm", "--no-progress"]) == 0
    assert main(["teacher-eval", "--teacher", "edm", "--num", "8", "--no-progress"]) == 0
    trec = json.loads(paths.teacher_metrics("edm").read_text())
    assert trec["nfe"] == 5 and np.isfinite(trec["fid"]) and 0 <= trec["recall"] <= 1

    for cmd in (["init-student", "--experiment", "inet_emd"], ["distill", "--experiment", "inet_emd"],
                ["sample", "--experiment", "inet_emd"], ["evaluate", "--experiment", "inet_emd"]):
        assert main([*cmd, "--no-progress"]) == 0, cmd
    with np.load(paths.samples_file("inet_emd")) as f:
        x, labels = f["x"], f["labels"]
    assert x.dtype == np.uint8 and x.shape == (10, 3, 16, 16) and set(labels) <= {0, 1, 2}
    rec = json.loads(paths.experiment_metrics("inet_emd").read_text())
    # The stage's FID is clean-fid's Frechet distance of the stand-in features of the saved uint8 samples.
    with torch.no_grad():
        gen_feats = InceptionStandIn().eval()(torch.from_numpy(x).float()).double().numpy()
    expected = fidlib.fid_from_stats(*fidlib.feature_stats(gen_feats), mu, sigma)
    assert rec["fid"] == pytest.approx(expected, rel=1e-6)  # float32 features, other batching
    assert rec["nfe"] == 1 and rec["K"] == 2 and 0 <= rec["precision"] <= 1


def test_reference_subset_is_spread_over_classes(tmp_path, monkeypatch, inception):
    """ref_images keeps a seeded random subset of the archive, not its first (single-class) images."""
    _imagefolder(tmp_path / "train")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(tmp_path / "train", "unused", None, ref_images=6)))
    assert main(["prepare", "--world", "inet", "--no-progress"]) == 0
    from mct.config import load_params
    from mct.worlds.registry import make_world

    world = make_world("inet", load_params("params.yaml").worlds["inet"])
    batches = list(world.reference_batches(paths.world_data("inet", ".zip"), batch_size=4))
    assert [len(b) for b in batches] == [4, 2] and batches[0].dtype == torch.uint8
    from mct.worlds.imagenet import ImageZipDataset

    ds = ImageZipDataset(paths.world_data("inet", ".zip"), one_hot=False)
    index_of = {ds.image(i).tobytes(): i for i in range(len(ds))}
    chosen = [index_of[img.permute(1, 2, 0).numpy().tobytes()] for b in batches for img in b]
    assert len(set(chosen)) == 6 and set(chosen) != set(range(6))  # not the archive's first (class-sorted) images
    again = list(world.reference_batches(paths.world_data("inet", ".zip"), batch_size=6))
    assert torch.equal(torch.cat(batches), again[0])  # the order is fixed


def test_missing_inception_is_a_clear_error_before_work(tmp_path, monkeypatch, capsys):
    _imagefolder(tmp_path / "train")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MCT_INCEPTION_PATH", str(tmp_path / "nowhere" / "inception-2015-12-05.pt"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(tmp_path / "train", "unused", None)))
    assert main(["prepare", "--world", "inet", "--no-progress"]) == 0
    assert main(["ref-stats", "--world", "inet", "--no-progress"]) == 1
    assert "Inception weights are missing" in capsys.readouterr().err
    assert not paths.reference_stats("inet").exists()
