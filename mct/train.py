"""The distillation loop: score-network DSM steps, then one EM generator step, on accelerate.

State (models, optimisers, EMA, RNG, step) is checkpointed atomically every ``checkpoint_every`` iterations, and a
restarted run resumes from it, so a run killed at iteration N ends where an uninterrupted run ends (bitwise on CPU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm

from mct.config import ExperimentConfig
from mct.diffusion import GuidedDenoiser
from mct.ema import ema_update
from mct.emd import ChainExplosionError, antithetic_start, langevin_estep, mstep_loss, score_dsm_loss
from mct.io import atomic_dir, load_torch, save_torch, write_json
from mct.resume import load_latest, non_finite, save_state, state_path
from mct.student import build_generator
from mct.teacher import load_denoiser
from mct.tracking import Tracking, accelerator_kwargs
from mct.worlds.registry import World


class DivergenceError(RuntimeError):
    """A non-finite loss or parameter: the run stops and the last good checkpoint is kept."""


# --- the loop ----------------------------------------------------------------------------------------------


def _grad_norm(acc: Accelerator, params, max_norm: float) -> float:
    limit = max_norm if max_norm > 0 else math.inf
    return float(acc.clip_grad_norm_(params, limit))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def distill(world: World, exp: ExperimentConfig, teacher_path: Path, student_path: Path, out_dir: Path,
            work_dir: Path, progress: bool = True, stop_after: int | None = None,
            accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Run (or resume) EM distillation; write generator.pt, log.jsonl and summary.json into ``out_dir``.

    ``stop_after`` ends the process-local run after that many total iterations without writing the final outputs,
    as a kill would (used to test resume).
    """
    d = exp.distill
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=d.mixed_precision,
                                     **accelerator_kwargs(d, work_dir))  # trackers: mct.tracking
    if acc.num_processes != d.num_processes:  # e.g. a launcher that started one process where N were asked for
        raise RuntimeError(f"distill.num_processes is {d.num_processes} but {acc.num_processes} process(es) started; "
                           "refusing to run with another global batch (launch with `accelerate launch --multi_gpu "
                           f"--num_processes {d.num_processes} -m mct.cli distill ...`)")
    device = acc.device
    work_dir.mkdir(parents=True, exist_ok=True)

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
    st = load_torch(student_path)
    spec = st["spec"]
    arch_kwargs = dict(spec["arch_kwargs"])
    if d.grad_checkpoint:
        if spec["arch"] not in ("edm", "adm", "sd_unet"):
            raise ValueError(f"distill.grad_checkpoint: supported for EDM, ADM and SD networks, not {spec['arch']!r}")
        arch_kwargs["use_checkpoint"] = True  # recompute block activations in backward: memory for compute
    gen = build_generator(world, spec, st["sigma_init"], st["generator"], arch_kwargs)
    score = world.build_network(spec["arch"], arch_kwargs)
    score.load_state_dict(st["score"])
    # Dropout off (eval mode) in both: the E-step's posterior and the M-step's VJP assume one deterministic map
    # g(z), and the Langevin drift one deterministic score. EDM's ImageNet U-Net records dropout 0.1.
    gen, score = gen.to(device).eval(), score.to(device).eval()
    ema = copy.deepcopy(gen).requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=d.lr_g, betas=d.betas_g)
    opt_s = torch.optim.Adam(score.parameters(), lr=d.lr_s, betas=d.betas_s)
    rng = torch.Generator(device=device).manual_seed(d.seed * 1_000_003 + acc.process_index)

    fingerprint = run_fingerprint(exp, teacher_path, student_path)
    # The newest verified state of this run (mct.resume: corrupt ones are set aside, another run's discarded).
    loaded = load_latest(work_dir, fingerprint, acc.num_processes, acc.is_main_process, acc.wait_for_everyone)
    start, log_lines, last_good = 0, [], None
    if loaded is not None:
        ck = loaded.state
        gen.load_state_dict(ck["generator"])
        score.load_state_dict(ck["score"])
        ema.load_state_dict(ck["ema"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_s.load_state_dict(ck["opt_s"])
        rng.set_state(ck["rng"][acc.process_index])
        start, log_lines, last_good = loaded.step, list(ck["log"]), loaded.path
    gen_p, score_p, opt_g, opt_s = acc.prepare(gen, score, opt_g, opt_s)
    gen_raw, score_raw = acc.unwrap_model(gen_p), acc.unwrap_model(score_p)
    # The score network models the student's conditional samples; guided in the E-step only when asked (its
    # unconditional branch is the teacher's, fine-tuned on conditional samples only).
    estep_score = (GuidedDenoiser(score_raw, lambda n: world.null_labels(n, device), d.guidance_scale)
                   if d.guide_score_net and d.guidance_scale != 1.0 else score_raw)

    log_path = work_dir / "log.jsonl"  # a live mirror of the log; the state holds the lines it covers
    if acc.is_main_process:
        log_path.write_text("".join(log_lines))
    log_file = open(log_path, "a")  # noqa: SIM115 - kept open for the whole loop
    track = Tracking(acc, world, exp, work_dir, log_lines)  # trackers (the resumed log replayed), convergence

    langevin = d.langevin()
    dsm_sigma, m_sigma = d.dsm_sigma.build(), d.mstep_sigma.build()
    shape = world.data_shape
    accum = d.grad_accum
    micro = d.batch_size // accum  # gradient accumulation: `accum` micro-batches make one optimiser step
    bar = tqdm(range(start, d.iterations), initial=start, total=d.iterations, desc=f"distill {exp.method_name} K={d.K}",
               disable=not (progress and acc.is_main_process), mininterval=1.0)
    t_run = time.perf_counter()
    try:
        for it in bar:
            t0 = time.perf_counter()
            for _ in range(d.score_steps):
                opt_s.zero_grad(set_to_none=True)
                loss_s = torch.zeros((), device=device)
                for _ in range(accum):
                    z = torch.randn((micro, *shape), generator=rng, device=device)
                    labels = world.draw_labels(micro, rng, device)
                    sigma = dsm_sigma.sample(micro, rng, device)
                    noise = torch.randn((micro, *shape), generator=rng, device=device)
                    with acc.autocast():
                        part = score_dsm_loss(score_p, gen_raw, z, sigma, labels, noise, world.sigma_data) / accum
                    acc.backward(part)
                    loss_s += part.detach()
                gn_s = _grad_norm(acc, score_p.parameters(), d.grad_clip)
                opt_s.step()
            _sync(device)
            t1 = time.perf_counter()
            opt_g.zero_grad(set_to_none=True)
            loss_g = torch.zeros((), device=device)
            t_estep = 0.0
            for _ in range(accum):
                te = time.perf_counter()
                z0 = torch.randn((micro, *shape), generator=rng, device=device)
                eps0 = torch.randn((micro, *shape), generator=rng, device=device)
                labels = world.draw_labels(micro, rng, device)
                sigma = m_sigma.sample(micro, rng, device)
                if langevin.antithetic:
                    z0, eps0, sigma, labels = antithetic_start(z0, eps0, sigma, labels)
                try:
                    with acc.autocast():  # bf16/fp16 network passes when asked; the chain state stays fp32
                        res = langevin_estep(gen_raw, estep_teacher, estep_score, z0, eps0, sigma, labels, langevin,
                                             rng)
                except ChainExplosionError as e:
                    raise DivergenceError(
                        f"distillation diverged at iteration {it}: {e} {_last_good(last_good)}") from e
                _sync(device)
                t_estep += time.perf_counter() - te
                with acc.autocast():
                    part = mstep_loss(gen_p, res.z, res.eps_tilde, sigma, labels, d.mstep_weight) / accum
                acc.backward(part)
                loss_g += part.detach()
            gn_g = _grad_norm(acc, gen_p.parameters(), d.grad_clip)
            if not (math.isfinite(loss_g.item()) and math.isfinite(loss_s.item()) and math.isfinite(gn_g)):
                raise DivergenceError(
                    f"distillation diverged at iteration {it}: loss_g={loss_g.item()}, loss_s={loss_s.item()}, "
                    f"grad_norm_g={gn_g}; {_last_good(last_good)}")
            opt_g.step()
            ema_update(ema, gen_raw, d.ema_decay)
            _sync(device)
            t3 = time.perf_counter()
            t2 = t1 + t_estep  # the M-step's share is the rest of the generator phase
            rec = {"iteration": it, "loss_score": loss_s.item(), "loss_gen": loss_g.item(),
                   "grad_norm_gen": gn_g, "grad_norm_score": gn_s,
                   "eps_tilde_norm": float(res.eps_tilde.flatten(1).norm(dim=1).mean()),
                   "z_shift": float((res.z - z0).flatten(1).norm(dim=1).mean()),
                   **res.health(),
                   "t_score": t1 - t0, "t_estep": t2 - t1, "t_mstep": t3 - t2}
            rec.update(track.step(it + 1, ema, rec))  # a convergence point when due (its own RNG), tracker line
            if acc.is_main_process:
                log_lines.append(json.dumps(rec) + "\n")
                log_file.write(log_lines[-1])
            done = it + 1
            if done % d.checkpoint_every == 0 or done == d.iterations:
                log_file.flush()
                last_good = _checkpoint(acc, work_dir, last_good, {
                    "step": done, "fingerprint": fingerprint, "world_size": acc.num_processes,
                    "rng": gather_object([rng.get_state()]), "log": list(log_lines),
                    "generator": gen_raw.state_dict(), "score": score_raw.state_dict(), "ema": ema.state_dict(),
                    "opt_g": opt_g.state_dict(), "opt_s": opt_s.state_dict()})
            if stop_after is not None and done >= stop_after:
                return {"stopped_at": done}
    finally:
        log_file.close()
        track.close()
        bar.close()

    seconds = time.perf_counter() - t_run
    records = [json.loads(line) for line in log_lines] if acc.is_main_process else _read_log(log_path)
    summary = {
        "experiment_method": exp.method_name, "iterations": d.iterations, "K": d.K, "space": d.space,
        "cancel_noise": d.cancel_noise, "cancel_initial": d.cancel_initial, "seconds_this_run": round(seconds, 2),
        "sec_per_iter": _mean_tail([r["t_score"] + r["t_estep"] + r["t_mstep"] for r in records]),
        "sec_per_iter_estep": _mean_tail([r["t_estep"] for r in records]),
        "final_loss_score": _mean_tail([r["loss_score"] for r in records]),
        "final_grad_norm_gen": _mean_tail([r["grad_norm_gen"] for r in records]),
        "langevin": asdict(langevin),
    }
    if acc.is_main_process:
        with atomic_dir(out_dir) as tmp:  # the outputs appear together, or not at all
            save_torch({"format": "mct-generator-v1", "spec": spec, "sigma_init": st["sigma_init"],
                        "ema": _denoiser_state(ema),
                        "generator": _denoiser_state(gen_raw)}, tmp / "generator.pt")
            (tmp / "log.jsonl").write_text("".join(log_lines))
            write_json(summary, tmp / "summary.json")
            track.finish(tmp, records)  # convergence.jsonl, dvclive/ (or the chosen tracker's files)
    return summary


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


def run_fingerprint(exp: ExperimentConfig, teacher_path: Path, student_path: Path) -> str:
    """sha256 of the resolved experiment settings and of the teacher and student-init files."""
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

