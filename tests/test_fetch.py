"""Pinned fetch: copies verify sha256, failures leave nothing behind, downloads obey offline mode."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mct.diffusion import VPEpsDenoiser, linear_alpha_bar
from mct.fetch import (
    KNOWN_TEACHERS,
    ChecksumMismatch,
    FetchError,
    OfflineError,
    PinRequired,
    fetch_pinned,
    fetch_teacher,
)

PAYLOAD = bytes(range(256)) * 4099  # ~1 MiB: more than one read chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG = "0" * 64


@pytest.fixture(autouse=True)
def _online_env(monkeypatch):
    # Tests control offline mode explicitly; loopback must never go through a proxy.
    monkeypatch.delenv("MCT_OFFLINE", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture()
def src_file(tmp_path: Path) -> Path:
    p = tmp_path / "src" / "teacher.pkl"
    p.parent.mkdir()
    p.write_bytes(PAYLOAD)
    return p


def test_fetch_local_path_and_file_url(src_file: Path, tmp_path: Path):
    d1 = fetch_pinned(src_file, SHA, tmp_path / "out" / "a.pkl", progress=False)
    assert d1 == tmp_path / "out" / "a.pkl" and d1.read_bytes() == PAYLOAD
    d2 = fetch_pinned(src_file.as_uri(), SHA.upper(), tmp_path / "out" / "b.pkl", progress=False)
    assert d2.read_bytes() == PAYLOAD
    assert sorted(os.listdir(tmp_path / "out")) == ["a.pkl", "b.pkl"]  # no temp files left


def test_existing_good_dest_is_not_refetched(src_file: Path, tmp_path: Path):
    dest = fetch_pinned(src_file, SHA, tmp_path / "t.pkl", progress=False)
    # The source is gone and downloads are off: only the cached, verified dest can satisfy this call.
    src_file.unlink()
    assert fetch_pinned(src_file, SHA, dest, progress=False, allow_download=False) == dest
    assert fetch_pinned("https://example.invalid/t.pkl", SHA, dest, allow_download=False) == dest


def test_checksum_mismatch_leaves_nothing(src_file: Path, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatch) as e:
        fetch_pinned(src_file, WRONG, out / "t.pkl", progress=False)
    msg = str(e.value)
    assert str(src_file) in msg and WRONG in msg and SHA in msg
    assert isinstance(e.value, ValueError)
    assert os.listdir(out) == []


def test_checksum_mismatch_keeps_existing_dest(src_file: Path, tmp_path: Path):
    dest = tmp_path / "t.pkl"
    old = b"an older verified version"
    dest.write_bytes(old)
    with pytest.raises(ChecksumMismatch):
        fetch_pinned(src_file, WRONG, dest, progress=False)
    assert dest.read_bytes() == old
    assert os.listdir(tmp_path) == ["src", "t.pkl"]


def test_wrong_dest_content_is_replaced_by_verified_copy(src_file: Path, tmp_path: Path):
    dest = tmp_path / "t.pkl"
    dest.write_bytes(b"corrupt partial download")
    fetch_pinned(src_file, SHA, dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("bad", ["abc", "g" * 64, SHA[:-1], SHA + "0", 123])
def test_malformed_sha_rejected_before_work(bad, tmp_path: Path):
    dest = tmp_path / "never" / "t.pkl"
    # Nonexistent source and an unroutable URL: a ValueError (not FetchError) proves nothing was attempted.
    for source in (tmp_path / "missing.pkl", "https://example.invalid/t.pkl"):
        with pytest.raises(ValueError, match="64 hexadecimal"):
            fetch_pinned(source, bad, dest, progress=False)
    assert not dest.parent.exists()


def test_missing_pin_is_refused(src_file: Path, tmp_path: Path):
    with pytest.raises(PinRequired):
        fetch_pinned(src_file, None, tmp_path / "t.pkl")  # type: ignore[arg-type]
    assert not (tmp_path / "t.pkl").exists()


def test_http_refused_offline(tmp_path: Path, monkeypatch):
    url = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl"
    with pytest.raises(OfflineError, match="locally") as e:
        fetch_pinned(url, SHA, tmp_path / "t.pkl", allow_download=False)
    assert url in str(e.value) and SHA in str(e.value)
    monkeypatch.setenv("MCT_OFFLINE", "1")
    with pytest.raises(OfflineError, match="MCT_OFFLINE"):
        fetch_pinned(url, SHA, tmp_path / "t.pkl", allow_download=True)
    assert os.listdir(tmp_path) == []


def test_missing_source_and_bad_scheme(tmp_path: Path):
    with pytest.raises(FetchError, match="not found"):
        fetch_pinned(tmp_path / "missing.pkl", SHA, tmp_path / "out" / "t.pkl", progress=False)
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(FetchError, match="unsupported source scheme"):
        fetch_pinned("ftp://host/t.pkl", SHA, tmp_path / "t.pkl")
    with pytest.raises(ValueError, match="is a directory"):
        fetch_pinned(tmp_path / "missing.pkl", SHA, tmp_path / "out", progress=False)


@pytest.fixture()
def http_root(tmp_path: Path):
    """A loopback-only static server over tmp_path/www, shut down after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_over_loopback_http(http_root, tmp_path: Path):
    root, base = http_root
    (root / "teacher.pkl").write_bytes(PAYLOAD)
    out = tmp_path / "out"
    dest = fetch_pinned(f"{base}/teacher.pkl", SHA, out / "t.pkl", progress=False, timeout=10)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(ChecksumMismatch):
        fetch_pinned(f"{base}/teacher.pkl", WRONG, out / "u.pkl", progress=False, timeout=10)
    with pytest.raises(FetchError, match="404"):
        fetch_pinned(f"{base}/absent.pkl", SHA, out / "v.pkl", progress=False, timeout=10)
    assert os.listdir(out) == ["t.pkl"]


