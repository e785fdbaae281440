"""Crash consistency of `mct distill` (issue 11, findings 1-4): nothing lost, nothing silently wrong.

A run is killed (``os._exit`` in a forked child: no cleanup runs, as with kill -9) at every save point of every
checkpoint, or its disk fills during a save, or its newest state is damaged; the rerun must end bitwise where the
uninterrupted run ends. The tiny toy2d setting (6 iterations, a state every 2) keeps each run well under a second.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mct import resume
from mct.config import parse_params, set_dotted
from mct.io import atomic_dir, load_torch
from mct.teacher import train_teacher
from mct.train import DivergenceError, distill
from mct.worlds.registry import make_world

from .conftest import TINY_RAW

KILLED = 137  # the child's exit status at a fault: what kill -9 reports
STEPS = (2, 4, 6)  # the checkpoints of the tiny run
# Where a save can be cut: mid-write of the temporary file, after it is complete, after the rename, after pruning.
SAVE_POINTS = ("partial", "tmp-written", "renamed", "pruned")


def _raw() -> dict:
    raw = copy.deepcopy(TINY_RAW)
    raw["teachers"]["toy2d_mlp"].update(iterations=60, arch_kwargs={"hidden": 32, "depth": 2})
    raw["templates"]["toy2d"]["distill"].update(iterations=6, checkpoint_every=2, batch_size=16, K=2)
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(world, experiment, teacher, student, reference outputs of an uninterrupted run)."""
    try:
        from mct.student import init_student
    except ImportError:  # before the student code moved out of mct.train
        from mct.train import init_student

    root = tmp_path_factory.mktemp("reliability")
    params = parse_params(_raw())
    world = make_world("toy2d", params.worlds["toy2d"])
    teacher = root / "teacher.pt"
    x = world.mixture.sample(4096, torch.Generator().manual_seed(0))
    train_teacher(world, params.teachers["toy2d_mlp"], x, None, teacher, progress=False)
    exp = params.experiment("tiny_emd")
    init_student(world, exp, teacher, root / "student.pt")
    distill(world, exp, teacher, root / "student.pt", root / "ref", root / "ref_work", progress=False)
    return world, exp, teacher, root / "student.pt", root / "ref"


def _run(setup, out: Path, work: Path, exp=None, **kw):
    world, exp0, teacher, student, _ = setup
    return distill(world, exp or exp0, teacher, student, out, work, progress=False, **kw)


def _records(path: Path) -> list[dict]:
    """Log records without the wall-clock fields (the only thing a rerun may change)."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_")}
            for line in path.read_text().splitlines()]


def assert_bitwise_equal(ref: Path, out: Path) -> None:
    a, b = load_torch(ref / "generator.pt"), load_torch(out / "generator.pt")
    for key in ("ema", "generator"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert _records(ref / "log.jsonl") == _records(out / "log.jsonl")
    # dvclive/: the default tracker's files (mct.tracking), replayed from the resumed log
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "generator.pt", "log.jsonl", "summary.json"]


def _half_writer(obj, path: Path) -> None:
    """torch.save that stops halfway: the state a kill (or a full disk) leaves mid-write."""
    torch.save(obj, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _killed_child(setup, out: Path, work: Path, point: str, step: int) -> None:
    """Run distill in a forked child that dies (no cleanup) at ``point`` of the save of ``step``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        try:
            if point == "partial":
                def writer(obj, path):
                    if obj["step"] == step:
                        _half_writer(obj, path)
                        os._exit(KILLED)
                    torch.save(obj, path)

                resume.WRITER = writer
            else:
                saves = iter(STEPS)
                current = {"step": None}

                def hook(p: str) -> None:
                    if p == "tmp-written":
                        current["step"] = next(saves)
                    if p == point and current["step"] == step:
                        os._exit(KILLED)

                resume.FAULT_HOOK = hook
            _run(setup, out, work)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill_at_every_save_point_resumes_bitwise(setup, tmp_path, point, step):
    """Finding 1: a kill between any two writes of a checkpoint; the rerun ends bitwise where an uninterrupted run
    ends (before, RNG and weights were two files and a kill between them resumed silently to other weights)."""
    _killed_child(setup, tmp_path / "out", tmp_path / "work", point, step)
    assert not (tmp_path / "out").exists()  # a killed run leaves no output
    _run(setup, tmp_path / "out", tmp_path / "work")
    assert_bitwise_equal(setup[4], tmp_path / "out")
    assert not list((tmp_path / "work").glob(".state-*.tmp"))  # leftovers of the kill are cleaned up


