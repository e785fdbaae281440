"""Fetch teachers (and other large inputs) pinned by sha256, atomically.

A file is streamed into a temp file beside ``dest``, hashed on the way, and renamed onto ``dest`` only when
its sha256 matches the pin; a mismatch leaves nothing behind. Sources are local paths, ``file://`` URLs and
http(s) URLs (standard-library urllib). Downloads are refused when ``allow_download=False`` or the
environment sets ``MCT_OFFLINE=1``: tests and the embedded default never touch the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mct.errors import ChecksumMismatch

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to stream multi-GB checkpoints
_USER_AGENT = "mct-fetch/0.1 (+urllib)"


class FetchError(RuntimeError):
    """A source could not be read (missing file, HTTP error, unsupported scheme)."""


class OfflineError(FetchError):
    """An http(s) source was requested while downloads are disabled."""


class PinRequired(ValueError):
    """A fetch was asked for without a sha256 pin."""


# --- known teachers ---------------------------------------------------------------------------------
#
# sha256 is None where we could not download the file here to measure it. The user must pin it: download the
# file once, run `sha256sum FILE`, and pass the digest (fetch_teacher(..., sha256=...) or params.yaml).
# fetch_teacher refuses to run without a pin; a checkpoint is executable input (pickle), so it is never
# loaded unverified.

KNOWN_TEACHERS: dict[str, dict] = {
    # Karras et al. (2022), EDM ImageNet-64 conditional (ADM architecture, EDM preconditioning), the
    # teacher of the paper's ImageNet-64 results. A pickle of EDM's own classes: pickle.load(f)["ema"] is an
    # EDMPrecond(DhariwalUNet), i.e. already a denoiser D(x, sigma, class_labels) in our VE convention.
    "edm-imagenet-64x64-cond-adm": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl",
        "sha256": None,  # must be pinned by the user (not measurable offline)
        "filename": "edm-imagenet-64x64-cond-adm.pkl",
        "format": "edm-pickle",
        "resolution": 64,
        "label_dim": 1000,
        "parameterization": "edm-x0",
        "sigma_data": 0.5,
        "labels": "one-hot float (B, 1000), EDM convention",
    },
    # Karras et al. (2022), EDM's CIFAR-10 teachers (DDPM++ network, VP preconditioning; FID 1.79 cond / 1.97
    # uncond at 35 NFE in EDM's paper). pickle.load(f)["ema"] is a VPPrecond(SongUNet): a denoiser D(x, sigma,
    # class_labels) in our VE convention (mct.nets.edm.VPPrecond).
    **{f"edm-cifar10-32x32-{c}-vp": {
        "url": f"https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-{c}-vp.pkl",
        "sha256": None,  # must be pinned by the user (not measurable offline)
        "filename": f"edm-cifar10-32x32-{c}-vp.pkl",
        "format": "edm-pickle",
        "resolution": 32,
        "label_dim": 10 if c == "cond" else 0,
        "parameterization": "edm-vp",
        "sigma_data": 0.5,
        "labels": "one-hot float (B, 10), EDM convention" if c == "cond" else "none (unconditional)",
    } for c in ("cond", "uncond")},
    # ImageNet-128: EDM published no 128x128 ImageNet model, so we use OpenAI's guided-diffusion ADM
    # (Dhariwal & Nichol 2021) 128x128 class-conditional model: eps-prediction under the VP linear beta schedule,
    # T = 1000; with learn_sigma it outputs 6 channels and the first 3 are eps. params.yaml's imagenet128_adm
    # teacher wires it in: the teacher stage loads the plain state dict with torch.load(weights_only=True) into
    # mct.nets.adm.ADMUNet (built from the flags below) inside mct.diffusion.VPEpsDenoiser(ADMEpsNet(...)).
    "adm-imagenet-128x128-cond": {
        "url": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/128x128_diffusion.pt",
        "sha256": None,  # must be pinned by the user (not measurable offline)
        "filename": "128x128_diffusion.pt",
        "format": "adm-state-dict",
        "resolution": 128,
        "label_dim": 1000,
        "parameterization": "vp-eps",
        "schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "eps_channels": (0, 3),  # learn_sigma=True: 6 output channels, eps first
        "labels": "int class index y (B,), ADM convention",
        "adm_flags": {
            "image_size": 128, "class_cond": True, "learn_sigma": True, "num_channels": 256, "num_heads": 4,
            "num_res_blocks": 2, "attention_resolutions": "32,16,8", "resblock_updown": True,
            "use_fp16": True, "use_scale_shift_norm": True, "diffusion_steps": 1000, "noise_schedule": "linear",
        },
    },
}


# --- helpers ----------------------------------------------------------------------------------------


def offline_mode() -> bool:
    """True when the environment forbids downloads (MCT_OFFLINE=1/true/yes/on)."""
    return os.environ.get("MCT_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_sha256(sha256: str | None, *, what: str = "sha256") -> str:
    """Validate a hex digest and return it lower-cased; None -> PinRequired."""
    if sha256 is None:
        raise PinRequired(f"{what} is required: pin the file by its sha256 (run `sha256sum FILE` on a trusted copy)")
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256.strip()) is None:
        raise ValueError(f"{what} must be 64 hexadecimal characters, got {sha256!r}")
    return sha256.strip().lower()


def sha256_file(path: str | Path, chunk_size: int = _CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _source_kind(source: str) -> tuple[str, str]:
    """-> ("local", path) or ("http", url). Single-letter schemes are Windows drive letters, i.e. paths."""
    parsed = urllib.parse.urlparse(source)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return "http", source
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(f"file:// URL with a remote host is not supported: {source}")
        return "local", urllib.request.url2pathname(parsed.path)
    if scheme == "" or len(scheme) == 1:
        return "local", source
    raise FetchError(f"unsupported source scheme {scheme!r} in {source} (use a path, file://, http:// or https://)")


@contextmanager
def _open_source(kind: str, loc: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield (readable binary stream, total size in bytes or None)."""
    if kind == "local":
        if not os.path.isfile(loc):
            raise FetchError(f"source file not found: {loc}")
        with open(loc, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    req = urllib.request.Request(loc, headers={"User-Agent": _USER_AGENT})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise FetchError(f"download failed: HTTP {e.code} {e.reason} for {loc}") from e
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"download failed for {loc}: {getattr(e, 'reason', e)}") from e
    with resp:
        length = resp.headers.get("Content-Length")
        yield resp, int(length) if length and length.isdigit() else None


