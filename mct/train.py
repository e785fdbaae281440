"""The distillation loop: score-network DSM steps, then one generator step of the chosen method, on accelerate.

The method (``distill.method``: EMD, SiD, DMD2; mct.methods) turns a drawn micro-batch into the generator's loss;
the loop knows none by name.

State (models, optimisers, EMA, RNG, step) is checkpointed atomically every ``checkpoint_every`` iterations, and a
restarted run resumes from it, so a run killed at iteration N ends where an uninterrupted run ends (bitwise on CPU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm

from mct.config import DistillConfig, ExperimentConfig, LangevinConfig, numeric_settings
from mct.diffusion import GuidedDenoiser
from mct.ema import ema_update
from mct.emd import ChainExplosionError, EStepResult, score_dsm_loss
from mct.io import atomic_dir, load_torch, save_torch, write_json
from mct.methods import Method, Networks, build_method, synchronize
from mct.resume import load_latest, loaded_code_sha256, non_finite, save_state, state_path
from mct.student import build_generator
from mct.teacher import load_denoiser
from mct.tracking import Tracking, accelerator_kwargs
from mct.worlds.registry import World


class DivergenceError(RuntimeError):
    """A non-finite loss or parameter: the run stops and the last good checkpoint is kept."""


# --- the loop ----------------------------------------------------------------------------------------------


def distill(world: World, exp: ExperimentConfig, teacher_path: Path, student_path: Path, out_dir: Path,
            work_dir: Path, progress: bool = True, stop_after: int | None = None,
            accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Run (or resume) EM distillation; write generator.pt, log.jsonl and summary.json into ``out_dir``.

    ``stop_after`` ends the process-local run after that many total iterations without writing the final outputs,
    as a kill would (used to test resume).
    """
    run = _start_run(world, exp, teacher_path, student_path, work_dir, accelerator)
    d = run.d
    log_file = _open_log(run)
    track = Tracking(run.acc, world, exp, work_dir, run.log_lines)  # trackers (the resumed log replayed), convergence
    bar = tqdm(range(run.start, d.iterations), initial=run.start, total=d.iterations,
               desc=f"distill {exp.method_name} K={d.K}", disable=not (progress and run.acc.is_main_process),
               mininterval=1.0)
    t_run = time.perf_counter()
    try:
        for it in bar:
            t0 = time.perf_counter()
            score = _score_phase(run)
            t1 = _clock(run.device)
            gen = _generator_phase(run, it, score.loss)
            t3 = _clock(run.device)
            rec = _record(it, score, gen, t0, t1, t3)
            rec.update(track.step(it + 1, run.ema, rec))  # a convergence point when due (its own RNG), tracker line
            _append_log(run, log_file, rec)
            done = it + 1
            if d.log_every and done % d.log_every == 0:  # the live log (work dir) is readable while the run goes on
                log_file.flush()
            if not progress and run.acc.is_main_process and done % max(1, d.iterations // 10) == 0:
                # no bar under an engine: a line per tenth of the budget in the stage's log instead
                print(f"distill {exp.method_name}: {done}/{d.iterations} iterations, "
                      f"{time.perf_counter() - t_run:.1f} s this run, loss_score {rec['loss_score']:.4g}", flush=True)
            if done % d.checkpoint_every == 0 or done == d.iterations:
                log_file.flush()
                run.last_good = _checkpoint(run.acc, work_dir, run.last_good, _resume_state(run, done))
            if stop_after is not None and done >= stop_after:
                return {"stopped_at": done}
    finally:
        log_file.close()
        track.close()
        bar.close()
    return _finish(run, out_dir, track, seconds=time.perf_counter() - t_run)


# --- building the run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One distillation run's state: what the phases read and update, and what a checkpoint holds.

    ``gen_p``/``score_p`` are accelerate's wrapped networks (their backward syncs gradients over processes);
    ``gen_raw``/``score_raw`` the same parameters unwrapped, for the E-step, the EMA and the checkpoint."""

    world: World
    exp: ExperimentConfig
    acc: Accelerator
    work_dir: Path
    fingerprint: str
    student: dict[str, Any]  # the student-init file: its spec and sigma_init go into generator.pt
    gen_p: nn.Module
    score_p: nn.Module
    gen_raw: nn.Module
    score_raw: nn.Module
    ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_s: torch.optim.Optimizer
    rng: torch.Generator  # every random number of the loop; per process, checkpointed
    estep_teacher: nn.Module
    estep_score: nn.Module
    langevin: LangevinConfig
    dsm_sigma: Any
    m_sigma: Any
    start: int  # iterations already done (resumed)
    log_lines: list[str]  # one JSON line per iteration done; the main process's are the run's log
    last_good: Path | None  # the newest checkpoint written, named when the run diverges
    method: Method  # the generator step of distill.method (mct.methods)

    @property
    def nets(self) -> Networks:
        return Networks(self.gen_p, self.gen_raw, self.estep_teacher, self.estep_score, self.world)

    @property
    def d(self) -> DistillConfig:
        return self.exp.distill

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def micro(self) -> int:
        """Gradient accumulation: ``grad_accum`` micro-batches of this size make one optimiser step."""
        return self.d.batch_size // self.d.grad_accum

    @property
    def log_path(self) -> Path:
        """A live mirror of the log; the resume state holds the lines it covers."""
        return self.work_dir / "log.jsonl"


def _start_run(world: World, exp: ExperimentConfig, teacher_path: Path, student_path: Path, work_dir: Path,
               accelerator: Accelerator | None) -> Run:
    """Teacher, student networks, EMA, optimisers and RNG, resumed from this run's newest state if there is one."""
    d = exp.distill
    method = build_method(world, d)  # a method the world cannot run stops here, before any work
    acc = accelerator or _accelerator(d, work_dir)
    if acc.num_processes != d.num_processes:  # e.g. a launcher that started one process where N were asked for
        raise RuntimeError(f"distill.num_processes is {d.num_processes} but {acc.num_processes} process(es) started; "
                           "refusing to run with another global batch (launch with `accelerate launch --multi_gpu "
                           f"--num_processes {d.num_processes} -m mct.cli distill ...`)")
    device = acc.device
    work_dir.mkdir(parents=True, exist_ok=True)
    estep_teacher = _estep_teacher(world, d, teacher_path, device)
    student = load_torch(student_path)
    gen, score = _student_networks(world, d, student, device)
    ema = copy.deepcopy(gen).requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=d.lr_g, betas=d.betas_g)
    opt_s = torch.optim.Adam(score.parameters(), lr=d.lr_s, betas=d.betas_s)
    rng = torch.Generator(device=device).manual_seed(d.seed * 1_000_003 + acc.process_index)
    fingerprint = run_fingerprint(exp, teacher_path, student_path)
    start, log_lines, last_good = _resume(acc, work_dir, fingerprint, gen, score, ema, opt_g, opt_s, rng)
    gen_p, score_p, opt_g, opt_s = acc.prepare(gen, score, opt_g, opt_s)
    gen_raw, score_raw = acc.unwrap_model(gen_p), acc.unwrap_model(score_p)
    # The score network models the student's conditional samples; guided in the E-step only when asked (its
    # unconditional branch is the teacher's, fine-tuned on conditional samples only).
    estep_score = (GuidedDenoiser(score_raw, lambda n: world.null_labels(n, device), d.guidance_scale)
                   if d.guide_score_net and d.guidance_scale != 1.0 else score_raw)
    return Run(world, exp, acc, work_dir, fingerprint, student, gen_p, score_p, gen_raw, score_raw, ema, opt_g,
               opt_s, rng, estep_teacher, estep_score, d.langevin(), d.dsm_sigma.build(), d.mstep_sigma.build(),
               start, log_lines, last_good, method)


