"""What a distillation run reports while it trains: training metrics through accelerate's trackers, and the EMA
generator's quality at fixed points (convergence curves).

Trackers (``distill.log_with``). ``dvclive`` (the default) writes ``dvclive/`` (``metrics.json`` and one TSV per
metric under ``plots/metrics/``), which ``dvc plots show`` and ``dvc exp show`` read through the pipeline's
declarations; ``tensorboard`` and ``wandb`` are optional extras (``pip install tensorboard`` / ``wandb``): asked for
and absent, the run stops before training with a message, where accelerate alone would drop the tracker silently.
DVCLive runs with its DVC and git integration off (no ``dvc.yaml`` of its own, no ``dvc exp save``, no Studio, no
reading of the repository): the pipeline, not the logger, declares what DVC tracks, and a test or a run outside a
repository must not touch git. W&B runs offline unless ``WANDB_MODE`` says otherwise: nothing reaches the network.

Where. Trackers write under ``<work_dir>/tracking/`` while the run trains (a live view, like ``log.jsonl``); the
finished run copies them into its distill output folder, which both engines declare as an output, beside
``convergence.jsonl``. A resumed run clears that folder and replays the log of the state it resumed from, so the
trackers hold exactly the iterations the outputs cover: no duplicate steps from the attempt that was killed.

Convergence (``distill.eval_every`` > 0). Every ``eval_every`` iterations the EMA generator draws
``distill.eval_samples`` samples from its own ``torch.Generator`` (fixed seed, the same latents at every point:
common random numbers make the curve's steps the generator's change, not sampling noise) and a cheap metric of the
world scores them: on toy2d the exact mode statistics against the true mixture and the 2-D Frechet distance to the
mixture's exact moments; on digits the Frechet distance in pixel space to the held-out split. The training's RNG
stream is never touched, so the trained generator is bitwise the one of a run without evaluation. Each point
records the iterations done and the training seconds so far, the sum of the per-iteration timings of the log (score,
E- and M-step phases): evaluation, checkpoints and logging are excluded, and a resumed run continues the sum from
its state. The points live in the per-iteration log record (``eval``), which the resume state carries, so a resumed
run's ``convergence.jsonl`` is the uninterrupted run's up to the timings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import DVCLiveTracker
from torch import Tensor, nn

from mct.config import DistillConfig, ExperimentConfig
from mct.convergence import FILE as CONVERGENCE_FILE
from mct.worlds.registry import World

TRACKER_PACKAGES = {"dvclive": "dvclive", "tensorboard": "tensorboard", "wandb": "wandb"}
EVAL_SEED = 20_240_517  # the latents of every evaluation point (any fixed value: only its fixedness matters)
TIMING_KEYS = ("t_score", "t_estep", "t_mstep")  # the per-iteration phases whose sum is training time


class TrackerUnavailableError(RuntimeError):
    """distill.log_with names a tracker whose package is not installed."""


def tracking_dir(work_dir: Path) -> Path:
    return work_dir / "tracking"


def require_tracker(name: str) -> None:
    """Stop with an install hint when the tracker's package is missing (accelerate would skip it silently)."""
    package = TRACKER_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise TrackerUnavailableError(
            f"distill.log_with is {name!r} but the package {package!r} is not installed: `pip install {package}` "
            f"(an optional extra), or set distill.log_with to dvclive or none")


# --- DVCLive without its repository integration --------------------------------------------------------------


def _offline_live_class():
    """dvclive.Live with the DVC/git/Studio hooks off. ``_init_dvc`` would open (or even ``dvc init``) the
    repository around the working directory and name a `dvc exp`; ``post_data_to_studio`` re-reads every TSV at
    every step (quadratic in the run's length) for a Studio that is not configured. Both are replaced by nothing."""
    from dvclive import Live

    class OfflineLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

        def post_data_to_studio(self) -> None:
            return None

    return OfflineLive


class LocalDVCLiveTracker(DVCLiveTracker):
    """accelerate's DVCLive tracker on an :func:`_offline_live_class` logger (built on the main process only)."""

    def start(self) -> None:
        from accelerate.state import PartialState

        if PartialState().is_main_process and self.live is None:
            self.live = _offline_live_class()(**{"save_dvc_exp": False, "dvcyaml": None, **self.init_kwargs})


def accelerator_kwargs(d: DistillConfig, work_dir: Path) -> dict[str, Any]:
    """The tracker arguments of ``Accelerator(...)`` for ``d.log_with`` (checked installed first)."""
    if d.log_with == "none":
        return {}
    require_tracker(d.log_with)
    if d.log_with == "dvclive":
        return {"log_with": [LocalDVCLiveTracker(dir=str(tracking_dir(work_dir) / "dvclive"))]}
    return {"log_with": d.log_with, "project_dir": str(tracking_dir(work_dir))}