def test_disk_full_during_a_save_loses_nothing(setup, tmp_path, monkeypatch):
    """A writer that fails with ENOSPC halfway through the second save: the first state stays as it was, no partial
    file is left, no output appears; the rerun (disk freed) ends bitwise equal."""
    work = tmp_path / "work"
    calls = []

    def full_disk(obj, path):
        calls.append(obj["step"])
        if obj["step"] == 4:
            _half_writer(obj, path)
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save(obj, path)

    monkeypatch.setattr(resume, "WRITER", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _run(setup, tmp_path / "out", work)
    assert calls == [2, 4]
    assert [p.name for p in work.iterdir() if p.name.startswith(("state", ".state"))] == ["state-000000002.pt"]
    before = (work / "state-000000002.pt").read_bytes()
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(resume, "WRITER", torch.save)
    _run(setup, tmp_path / "out", work, stop_after=2)  # the state it resumes from was not touched
    assert (work / "state-000000002.pt").read_bytes() == before
    _run(setup, tmp_path / "out", work)
    assert_bitwise_equal(setup[4], tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "garbage", "wrong-step", "non-finite"])
def test_corrupt_latest_state_is_set_aside_and_the_previous_one_used(setup, tmp_path, capfd, damage):
    """Finding 2: a damaged newest state no longer blocks the stage; it is renamed ``*.corrupt`` with a warning that
    names it, the previous state is used, and the result is still bitwise the uninterrupted one."""
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    latest = work / "state-000000004.pt"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:1000])
    elif damage == "zero-byte":
        latest.write_bytes(b"")
    elif damage == "garbage":
        latest.write_bytes(os.urandom(4096))
    else:
        state = load_torch(latest)
        if damage == "wrong-step":
            state["step"] = 6
        else:
            next(iter(state["ema"].values())).view(-1)[0] = float("nan")
        torch.save(state, latest)
    capfd.readouterr()
    _run(setup, tmp_path / "out", work)
    err = capfd.readouterr().err
    assert f"resume state {latest} is unusable" in err and f"{latest}.corrupt" in err
    assert "resuming from the previous good state" in err and "state-000000002.pt" in err
    assert (work / "state-000000004.pt.corrupt").exists()
    assert_bitwise_equal(setup[4], tmp_path / "out")


def test_no_usable_state_restarts_from_scratch_with_a_message(setup, tmp_path, capfd):
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    for p in work.glob("state-*.pt"):
        p.write_bytes(b"\0" * 10)
    (work / "log.jsonl").write_text('{"iteration": 0, "loss_')  # a half-written line: never read back
    capfd.readouterr()
    _run(setup, tmp_path / "out", work)
    assert "restarting from scratch" in capfd.readouterr().err
    assert_bitwise_equal(setup[4], tmp_path / "out")


def test_legacy_state_files_are_not_resumed_from(setup, tmp_path):
    """The pre-v1 layout (checkpoint.pt + rng.rank0.pt, not tied together) is discarded, never half-used."""
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"step": 4, "rng": torch.zeros(3)}, work / "rng.rank0.pt")
    (work / "checkpoint.pt").write_bytes(b"")
    _run(setup, tmp_path / "out", work)
    assert not (work / "checkpoint.pt").exists() and not (work / "rng.rank0.pt").exists()
    (aside,) = work.glob("discarded-*")  # moved aside, not deleted
    assert {"checkpoint.pt", "rng.rank0.pt"} <= {p.name for p in aside.iterdir()}
    assert_bitwise_equal(setup[4], tmp_path / "out")