def _accelerator(d: DistillConfig, work_dir: Path) -> Accelerator:
    """accelerate's state for this process: CPU where no GPU is, the run's precision, its trackers (mct.tracking)."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=d.mixed_precision,
                       **accelerator_kwargs(d, work_dir))


def _estep_teacher(world: World, d: DistillConfig, teacher_path: Path, device: torch.device) -> nn.Module:
    """The frozen denoiser whose score the E-step reads: the teacher (its parameters in bf16 when asked) or the
    world's analytic one, under classifier-free guidance when ``guidance_scale`` is not 1."""
    teacher, _ = load_denoiser(teacher_path, world)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if d.teacher_dtype == "bfloat16":
        if d.mixed_precision != "bf16":
            raise ValueError("distill.teacher_dtype: bfloat16 needs distill.mixed_precision: bf16 (autocast runs the "
                             "teacher's layers in bf16)")
        for p in teacher.parameters():  # parameters only: schedules and other buffers keep their precision
            p.data = p.data.to(torch.bfloat16)
    estep_teacher = world.analytic_denoiser().to(device) if d.estep_teacher == "analytic" else teacher
    if d.guidance_scale != 1.0:  # classifier-free guidance of the teacher's score, where the E-step reads it
        estep_teacher = GuidedDenoiser(estep_teacher, lambda n: world.null_labels(n, device), d.guidance_scale)
    return estep_teacher


