"""The digits world: data split, file round-trip, labels, the conditional conv U-Net, and image helpers."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from mct.diffusion import EDMPrecond, LogNormalSigma, dsm_loss
from mct.images import image_grid, save_png, to_uint8
from mct.nets.conv import ConvUNet, build_digits_denoiser
from mct.nets.weights import count_parameters
from mct.worlds.digits import (
    DigitsFileError,
    DigitsSplit,
    load_digits_split,
    load_split,
    one_hot,
    save_split,
    stratified_indices,
    uniform_labels,
)


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(held_out_fraction=0.2, seed=0)


# --- data -------------------------------------------------------------------------------------------


def test_split_shapes_dtypes_and_range(split: DigitsSplit) -> None:
    assert split.train_x.dtype == torch.float32 and split.test_x.dtype == torch.float32
    assert split.train_y.dtype == torch.int64 and split.test_y.dtype == torch.int64
    assert split.train_x.shape[1:] == (1, 8, 8) and split.test_x.shape[1:] == (1, 8, 8)
    assert split.train_x.shape[0] == split.train_y.shape[0]
    assert split.test_x.shape[0] == split.test_y.shape[0]
    assert split.train_x.shape[0] + split.test_x.shape[0] == 1797
    both = torch.cat([split.train_x, split.test_x])
    # Pixels 0 and 16 both occur, so the scaling hits the ends of [-1, 1] exactly; 0..16 are 17 levels.
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    assert torch.unique(both).numel() == 17


def test_split_is_deterministic_and_seeded(split: DigitsSplit) -> None:
    again = load_digits_split(held_out_fraction=0.2, seed=0)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(split, name), getattr(again, name))
    other = load_digits_split(held_out_fraction=0.2, seed=1)
    assert not torch.equal(split.test_x, other.test_x)


def test_split_is_stratified_and_disjoint(split: DigitsSplit) -> None:
    from sklearn.datasets import load_digits

    labels = np.asarray(load_digits().target)
    train_idx, test_idx = stratified_indices(labels, 0.2, seed=0)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(labels.size))
    full = np.bincount(labels, minlength=10)
    test_counts = np.bincount(split.test_y.numpy(), minlength=10)
    train_counts = np.bincount(split.train_y.numpy(), minlength=10)
    assert np.array_equal(test_counts, np.round(0.2 * full).astype(int))
    assert np.array_equal(train_counts + test_counts, full)
    assert (test_counts > 0).all() and (train_counts > 0).all()
    # The union of both sides is the data set itself (as a multiset of (image, label) rows).
    x = np.concatenate([split.train_x.numpy(), split.test_x.numpy()]).reshape(-1, 64)
    y = np.concatenate([split.train_y.numpy(), split.test_y.numpy()])
    ref = (load_digits().images.reshape(-1, 64) / 8.0 - 1.0).astype(np.float32)
    rows = np.concatenate([x, y[:, None]], axis=1)
    ref_rows = np.concatenate([ref, labels[:, None]], axis=1)
    assert np.array_equal(np.unique(rows, axis=0), np.unique(ref_rows, axis=0))


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="held_out_fraction"):
        load_digits_split(held_out_fraction=1.0)


def test_save_load_round_trip_is_exact(split: DigitsSplit, tmp_path) -> None:
    path = tmp_path / "sub" / "digits.npz"
    save_split(path, split)
    back = load_split(path)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(split, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert sorted(p.name for p in path.parent.iterdir()) == ["digits.npz"]  # no temp file left behind


def test_load_split_names_what_is_wrong(split: DigitsSplit, tmp_path) -> None:
    arrays = {n: getattr(split, n).numpy() for n in ("train_x", "train_y", "test_x")}
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(DigitsFileError, match="test_y"):
        load_split(tmp_path / "missing.npz")

    np.savez(tmp_path / "shape.npz", **arrays, test_y=split.test_y.numpy()[:-1])
    with pytest.raises(DigitsFileError, match=r"test_y must have shape"):
        load_split(tmp_path / "shape.npz")

    np.savez(tmp_path / "img.npz", **{**arrays, "train_x": arrays["train_x"].reshape(-1, 64)},
             test_y=split.test_y.numpy())
    with pytest.raises(DigitsFileError, match=r"train_x must have shape \(N, 1, 8, 8\)"):
        load_split(tmp_path / "img.npz")

    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(DigitsFileError, match="not a readable"):
        load_split(tmp_path / "garbage.npz")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "absent.npz")


def test_one_hot_and_uniform_labels() -> None:
    oh = one_hot(torch.tensor([0, 3, 9]))
    assert oh.dtype == torch.float32 and oh.shape == (3, 10)
    assert torch.equal(oh.argmax(1), torch.tensor([0, 3, 9])) and torch.equal(oh.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="labels must lie"):
        one_hot(torch.tensor([10]))

    a = uniform_labels(5000, 10, torch.Generator().manual_seed(7))
    b = uniform_labels(5000, 10, torch.Generator().manual_seed(7))
    assert a.dtype == torch.int64 and torch.equal(a, b)
    counts = torch.bincount(a, minlength=10)
    assert counts.numel() == 10
    # Uniform: each count ~ Binomial(5000, 0.1), sd ~ 21; 6 sd either side.
    assert (counts - 500).abs().max().item() < 130


# --- network ----------------------------------------------------------------------------------------


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    sigma = LogNormalSigma().sample(n, generator=g)
    labels = one_hot(uniform_labels(n, 10, g))
    return x, sigma, labels


def test_denoiser_shapes_and_backprop() -> None:
    torch.manual_seed(0)
    den = build_digits_denoiser()
    assert isinstance(den, EDMPrecond) and den.label_dim == 10 and den.sigma_data == 0.5
    assert 250_000 <= count_parameters(den) <= 400_000
    x, sigma, labels = _batch()
    out = den(x, sigma, labels)
    assert out.shape == (8, 1, 8, 8) and torch.isfinite(out).all()
    # A standard (non-zero) init: the raw net's output is far from constant.
    raw = den.model(x, torch.log(sigma) / 4, labels)
    assert raw.std().item() > 0.05
    out.square().mean().backward()
    for name, p in den.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum().item() > 0, f"no gradient reaches {name}"


def test_label_changes_output() -> None:
    torch.manual_seed(0)
    den = build_digits_denoiser().eval()
    x, sigma, _ = _batch()
    with torch.no_grad():
        a = den(x, sigma, one_hot(torch.zeros(8, dtype=torch.long)))
        b = den(x, sigma, one_hot(torch.full((8,), 7)))
        a2 = den(x, sigma, one_hot(torch.zeros(8, dtype=torch.long)))
    assert torch.equal(a, a2)
    assert (a - b).abs().max().item() > 1e-3


def test_unet_is_generic_and_validates() -> None:
    net = ConvUNet(img_channels=3, img_resolution=32, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1)
    x = torch.randn(2, 3, 32, 32)
    assert net(x, torch.zeros(2), one_hot(torch.tensor([1, 2]))).shape == (2, 3, 32, 32)
    uncond = ConvUNet(img_resolution=16, model_channels=8, label_dim=0)
    assert uncond(torch.randn(2, 1, 16, 16), torch.zeros(2), None).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        ConvUNet(img_resolution=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="class_labels"):
        ConvUNet(model_channels=8)(torch.randn(2, 1, 8, 8), torch.zeros(2), None)
    with pytest.raises(ValueError, match="x must have shape"):
        ConvUNet(model_channels=8)(torch.randn(2, 1, 16, 16), torch.zeros(2), one_hot(torch.tensor([1, 2])))


@pytest.mark.slow  # 26 s measured on the shared 2-core machine
def test_short_dsm_training_lowers_the_loss(split: DigitsSplit) -> None:
    """150 Adam steps at batch 64; the loss on a fixed evaluation batch (fixed sigmas and noise, so the
    comparison has no sampling noise) must fall to below 60% of its value at step 0."""
    torch.manual_seed(0)
    den = build_digits_denoiser()
    sigma_dist = LogNormalSigma()
    g_eval = torch.Generator().manual_seed(123)
    xe, ye = split.train_x[:256], one_hot(split.train_y[:256])
    se = sigma_dist.sample(256, generator=g_eval)
    ne = torch.randn(xe.shape, generator=g_eval)

    def eval_loss() -> float:
        with torch.no_grad():
            return dsm_loss(den, xe, se, ye, ne, sigma_data=0.5).item()

    before = eval_loss()
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    n = split.train_x.shape[0]
    train_losses = []
    for _ in range(150):
        idx = torch.randint(0, n, (64,), generator=g)
        x0, y = split.train_x[idx], one_hot(split.train_y[idx])
        loss = dsm_loss(den, x0, sigma_dist.sample(64, generator=g), y, torch.randn(x0.shape, generator=g), 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_losses.append(loss.item())
    after = eval_loss()
    assert after < 0.6 * before, (before, after)
    # The running training loss agrees: mean of the last 20 steps < 60% of the mean of the first 5.
    assert np.mean(train_losses[-20:]) < 0.6 * np.mean(train_losses[:5]), train_losses


# --- images -----------------------------------------------------------------------------------------


def test_to_uint8_maps_values_like_edm() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    # (x * 127.5 + 128).clip(0, 255), truncated: -1 -> 0.5 -> 0, 0 -> 128, 0.5 -> 191.75 -> 191, 1 -> 255.
    assert u.reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]
    rgb = to_uint8(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3) and (rgb == 128).all()


def test_image_grid_layout_and_save(tmp_path) -> None:
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    imgs = levels.reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    grid = image_grid(imgs, nrow=3, upscale=4)
    assert grid.mode == "L" and grid.size == (3 * 8 * 4, 2 * 8 * 4)  # (width, height)
    arr = np.asarray(grid)
    expected = to_uint8(levels.reshape(5, 1, 1, 1))[:, 0, 0, 0].tolist() + [0]  # last cell is black padding
    for k, v in enumerate(expected):
        r, c = divmod(k, 3)
        cell = arr[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
        assert (cell == v).all(), (k, v)
    # Nearest upscaling of a single bright pixel covers exactly an upscale x upscale block.
    one = -torch.ones(1, 1, 8, 8)
    one[0, 0, 2, 5] = 1.0
    a = np.asarray(image_grid(one, nrow=1, upscale=3))
    assert a.shape == (24, 24) and (a == 255).sum() == 9 and (a[6:9, 15:18] == 255).all()

    rgb = image_grid(torch.zeros(4, 3, 8, 8), nrow=2, upscale=2)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)

    path = tmp_path / "figs" / "grid.png"
    save_png(path, grid)
    with PIL.Image.open(path) as im:
        assert np.array_equal(np.asarray(im), arr)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="1 or 3 channels"):
        image_grid(torch.zeros(1, 2, 8, 8), nrow=1)