def test_states_hold_everything_and_only_two_are_kept(setup, tmp_path):
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work)
    assert [p.name for p in sorted(work.glob("state-*"))] == ["state-000000004.pt", "state-000000006.pt"]
    state = load_torch(work / "state-000000006.pt")
    assert state["format"] == resume.FORMAT and state["step"] == 6 and state["world_size"] == 1
    assert len(state["rng"]) == 1 and len(state["log"]) == 6
    assert {"generator", "score", "ema", "opt_g", "opt_s", "fingerprint"} <= state.keys()


@pytest.mark.parametrize(("poisoned_at", "last_good"), [(0, None), (2, "state-000000002.pt")])
def test_non_finite_weights_are_never_checkpointed(setup, tmp_path, monkeypatch, poisoned_at, last_good):
    """Finding 3: an EMA weight turns infinite at iteration ``poisoned_at`` while every loss stays finite (the EMA
    is in no loss), as the issue's infinite learning rate made it. Before, the checkpoint held it and the message
    claimed a good checkpoint; now the next save is refused, nothing non-finite is on disk, and the message names
    the last good state truthfully, or says there is none."""
    from mct import train

    real, calls = train.ema_update, []

    def poisoning_ema_update(ema, *args, **kwargs):
        real(ema, *args, **kwargs)
        if len(calls) == poisoned_at:
            with torch.no_grad():
                next(iter(ema.parameters())).view(-1)[0] = float("inf")
        calls.append(1)

    monkeypatch.setattr(train, "ema_update", poisoning_ema_update)
    work = tmp_path / "work"
    expected = (f"the last good checkpoint is {work / last_good}" if last_good
                else "no checkpoint of this run has been written")
    with pytest.raises(DivergenceError, match=r"ema\..* is not finite") as err:
        _run(setup, tmp_path / "out", work)
    assert expected in str(err.value)
    states = sorted(work.glob("state-*"))
    assert [p.name for p in states] == ([last_good] if last_good else [])
    assert all(resume.non_finite(load_torch(p)) is None for p in states)
    assert not (tmp_path / "out").exists()


def test_divergence_names_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    """A loss that turns NaN at iteration 3 (after the state of step 2): the stop names that state, which holds only
    finite tensors and from which a rerun resumes."""
    from mct import methods

    real, calls = methods.mstep_loss, []

    def nan_from_iteration_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(methods, "mstep_loss", nan_from_iteration_3)
    work = tmp_path / "work"
    with pytest.raises(DivergenceError, match="diverged at iteration 3") as err:
        _run(setup, tmp_path / "out", work)
    good = work / "state-000000002.pt"
    assert f"the last good checkpoint is {good}" in str(err.value)
    assert [p.name for p in work.glob("state-*")] == [good.name]
    assert resume.non_finite(load_torch(good)) is None


def test_a_state_of_another_world_size_is_refused(setup, tmp_path):
    """Finding 4 (resume side): a state written by 2 processes is not resumed by 1 (its RNG streams are per rank)."""
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=2)
    state = load_torch(work / "state-000000002.pt")
    state["world_size"], state["rng"] = 2, state["rng"] * 2
    torch.save(state, work / "state-000000002.pt")
    with pytest.raises(resume.ResumeError, match="written by 2 processes but this run has 1"):
        _run(setup, tmp_path / "out", work)