def _student_networks(world: World, d: DistillConfig, student: dict[str, Any],
                      device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The generator g(z) and the score network of the student-init file, on ``device`` in eval mode.

    Dropout off (eval mode) in both: the E-step's posterior and the M-step's VJP assume one deterministic map g(z),
    and the Langevin drift one deterministic score. EDM's ImageNet U-Net records dropout 0.1."""
    spec = student["spec"]
    arch_kwargs = dict(spec["arch_kwargs"])
    if d.grad_checkpoint:
        if spec["arch"] not in ("edm", "adm", "sd_unet"):
            raise ValueError(f"distill.grad_checkpoint: supported for EDM, ADM and SD networks, not {spec['arch']!r}")
        arch_kwargs["use_checkpoint"] = True  # recompute block activations in backward: memory for compute
    gen = build_generator(world, spec, student["sigma_init"], student["generator"], arch_kwargs)
    score = world.build_network(spec["arch"], arch_kwargs)
    score.load_state_dict(student["score"])
    return gen.to(device).eval(), score.to(device).eval()


def _resume(acc: Accelerator, work_dir: Path, fingerprint: str, gen: nn.Module, score: nn.Module, ema: nn.Module,
            opt_g: torch.optim.Optimizer, opt_s: torch.optim.Optimizer,
            rng: torch.Generator) -> tuple[int, list[str], Path | None]:
    """Load this run's newest verified state into the (not yet prepared) models, optimisers and RNG; return the step,
    the log lines and the state's path, or a fresh start. mct.resume sets corrupt states aside and moves another
    run's aside (naming the changed settings), never deleting either."""
    settings, legacy = _FINGERPRINTED.get(fingerprint, (None, None))
    loaded = load_latest(work_dir, fingerprint, acc.num_processes, acc.is_main_process, acc.wait_for_everyone,
                         settings=settings, legacy=legacy)
    if loaded is None:
        return 0, [], None
    ck = loaded.state
    gen.load_state_dict(ck["generator"])
    score.load_state_dict(ck["score"])
    ema.load_state_dict(ck["ema"])
    opt_g.load_state_dict(ck["opt_g"])
    opt_s.load_state_dict(ck["opt_s"])
    rng.set_state(ck["rng"][acc.process_index])
    return loaded.step, list(ck["log"]), loaded.path


# --- one iteration -----------------------------------------------------------------------------------------


@dataclass
class ScoreStep:
    """The last DSM step's loss and (pre-clip) gradient norm."""

    loss: Tensor
    grad_norm: float


def _score_phase(run: Run) -> ScoreStep:
    """``score_steps`` denoising-score-matching steps of the score network on fresh generator samples g(z), so it
    tracks the student's current distribution before the E-step reads its score."""
    acc, rng, device = run.acc, run.rng, run.device
    shape, accum, micro = run.world.data_shape, run.d.grad_accum, run.micro
    for _ in range(run.d.score_steps):
        run.opt_s.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for _ in range(accum):
            z = torch.randn((micro, *shape), generator=rng, device=device)
            labels = run.world.draw_labels(micro, rng, device)
            sigma = run.dsm_sigma.sample(micro, rng, device)
            noise = torch.randn((micro, *shape), generator=rng, device=device)
            with acc.autocast():
                part = score_dsm_loss(run.score_p, run.gen_raw, z, sigma, labels, noise, run.world.sigma_data) / accum
            acc.backward(part)
            loss += part.detach()
        grad_norm = _grad_norm(acc, run.score_p.parameters(), run.d.grad_clip)
        run.opt_s.step()
    return ScoreStep(loss, grad_norm)


@dataclass
class GeneratorStep:
    """The M-step's loss and (pre-clip) gradient norm, the last micro-batch's chain (start ``z0``, result ``chain``)
    and the seconds spent in E-steps."""

    loss: Tensor
    grad_norm: float
    z0: Tensor
    chain: EStepResult | None  # None where the method has no chain (the exact E-step, SiD, DMD2)
    t_estep: float
    health: dict[str, float]  # the last micro-batch's E-step health (chain moves, or the exact E-step's ESS)


def _generator_phase(run: Run, it: int, loss_s: Tensor) -> GeneratorStep:
    """One generator step: per micro-batch, the method's loss (for EMD the E-step's chain from (z0, eps0) to
    posterior samples, then the M-step's regression of g(z) onto them) and its backward; one optimiser step and the
    EMA update.

    A chain that explodes, or a non-finite loss or gradient norm, stops the run (DivergenceError) before the step."""
    acc, rng, device, d = run.acc, run.rng, run.device, run.d
    shape, accum, micro = run.world.data_shape, d.grad_accum, run.micro
    nets = run.nets
    run.opt_g.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=device)
    t_estep = 0.0
    for _ in range(accum):
        z0 = torch.randn((micro, *shape), generator=rng, device=device)
        eps0 = torch.randn((micro, *shape), generator=rng, device=device)
        labels = run.world.draw_labels(micro, rng, device)
        sigma = run.m_sigma.sample(micro, rng, device)
        try:
            step = run.method(nets, z0, eps0, sigma, labels, rng, acc.autocast)
        except ChainExplosionError as e:
            raise DivergenceError(f"distillation diverged at iteration {it}: {e} {_last_good(run.last_good)}") from e
        t_estep += step.estep_seconds
        part = step.loss / accum
        acc.backward(part)
        loss += part.detach()
    grad_norm = _grad_norm(acc, run.gen_p.parameters(), d.grad_clip)
    if not (math.isfinite(loss.item()) and math.isfinite(loss_s.item()) and math.isfinite(grad_norm)):
        raise DivergenceError(
            f"distillation diverged at iteration {it}: loss_g={loss.item()}, loss_s={loss_s.item()}, "
            f"grad_norm_g={grad_norm}; {_last_good(run.last_good)}")
    run.opt_g.step()
    ema_update(run.ema, run.gen_raw, d.ema_decay)
    return GeneratorStep(loss, grad_norm, step.z0, step.chain, t_estep, step.health)


