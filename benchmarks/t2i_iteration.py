"""Benchmark: one EMD-K iteration of text-to-image EM distillation at Stable Diffusion v1.5 scale.

SD v1.5's UNet is built from its published configuration (``SD15_UNET_CONFIG``, 859,520,964 parameters) with random
weights, nothing downloaded, three times: the teacher (frozen, bf16, guided by classifier-free guidance against a
random null embedding), the generator and the score network (fp32 master weights, bf16 autocast, gradient
checkpointing). Conditions are random text embeddings (B, 77, 768). One iteration is what ``mct.train`` does:

  score step   score_dsm_loss on a fresh generator sample + Adam step of the score network
  E-step       langevin_estep, space eps_z, K steps, the guided teacher
  M-step       mstep_loss backward + Adam step of the generator

Every UNet forward call is counted (calls, samples, backward passes through its output), per network, and checked
against the formula for the settings (``expected_passes``). The memory plan is computed from the parameter count:
generator and score network 16 bytes/param each (fp32 weights, gradients, Adam's two moments), teacher 2 bytes/param.

On a GPU (the numbers that matter):
    python benchmarks/t2i_iteration.py --batch 2 --K 1 2 4 8
Without memory (CPU CI): the real-size parameter count and memory plan, the UNet built on the meta device:
    python benchmarks/t2i_iteration.py --count-only
A toy-size run of the same path on a CPU (what the tests run):
    python benchmarks/t2i_iteration.py --tiny --device cpu --K 1 2 --iters 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mct.config import LangevinConfig
from mct.diffusion import GuidedDenoiser, LogUniformSigma
from mct.emd import Generator, antithetic_start, langevin_estep, mstep_loss, score_dsm_loss
from mct.io import atomic_path, write_json
from mct.nets.sd import SD15_UNET_CONFIG, scaled_linear_alpha_bar, sd_denoiser, unet_from_config

SD15_PARAMETERS = 859_520_964
TEXT_TOKENS = 77
# toy-size UNet of the same family (as mct/sd_export.py): CPU smoke runs and tests
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 32,
}
# the t2i_sd15 template's settings where the cost does not depend on them (params.yaml)
SIGMA_INIT = 14.6  # t* = 999: the generator denoises pure noise
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6  # DSM and M-step noise levels, log-uniform
SIGMA_DATA = 1.0  # SD latents
GAMMA_EPS, GAMMA_Z = 0.3, 0.02
LR = 1e-5
BYTES_TRAINED = 16  # fp32 weight 4 + gradient 4 + Adam m 4 + Adam v 4
BYTES_TEACHER = 2  # bf16 weights


# --- counting UNet passes -------------------------------------------------------------------------------------


class PassCount:
    """Forward calls, samples through the UNet, and backward passes through its output, of one network."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = self.samples = self.backward = 0

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "samples": self.samples, "backward": self.backward}


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts one backward pass through the UNet (a VJP or a parameter gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, count: PassCount) -> Tensor:
        ctx.count = count
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.count.backward += 1
        return grad, None


class CountedUNet(nn.Module):
    """The UNet with its forward calls counted (gradient checkpointing's recomputation inside the backward pass runs
    the UNet's blocks, not this forward, so it is not counted as a pass)."""

    def __init__(self, unet: nn.Module, count: PassCount) -> None:
        super().__init__()
        self.unet, self.count = unet, count

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> SimpleNamespace:
        self.count.calls += 1
        self.count.samples += sample.shape[0]
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        if out.requires_grad:
            out = _CountBackward.apply(out, self.count)
        return SimpleNamespace(sample=out)


def expected_passes(K: int, batch: int, cfg: LangevinConfig) -> dict[str, Any]:
    """The UNet passes one iteration needs, per network, and in all (a "pass" = a forward over B samples)."""
    moves = cfg.moves_z  # the E-step's generator forward keeps its graph for a VJP only when z moves
    if cfg.z_step == "curvature" and moves:
        raise ValueError("the formula covers z_step 'shrink' (no power iterations)")
    gen = {"calls": 1 + K + 1, "backward": (K if moves else 0) + 1}  # DSM sample, E-step K, M-step 1
    score = {"calls": 1 + K, "backward": 1}  # DSM 1, E-step K
    teacher = {"calls": K, "backward": 0}  # CFG: one call over 2B inputs per step
    gen["samples"], score["samples"], teacher["samples"] = (K + 2) * batch, (K + 1) * batch, 2 * K * batch
    nets = {"generator": gen, "score": score, "teacher": teacher}
    return {
        "per_network": nets,
        "calls": sum(n["calls"] for n in nets.values()),
        "forward_passes": sum(n["samples"] for n in nets.values()) // batch,
        "backward_passes": sum(n["backward"] for n in nets.values()),
    }


