"""Benchmark: cost of one Langevin step against the network passes it needs, and seconds per iteration vs K.

A Langevin step in (eps, z) needs one teacher forward, one score-network forward and one generator forward + VJP.
We time each pass alone, then the step as the library runs it, and report the ratio (target <= 1.25).

    python benchmarks/bench_estep.py --world digits --batch 256 --out reports/benchmarks/estep_digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mct.diffusion import denoiser_eps
from mct.emd import Generator, LangevinConfig, langevin_estep, mstep_loss, score_dsm_loss
from mct.io import write_json
from mct.nets.conv import build_digits_denoiser
from mct.nets.mlp import build_mlp_denoiser


def _cfg(K: int, gamma_z: float) -> LangevinConfig:
    # Linear cancellation on an unpaired batch: the same network passes as antithetic pairs, which only reorder noise.
    return LangevinConfig(K=K, gamma_z=gamma_z, cancel_scheme="linear")

def _time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def build(world: str, device: torch.device):
    if world == "digits":
        make, shape, label_dim = (lambda: build_digits_denoiser()), (1, 8, 8), 10
    else:
        make, shape, label_dim = (lambda: build_mlp_denoiser(hidden=128, depth=3, sigma_data=1.4)), (2,), 0
    teacher, score = make().to(device).requires_grad_(False), make().to(device)
    gen = Generator(make(), 2.5).to(device)
    return teacher, score, gen, shape, label_dim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", choices=["digits", "toy2d"], default="digits")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, score, gen, shape, label_dim = build(args.world, device)
    b = args.batch
    z = torch.randn((b, *shape), device=device)
    eps = torch.randn((b, *shape), device=device)
    sigma = torch.exp(torch.randn(b, device=device) - 0.5)
    labels = (torch.nn.functional.one_hot(torch.randint(0, label_dim, (b,), device=device), label_dim).float()
              if label_dim else None)
    x = gen(z, labels).detach() + sigma.reshape(-1, *([1] * len(shape))) * eps

    def teacher_fwd():
        with torch.no_grad():
            denoiser_eps(teacher, x, sigma, labels)

    def score_fwd():
        with torch.no_grad():
            denoiser_eps(score, x, sigma, labels)

    def gen_vjp():
        zl = z.detach().requires_grad_(True)
        g = gen(zl, labels)
        torch.autograd.grad(g, zl, grad_outputs=eps)

    def one_step():
        langevin_estep(gen, teacher, score, z, eps, sigma, labels, _cfg(1, 0.01), None)

    rep = args.repeats
    t_teacher, t_score = _time(teacher_fwd, rep, device), _time(score_fwd, rep, device)
    t_vjp = _time(gen_vjp, rep, device)
    # One step's marginal cost = (K=9 run - K=1 run) / 8, which excludes the fixed set-up of a call.
    t_k1 = _time(one_step, rep, device)
    t_k9 = _time(lambda: langevin_estep(gen, teacher, score, z, eps, sigma, labels,
                                        _cfg(9, 0.01), None), max(3, rep // 3), device)
    t_step = (t_k9 - t_k1) / 8
    passes = t_teacher + t_score + t_vjp
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4)
    opt_s = torch.optim.Adam(score.parameters(), lr=1e-4)

    def iteration(K: int) -> dict[str, float]:
        t0 = time.perf_counter()
        loss_s = score_dsm_loss(score, gen, z, sigma, labels, eps, 0.5)
        opt_s.zero_grad()
        loss_s.backward()
        opt_s.step()
        t1 = time.perf_counter()
        cfg = _cfg(K, 0.01 if K > 1 else 0.0)  # K=1 is Diff-Instruct: no z move, no VJP
        res = langevin_estep(gen, teacher, score, z, eps, sigma, labels, cfg, None)
        t2 = time.perf_counter()
        loss = mstep_loss(gen, res.z, res.eps_tilde, sigma, labels)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        t3 = time.perf_counter()
        return {"score_update": t1 - t0, "estep": t2 - t1, "mstep": t3 - t2, "total": t3 - t0}

    per_k = {}
    for K in [int(k) for k in args.ks.split(",")]:
        iteration(K)
        runs = [iteration(K) for _ in range(max(3, rep // 2))]
        per_k[K] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "world": args.world, "batch": b, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "teacher_forward_s": t_teacher, "score_forward_s": t_score, "generator_forward_vjp_s": t_vjp,
        "sum_of_passes_s": passes, "langevin_step_s": t_step, "step_over_passes": t_step / passes,
        "seconds_per_iteration_vs_K": per_k,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
