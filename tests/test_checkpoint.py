"""mct.checkpoint: EDM persistence pickles load into mct's networks without running code; bad pickles are refused.

The fixtures are written here in EDM's persisted byte format (a REDUCE of
``torch_utils.persistence._reconstruct_persistent_obj`` on a meta dict holding the class name, the module
source and the object's ``__dict__``) without EDM: a stand-in module is registered under that name only while
pickling, and the embedded module source would create a marker file if anything executed it.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mct.checkpoint import (
    CheckpointError,
    PersistentRecord,
    UnsafeCheckpointError,
    format_inspection,
    inspect_checkpoint,
    load_edm_pickle,
    load_pickle_restricted,
    load_state_checkpoint,
    sha256_file,
)
from mct.diffusion import EDMPrecond
from mct.edm_export import Persisted, dump_persisted
from mct.errors import ChecksumMismatch
from mct.nets.edm import DhariwalUNet, SongUNet, VPPrecond
from mct.nets.weights import count_parameters, load_state_strict

ADM_KW = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=np.float64(0.0),
              channels_per_head=8)
SONG_KW = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
               dropout=0.0, embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1])


# --- writing EDM's persisted format -------------------------------------------------------------------


def write_edm_pickle(path, data: dict, called_marker) -> None:
    """mct.edm_export.dump_persisted, with a reconstruct call that leaves ``called_marker`` if anything runs it."""

    def _reconstruct_persistent_obj(meta):  # would only run if a loader used the real reconstruct path
        open(called_marker, "w").close()

    dump_persisted(path, data, reconstruct=_reconstruct_persistent_obj)
    assert "torch_utils.persistence" not in sys.modules


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


class EDMLoss:  # stands in for training.loss.EDMLoss: a persisted object that is not a network
    def __init__(self) -> None:
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


@pytest.fixture
def markers(tmp_path):
    return dict(src=tmp_path / "module_src_ran", called=tmp_path / "reconstruct_called")


def _src(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()\nclass EDMPrecond: pass\n"


@pytest.fixture
def adm_pickle(tmp_path, markers):
    torch.manual_seed(0)
    unet = _randomize(DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, **ADM_KW))
    net = EDMPrecond(unet, sigma_data=0.5, label_dim=10)
    src = _src(markers["src"])
    unet_kwargs = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, **ADM_KW)
    ema = Persisted(net, "EDMPrecond", src, init_kwargs=dict(
        img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, sigma_data=0.5, model_type="DhariwalUNet",
        **ADM_KW))
    net_state = dict(net.__dict__)
    net_state["_modules"] = dict(model=Persisted(unet, "DhariwalUNet", src, init_kwargs=unet_kwargs))
    ema.obj = types.SimpleNamespace(**net_state)
    data = dict(ema=ema, loss_fn=Persisted(EDMLoss(), "EDMLoss", src, init_kwargs={}), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True))
    path = tmp_path / "edm-tiny.pkl"
    write_edm_pickle(path, data, markers["called"])
    return path, net


def _inputs(batch=3, res=16, label_dim=10):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, res, res, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g))
    labels = F.one_hot(torch.randint(0, label_dim, (batch,), generator=g), label_dim).float()
    return x, sigma, labels


# --- EDM pickles ---------------------------------------------------------------------------------------


def test_edm_pickle_round_trips_into_our_networks(adm_pickle, markers):
    path, net = adm_pickle
    loaded = load_edm_pickle(path)
    ema = loaded["ema"]
    assert isinstance(ema, EDMPrecond) and isinstance(ema.model, DhariwalUNet)
    assert ema.sigma_data == 0.5 and ema.label_dim == 10 and not ema.training
    x, sigma, labels = _inputs()
    net.eval()
    with torch.no_grad():
        assert torch.equal(ema(x, sigma, labels), net(x, sigma, labels))
    # Non-network entries come back as inert data; nothing embedded was run.
    assert isinstance(loaded["loss_fn"], PersistentRecord)
    assert loaded["loss_fn"].attributes["P_mean"] == -1.2
    assert loaded["augment_pipe"] is None and loaded["dataset_kwargs"]["use_labels"] is True
    assert not markers["src"].exists() and not markers["called"].exists()
    assert "open(" in loaded["loss_fn"].module_src  # kept as text only


def test_vp_song_unet_record_rebuilt_from_precond_kwargs(tmp_path, markers):
    """VPPrecond(SongUNet) whose inner record lacks init kwargs: rebuilt from the preconditioner's kwargs."""
    torch.manual_seed(1)
    unet = _randomize(SongUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=10,
                               **{k: v for k, v in SONG_KW.items() if k != "model_type"}))
    net = VPPrecond(unet, label_dim=10)
    src = _src(markers["src"])
    rec = Persisted(net, "VPPrecond", src, init_kwargs=dict(img_resolution=16, img_channels=3, label_dim=10,
                                                            **SONG_KW))
    state = dict(net.__dict__)
    model = Persisted(unet, "SongUNet", src, init_kwargs=None)
    state["_modules"] = dict(model=model)
    rec.obj = types.SimpleNamespace(**state)
    path = tmp_path / "vp.pkl"
    write_edm_pickle(path, dict(ema=rec), markers["called"])
    ema = load_edm_pickle(path)["ema"]
    assert isinstance(ema, VPPrecond) and isinstance(ema.model, SongUNet)
    x, sigma, labels = _inputs()
    net.eval()
    with torch.no_grad():
        assert torch.equal(ema(x, sigma, labels), net(x, sigma, labels))
    assert not markers["src"].exists()


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.exec": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": _Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.Popen": _Reduce(__import__("subprocess").Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen"])
def test_code_carrying_pickles_are_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    refused = []
    # Plain, and hidden inside an otherwise well-formed EDM persistent object's state.
    holder = types.SimpleNamespace(_modules={}, _parameters={}, _buffers={}, sigma_data=payload)
    for i, data in enumerate([payload, dict(ema=Persisted(holder, "EDMPrecond", "", init_kwargs={}))]):
        path = tmp_path / f"evil{i}.pkl"
        write_edm_pickle(path, data, tmp_path / "called")
        for load in (load_edm_pickle, inspect_checkpoint):
            with pytest.raises(UnsafeCheckpointError) as e:
                load(path)
            refused.append(str(e.value))
    func = name.split(".")[-1]
    assert all(f".{func}" in msg and "allow-list" in msg for msg in refused)
    assert not marker.exists()