FORMULA = {
    "forward_passes": "DSM (generator sample 1 + score 1) + K x (teacher 2 [CFG: one call on 2B inputs] + score 1 "
                      "+ generator 1) + M-step generator 1 = 4K + 3",
    "backward_passes": "DSM score 1 + K generator VJPs (E-step z move) + M-step generator 1 = K + 2",
    "calls": "generator K + 2 + score K + 1 + teacher K = 3K + 3",
}


# --- networks and memory ----------------------------------------------------------------------------------------


def memory_plan(n: int) -> dict[str, Any]:
    """Weights and optimiser state before activations: generator and score network trained (fp32 + Adam), teacher
    frozen in bf16."""
    trained = 2 * BYTES_TRAINED * n
    teacher = BYTES_TEACHER * n
    total = trained + teacher
    return {"parameters_per_unet": n, "bytes_per_param_trained": BYTES_TRAINED, "bytes_per_param_teacher":
            BYTES_TEACHER, "generator_and_score_bytes": trained, "teacher_bytes": teacher, "total_bytes": total,
            "total_gb": total / 1e9, "total_gib": total / 2**30}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def real_size_count() -> int:
    """The SD v1.5 UNet's parameter count, built on the meta device (no memory)."""
    with torch.device("meta"):
        unet = unet_from_config(SD15_UNET_CONFIG)
    return count_parameters(unet)


def build(config: dict[str, Any], width: int, device: torch.device, guidance: float, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):
        base = unet_from_config(config)
    alpha_bar = scaled_linear_alpha_bar().to(device)
    counts = {name: PassCount() for name in ("generator", "score", "teacher")}

    def trained(name: str) -> nn.Module:
        unet = copy.deepcopy(base)  # the generator and the score network start as copies of the teacher
        unet.enable_gradient_checkpointing()
        return sd_denoiser(CountedUNet(unet.train(), counts[name]), alpha_bar)

    gen = Generator(trained("generator"), SIGMA_INIT)
    score = trained("score")
    teacher_unet = base.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    null = torch.randn((1, TEXT_TOKENS, width), device=device)
    teacher = GuidedDenoiser(sd_denoiser(CountedUNet(teacher_unet, counts["teacher"]), alpha_bar),
                             lambda n: null.expand(n, -1, -1), guidance)
    return gen, score, teacher, counts, count_parameters(teacher_unet)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