def test_a_process_count_other_than_configured_is_refused(setup, tmp_path):
    """Finding 4 (start-up side): `num_processes: 2` started as one process (what `accelerate launch --num_processes
    2` does on a CPU host) halved the global batch silently; now it stops before any work."""
    raw = _raw()
    set_dotted(raw, "templates.toy2d.distill.num_processes", 2)
    exp = parse_params(raw).experiment("tiny_emd")
    with pytest.raises(RuntimeError, match="distill.num_processes is 2 but 1 process"):
        _run(setup, tmp_path / "out", tmp_path / "work", exp=exp)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_two_cpu_processes_are_launched_by_the_engines_command():
    """Finding 4 (launcher side): both engines take the command from one place; for N > 1 processes it carries
    accelerate's --multi_gpu, which starts N torchrun processes on a CPU host too."""
    from mct.config import DistillConfig

    try:
        from mct.stages import launcher
    except ImportError:  # before the stage table: the rule lives in the Snakemake helpers and workflow/dvc_vars.py
        pytest.skip("mct.stages not present")
    assert launcher(DistillConfig(num_processes=2)) == "accelerate launch --multi_gpu --num_processes 2 -m mct.cli"
    assert launcher(DistillConfig(gpus=1)) == "accelerate launch --num_processes 1 -m mct.cli"
    assert launcher(DistillConfig()) == "mct"


