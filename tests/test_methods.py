"""distill.method: the peers (SiD, DMD2) run in EMD's loop; the loop knows no method by name; a run's settings
hold only the keys its method reads."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from mct.config import ConfigError, parse_params, set_dotted
from mct.emd import Generator
from mct.io import load_torch
from mct.methods import METHODS, EMDLangevin, FakeScoreLoss, Networks, build_method
from mct.nets.mlp import build_mlp_denoiser
from mct.student import init_student
from mct.train import distill
from mct.worlds.registry import make_world


def _run(raw, name, teacher, root, **kw):
    params = parse_params(raw)
    exp = params.experiment(name)
    world = make_world(exp.world, params.worlds[exp.world])
    init_student(world, exp, teacher, root / "student.pt")
    return distill(world, exp, teacher, root / "student.pt", root / "out", root / "work", progress=False, **kw), exp


def _with_method(raw, name, method, **distill_keys):
    raw["experiments"][name] = {"template": "toy2d", "distill": {"method": method, **distill_keys}}
    return raw


@pytest.mark.parametrize(("method", "keys"), [("sid", {}), ("dmd2", {"score_steps": 3}),
                                             ("dmd2", {"regression_weight": 0.25, "regression_pairs": 256,
                                                       "regression_steps": 4})],
                         ids=["sid", "dmd2", "dmd2-regression"])
def test_peer_runs_in_the_loop_resumes_bitwise_and_records_its_method(tiny_raw, toy_teacher, tmp_path, method,
                                                                         keys):
    """A peer distils through the same loop: outputs and log written, the generator moved from its start, no chain
    columns in the log; killed at iteration 20 and resumed it ends bitwise where an uninterrupted run ends."""
    _with_method(tiny_raw, "peer", method, **keys)
    summary, exp = _run(tiny_raw, "peer", toy_teacher, tmp_path / "a")
    assert summary["experiment_method"] == method == exp.method_name
    assert summary["settings"]["distill.method"] == method and "distill.K" not in summary["settings"]
    log = [json.loads(line) for line in (tmp_path / "a" / "out" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and "eps_tilde_norm" not in log[0] and all(r["t_estep"] == 0 for r in log)
    assert ("regression_loss" in log[0]) == bool(keys.get("regression_weight"))
    start, end = load_torch(tmp_path / "a" / "student.pt")["generator"], load_torch(tmp_path / "a" / "out" /
                                                                                   "generator.pt")["generator"]
    assert any(not torch.equal(start[k], end[k]) for k in start)
    _run(tiny_raw, "peer", toy_teacher, tmp_path / "b", stop_after=20)
    _run(tiny_raw, "peer", toy_teacher, tmp_path / "b")
    b = load_torch(tmp_path / "b" / "out" / "generator.pt")["ema"]
    a = load_torch(tmp_path / "a" / "out" / "generator.pt")["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sid_leaves_no_gradient_in_the_score_network(tiny_raw, toy_teacher, tmp_path):
    """SiD backpropagates through the fake score network's input; its parameters must stay out of the graph (and
    keep requires_grad for their own DSM steps)."""
    params = parse_params(_with_method(tiny_raw, "peer", "sid"))
    world = make_world("toy2d", params.worlds["toy2d"])
    g = Generator(build_mlp_denoiser(hidden=16, depth=2), 2.0)
    score = build_mlp_denoiser(hidden=16, depth=2)
    nets = Networks(g, g, world.analytic_denoiser(), score, world)
    step = build_method(world, params.experiment("peer").distill)(nets, torch.randn(8, 2), torch.randn(8, 2),
                                                                   torch.ones(8), None, torch.Generator(),
                                                                   contextlib.nullcontext)
    step.loss.backward()
    assert all(p.grad is None and p.requires_grad for p in score.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_build_method_maps_each_method_to_its_class(tiny_raw):
    params = parse_params(_with_method(_with_method(tiny_raw, "s", "sid"), "d", "dmd2"))
    world = make_world("toy2d", params.worlds["toy2d"])
    assert set(METHODS) == {"emd", "sid", "dmd2"}
    assert isinstance(build_method(world, params.experiment("tiny_emd").distill), EMDLangevin)
    sid, dmd2 = (build_method(world, params.experiment(n).distill) for n in ("s", "d"))
    assert isinstance(sid, FakeScoreLoss) and sid.loss.alpha == 1.2 and sid.loss.normalize
    assert isinstance(dmd2, FakeScoreLoss) and type(dmd2.loss).__name__ == "DMD2Loss"


def test_a_method_with_an_estep_or_an_unknown_method_stops_validation(tiny_raw):
    raw = _with_method(tiny_raw, "s", "sid", estep="exact")
    with pytest.raises(ConfigError, match=r"experiments\.s\.distill\.estep: 'exact' is an E-step of method 'emd'"):
        parse_params(raw)
    raw = _with_method(tiny_raw, "s", "gan")
    with pytest.raises(ConfigError, match=r"experiments\.s\.distill\.method: unknown value 'gan'"):
        parse_params(raw)


def test_settings_hold_only_the_keys_the_method_reads(tiny_raw):
    """An EMD run's settings are what they were before distill.method existed (no method key, no SiD key), so
    earlier runs' fingerprints and records stay valid; a peer's drop the E-step's keys, which cannot change its
    numbers, and keep its own."""
    from mct.config import numeric_settings

    raw = _with_method(_with_method(tiny_raw, "s", "sid"), "d", "dmd2")
    params = parse_params(raw)
    emd, sid, dmd2 = (numeric_settings(params.experiment(n)) for n in ("tiny_emd", "s", "d"))
    assert "distill.method" not in emd and "distill.sid_alpha" not in emd and "distill.K" in emd
    assert sid["distill.method"] == "sid" and sid["distill.sid_alpha"] == 1.2 and "distill.K" not in sid
    assert "distill.sid_alpha" not in dmd2 and dmd2["distill.normalize_gradient"] is True
    set_dotted(raw, "experiments.s.distill.K", 16)  # a key SiD does not read: same settings, same fingerprint
    assert numeric_settings(parse_params(raw).experiment("s")) == sid


def test_dmd_regression_is_a_dmd2_option_whose_off_state_changes_no_setting(tiny_raw):
    """regression_weight > 0 builds DMD2 with DMD's regression (its keys in the settings); at 0 (the default) a DMD2
    run's settings are what they were before the option existed, so earlier runs' fingerprints stay valid; on
    another method validation stops, naming the key."""
    from mct.config import numeric_settings
    from mct.methods import DMDRegression

    raw = _with_method(_with_method(tiny_raw, "d", "dmd2"), "r", "dmd2", regression_weight=0.25)
    params = parse_params(raw)
    world = make_world("toy2d", params.worlds["toy2d"])
    plain, reg = (numeric_settings(params.experiment(n)) for n in ("d", "r"))
    assert not any(k.startswith("distill.regression") for k in plain)
    assert {k: v for k, v in reg.items() if k not in plain} == {
        "distill.regression_weight": 0.25, "distill.regression_pairs": 4096, "distill.regression_steps": 18}
    method = build_method(world, params.experiment("r").distill)
    assert isinstance(method, DMDRegression) and method.weight == 0.25 and method.pairs.count == 4096
    assert isinstance(build_method(world, params.experiment("d").distill), FakeScoreLoss)
    with pytest.raises(ConfigError, match=r"experiments\.s\.distill\.regression_weight: DMD's regression loss is "
                                          r"an option of method 'dmd2'"):
        parse_params(_with_method(copy.deepcopy(tiny_raw), "s", "sid", regression_weight=0.25))
    with pytest.raises(ConfigError, match=r"experiments\.n\.distill\.regression_weight"):
        parse_params(_with_method(copy.deepcopy(tiny_raw), "n", "dmd2", regression_weight=-1.0))