# --- the benchmark --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
    width = config["cross_attention_dim"]
    side = config["sample_size"]
    shape = (config["in_channels"], side, side)
    b = args.batch
    gen, score, teacher, counts, n_params = build(config, width, device, args.guidance, args.seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=LR)
    opt_s = torch.optim.Adam(score.parameters(), lr=LR)
    cancel = "antithetic" if b % 2 == 0 else "linear"  # antithetic pairs need an even batch
    rng = torch.Generator(device=device).manual_seed(args.seed)
    sigmas = LogUniformSigma(SIGMA_MIN, SIGMA_MAX)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def iteration(cfg: LangevinConfig) -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        z = torch.randn((b, *shape), generator=rng, device=device)
        labels = torch.randn((b, TEXT_TOKENS, width), generator=rng, device=device)
        noise = torch.randn((b, *shape), generator=rng, device=device)
        with autocast:
            loss_s = score_dsm_loss(score, gen, z, sigmas.sample(b, rng, device), labels, noise, SIGMA_DATA)
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
        _sync(device)
        t1 = time.perf_counter()
        z0 = torch.randn((b, *shape), generator=rng, device=device)
        eps0 = torch.randn((b, *shape), generator=rng, device=device)
        labels = torch.randn((b, TEXT_TOKENS, width), generator=rng, device=device)
        sigma = sigmas.sample(b, rng, device)
        if cfg.antithetic:
            z0, eps0, sigma, labels = antithetic_start(z0, eps0, sigma, labels)
        with autocast:  # bf16 network passes; the chain state stays fp32
            res = langevin_estep(gen, teacher, score, z0, eps0, sigma, labels, cfg, rng)
        _sync(device)
        t2 = time.perf_counter()
        with autocast:
            loss_g = mstep_loss(gen, res.z, res.eps_tilde, sigma, labels)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        _sync(device)
        t3 = time.perf_counter()
        if not (torch.isfinite(loss_s) and torch.isfinite(loss_g)):
            raise RuntimeError(f"non-finite loss: score {loss_s.item()}, generator {loss_g.item()}")
        return {"score": t1 - t0, "estep": t2 - t1, "mstep": t3 - t2, "total": t3 - t0}

    rows = []
    for K in tqdm(args.K, desc="K", file=sys.stderr, disable=args.no_progress):
        cfg = LangevinConfig(K=K, space="eps_z", gamma_eps=GAMMA_EPS, gamma_z=GAMMA_Z, cancel_scheme=cancel)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        iteration(cfg)  # warm-up: kernel selection, allocator, Adam state
        for c in counts.values():
            c.reset()
        runs = [iteration(cfg) for _ in range(args.iters)]
        per_net = {name: {k: v // args.iters for k, v in c.as_dict().items()} for name, c in counts.items()}
        exact = all(v % args.iters == 0 for c in counts.values() for v in c.as_dict().values())
        counted = {"per_network": per_net, "calls": sum(n["calls"] for n in per_net.values()),
                   "forward_passes": sum(n["samples"] for n in per_net.values()) / b,
                   "backward_passes": sum(n["backward"] for n in per_net.values()), "same_every_iteration": exact}
        if counted["forward_passes"] == int(counted["forward_passes"]):
            counted["forward_passes"] = int(counted["forward_passes"])
        expected = expected_passes(K, b, cfg)
        totals = [r["total"] for r in runs]
        row = {"K": K, "sec_per_iter_mean": statistics.fmean(totals), "sec_per_iter_min": min(totals),
               "sec_score_mean": statistics.fmean(r["score"] for r in runs),
               "sec_estep_mean": statistics.fmean(r["estep"] for r in runs),
               "sec_mstep_mean": statistics.fmean(r["mstep"] for r in runs),
               "timed_iterations": len(runs),
               "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                    else None),
               "peak_rss_gib": _peak_rss_gib() if device.type == "cpu" else None,
               "unet_passes_counted": counted, "unet_passes_expected": expected,
               "passes_match": all(counted[k] == expected[k] for k in ("calls", "forward_passes", "backward_passes"))
               and per_net == expected["per_network"] and exact}
        rows.append(row)
        tqdm.write(json.dumps({k: row[k] for k in ("K", "sec_per_iter_mean", "sec_per_iter_min", "peak_gpu_mem_gib",
                                                   "peak_rss_gib", "passes_match")}), file=sys.stderr)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "tiny": args.tiny,
        "unet_config": "tiny" if args.tiny else "SD15_UNET_CONFIG", "latent_shape": list(shape),
        "text_embeddings": [b, TEXT_TOKENS, width], "batch": b, "guidance_scale": args.guidance,
        "precision": "teacher bf16 weights; generator and score fp32 weights; bf16 autocast for every pass",
        "gradient_checkpointing": ["generator", "score"],
        "langevin": {"space": "eps_z", "gamma_eps": GAMMA_EPS, "gamma_z": GAMMA_Z, "z_step": "shrink",
                     "cancel_scheme": cancel},
        "sigma_init": SIGMA_INIT, "sigma_range": [SIGMA_MIN, SIGMA_MAX], "lr": LR, "warmup_iterations": 1,
        "unet_parameters": n_params, "memory_plan": memory_plan(n_params), "passes_formula": FORMULA,
        "peak_memory_note": ("torch.cuda.max_memory_allocated, reset per K" if device.type == "cuda" else
                             "CPU: the process's peak RSS so far (getrusage), not reset per K"),
        "rows": rows,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def plan_lines(n: int) -> list[str]:
    plan = memory_plan(n)
    return [f"UNet parameters: {n:,}",
            f"memory plan (before activations): generator + score network 2 x {BYTES_TRAINED} B/param = "
            f"{plan['generator_and_score_bytes'] / 1e9:.2f} GB, teacher bf16 {BYTES_TEACHER} B/param = "
            f"{plan['teacher_bytes'] / 1e9:.2f} GB, total {plan['total_gb']:.2f} GB ({plan['total_gib']:.2f} GiB)"]


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Text-to-image EMD iteration benchmark", "",
             f"device {result['device']} ({result['threads']} threads), torch {result['torch']}, UNet "
             f"{result['unet_config']}, batch {result['batch']}, latents {result['latent_shape']}, text embeddings "
             f"{result['text_embeddings']}, CFG scale {result['guidance_scale']}; {result['precision']}; gradient "
             f"checkpointing on generator and score network; E-step {result['langevin']}.", "",
             *plan_lines(result["unet_parameters"]), "",
             "UNet passes per iteration (a pass = one forward over B samples; counted by wrapping the UNet's forward):",
             *[f"- {k}: {v}" for k, v in result["passes_formula"].items()], "",
             f"Peak memory: {result['peak_memory_note']}.", "",
             "| K | s/iter mean | s/iter min | score s | E-step s | M-step s | peak GPU GiB | peak RSS GiB "
             "| forward passes (counted / formula) | backward (counted / formula) | calls | match |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c, e = r["unet_passes_counted"], r["unet_passes_expected"]
        lines.append(f"| {r['K']} | {r['sec_per_iter_mean']:.4g} | {r['sec_per_iter_min']:.4g} | "
                     f"{r['sec_score_mean']:.3g} | {r['sec_estep_mean']:.3g} | {r['sec_mstep_mean']:.3g} | "
                     f"{_fmt(r['peak_gpu_mem_gib'], '.2f')} | {_fmt(r['peak_rss_gib'], '.2f')} | "
                     f"{c['forward_passes']} / {e['forward_passes']} | {c['backward_passes']} / "
                     f"{e['backward_passes']} | {c['calls']} / {e['calls']} | {'yes' if r['passes_match'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    write_json(result, out / "results.json")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2, help="batch B (even: antithetic pairs; odd: linear cancellation)")
    ap.add_argument("--K", type=int, nargs="+", default=[1, 2, 4, 8], help="Langevin steps K to time")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per K (after 1 warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--guidance", type=float, default=1.75, help="classifier-free guidance scale of the teacher")
    ap.add_argument("--tiny", action="store_true", help="toy-size UNet (32/64 channels, 8x8 latents, width-32 text)")
    ap.add_argument("--count-only", action="store_true",
                    help="only the real-size parameter count and memory plan (UNet on the meta device)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/benchmarks/t2i_iteration",
                    help="folder for results.json and results.md (--count-only: memory_plan.json and .md)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or not args.K or min(args.K) < 1:
        ap.error("--batch, --iters and every --K must be >= 1")
    if args.count_only:
        n = real_size_count()
        out = Path(args.out)
        write_json({"unet_config": "SD15_UNET_CONFIG", "built_on": "meta", "memory_plan": memory_plan(n)},
                   out / "memory_plan.json")
        with atomic_path(out / "memory_plan.md") as tmp:
            tmp.write_text("# SD v1.5 UNet: parameters and memory plan\n\n" + "\n\n".join(plan_lines(n)) + "\n")
        print("\n".join(plan_lines(n)))
        return 0 if n == SD15_PARAMETERS else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here (use --device cpu)")
    if not args.tiny and device.type == "cpu":
        need = memory_plan(SD15_PARAMETERS)["total_bytes"]
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > have:
            print(f"the real-size iteration needs {need / 2**30:.1f} GiB before activations; this machine has "
                  f"{have / 2**30:.1f} GiB of memory (use --count-only or --tiny)", file=sys.stderr)
            return 2
    result = run(args)
    write_outputs(result, Path(args.out))
    print(markdown(result))
    return 0 if all(r["passes_match"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
