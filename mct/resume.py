"""Crash-consistent resume state for ``mct distill``.

One file per checkpoint, ``<work>/state-<step>.pt``, holds everything a resumed run needs: the networks, both
optimisers, the EMA, the RNG state of every rank, the log records up to that step, the step itself, the run's
fingerprint and its world size. It is written to a temporary file, flushed and fsynced, renamed into place and
the folder fsynced, so at any instant the newest readable state is a whole one. Older states are pruned only
after the new one is durable; the previous one is kept (:data:`KEEP`), so a latest state that turns out to be
unreadable still leaves a good one to fall back on.

On load every candidate is verified (format, step in the file = step in the name, number of RNG states = world
size, every tensor finite); one that fails is set aside (renamed ``*.corrupt``, with a warning naming it) and the
next older one is tried. A state of this run written by another number of processes is refused
(:class:`ResumeError`): its RNG streams cannot be mapped onto a different number of ranks.

What a state belongs to. The fingerprint hashes the run's settings (:func:`run_settings`): the resolved experiment
without the keys that cannot change the numbers (:data:`mct.config.NEUTRAL_KEYS`: logging and evaluation cadence,
the tracker, checkpoint cadence, the sample/evaluate stages' settings) and the content of the teacher and student-
init files (their tensors and specs, not their wall-clock training records, so the same teacher trained again by the
other engine is the same teacher). The settings themselves are kept beside the states (``settings.json``). A state
of other settings is never resumed and never deleted: it is moved, with ``settings.json`` and the log, into
``<work>/discarded-<UTC time>/``, and the warning names every changed key with its old and new value. A resumed run
says so: ``resuming from step N (file)``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mct.config import numeric_settings, settings_changes
from mct.io import atomic_path, fsync_dir, load_torch, write_json

FORMAT = "mct-resume-v1"
KEEP = 2  # the newest state and the one before it: a fallback if the newest cannot be read
_NAME = re.compile(r"state-(\d{9})\.pt")
# Files of the pre-v1 layout (RNG saved apart from the weights, not tied to a step): never resumed from.
LEGACY = ("checkpoint.pt", "rng.rank*.pt")
SETTINGS = "settings.json"  # beside the states: the settings every state-*.pt of the folder was written under
WRITER: Callable[[Any, Path], None] = torch.save
# Test hook: called with a save point's name ("tmp-written", "renamed", "pruned"); raising there is a kill at that
# point. None in production.
FAULT_HOOK: Callable[[str], None] | None = None


class ResumeError(RuntimeError):
    """Resume state exists for this run but cannot be used as it is (e.g. another world size)."""


@dataclass(frozen=True)
class Loaded:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def state_path(work_dir: Path, step: int) -> Path:
    return work_dir / f"state-{step:09d}.pt"


def list_states(work_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every state file in ``work_dir``, newest first."""
    found = []
    for p in work_dir.glob("state-*.pt"):
        m = _NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def non_finite(obj: Any, prefix: str = "") -> str | None:
    """Dotted name of the first floating tensor in ``obj`` holding a NaN or an infinity, else None."""
    if isinstance(obj, Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return prefix or "<tensor>"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad:
            return bad
    return None


def _warn(msg: str) -> None:
    print(f"distill: warning: {msg}", file=sys.stderr, flush=True)


def save_state(work_dir: Path, state: dict[str, Any], keep: int = KEEP,
               writer: Callable[[Any, Path], None] | None = None) -> Path:
    """Write ``state`` (which carries its ``step``) as one durable file; prune older states beyond ``keep``.

    A non-finite tensor refuses the save (ValueError naming it) before anything is written. ``writer`` is
    :data:`WRITER` by default (tests inject failing writers: a full disk must lose nothing already saved).
    """
    bad = non_finite(state)
    if bad:
        raise ValueError(f"refusing to checkpoint step {state['step']}: {bad} is not finite")
    dest = state_path(work_dir, int(state["step"]))
    with atomic_path(dest) as tmp:
        (writer or WRITER)({"format": FORMAT, **state}, tmp)
        _hook("tmp-written")
    _hook("renamed")
    for _, old in list_states(work_dir)[keep:]:
        old.unlink(missing_ok=True)
    _hook("pruned")
    return dest


def _hook(point: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point)


def verify(path: Path, state: Any, world_size: int) -> str | None:
    """Why ``state`` (read from ``path``) is not a usable resume state of this run, else None.

    A world-size mismatch is not reported here (it is not corruption): :func:`load_latest` refuses it.
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return "not an mct resume state"
    m = _NAME.fullmatch(path.name)
    if not isinstance(state.get("step"), int) or m is None or int(m.group(1)) != state["step"]:
        return f"its step {state.get('step')!r} does not match its name"
    missing = [k for k in ("fingerprint", "world_size", "rng", "generator", "score", "ema", "opt_g", "opt_s", "log")
               if k not in state]
    if missing:
        return f"missing entries {missing}"
    if not isinstance(state["rng"], list) or len(state["rng"]) != state["world_size"]:
        return f"{len(state['rng'])} RNG states for world size {state['world_size']}"
    bad = non_finite(state)
    if bad:
        return f"{bad} is not finite"
    return None


# --- what a state belongs to --------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """sha256 of what a teacher or student-init file means: for mct's own formats every entry but ``meta`` (the
    training's wall-clock record, which differs between two bitwise-equal trainings), tensors by their bytes;
    for any other file (an EDM pickle) its bytes."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file (an EDM pickle) or not weights-only loadable: hash the bytes
        ckpt = None
    h = hashlib.sha256()
    if not (isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("mct-")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "file:" + h.hexdigest()
    _digest_into(h, {k: v for k, v in ckpt.items() if k != "meta"})
    return "content:" + h.hexdigest()


def _digest_into(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(json.dumps(str(k)).encode())
            _digest_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest_into(h, v)
        h.update(b"]")
    else:
        h.update(json.dumps(obj, default=str).encode())


def loaded_code_sha256(package: str = "mct") -> str:
    """sha256 over the source of every module of ``package`` this process has imported (name and bytes, in name
    order): the code that made a run, with or without git, uncommitted edits included. Called at a run's end, when
    every module it imports lazily has been imported."""
    h = hashlib.sha256()
    for name in sorted(m for m in sys.modules if m == package or m.startswith(package + ".")):
        source = getattr(sys.modules[name], "__file__", None)
        if source and source.endswith(".py"):
            h.update(name.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    return h.hexdigest()


def run_settings(experiment: dict[str, Any], teacher_path: Path, student_path: Path) -> dict[str, Any]:
    """The flat settings a run's numbers depend on: the resolved experiment (``dataclasses.asdict``) without
    :data:`mct.config.NEUTRAL_KEYS`, and the teacher's and student-init file's :func:`file_digest`."""
    return {**numeric_settings(experiment), "teacher_file": file_digest(teacher_path),
            "student_file": file_digest(student_path)}


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _read_settings(work_dir: Path) -> dict[str, Any] | None:
    """The folder's ``settings.json`` ({fingerprint, settings}), or None where it is missing or unreadable."""
    try:
        rec = json.loads((work_dir / SETTINGS).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("settings"), dict) else None


def _why_stale(stale_fingerprints: set[str], recorded: dict[str, Any] | None,
               settings: dict[str, Any] | None) -> str:
    """What changed between the discarded states' settings and this run's, as the warning says it."""
    if recorded is None or settings is None or stale_fingerprints != {recorded.get("fingerprint")}:
        return ("their settings are not recorded (written by an older mct, or settings.json is missing), so the "
                "changed keys cannot be named")
    changes = settings_changes(recorded["settings"], settings)
    return "changed: " + "; ".join(changes) if changes else "the settings hash differently (same recorded keys)"


def _move_aside(work_dir: Path, files: list[Path]) -> Path:
    """Move ``files`` into a new ``work_dir/discarded-<UTC time>[-n]/`` and return it (nothing is deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = work_dir / f"discarded-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = work_dir / f"discarded-{stamp}-{n}"
    aside.mkdir()
    for p in files:
        if p.exists():
            os.replace(p, aside / p.name)
    fsync_dir(aside)
    return aside


def load_latest(work_dir: Path, fingerprint: str, world_size: int, is_main: bool = True,
                barrier: Callable[[], None] = lambda: None, settings: dict[str, Any] | None = None,
                legacy: Callable[[], str] | None = None) -> Loaded | None:
    """The newest verified state of this run in ``work_dir``, or None (start from scratch).

    Unreadable or inconsistent states are renamed ``<name>.corrupt`` by the main process (every rank verifies the
    same files read-only first, so all ranks choose the same state). States of another fingerprint are moved aside
    (:func:`_discard`), with the changed keys named when ``settings`` (this run's, :func:`run_settings`) and the
    folder's ``settings.json`` allow. ``legacy`` gives the fingerprint an older mct wrote for these same settings
    (every key, file bytes): a state carrying it is this run's. The main process then records ``settings``.
    """
    legacy_files = [p for pattern in LEGACY for p in work_dir.glob(pattern)]
    accepted = {fingerprint}
    chosen: Loaded | None = None
    rejected: list[tuple[Path, str]] = []
    stale: dict[Path, str] = {}
    for _, path in list_states(work_dir):
        try:
            state = load_torch(path)
        except Exception as e:  # truncated, zero-byte or garbage files fail in many ways inside torch.load
            rejected.append((path, f"unreadable ({type(e).__name__}: {str(e)[:120]})"))
            continue
        problem = verify(path, state, world_size)
        if problem:
            rejected.append((path, problem))
            continue
        if state["fingerprint"] not in accepted and legacy is not None and not (work_dir / SETTINGS).exists():
            accepted.add(legacy())  # a folder of an older mct: its states hashed every key and the files' bytes
            legacy = None
        if state["fingerprint"] not in accepted:
            stale[path] = state["fingerprint"]
            continue
        if state["world_size"] != world_size:
            raise ResumeError(
                f"{path} was written by {state['world_size']} processes but this run has {world_size}; its RNG "
                f"streams cannot be split over another number of ranks. Launch {state['world_size']} processes "
                f"(distill.num_processes), or delete {work_dir} to start over")
        chosen = Loaded(path, state)
        break
    barrier()
    if is_main:
        _settle(work_dir, fingerprint, settings, chosen, rejected, stale, legacy_files)
    barrier()
    return chosen


def _settle(work_dir: Path, fingerprint: str, settings: dict[str, Any] | None, chosen: Loaded | None,
            rejected: list[tuple[Path, str]], stale: dict[Path, str], legacy_files: list[Path]) -> None:
    """The main process's side of :func:`load_latest`: clean up, set aside, say what happens, record settings."""
    for tmp in work_dir.glob(".state-*.tmp"):  # what a kill during a save left behind (never a state)
        tmp.unlink(missing_ok=True)
    for path, why in rejected:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        _warn(f"resume state {path} is unusable ({why}); set aside as {aside}")
    if stale or legacy_files:
        _discard(work_dir, settings, stale, legacy_files)
    if rejected or stale or legacy_files:
        fsync_dir(work_dir)
    if chosen is not None and rejected:
        _warn(f"resuming from the previous good state {chosen.path} (step {chosen.step})")
    elif chosen is None and rejected:
        _warn(f"no usable resume state left in {work_dir}: restarting from scratch")
    if chosen is not None:
        print(f"distill: resuming from step {chosen.step} ({chosen.path})", file=sys.stderr, flush=True)
    if settings is not None:
        write_json({"fingerprint": fingerprint, "settings": settings}, work_dir / SETTINGS)


def _discard(work_dir: Path, settings: dict[str, Any] | None, stale: dict[Path, str],
             legacy_files: list[Path]) -> None:
    """Move the states of other settings (and an older layout's files), their settings.json and the log mirror
    aside, never deleting them, and say which keys changed and where the files are."""
    why = _why_stale(set(stale.values()), _read_settings(work_dir), settings) if stale else \
        "files of an older resume layout (never resumed from)"
    files = [*stale, *legacy_files, work_dir / SETTINGS, work_dir / "log.jsonl"]
    names = [p.name for p in files if p.exists()]
    aside = _move_aside(work_dir, files)
    steps = ", ".join(str(int(_NAME.fullmatch(p.name).group(1))) for p in stale) or "none"
    _warn(f"not resuming from the state in {work_dir} (steps {steps}): {why}. This run starts from step 0; the old "
          f"files ({', '.join(names)}) are kept in {aside} (to continue that run, move them back into {work_dir} "
          f"and rerun with its settings)")