def _record(it: int, score: ScoreStep, gen: GeneratorStep, t0: float, t1: float, t3: float) -> dict[str, Any]:
    """One iteration's log line: losses, gradient norms, the last chain's size and health, and phase times
    (score phase t0..t1, E-steps t1..t2, the rest of the generator phase t2..t3)."""
    t2 = t1 + gen.t_estep
    chain = {} if gen.chain is None else {
        "eps_tilde_norm": float(gen.chain.eps_tilde.flatten(1).norm(dim=1).mean()),
        "z_shift": float((gen.chain.z - gen.z0).flatten(1).norm(dim=1).mean())}
    return {"iteration": it, "loss_score": score.loss.item(), "loss_gen": gen.loss.item(),
            "grad_norm_gen": gen.grad_norm, "grad_norm_score": score.grad_norm, **chain, **gen.health,
            "t_score": t1 - t0, "t_estep": t2 - t1, "t_mstep": t3 - t2}


# --- the log, checkpoints and the final outputs ------------------------------------------------------------


def _open_log(run: Run) -> TextIO:
    """The live log, rewritten to the resumed lines (dropping any past the state) and opened for appending."""
    if run.acc.is_main_process:
        run.log_path.write_text("".join(run.log_lines))
    return open(run.log_path, "a")  # noqa: SIM115 - kept open for the whole loop


def _append_log(run: Run, log_file: TextIO, rec: dict[str, Any]) -> None:
    if run.acc.is_main_process:
        run.log_lines.append(json.dumps(rec) + "\n")
        log_file.write(run.log_lines[-1])


def _resume_state(run: Run, step: int) -> dict[str, Any]:
    """What a restart needs to continue bitwise: models, EMA, optimisers, every process's RNG state and the log."""
    return {"step": step, "fingerprint": run.fingerprint, "world_size": run.acc.num_processes,
            "rng": gather_object([run.rng.get_state()]), "log": list(run.log_lines),
            "generator": run.gen_raw.state_dict(), "score": run.score_raw.state_dict(), "ema": run.ema.state_dict(),
            "opt_g": run.opt_g.state_dict(), "opt_s": run.opt_s.state_dict()}


