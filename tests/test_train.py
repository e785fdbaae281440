"""The distillation loop: outputs, logs, resume after a kill, divergence handling."""

from __future__ import annotations

import json

import pytest
import torch

from mct.config import parse_params, set_dotted
from mct.io import load_torch
from mct.student import generate, init_student, load_generator
from mct.train import DivergenceError, distill
from mct.worlds.registry import make_world


def _setup(raw, name, teacher, root):
    params = parse_params(raw)
    exp = params.experiment(name)
    world = make_world(exp.world, params.worlds[exp.world])
    init_student(world, exp, teacher, root / "student.pt")
    return world, exp


def test_student_init_copies_teacher_and_scratch_differs(tiny_raw, toy_teacher, tmp_path):
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    st = load_torch(tmp_path / "student.pt")
    teacher_state = load_torch(toy_teacher)["state_dict"]
    assert all(torch.equal(st["generator"][k], v) for k, v in teacher_state.items())
    assert all(torch.equal(st["score"][k], v) for k, v in teacher_state.items())
    set_dotted(tiny_raw, "experiments.tiny_emd.student.init", "scratch")
    _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path / "scratch")
    st2 = load_torch(tmp_path / "scratch" / "student.pt")
    assert any(not torch.equal(st2["generator"][k], v) for k, v in teacher_state.items() if k.endswith("weight"))
    # g(z) = D(sigma* z, sigma*) of the teacher: check one sample against the formula.
    gen = load_generator(tmp_path / "student.pt", world)
    z = torch.randn(5, 2)
    from mct.teacher import load_denoiser

    teacher, _ = load_denoiser(toy_teacher, world)
    torch.testing.assert_close(gen(z), teacher(2.5 * z, torch.full((5,), 2.5)))


def test_distill_writes_outputs_and_log(tiny_raw, toy_teacher, tmp_path):
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    summary = distill(world, exp, toy_teacher, tmp_path / "student.pt", tmp_path / "out", tmp_path / "work",
                      progress=False)
    assert (tmp_path / "out" / "generator.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(30))
    for key in ("loss_score", "loss_gen", "grad_norm_gen", "grad_norm_score", "t_score", "t_estep", "t_mstep"):
        assert all(isinstance(r[key], float) for r in log), key
    assert summary["K"] == 4 and summary["sec_per_iter"] > 0
    gen = load_generator(tmp_path / "out" / "generator.pt", world, "ema")
    x1, _ = generate(gen, (2,), 100, seed=3, labels=0)
    x2, _ = generate(gen, (2,), 100, seed=3, labels=0)
    assert torch.equal(x1, x2) and torch.isfinite(x1).all()


def test_the_live_log_is_on_disk_every_log_every_and_progress_lines_go_to_stdout(tiny_raw, toy_teacher, tmp_path,
                                                                                  monkeypatch, capsys):
    """A run watched from outside (an engine's stage log, `tail` of the live log) sees it move: with log_every 5
    and no checkpoint before the end, the work dir's log.jsonl holds every line up to the last multiple of 5 at each
    iteration; without a progress bar, one line per tenth of the budget goes to stdout (30 iterations: every 3)."""
    import mct.train as train

    set_dotted(tiny_raw, "templates.toy2d.distill.log_every", 5)
    set_dotted(tiny_raw, "templates.toy2d.distill.checkpoint_every", 1000)
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    on_disk, append = [], train._append_log

    def watched(run, log_file, rec):
        on_disk.append(len(run.log_path.read_text().splitlines()))  # before this iteration's line is written
        append(run, log_file, rec)

    monkeypatch.setattr(train, "_append_log", watched)
    distill(world, exp, toy_teacher, tmp_path / "student.pt", tmp_path / "out", tmp_path / "work", progress=False)
    assert on_disk == [it - it % 5 for it in range(30)]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("distill ")]
    assert [x.split(": ")[1].split(" ")[0] for x in lines] == [f"{k}/30" for k in range(3, 31, 3)]


def test_the_code_digest_covers_every_imported_mct_module_and_sees_an_edit(tmp_path, monkeypatch):
    """mct.resume.loaded_code_sha256: sha256 over (name, source bytes) of the imported mct modules in name order;
    one more module, or one module's source edited, gives another digest."""
    import hashlib
    import sys
    import types
    from pathlib import Path

    from mct.resume import loaded_code_sha256

    h = hashlib.sha256()
    for name in sorted(m for m in sys.modules if m == "mct" or m.startswith("mct.")):
        f = getattr(sys.modules[name], "__file__", None)
        if f and f.endswith(".py"):
            h.update(name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    before = loaded_code_sha256()
    assert before == h.hexdigest()
    extra = tmp_path / "extra.py"
    extra.write_text("x = 1\n")
    module = types.ModuleType("mct.zz_extra")
    module.__file__ = str(extra)
    monkeypatch.setitem(sys.modules, "mct.zz_extra", module)
    with_extra = loaded_code_sha256()
    extra.write_text("x = 2\n")
    assert len({before, with_extra, loaded_code_sha256()}) == 3


@pytest.mark.parametrize("name", ["tiny_emd", "tiny_di"])
def test_resume_after_kill_is_bitwise_identical(tiny_raw, toy_teacher, tmp_path, name):
    """A run stopped at iteration 20 (checkpoint every 10) and resumed ends bitwise where an uninterrupted run ends:
    all randomness comes from one checkpointed torch.Generator and CPU kernels are deterministic."""
    world, exp = _setup(tiny_raw, name, toy_teacher, tmp_path)
    student = tmp_path / "student.pt"
    distill(world, exp, toy_teacher, student, tmp_path / "a", tmp_path / "wa", progress=False)
    distill(world, exp, toy_teacher, student, tmp_path / "b", tmp_path / "wb", progress=False, stop_after=20)
    assert not (tmp_path / "b" / "generator.pt").exists()  # a killed run leaves no final output
    # Simulate a kill between checkpoints: the log has lines past the last checkpoint that must be dropped.
    with open(tmp_path / "wb" / "log.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 20, "junk": True}) + "\n")
    distill(world, exp, toy_teacher, student, tmp_path / "b", tmp_path / "wb", progress=False)
    a, b = load_torch(tmp_path / "a" / "generator.pt"), load_torch(tmp_path / "b" / "generator.pt")
    for key in ("ema", "generator"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    la = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lb] == list(range(30))
    assert [r["loss_gen"] for r in la] == [r["loss_gen"] for r in lb]


def test_divergence_stops_with_clear_error_and_keeps_checkpoint(tiny_raw, toy_teacher, tmp_path):
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.lr_g", 1e6)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.grad_clip", 0.0)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.iterations", 200)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.betas_g", [0.9, 0.999])
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    with pytest.raises(DivergenceError, match="diverged at iteration"):
        distill(world, exp, toy_teacher, tmp_path / "student.pt", tmp_path / "out", tmp_path / "work",
                progress=False)
    assert not (tmp_path / "out" / "generator.pt").exists()