def test_the_refused_payload_is_real(tmp_path):
    """Control: an ordinary unpickler runs the same kind of payload (so the refusal above is meaningful)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_payloads(marker)["builtins.exec"]))
    assert marker.exists()


def test_build_cannot_patch_allowed_globals(tmp_path):
    # GLOBAL dnnlib.util.EasyDict; BUILD (None, {'get': 1}) would setattr on the class itself.
    path = tmp_path / "build.pkl"
    path.write_bytes(b"cdnnlib.util\nEasyDict\n(N(dS'get'\nI1\nstb.")
    with pytest.raises(UnsafeCheckpointError, match="refusing to set the state"):
        load_pickle_restricted(path)
    from mct.checkpoint import SAFE_GLOBALS
    assert SAFE_GLOBALS[("dnnlib.util", "EasyDict")].get is dict.get


def test_checksum_pinning(adm_pickle):
    path, _ = adm_pickle
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest == sha256_file(path, chunk_size=7)
    assert isinstance(load_edm_pickle(path, sha256=digest.upper())["ema"], EDMPrecond)
    with pytest.raises(ChecksumMismatch, match=digest):
        load_edm_pickle(path, sha256="0" * 64)


def test_strict_loading_names_what_does_not_fit():
    net = nn.Sequential(nn.Linear(2, 3))
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing: 0\.bias"):
        load_state_strict(net, {"0.weight": good["0.weight"]})
    with pytest.raises(CheckpointError, match=r"unexpected: 0\.extra"):
        load_state_strict(net, {**good, "0.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"shape mismatch: 0\.weight: \(3, 3\) vs \(3, 2\)"):
        load_state_strict(net, {**good, "0.weight": torch.zeros(3, 3)})
    load_state_strict(net, {k: v + 1 for k, v in good.items()})
    assert torch.equal(net[0].bias, good["0.bias"] + 1)


def test_edm_pickle_for_another_architecture_is_rejected(tmp_path, markers):
    """The recorded kwargs say model_channels=16; a state from a wider net must not load silently."""
    torch.manual_seed(0)
    wide = DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=10,
                        **{**ADM_KW, "model_channels": 24})
    net = EDMPrecond(wide, label_dim=10)
    state = dict(net.__dict__)
    kw = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, **ADM_KW)
    state["_modules"] = dict(model=Persisted(wide, "DhariwalUNet", "", init_kwargs=kw))
    rec = Persisted(types.SimpleNamespace(**state), "EDMPrecond", "", init_kwargs={})
    path = tmp_path / "mismatch.pkl"
    write_edm_pickle(path, dict(ema=rec), markers["called"])
    expected = r"shape mismatch: model\.dec\.16x16_block0\.affine\.bias: \(48,\) vs \(32,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_edm_pickle(path)


# --- state-dict checkpoints and inspection --------------------------------------------------------------


def test_state_dict_checkpoint_loads_with_weights_only(tmp_path):
    net = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model=net.state_dict(), step=7), path)
    ckpt = load_state_checkpoint(path)
    assert ckpt["step"] == 7
    assert all(torch.equal(ckpt["model"][k], v) for k, v in net.state_dict().items())
    marker = tmp_path / "pwned"
    torch.save(dict(model=net.state_dict(), evil=_payloads(marker)["builtins.exec"]), tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_state_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # an EDM pickle is not a torch.save file
        load_pickle_restricted(path)


def test_inspect_checkpoint_reports_networks_counts_and_sha(adm_pickle, tmp_path):
    path, net = adm_pickle
    info = inspect_checkpoint(path)
    assert info["format"] == "edm-pickle"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    [ema] = info["networks"]
    assert (ema["key"], ema["class_name"], ema["model_class"]) == ("ema", "EDMPrecond", "DhariwalUNet")
    assert ema["num_parameters"] == count_parameters(net)
    assert set(info["other_keys"]) == {"loss_fn", "augment_pipe", "dataset_kwargs"}
    text = format_inspection(info)
    assert info["sha256"] in text and f"{count_parameters(net):,} parameters" in text

    sd_path = tmp_path / "student.pt"
    torch.save(dict(ema=net.state_dict(), step=3), sd_path)
    info = inspect_checkpoint(sd_path)
    assert info["format"] == "state-dict" and info["other_keys"] == ["step"]
    assert info["networks"][0]["key"] == "ema"
    assert info["networks"][0]["num_parameters"] == sum(t.numel() for t in net.state_dict().values())
