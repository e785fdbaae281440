"""The ImageNet-128 teacher path at toy size: a guided-diffusion state dict (written here with our ADM U-Net, whose
names match guided-diffusion's) is fetched against its pin, converted into an mct teacher (VP eps -> VE denoiser)
and distilled; a bad flag or a wrong pin stops before anything is written."""

from __future__ import annotations

import pytest
import torch
import yaml

from mct import paths
from mct.checkpoint import sha256_file
from mct.cli import main
from mct.diffusion import linear_alpha_bar, ve_sigma_to_vp
from mct.nets.adm import ADMUNet, adm_model_kwargs
from tests.test_edm_nets import _randomize

FLAGS = {"image_size": 16, "class_cond": True, "learn_sigma": True, "num_channels": 32, "num_heads": 2,
         "num_res_blocks": 1, "attention_resolutions": "8", "channel_mult": "1,2", "resblock_updown": True,
         "use_scale_shift_norm": True, "use_fp16": True, "diffusion_steps": 1000, "noise_schedule": "linear"}


def _adm_state_dict(path) -> dict:
    torch.manual_seed(0)
    unet = _randomize(ADMUNet(**adm_model_kwargs(FLAGS)))  # no zero-initialised layers: the test sees every one
    state = unet.state_dict()
    torch.save(state, path)
    return state


def _params(source, sha, flags=FLAGS) -> dict:
    return {
        "suite": "tiny",
        "worlds": {"inet128": {"kind": "imagenet", "resolution": 16, "num_classes": 1000, "source": "unused"}},
        "teachers": {"adm": {"world": "inet128", "kind": "fetch", "arch": "adm", "arch_kwargs": flags,
                             "source": str(source), "sha256": sha}},
        "templates": {},
        "experiments": {"inet128_emd": {"world": "inet128", "teacher": "adm", "student": {"log_snr_init": -2.0},
                                        "distill": {"iterations": 2, "batch_size": 2, "K": 2, "checkpoint_every": 1,
                                                    "grad_checkpoint": True}}},
        "suites": {"tiny": ["inet128_emd"]},
    }


def test_adm_state_dict_becomes_a_ve_denoiser_and_distills(tmp_path, monkeypatch):
    src = tmp_path / "128x128_diffusion.pt"
    state = _adm_state_dict(src)
    monkeypatch.chdir(tmp_path)
    from mct.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(src)  # what `mct inspect-checkpoint` shows a user about the download
    assert info["networks"][0]["class_name"].startswith("guided-diffusion UNetModel") and info["other_keys"] == []
    assert info["networks"][0]["num_parameters"] == sum(t.numel() for t in state.values())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(src, sha256_file(src))))
    assert main(["teacher", "--teacher", "adm", "--no-progress"]) == 0
    assert [p.name for p in paths.teacher_file("adm").parent.iterdir()] == ["teacher.pt"]  # download removed

    from mct.config import load_params
    from mct.teacher import load_denoiser
    from mct.worlds.registry import make_world

    world = make_world("inet128", load_params("params.yaml").worlds["inet128"])
    teacher, spec = load_denoiser(paths.teacher_file("adm"), world)
    assert spec["arch"] == "adm"
    # D(x, sigma, y) = x - sigma * eps(alpha x, t) with ADM's own weights, its integer timestep and class index.
    unet = ADMUNet(**adm_model_kwargs(FLAGS))
    unet.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.nn.functional.one_hot(torch.tensor([3, 999]), 1000).float()
    sigma = torch.tensor([0.5, 20.0])
    vp_sigmas = torch.sqrt((1 - linear_alpha_bar()) / linear_alpha_bar())
    t = (sigma.log()[:, None] - vp_sigmas.log()[None]).abs().argmin(1)
    alpha, _ = ve_sigma_to_vp(sigma)
    with torch.no_grad():
        eps = unet(x * alpha[:, None, None, None], t, torch.tensor([3, 999]))[:, :3]
        torch.testing.assert_close(teacher(x, sigma, labels), x - sigma[:, None, None, None] * eps)

    for cmd in (["init-student", "--experiment", "inet128_emd"], ["distill", "--experiment", "inet128_emd"]):
        assert main([*cmd, "--no-progress"]) == 0, cmd
    import json

    from mct.student import load_generator

    summary = json.loads((paths.distill_dir("inet128_emd") / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["final_grad_norm_gen"] > 0
    init = load_generator(paths.student_init("inet128_emd"), world)
    out = load_generator(paths.distill_dir("inet128_emd") / "generator.pt", world, "generator")
    pairs = zip(out.state_dict().values(), init.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the M-step moved the ADM generator


@pytest.mark.parametrize("case", ["bad_flag", "wrong_pin"])
def test_adm_teacher_refusals_leave_nothing(tmp_path, monkeypatch, capsys, case):
    src = tmp_path / "128x128_diffusion.pt"
    _adm_state_dict(src)
    monkeypatch.chdir(tmp_path)
    flags, sha = dict(FLAGS), sha256_file(src)
    if case == "bad_flag":
        flags["num_chanels"] = 64
    else:
        sha = "0" * 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(src, sha, flags)))
    assert main(["teacher", "--teacher", "adm", "--no-progress"]) == 1
    assert ("num_chanels" if case == "bad_flag" else "sha256") in capsys.readouterr().err
    folder = paths.teacher_file("adm").parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_adm_flags_must_fit_the_world(tmp_path):
    from mct.config import ConfigError, parse_params

    raw = _params("x.pt", "0" * 64, {**FLAGS, "image_size": 32})
    with pytest.raises(ConfigError, match=r"teachers\.adm\.arch_kwargs\.image_size"):
        parse_params(raw)
    raw = _params("x.pt", "0" * 64)
    raw["teachers"]["adm"]["kind"] = "train"
    with pytest.raises(ConfigError, match=r"teachers\.adm\.kind"):
        parse_params(raw)
