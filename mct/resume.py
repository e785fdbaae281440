"""Crash-consistent resume state for ``mct distill``.

One file per checkpoint, ``<work>/state-<step>.pt``, holds everything a resumed run needs: the networks, both
optimisers, the EMA, the RNG state of every rank, the log records up to that step, the step itself, the run's
fingerprint and its world size. It is written to a temporary file, flushed and fsynced, renamed into place and
the folder fsynced, so at any instant the newest readable state is a whole one. Older states are pruned only
after the new one is durable; the previous one is kept (:data:`KEEP`), so a latest state that turns out to be
unreadable still leaves a good one to fall back on.

On load every candidate is verified (format, step in the file = step in the name, number of RNG states = world
size, every tensor finite); one that fails is set aside (renamed ``*.corrupt``, with a warning naming it) and the
next older one is tried. A state of another run (settings or inputs changed: another fingerprint) is discarded; a
state of this run written by another number of processes is refused (:class:`ResumeError`): its RNG streams
cannot be mapped onto a different number of ranks.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mct.io import atomic_path, fsync_dir, load_torch

FORMAT = "mct-resume-v1"
KEEP = 2  # the newest state and the one before it: a fallback if the newest cannot be read
_NAME = re.compile(r"state-(\d{9})\.pt")
# Files of the pre-v1 layout (RNG saved apart from the weights, not tied to a step): never resumed from.
LEGACY = ("checkpoint.pt", "rng.rank*.pt")

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


def load_latest(work_dir: Path, fingerprint: str, world_size: int, is_main: bool = True,
                barrier: Callable[[], None] = lambda: None) -> Loaded | None:
    """The newest verified state of this run in ``work_dir``, or None (start from scratch).

    Unreadable or inconsistent states are renamed ``<name>.corrupt`` by the main process (every rank verifies the
    same files read-only first, so all ranks choose the same state). States of another fingerprint are deleted.
    """
    legacy = [p for pattern in LEGACY for p in work_dir.glob(pattern)]
    chosen: Loaded | None = None
    rejected: list[tuple[Path, str]] = []
    stale: list[Path] = []
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
        if state["fingerprint"] != fingerprint:
            stale.append(path)
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
        for tmp in work_dir.glob(".state-*.tmp"):  # what a kill during a save left behind (never a state)
            tmp.unlink(missing_ok=True)
        for path, why in rejected:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            _warn(f"resume state {path} is unusable ({why}); set aside as {aside}")
        if stale or legacy:
            _warn(f"discarding resume state in {work_dir} (settings or inputs changed, or an older layout)")
            for p in stale + legacy:
                p.unlink(missing_ok=True)
        if rejected or stale or legacy:
            fsync_dir(work_dir)
        if chosen is not None and rejected:
            _warn(f"resuming from the previous good state {chosen.path} (step {chosen.step})")
        elif chosen is None and rejected:
            _warn(f"no usable resume state left in {work_dir}: restarting from scratch")
    barrier()
    return chosen