def test_changed_settings_discard_stale_resume_state(tiny_raw, toy_teacher, tmp_path):
    """A finished run's state must not be reused when the experiment's settings change (both engines rerun
    distill with the same work dir): the rerun equals a fresh run."""
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    student = tmp_path / "student.pt"
    distill(world, exp, toy_teacher, student, tmp_path / "out", tmp_path / "work", progress=False)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.lr_g", 1e-3)
    exp2 = parse_params(tiny_raw).experiment("tiny_emd")
    distill(world, exp2, toy_teacher, student, tmp_path / "out", tmp_path / "work", progress=False)
    distill(world, exp2, toy_teacher, student, tmp_path / "fresh", tmp_path / "work_fresh", progress=False)
    a, b = load_torch(tmp_path / "out" / "generator.pt"), load_torch(tmp_path / "fresh" / "generator.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_sharded_sampling_gives_the_same_set(tiny_raw, toy_teacher, tmp_path):
    """Each batch has its own seed, so two 'processes' together draw exactly the single-process set."""
    world, _ = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    gen = load_generator(tmp_path / "student.pt", world)
    full, _ = generate(gen, (2,), 1000, seed=5, labels=0, batch_size=100)
    parts = [generate(gen, (2,), 1000, seed=5, labels=0, batch_size=100, shard=(r, 2))[0] for r in range(2)]
    # rank r holds batches r, r + 2, ...: interleave them back.
    chunks = [parts[j % 2][(j // 2) * 100:(j // 2 + 1) * 100] for j in range(10)]
    assert torch.equal(torch.cat(chunks), full)
    # uint8 (how ImageNet samples are stored): EDM's quantisation of the very same samples, batch by batch.
    quantised, _ = generate(gen, (2,), 1000, seed=5, labels=0, batch_size=100, uint8=True)
    assert quantised.dtype == torch.uint8
    assert torch.equal(quantised, torch.clamp(full * 127.5 + 128, 0, 255).to(torch.uint8))


def test_gradient_accumulation_runs_and_must_divide_the_batch(tiny_raw, toy_teacher, tmp_path):
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.grad_accum", 3)
    with pytest.raises(Exception, match=r"distill\.grad_accum: must divide batch_size \(64\)"):
        parse_params(tiny_raw)
    set_dotted(tiny_raw, "experiments.tiny_emd.distill.grad_accum", 4)
    world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path)
    summary = distill(world, exp, toy_teacher, tmp_path / "student.pt", tmp_path / "out", tmp_path / "work",
                      progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and all(torch.isfinite(torch.tensor(r["loss_gen"])) for r in log)
    assert summary["sec_per_iter"] > 0


def test_curvature_z_step_moves_z_where_the_shrink_step_does_not(tiny_raw, toy_teacher, tmp_path):
    """Chain health in the training log, end to end (30 iterations of the tiny toy2d run, sigma from the template).

    The shrink step gamma_z sigma^2/(sigma^2 + 1) with gamma_z = 0.005 moves z by about 0.1 prior standard
    deviations at most at K = 4; the curvature step with gamma_z = 0.3 (posterior widths) moves it several times more,
    without a single chain reset. Measured when written: mean z_move_rms 0.03 (shrink) and 0.3-0.6 (curvature)."""
    moves = {}
    for scheme, gamma_z in (("shrink", 0.005), ("curvature", 0.3)):
        set_dotted(tiny_raw, "experiments.tiny_emd.distill.z_step", scheme)
        set_dotted(tiny_raw, "experiments.tiny_emd.distill.z_step_ref", 1.0)
        set_dotted(tiny_raw, "experiments.tiny_emd.distill.gamma_z", gamma_z)
        world, exp = _setup(tiny_raw, "tiny_emd", toy_teacher, tmp_path / scheme)
        distill(world, exp, toy_teacher, tmp_path / scheme / "student.pt", tmp_path / scheme / "out",
                tmp_path / scheme / "work", progress=False)
        log = [json.loads(line) for line in (tmp_path / scheme / "out" / "log.jsonl").read_text().splitlines()]
        assert all(r["chains_reset_frac"] == 0 and r["chains_nonfinite"] == 0 for r in log)
        moves[scheme] = sum(r["z_move_rms"] for r in log) / len(log)
    assert moves["shrink"] < 0.1, moves
    assert moves["curvature"] > 3 * moves["shrink"], moves