def _finish(run: Run, out_dir: Path, track: Tracking, seconds: float) -> dict[str, Any]:
    """The summary; the main process writes generator.pt, log.jsonl, summary.json and the trackers' files into
    ``out_dir`` together, or not at all."""
    acc, d = run.acc, run.d
    records = [json.loads(line) for line in run.log_lines] if acc.is_main_process else _read_log(run.log_path)
    summary = {
        "experiment_method": run.exp.method_name, "iterations": d.iterations, "K": d.K, "space": d.space,
        "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial, "seconds_this_run": round(seconds, 2),
        "sec_per_iter": _mean_tail([r["t_score"] + r["t_estep"] + r["t_mstep"] for r in records]),
        "sec_per_iter_estep": _mean_tail([r["t_estep"] for r in records]),
        "final_loss_score": _mean_tail([r["loss_score"] for r in records]),
        "final_grad_norm_gen": _mean_tail([r["grad_norm_gen"] for r in records]),
        "langevin": asdict(run.langevin),
        "settings": numeric_settings(run.exp),  # what sample/evaluate check their params against
        "code_sha256": loaded_code_sha256(),  # the mct code this process ran (evaluate copies it into the record)
    }
    summary.update(run.method.record(run.nets, run.m_sigma, run.device))  # e.g. the exact E-step's checks
    if acc.is_main_process:
        with atomic_dir(out_dir) as tmp:
            save_torch({"format": "mct-generator-v1", "spec": run.student["spec"],
                        "sigma_init": run.student["sigma_init"], "ema": _denoiser_state(run.ema),
                        "generator": _denoiser_state(run.gen_raw)}, tmp / "generator.pt")
            (tmp / "log.jsonl").write_text("".join(run.log_lines))
            write_json(summary, tmp / "summary.json")
            track.finish(tmp, records)  # convergence.jsonl, dvclive/ (or the chosen tracker's files)
    return summary


def _grad_norm(acc: Accelerator, params, max_norm: float) -> float:
    limit = max_norm if max_norm > 0 else math.inf
    return float(acc.clip_grad_norm_(params, limit))


def _clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    synchronize(device)
    return time.perf_counter()


def _last_good(path: Path | None) -> str:
    if path is None:
        return "no checkpoint of this run has been written, so a rerun starts from scratch"
    return f"the last good checkpoint is {path} (a rerun resumes from it)"


def _checkpoint(acc: Accelerator, work_dir: Path, last_good: Path | None, state: dict[str, Any]) -> Path:
    """Save one resume state (the main process writes it; every rank's RNG state is in it) and return its path.

    Every rank checks finiteness on the same (replicated) tensors, so all refuse together: a non-finite state is
    never written, and the divergence stop names the last state that was."""
    bad = non_finite(state)
    if bad:
        raise DivergenceError(f"distillation diverged before step {state['step']}: {bad} is not finite; "
                              f"{_last_good(last_good)}")
    path = save_state(work_dir, state) if acc.is_main_process else state_path(work_dir, state["step"])
    acc.wait_for_everyone()
    return path


# fingerprint -> (the settings it hashes, the fingerprint an older mct gave them): what _resume records beside the
# states and compares a changed run against, without the run's state having to carry it
_FINGERPRINTED: dict[str, tuple[dict[str, Any], Any]] = {}


def run_fingerprint(exp: ExperimentConfig, teacher_path: Path, student_path: Path) -> str:
    """sha256 of the settings the run's numbers depend on (mct.resume.run_settings: the resolved experiment without
    logging, evaluation and checkpoint cadence, and the teacher's and student-init file's content)."""
    from mct.resume import fingerprint_of, run_settings

    settings = run_settings(asdict(exp), teacher_path, student_path)
    fingerprint = fingerprint_of(settings)
    _FINGERPRINTED[fingerprint] = (settings, lambda: _legacy_fingerprint(exp, teacher_path, student_path))
    return fingerprint


def _legacy_fingerprint(exp: ExperimentConfig, teacher_path: Path, student_path: Path) -> str:
    """The fingerprint mct wrote before the settings were recorded (every key, the files' bytes): a state of such a
    run with these very settings still resumes."""
    import hashlib

    from mct.checkpoint import sha256_file

    blob = json.dumps({"exp": asdict(exp), "teacher": sha256_file(teacher_path),
                       "student": sha256_file(student_path)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _denoiser_state(gen: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in gen.denoiser.state_dict().items()}


def _mean_tail(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return float(sum(tail) / len(tail)) if tail else float("nan")