def test_atomic_dir_replaces_a_folder_as_a_whole(tmp_path):
    """Distill outputs appear together: a failure inside the block leaves the old folder and no temporary one."""
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (dest / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(dest) as tmp:
        (tmp / "b").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def _launch(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_cpu_processes_run_resume_bitwise_and_refuse_one(setup, tmp_path):
    """Finding 4, end to end (about 2 minutes on 2 cores): the engines' launch line starts 2 processes on this CPU
    host, their state holds both RNG streams, a 2-process run stopped at step 4 resumes bitwise, and a single
    process refuses the 2-process configuration."""
    _, _, teacher, student, _ = setup
    raw = _raw()
    raw["templates"]["toy2d"]["distill"]["num_processes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["distill", "--experiment", "tiny_emd", "--params", "params.yaml", "--teacher", str(teacher),
            "--student", str(student), "--no-progress"]
    two = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "mct.cli", *args]
    r = _launch([*two, "--out", "a", "--work", "wa"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch([*two, "--out", "b", "--work", "wb", "--stop-after", "4"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_torch(tmp_path / "wb" / "state-000000004.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and not torch.equal(*state["rng"])
    r = _launch([*two, "--out", "b", "--work", "wb"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bitwise_equal(tmp_path / "a", tmp_path / "b")
    r = _launch([sys.executable, "-m", "mct.cli", *args, "--out", "c", "--work", "wb"], tmp_path)
    assert r.returncode == 1 and "distill.num_processes is 2 but 1 process(es) started" in r.stderr, r.stderr


def test_atomic_path_makes_the_data_durable_before_the_rename(tmp_path, monkeypatch):
    """Finding 2: atomic_path renamed without fsync, so after a power loss the new name could hold an empty file.
    Now the file's data is fsynced before the rename and the folder after it."""
    from mct import io as mio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    dest = tmp_path / "x.json"
    mio.write_json({"a": 1}, dest)
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".x.json.")) and events[2][1] == str(tmp_path)


# --- issue 21, item 5: a changed flag never destroys a run ------------------------------------------------------


def _with(setup, **distill):
    exp = setup[1]
    return dataclasses.replace(exp, distill=dataclasses.replace(exp.distill, **distill))


@pytest.mark.parametrize("change", [{"log_every": 5}, {"log_with": "none", "eval_every": 3, "checkpoint_every": 3}])
def test_a_logging_change_resumes_bitwise(setup, tmp_path, capfd, change):
    """Keys that cannot change the numbers (tracker, logging and evaluation cadence, checkpoint cadence) keep the
    resume state: the run resumes, says so, and ends bitwise where the uninterrupted run ends."""
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    capfd.readouterr()
    _run(setup, tmp_path / "out", work, exp=_with(setup, **change))
    err = capfd.readouterr().err
    assert f"resuming from step 4 ({work / 'state-000000004.pt'})" in err, err
    assert "not resuming" not in err and not list(work.glob("discarded-*"))
    a, b = load_torch(setup[4] / "generator.pt"), load_torch(tmp_path / "out" / "generator.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    strip = [{k: v for k, v in r.items() if k != "eval"} for r in _records(tmp_path / "out" / "log.jsonl")]
    assert _records(setup[4] / "log.jsonl") == strip  # eval points (own RNG) are the only addition
    if change == {"log_every": 5}:
        assert_bitwise_equal(setup[4], tmp_path / "out")


def test_an_lr_change_refuses_to_resume_names_it_and_keeps_the_files(setup, tmp_path, capfd):
    """A key that matters: the run starts from step 0, the warning names distill.lr_g with both values and where the
    old files went; they are all there, and moved back under the old settings they resume bitwise."""
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    old_lr = setup[1].distill.lr_g
    capfd.readouterr()
    _run(setup, tmp_path / "out2", work, exp=_with(setup, lr_g=old_lr * 2), stop_after=2)
    err = capfd.readouterr().err
    (aside,) = work.glob("discarded-*")
    assert f"distill.lr_g: {old_lr!r} -> {old_lr * 2!r}" in err and str(aside) in err, err
    assert "starts from step 0" in err and "resuming from step" not in err
    assert sorted(p.name for p in aside.iterdir()) == ["log.jsonl", "settings.json", "state-000000002.pt",
                                                       "state-000000004.pt"]
    assert [p.name for p in work.glob("state-*")] == ["state-000000002.pt"]  # the new run's own
    restored = tmp_path / "restored"
    aside.rename(restored)
    capfd.readouterr()
    _run(setup, tmp_path / "out", restored)
    assert "resuming from step 4" in capfd.readouterr().err
    assert_bitwise_equal(setup[4], tmp_path / "out")


def test_a_state_of_the_older_fingerprint_still_resumes(setup, tmp_path, capfd):
    """States an older mct wrote (fingerprint over every key and the files' bytes, no settings.json) resume when the
    settings are the same, rather than being set aside by the upgrade."""
    from mct.train import _legacy_fingerprint

    world, exp, teacher, student, ref = setup
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    for p in work.glob("state-*.pt"):
        state = load_torch(p)
        state["fingerprint"] = _legacy_fingerprint(exp, teacher, student)
        torch.save(state, p)
    (work / resume.SETTINGS).unlink()
    capfd.readouterr()
    _run(setup, tmp_path / "out", work)
    assert "resuming from step 4" in capfd.readouterr().err
    assert_bitwise_equal(ref, tmp_path / "out")


def test_a_teacher_trained_again_is_the_same_teacher(setup, tmp_path, capfd):
    """The other engine's training of the same teacher differs only in its wall-clock record (meta): the state
    resumes. Other weights are another teacher, named as the change."""
    world, exp, teacher, student, ref = setup
    work = tmp_path / "work"
    _run(setup, tmp_path / "out", work, stop_after=4)
    ckpt = load_torch(teacher)
    ckpt["meta"] = {**ckpt["meta"], "seconds": ckpt["meta"].get("seconds", 0) + 1.5}
    again = tmp_path / "teacher_again.pt"
    torch.save(ckpt, again)
    assert again.read_bytes() != teacher.read_bytes()
    capfd.readouterr()
    distill(world, exp, again, student, tmp_path / "out", work, progress=False)
    assert "resuming from step 4" in capfd.readouterr().err
    assert_bitwise_equal(ref, tmp_path / "out")
    next(iter(ckpt["state_dict"].values())).view(-1)[0] += 1.0
    torch.save(ckpt, again)
    distill(world, exp, again, student, tmp_path / "out", work, progress=False, stop_after=2)
    assert "changed: teacher_file: 'content:" in capfd.readouterr().err
