"""FID through clean-fid with a feature net trained on sklearn's digits; the Inception guard; stats files."""

from __future__ import annotations

import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid import fid as cfid
from PIL import Image
from sklearn.datasets import load_digits

from mct.metrics import fid
from mct.metrics.features import FeatureNet, load_feature_net, save_feature_net, train_feature_net


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1347], perm[1347:]
    return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}


@pytest.fixture(scope="module")
def trained(digits):
    # One thread: this small net trains in ~4 s on one core, but far slower when two threads fight over
    # shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        net, acc = train_feature_net(digits["train_x"], digits["train_y"], digits["test_x"], digits["test_y"],
                                     epochs=15, lr=3e-3, batch_size=64, seed=0, num_classes=10)
        print(f"\nFeatureNet on digits: held-out accuracy {acc:.4f}, trained in "
              f"{time.perf_counter() - start:.2f} s on 1 thread")
    finally:
        torch.set_num_threads(threads)
    return net, acc


def independent_fid(mu1, s1, mu2, s2) -> float:
    """Tr sqrt(S1 S2) = Tr sqrt(A S2 A) with A = S1^(1/2), via symmetric eigendecompositions (no sqrtm)."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --- the feature net ---------------------------------------------------------------------------------------


def test_feature_net_learns_digits(trained):
    _, acc = trained
    assert acc > 0.90


def test_training_is_deterministic_given_seed(digits):
    args = (digits["train_x"][:256], digits["train_y"][:256], digits["test_x"], digits["test_y"])
    kw = dict(epochs=1, lr=3e-3, batch_size=64, num_classes=10, width=8)
    (a, acc_a), (b, acc_b), (c, _) = (train_feature_net(*args, seed=s, **kw) for s in (1, 1, 2))
    assert acc_a == acc_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_feature_net_save_load_roundtrip(tmp_path, digits):
    net = FeatureNet(in_channels=1, num_classes=10, width=8, feature_dim=16).eval()
    save_feature_net(tmp_path / "fnet.pt", net, {"accuracy": 0.5, "data": "digits", "classes": list(range(10))})
    loaded, meta = load_feature_net(tmp_path / "fnet.pt")
    x = digits["test_x"][:32]
    assert torch.equal(loaded.features(x), net.features(x))
    assert meta == {"accuracy": 0.5, "data": "digits", "classes": list(range(10))}
    assert [p.name for p in tmp_path.iterdir()] == ["fnet.pt"]  # no temp file left behind


def test_feature_net_rejects_images_outside_range(digits):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_feature_net(digits["train_x"] * 8, digits["train_y"], digits["test_x"], digits["test_y"], epochs=1)


# --- FID ---------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(trained, digits):
    ext = fid.custom_extractor(trained[0], resize_to=8)
    mu, sigma = fid.feature_stats(fid.images_features(digits["train_x"], ext))
    # Tolerance: sqrtm round-off, 1e-9 of the total feature variance.
    assert abs(fid.fid_from_stats(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_grows_monotonically_with_noise(trained, digits):
    ext = fid.custom_extractor(trained[0], resize_to=8)
    ref = fid.feature_stats(fid.images_features(digits["train_x"], ext))
    gen = torch.Generator().manual_seed(0)
    x = digits["test_x"]
    noise = torch.randn(x.shape, generator=gen)
    levels = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    fids = [fid.compute_fid(fid.images_features((x + s * noise).clamp(-1, 1), ext), ref) for s in levels]
    assert all(a < b for a, b in pairwise(fids)), fids
    assert fids[-1] > 10 * fids[0], fids


def test_fid_from_stats_is_cleanfids_and_matches_an_independent_computation(trained, digits):
    ext = fid.custom_extractor(trained[0], resize_to=8)
    mu1, s1 = fid.feature_stats(fid.images_features(digits["train_x"], ext))
    mu2, s2 = fid.feature_stats(fid.images_features(digits["test_x"][digits["test_y"] < 7], ext))
    ours = fid.fid_from_stats(mu1, s1, mu2, s2)
    assert ours == float(cfid.frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(independent_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert ours > 1.0  # the two sets differ (classes 7-9 missing), so the identity above is not trivial


def test_images_features_match_clean_fid_folder_path(tmp_path, trained, digits):
    """Our in-memory path gives what clean-fid's compute_fid(fdir1, fdir2, custom_feat_extractor=...) gives on
    PNG folders of the same (quantised) images."""
    ext = fid.custom_extractor(trained[0], resize_to=8)
    sets = {"a": digits["train_x"][:120], "b": digits["test_x"][:100]}
    for name, x in sets.items():
        (tmp_path / name).mkdir()
        for i, img in enumerate(fid.to_uint8_nhwc(x)):
            Image.fromarray(img[..., 0]).save(tmp_path / name / f"{i:04d}.png")
    ours = {k: fid.images_features(x, ext, batch_size=32) for k, x in sets.items()}
    folder_a = cfid.get_folder_features(str(tmp_path / "a"), ext, num_workers=0, batch_size=32,
                                        device=torch.device("cpu"), mode="legacy_tensorflow", verbose=False)
    np.testing.assert_allclose(ours["a"], folder_a, rtol=1e-5, atol=1e-5)
    theirs = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="legacy_tensorflow",
                              custom_feat_extractor=ext, num_workers=0, batch_size=32,
                              device=torch.device("cpu"), verbose=False)
    mine = fid.fid_from_stats(*fid.feature_stats(ours["a"]), *fid.feature_stats(ours["b"]))
    assert mine == pytest.approx(theirs, rel=1e-4)


def test_stats_roundtrip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    mu, sigma = fid.feature_stats(feats)
    meta = {"extractor": "FeatureNet", "sha256": "ab" * 32, "n": 50, "accuracy": 0.981}
    fid.save_stats(tmp_path / "ref.npz", mu, sigma, meta)
    mu2, sigma2, meta2 = fid.load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta2 == meta
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]
    gen = rng.normal(size=(40, 6)) + 1.0
    assert fid.compute_fid(gen, (mu2, sigma2, meta2)) == fid.fid_from_stats(*fid.feature_stats(gen), mu, sigma)


@pytest.mark.parametrize("batches", [[200], [1, 199], [7, 50, 143], [100, 100]])
def test_running_stats_equal_the_all_at_once_statistics(batches):
    """Merging batch statistics (Chan et al.) is exact: same mean and covariance as np.cov of all rows, whatever
    the batching, even for features far from zero (where the naive sum-of-squares formula loses digits)."""
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 5)) * [1, 10, 0.1, 3, 1] + 1e4
    running = fid.RunningStats()
    start = 0
    for b in batches:
        running.update(feats[start:start + b])
        start += b
    mu, sigma = running.stats()
    ref_mu, ref_sigma = fid.feature_stats(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-9)
    assert running.count == 200


def test_running_stats_refuse_bad_input():
    running = fid.RunningStats()
    with pytest.raises(ValueError, match="at least 2"):
        running.update(np.ones((1, 3)))
        running.stats()
    with pytest.raises(ValueError, match="width changed"):
        running.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        running.update(np.full((2, 3), np.nan))


def test_precision_recall_features_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 4))
    fid.save_stats(tmp_path / "ref.npz", *fid.feature_stats(feats), {"n": 30}, pr_features=feats[:10])
    *_, pr = fid.load_stats(tmp_path / "ref.npz", with_pr_features=True)
    assert np.array_equal(pr, feats[:10])
    fid.save_stats(tmp_path / "old.npz", *fid.feature_stats(feats), {"n": 30})
    assert fid.load_stats(tmp_path / "old.npz", with_pr_features=True)[3] is None


def test_mismatched_statistics_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        fid.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Inception: never downloaded -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_inception_file_raises_with_instructions(tmp_path, monkeypatch, no_network):
    missing = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "DEFAULT_INCEPTION_PATH", missing)
    with pytest.raises(fid.InceptionWeightsMissing) as err:
        fid.inception_feature_extractor("clean", "cpu")
    msg = str(err.value)
    assert str(missing) in msg and fid.INCEPTION_ENV in msg and "https://" in msg
    assert isinstance(err.value, RuntimeError)

    elsewhere = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    monkeypatch.setenv(fid.INCEPTION_ENV, str(elsewhere))
    with pytest.raises(fid.InceptionWeightsMissing, match=str(elsewhere)):
        fid.inception_feature_extractor("legacy_tensorflow", "cpu")
    assert not elsewhere.exists() and not missing.exists()


class _FakeInceptionLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))


class _FakeInception(torch.nn.Module):
    """Has the TorchScript interface clean-fid's InceptionV3W uses: .layers and forward(x, return_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_extractor_loads_from_env_path_without_downloading(tmp_path, monkeypatch, no_network, digits):
    path: Path = tmp_path / "weights" / "inception-2015-12-05.pt"
    path.parent.mkdir()
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    monkeypatch.setenv(fid.INCEPTION_ENV, str(path.parent))  # a folder holding the file works too
    model = fid.inception_feature_extractor("clean", "cpu")
    feats = fid.images_features(digits["test_x"][:5], model, batch_size=2, mode="clean")  # resized to 299
    assert feats.shape == (5, 2048) and np.isfinite(feats).all()


def test_unknown_inception_mode_is_rejected():
    with pytest.raises(ValueError, match="legacy_pytorch"):
        fid.inception_feature_extractor("legacy_pytorch", "cpu")
