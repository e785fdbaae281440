"""The paper-scale path on CPU at toy size: a pinned EDM pickle teacher is fetched, loaded safely, copied into a
student and distilled through the same engine; a wrong pin is refused and leaves nothing behind."""

from __future__ import annotations

import types

import torch
import yaml

from mct import paths
from mct.checkpoint import sha256_file
from mct.cli import main
from mct.diffusion import EDMPrecond
from mct.nets.edm import DhariwalUNet
from tests.test_checkpoint import ADM_KW, EDMLoss, Persisted, _randomize, _src, write_edm_pickle


def _tiny_edm_pickle(path, marker_dir, label_dim: int = 10):
    torch.manual_seed(0)
    kw = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=label_dim, **ADM_KW)
    unet = _randomize(DhariwalUNet(**kw))
    net = EDMPrecond(unet, sigma_data=0.5, label_dim=label_dim)
    src = _src(marker_dir / "module_src_ran")
    ema = Persisted(net, "EDMPrecond", src, init_kwargs=dict(
        img_resolution=16, img_channels=3, label_dim=label_dim, use_fp16=False, sigma_data=0.5,
        model_type="DhariwalUNet", **ADM_KW))
    state = dict(net.__dict__)
    state["_modules"] = dict(model=Persisted(unet, "DhariwalUNet", src, init_kwargs=kw))
    ema.obj = types.SimpleNamespace(**state)
    write_edm_pickle(path, dict(ema=ema, loss_fn=Persisted(EDMLoss(), "EDMLoss", src, init_kwargs={})),
                     marker_dir / "reconstruct_called")
    return net


def _params(source, sha) -> dict:
    return {
        "suite": "tiny",
        "worlds": {"inet": {"kind": "imagenet", "resolution": 16, "num_classes": 10, "source": "unused"}},
        "teachers": {"edm": {"world": "inet", "kind": "fetch", "arch": "edm", "source": str(source), "sha256": sha}},
        "templates": {},
        "experiments": {"inet_emd": {"world": "inet", "teacher": "edm", "student": {"log_snr_init": -2.0},
                                     "distill": {"iterations": 2, "batch_size": 2, "K": 2, "checkpoint_every": 1}}},
        "suites": {"tiny": ["inet_emd"]},
    }


def test_edm_teacher_fetch_init_and_distill(tmp_path, monkeypatch):
    src = tmp_path / "edm-tiny.pkl"
    net = _tiny_edm_pickle(src, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text(yaml.safe_dump(_params(src, sha256_file(src))))
    assert main(["teacher", "--teacher", "edm", "--no-progress"]) == 0
    assert sha256_file(paths.teacher_file("edm")) == sha256_file(src)
    assert main(["init-student", "--experiment", "inet_emd"]) == 0
    assert main(["distill", "--experiment", "inet_emd", "--no-progress"]) == 0
    from mct.config import load_params
    from mct.student import load_generator
    from mct.worlds.registry import make_world

    params = load_params("params.yaml")
    world = make_world("inet", params.worlds["inet"])
    init = load_generator(paths.student_init("inet_emd"), world)
    z = torch.randn(2, 3, 16, 16)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    sigma = init.sigma_init
    torch.testing.assert_close(init(z, labels), net(sigma * z, torch.full((2,), sigma), labels))
    assert abs(sigma - torch.exp(torch.tensor(1.0)).item()) < 1e-6  # lambda* = -2 -> sigma* = e
    out = load_generator(paths.distill_dir("inet_emd") / "generator.pt", world, "generator")
    pairs = zip(out.state_dict().values(), init.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert not (tmp_path / "module_src_ran").exists() and not (tmp_path / "reconstruct_called").exists()


def test_wrong_pin_is_refused_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    src = tmp_path / "edm-tiny.pkl"
    _tiny_edm_pickle(src, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text(yaml.safe_dump(_params(src, "0" * 64)))
    assert main(["teacher", "--teacher", "edm", "--no-progress"]) == 1
    assert "sha256" in capsys.readouterr().err.lower()
    teacher_dir = paths.teacher_file("edm").parent
    assert not teacher_dir.exists() or list(teacher_dir.iterdir()) == []


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, monkeypatch):
    """Two iterations with EDM blocks recomputed in backward equal two without (deterministic CPU kernels)."""
    src = tmp_path / "edm-tiny.pkl"
    _tiny_edm_pickle(src, tmp_path)
    out = {}
    for flag in (False, True):
        work = tmp_path / f"work{flag}"
        work.mkdir()
        monkeypatch.chdir(work)
        raw = _params(src, sha256_file(src))
        raw["experiments"]["inet_emd"]["distill"]["grad_checkpoint"] = flag
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        for cmd in (["teacher", "--teacher", "edm"], ["init-student", "--experiment", "inet_emd"],
                    ["distill", "--experiment", "inet_emd"]):
            assert main([*cmd, "--no-progress"]) == 0
        out[flag] = torch.load(paths.distill_dir("inet_emd") / "generator.pt", weights_only=True)["generator"]
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-6)


class _Smuggler:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_inspect_checkpoint_cli_shows_and_refuses(tmp_path, capsys):
    import pickle

    good = tmp_path / "edm-tiny.pkl"
    _tiny_edm_pickle(good, tmp_path)
    assert main(["inspect-checkpoint", str(good)]) == 0
    shown = capsys.readouterr().out
    assert sha256_file(good) in shown and "DhariwalUNet" in shown
    bad = tmp_path / "bad.pkl"
    marker = tmp_path / "pwned"
    bad.write_bytes(pickle.dumps({"ema": _Smuggler(marker)}))
    assert main(["inspect-checkpoint", str(bad)]) == 3
    assert "system" in capsys.readouterr().err
    assert not marker.exists()


def test_dropout_is_off_while_distilling(tmp_path):
    """EDM's ImageNet U-Net records dropout 0.1, but EMD assumes one deterministic generator and score network
    (the E-step's VJP and the M-step must see the same g): a network's dropout rate must not change a run at all."""
    from mct.config import parse_params
    from mct.student import init_student
    from mct.teacher import denoiser_spec, save_denoiser
    from mct.train import distill
    from mct.worlds.registry import make_world

    raw = _params("unused.pkl", None)
    params = parse_params(raw)
    world = make_world("inet", params.worlds["inet"])
    exp = params.experiment("inet_emd")
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    out = {}
    for p in (0.0, 0.5):
        network = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, **{**ADM_KW, "dropout": p})
        arch_kwargs = {"model_type": "DhariwalUNet", "network": network}
        torch.manual_seed(0)
        teacher = _randomize(world.build_network("edm", arch_kwargs))
        if p > 0:  # the rate is real: in training mode two passes differ
            assert not torch.equal(teacher.train()(x, sigma, labels), teacher(x, sigma, labels))
        save_denoiser(tmp_path / f"teacher{p}.pt", teacher, denoiser_spec(world, "edm", arch_kwargs))
        init_student(world, exp, tmp_path / f"teacher{p}.pt", tmp_path / f"student{p}.pt")
        distill(world, exp, tmp_path / f"teacher{p}.pt", tmp_path / f"student{p}.pt", tmp_path / f"out{p}",
                tmp_path / f"work{p}", progress=False)
        out[p] = torch.load(tmp_path / f"out{p}" / "generator.pt", weights_only=True)["generator"]
    assert out[0.0].keys() == out[0.5].keys()
    assert all(torch.equal(out[0.0][k], out[0.5][k]) for k in out[0.0])