# --- the fetch --------------------------------------------------------------------------------------


def fetch_pinned(source: str | Path, sha256: str, dest: str | Path, *, progress: bool = True,
                 allow_download: bool = True, timeout: float = 60.0) -> Path:
    """Copy/download ``source`` to ``dest`` and return ``dest``, guaranteeing sha256(dest) == ``sha256``.

    If ``dest`` already has the pinned digest nothing is fetched (this also works offline). Otherwise the
    bytes are streamed into a temp file in dest's folder and renamed onto ``dest`` only after the digest
    matches. On a mismatch :class:`ChecksumMismatch` is raised and nothing is left behind; a file already at
    ``dest`` is never modified unless it is replaced by a verified one.
    """
    want = check_sha256(sha256)  # before any I/O
    source = os.fspath(source)
    kind, loc = _source_kind(source)
    dest = Path(dest)
    if dest.is_dir():
        raise ValueError(f"dest must be a file path, but {dest} is a directory")

    if dest.is_file() and sha256_file(dest) == want:
        return dest
    if kind == "http" and (not allow_download or offline_mode()):
        why = "MCT_OFFLINE is set" if offline_mode() else "downloads are disabled (allow_download=False)"
        raise OfflineError(
            f"refusing to download {loc}: {why}. Provide the file locally instead: download it on a machine "
            f"with internet access, check `sha256sum FILE` == {want}, and either place it at {dest} or pass "
            f"its local path (or a file:// URL) as the source.")

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open_source(kind, loc, timeout) as (src, total):
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                while block := src.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != want:
            raise ChecksumMismatch(f"sha256 mismatch for {source}: expected {want}, got {got}; the file was discarded")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a fetched checkpoint is an ordinary readable file
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_teacher(name: str, dest: str | Path, *, sha256: str | None = None, source: str | Path | None = None,
                  progress: bool = True, allow_download: bool = True) -> Path:
    """Fetch a teacher listed in :data:`KNOWN_TEACHERS` into ``dest`` (a file path, or a folder).

    ``sha256`` overrides the table's pin (required where the table has none); ``source`` overrides its URL,
    e.g. with a local copy on an offline cluster.
    """
    if name not in KNOWN_TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; known: {sorted(KNOWN_TEACHERS)}")
    entry = KNOWN_TEACHERS[name]
    pin = sha256 if sha256 is not None else entry["sha256"]
    if pin is None:
        raise PinRequired(
            f"teacher {name!r} has no sha256 pin. Download {entry['url']} once, run `sha256sum` on it and pass "
            f"the digest (sha256=... / the teacher's sha256 in params.yaml); unpinned checkpoints are not loaded.")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / entry["filename"]
    return fetch_pinned(source if source is not None else entry["url"], pin, dest, progress=progress,
                        allow_download=allow_download)

