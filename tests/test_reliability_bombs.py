"""Memory bombs in the safe loaders (issue 11, finding 5): small files that ask for gigabytes are refused, with the
peak memory of the process that reads them measured.

Every bomb is read in one fresh subprocess, one after the other, through the loaders the CLI uses
(``inspect_checkpoint``, ``load_edm_pickle``, ``prepare_imagenet``). The child reports its peak RSS
(``ru_maxrss``) after the imports and after each bomb; each bomb may add at most :data:`BUDGET_MB` to the peak.
Before the budgets these files took 2.5 GB (38-byte ``bytearray(2e9)``), 4.7 GB (``list(bytearray(2e9))``),
6 GB (an EDM record of a 384-channel U-Net without tensors) and 5.2 GB (a 1x200,000 PNG, 372 bytes zipped).
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
import zlib
from pathlib import Path

import pytest

BUDGET_MB = 256  # extra peak RSS any one bomb may cause (the honest loaders need a few MB for these files)


def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _int4(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG of the given size; with ``rows`` None only the header (enough for PIL.Image.open to report the size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if rows is not None:
        out += chunk(b"IDAT", zlib.compress(rows, 9))
    return out + chunk(b"IEND", b"")


def _edm_record_pickle(path: Path, monkeypatch) -> None:
    """EDM's persisted format for an EDMPrecond whose recorded U-Net has 384 channels (~300M parameters) and no
    tensors at all: a few hundred bytes."""
    def _reconstruct_persistent_obj(meta):  # stand-in, registered only while pickling
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class Rec:
        def __init__(self, class_name, state):
            self.meta = dict(type="class", version=6, module_src="", class_name=class_name, state=state)

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    unet = Rec("DhariwalUNet", {"_init_args": (), "_init_kwargs": dict(
        img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=384,
        channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8])})
    precond = Rec("EDMPrecond", {"_modules": {"model": unet}, "_init_args": (),
                                 "_init_kwargs": dict(img_resolution=64, img_channels=3, label_dim=1000)})
    path.write_bytes(pickle.dumps({"ema": precond}, protocol=2))


def _torch_zip_bomb(path: Path) -> Path:
    """A torch.save zip whose one tensor claims 10^9 elements (4 GB) over a 16-byte record."""
    import torch

    torch.save({"w": torch.zeros(4)}, path)
    bomb = path.with_name("tzip_bomb.pt")
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(bomb, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cpuq\x06K\x04t", b"cpuq\x06" + _int4(1_000_000_000) + b"t")
                data = data.replace(b"K\x00K\x04\x85", b"K\x00" + _int4(1_000_000_000) + b"\x85")
            out.writestr(info, data)
    return bomb


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> list[tuple[str, str, Path, str]]:
    """(name, loader, file, expected message) for every bomb."""
    root = tmp_path_factory.mktemp("bombs")
    out = []

    def add(name, loader, data_or_path, expected):
        path = data_or_path if isinstance(data_or_path, Path) else root / f"{name}.pkl"
        if not isinstance(data_or_path, Path):
            path.write_bytes(data_or_path)
        out.append((name, loader, path, expected))

    add("bytearray_2e9", "inspect", _proto2(b"cbuiltins\nbytearray\n" + _int4(2_000_000_000) + b"\x85R"),
        "bytearray of size 2,000,000,000, beyond this file's allocation budget")
    add("bytes_2e9", "inspect", _proto2(b"cbuiltins\nbytes\n" + _int4(2_000_000_000) + b"\x85R"),
        "bytes of size 2,000,000,000")
    add("list_of_bytearray_2e9", "inspect",
        _proto2(b"cbuiltins\nlist\ncbuiltins\nbytearray\n" + _int4(2_000_000_000) + b"\x85R\x85R"),
        "bytearray of size 2,000,000,000")
    add("numpy_shape_2e9", "inspect", _proto2(
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int4(2_000_000_000)
        + b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R\x87R"), "a numpy array (bytes) of size 16,000,000,000")
    add("binbytes8_declares_8GB", "inspect", b"\x80\x04\x8e" + struct.pack("<Q", 8 << 30) + b"abc",
        "not a readable pickle")
    out.append(("edm_record_384_channels", "edm", root / "edm.pkl", "missing: model."))
    add("torch_zip_declares_4GB", "inspect", _torch_zip_bomb(root / "small.pt"), "does not match expected size")
    w = 200_000
    add("png_1x200000_zip", "prepare", _zip(root / "thin.zip", {"c/a.png": _png(w, 1, b"\0" + b"\0" * w)}),
        "exceed the budget of 67,108,864")
    add("png_header_10000x10000", "prepare", _zip(root / "big.zip", {"c/a.png": _png(10_000, 10_000)}),
        "10000x10000 pixels exceed the budget")
    add("png_header_20000x20000_pil_bomb", "prepare", _zip(root / "bomb.zip", {"c/a.png": _png(20_000, 20_000)}),
        "refused as a decompression bomb")
    return out


CHILD = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path
    import torch
    from mct.checkpoint import CheckpointError, inspect_checkpoint, load_edm_pickle
    from mct.worlds.imagenet import DatasetError, prepare_imagenet

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results = {"baseline_mb": peak_mb()}
    for name, loader, path in json.loads(sys.argv[1]):
        try:
            if loader == "inspect":
                inspect_checkpoint(path)
            elif loader == "edm":
                load_edm_pickle(path)
            else:
                prepare_imagenet(path, Path(tempfile.mkdtemp()) / "out.zip", 64, progress=False)
            message = None
        except (CheckpointError, DatasetError) as e:
            message = str(e)
        results[name] = {"refused": message, "peak_mb": peak_mb()}
    print(json.dumps(results))
""")


def test_memory_bombs_are_refused_within_budget(bombs, tmp_path, monkeypatch):
    _edm_record_pickle(next(p for n, _, p, _ in bombs if n == "edm_record_384_channels"), monkeypatch)
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([(n, ld, str(p)) for n, ld, p, _ in bombs])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    previous = res["baseline_mb"]
    report = []
    for name, _, path, expected in bombs:
        got = res[name]
        assert got["refused"] is not None, f"{name}: accepted"
        assert expected in got["refused"], (name, got["refused"])
        assert got["peak_mb"] - previous <= BUDGET_MB, (name, got["peak_mb"], previous)
        report.append(f"{name} ({path.stat().st_size} B): +{got['peak_mb'] - res['baseline_mb']:.0f} MB")
        previous = got["peak_mb"]
    print(f"baseline {res['baseline_mb']:.0f} MB; " + "; ".join(report))
