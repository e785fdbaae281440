"""`student.init: scratch` re-initialises every network family mct builds, as a freshly built network of that family
starts, and refuses a re-initialisation that would leave teacher weights behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mct.config import parse_params
from mct.diffusion import EDMPrecond
from mct.io import load_torch
from mct.nets.adm import build_adm_denoiser
from mct.nets.conv import build_digits_denoiser
from mct.nets.edm import DhariwalUNet, SongUNet
from mct.nets.mlp import build_mlp_denoiser
from mct.nets.weights import check_reinitialised, reinitialise
from mct.student import init_student, scratch_init
from mct.teacher import denoiser_spec, save_denoiser
from mct.worlds.registry import make_world

EDM_ADM = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16, channel_mult=(1, 2),
               num_blocks=1, attn_resolutions=(4,), dropout=0.0, channels_per_head=8)
EDM_DDPMPP = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=16,
                  channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
ADM_FLAGS = dict(image_size=16, class_cond=True, learn_sigma=True, num_channels=32, num_heads=2, num_res_blocks=1,
                 attention_resolutions="8", channel_mult="1,2", resblock_updown=True, use_scale_shift_norm=True)

FAMILIES = {
    "mlp": lambda: build_mlp_denoiser(hidden=64, depth=2),
    "digits_unet": lambda: build_digits_denoiser(model_channels=16),
    "edm_dhariwal": lambda: EDMPrecond(DhariwalUNet(**EDM_ADM), sigma_data=0.5, label_dim=10),
    "edm_song": lambda: EDMPrecond(SongUNet(**EDM_DDPMPP), sigma_data=0.5, label_dim=10),
    "adm": lambda: build_adm_denoiser(ADM_FLAGS),
}


def _trained(net: nn.Module, seed: int = 123) -> nn.Module:
    """Stand-in for a trained teacher: every parameter moved off its initial value, zero-initialised layers too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _constant(t: torch.Tensor) -> bool:
    """Constant by design: several entries, all equal (a single entry may be a random draw)."""
    return t.numel() > 1 and bool((t == t.reshape(-1)[0]).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scratch_init_draws_each_tensor_as_a_fresh_network_does(family):
    """Oracle: a freshly constructed network of the same family (another seed) is that family's initialisation.

    Constant-by-design tensors (ADM's zero convolutions, EDM's zero-weight output layers, norm scales of one) must
    equal the fresh network's exactly. Random ones must differ from the teacher's values and have the fresh tensor's
    spread: for tensors of n >= 256 entries the relative standard error of a sample standard deviation is at most
    sqrt(0.5 / n) (normal; uniform draws have less) <= 4.5 %, so two independent draws differ by < 25 % (about
    4 standard errors of the difference) unless the initialiser differs.
    """
    torch.manual_seed(0)
    teacher = _trained(FAMILIES[family]())
    old = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    torch.manual_seed(7)
    fresh = dict(FAMILIES[family]().named_parameters())
    info = scratch_init(teacher, seed=1)
    new = dict(teacher.named_parameters())
    assert info["tensors"] == len(new) and info["changed"] > 0
    compared = 0
    for name, p in new.items():
        f = fresh[name].detach()
        if _constant(f):
            assert torch.equal(p, f), f"{family}: {name} should be its design constant {f.reshape(-1)[0].item()}"
            continue
        assert not torch.equal(p, old[name]), f"{family}: {name} kept the teacher's values"
        if p.numel() >= 256:
            compared += 1
            ratio = float(p.detach().std() / f.std())
            assert 0.75 < ratio < 1.33, f"{family}: {name} has std {p.std():.4g}, a fresh network {f.std():.4g}"
    assert compared > 0


def test_scratch_init_is_seeded():
    a, b = _trained(build_mlp_denoiser(hidden=32, depth=2)), _trained(build_mlp_denoiser(hidden=32, depth=2))
    scratch_init(a, seed=5)
    scratch_init(b, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


class _BareParameter(nn.Module):
    """A layer that owns a parameter but defines no reset_parameters (what EDM's layers were before)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))


class _NoOpReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))

    def reset_parameters(self) -> None:  # claims to reset, changes nothing
        pass


@pytest.mark.parametrize(("module", "message"), [
    (_BareParameter(), r"1 of 3 parameter tensors have no initialiser .*: scale"),
    (_NoOpReset(), r"2 randomly initialised parameter tensors kept their old values: bias, weight"),
])
def test_a_reinitialisation_that_could_leave_teacher_weights_is_refused(module, message):
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    with pytest.raises(ValueError, match=message):
        check_reinitialised(before, module, reinitialise(module))


def test_nothing_changed_is_refused():
    net = nn.GroupNorm(2, 4)  # constant by design and already at its constants: nothing to change
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match="none of the 2 parameter tensors changed; nothing was reset"):
        check_reinitialised(before, net, reinitialise(net))


def test_init_student_scratch_on_an_edm_teacher(tmp_path):
    """Through the stage: an EDM (DhariwalUNet) teacher's scratch student keeps none of the teacher's random tensors;
    the score network stays the teacher."""
    raw = {
        "suite": "tiny",
        "worlds": {"inet": {"kind": "imagenet", "resolution": 8, "num_classes": 10, "source": "unused"}},
        "teachers": {"edm": {"world": "inet", "kind": "fetch", "arch": "edm", "source": "unused", "sha256": None}},
        "templates": {},
        "experiments": {"inet_emd": {"world": "inet", "teacher": "edm", "student": {"init": "scratch"}}},
        "suites": {"tiny": ["inet_emd"]},
    }
    params = parse_params(raw)
    world, exp = make_world("inet", params.worlds["inet"]), params.experiment("inet_emd")
    arch_kwargs = {"model_type": "DhariwalUNet", "network": {**EDM_ADM, "in_channels": 3, "out_channels": 3}}
    torch.manual_seed(0)
    teacher = _trained(world.build_network("edm", arch_kwargs))
    save_denoiser(tmp_path / "teacher.pt", teacher, denoiser_spec(world, "edm", arch_kwargs))
    info = init_student(world, exp, tmp_path / "teacher.pt", tmp_path / "student.pt")
    st, t = load_torch(tmp_path / "student.pt"), teacher.state_dict()
    assert info["init"] == "scratch" and info["reset"]["changed"] > 0
    assert all(torch.equal(st["score"][k], v) for k, v in t.items())
    gen = dict(st["generator"])
    for name, _ in teacher.named_parameters():
        assert not torch.equal(gen[name], t[name]) or _constant(gen[name]), name