# --- world metrics at a convergence point --------------------------------------------------------------------


def world_metric(world: World) -> Callable[[Tensor], dict[str, float]] | None:
    """The cheap quality metric of a world's samples (World.training_metric), or None where the world has none
    (ImageNet: Inception FID is the evaluate stage's, far too costly to run inside training)."""
    return world.training_metric()


# --- the run's tracking --------------------------------------------------------------------------------------


def _scalars(prefix: str, rec: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers as tracker keys; the iteration is the tracker's step, not a metric."""
    return {f"{prefix}/{k}": float(v) for k, v in rec.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracking:
    """The trackers and the convergence points of one distillation run (see the module docstring).

    ``train.distill`` calls it three times: built after the resume state is loaded (clears the trackers' folder and
    replays the resumed log), :meth:`step` once per iteration (returns what to merge into the log record), and
    :meth:`finish` inside the atomic output folder; :meth:`close` in the loop's ``finally``."""

    def __init__(self, acc: Accelerator, world: World, exp: ExperimentConfig, work_dir: Path,
                 log_lines: list[str]) -> None:
        self.acc, self.world, self.d = acc, world, exp.distill
        self.dir = tracking_dir(work_dir)
        self.metric = world_metric(world) if self.d.eval_every > 0 else None
        self.seconds = 0.0
        self.closed = False
        if acc.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)  # replayed below: the trackers cover the resumed log only
            self.dir.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.init_trackers(exp.method_name, config=_flat_config(exp), init_kwargs=self._init_kwargs())
        for line in log_lines:
            rec = json.loads(line)
            self._account(rec)
            self._log(rec["iteration"] + 1, rec)

    def _init_kwargs(self) -> dict[str, Any]:
        return {"wandb": {"dir": str(self.dir), "mode": os.environ.get("WANDB_MODE", "offline")}}

    def _account(self, rec: dict[str, Any]) -> None:
        self.seconds += sum(float(rec.get(k, 0.0)) for k in TIMING_KEYS)

    def _log(self, done: int, rec: dict[str, Any]) -> None:
        every = self.d.log_every
        due = every and (done % every == 0 or done == self.d.iterations)
        values = _scalars("train", rec) if due else {}
        if isinstance(rec.get("eval"), dict):
            values.update(_scalars("eval", rec["eval"]))
        if values:
            self.acc.log(values, step=done)

    def step(self, done: int, ema: nn.Module, rec: dict[str, Any]) -> dict[str, Any]:
        """After iteration ``done`` (1-based count): the convergence point when one is due (main process; an
        ``{"eval": {...}}`` to merge into the log record, else ``{}``), and the trackers' line."""
        self._account(rec)
        extra: dict[str, Any] = {}
        if self.metric is not None and done % self.d.eval_every == 0 and self.acc.is_main_process:
            extra = {"eval": self.evaluate(done, ema)}
        self._log(done, {**rec, **extra})
        return extra

    def evaluate(self, done: int, ema: nn.Module) -> dict[str, float]:
        from mct.student import generate

        t0 = time.perf_counter()
        x, _ = generate(ema, self.world.data_shape, self.d.eval_samples, EVAL_SEED, self.world.eval_labels,
                        batch_size=self.d.eval_samples, device=self.acc.device)
        point = {"iteration": done, "train_seconds": self.seconds, **self.metric(x.float())}
        point["eval_seconds"] = time.perf_counter() - t0
        return point

    def finish(self, out: Path, records: list[dict[str, Any]]) -> None:
        """Close the trackers and write into the output folder ``out`` their files and ``convergence.jsonl``."""
        self.close()
        points = [r["eval"] for r in records if isinstance(r.get("eval"), dict)]
        if points:
            (out / CONVERGENCE_FILE).write_text("".join(json.dumps(p) + "\n" for p in points))
        if self.dir.exists():
            for child in sorted(self.dir.iterdir()):
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, out / child.name)

    def close(self) -> None:
        """End the trackers (their files complete on disk); the process group is left to its owner, which
        ``Accelerator.end_training`` would destroy."""
        if not self.closed:
            self.closed = True
            for tracker in self.acc.trackers:
                tracker.finish()


def _flat_config(exp: ExperimentConfig) -> dict[str, Any]:
    """The run's settings as the flat scalar mapping trackers store as hyper-parameters."""
    from dataclasses import asdict

    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[prefix] = v
        else:
            out[prefix] = str(v)

    walk("", asdict(exp))
    return out