def test_fetch_teacher_requires_pin_and_accepts_local_source(src_file: Path, tmp_path: Path):
    name = "edm-imagenet-64x64-cond-adm"
    assert KNOWN_TEACHERS[name]["sha256"] is None
    with pytest.raises(PinRequired, match="sha256"):
        fetch_teacher(name, tmp_path, source=src_file, progress=False)
    dest = fetch_teacher(name, tmp_path, sha256=SHA, source=src_file, progress=False)
    assert dest == tmp_path / "edm-imagenet-64x64-cond-adm.pkl" and dest.read_bytes() == PAYLOAD
    with pytest.raises(ValueError, match="unknown teacher"):
        fetch_teacher("no-such-teacher", tmp_path, sha256=SHA)


def test_linear_alpha_bar_matches_ddpm_schedule():
    ab = linear_alpha_bar()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    np.testing.assert_allclose(ab.numpy(), np.cumprod(1.0 - betas), rtol=1e-12, atol=0)
    assert ab[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert bool((ab[1:] < ab[:-1]).all())
    assert 4.0e-5 < ab[-1].item() < 4.1e-5  # DDPM's alpha_bar_T ~ 4.04e-5
    with pytest.raises(ValueError):
        linear_alpha_bar(T=0)


def test_linear_alpha_bar_plugs_into_vp_eps_denoiser():
    ab = linear_alpha_bar()
    seen = {}

    def eps_net(x_vp, t, labels):  # records ADM's integer timestep; eps = 0 so D(x) = x
        seen["t"] = t
        return torch.zeros_like(x_vp)

    class Net(torch.nn.Module):
        def forward(self, x_vp, t, labels):
            return eps_net(x_vp, t, labels)

    den = VPEpsDenoiser(Net(), ab)
    t = torch.tensor([0, 1, 499, 999])
    sigma = torch.sqrt((1 - ab[t]) / ab[t])  # VE sigma of ADM step t
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(den(x, sigma), x)
    assert torch.equal(seen["t"], t)
