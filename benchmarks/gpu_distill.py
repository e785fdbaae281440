"""Benchmark: a few EM-distillation iterations of every paper-scale world at the real network size, with random-weight
teachers, through the library's own ``mct.train.distill``: seconds per iteration, peak memory and the parameter count,
against K, printed as one table.

The worlds and their teachers' networks (from params.yaml's templates and teachers):
    cifar10      EDM's CIFAR-10 DDPM++ SongUNet under VPPrecond (edm-cifar10-32x32-cond-vp.pkl), 55.7M parameters
    imagenet64   EDM's ImageNet-64 ADM DhariwalUNet (edm-imagenet-64x64-cond-adm.pkl), 296M parameters
    imagenet128  OpenAI's guided-diffusion ADM 128x128 (128x128_diffusion.pt), 422M parameters

On a GPU (the numbers that matter; one run measures all three worlds):
    python benchmarks/gpu_distill.py --ks 1,2,4,8 --batch 32 --iterations 6 --out reports/benchmarks/gpu_distill.json
The real size on a CPU (slow; the record of reports/benchmarks/real_size_cpu.json):
    python benchmarks/gpu_distill.py --allow-cpu --ks 1 --batch 2 --iterations 2 --mixed-precision no
A toy-size smoke run of the same path (what the tests run):
    python benchmarks/gpu_distill.py --tiny --ks 1,2 --batch 2 --iterations 2

Settings (Langevin step sizes, lambda*, learning rates, bf16 autocast, gradient checkpointing) come from each world's
template in params.yaml; --batch is the per-device batch and must be even (the E-step pairs chains antithetically).
Each world runs in its own process, so its peak memory is its own (GPU: torch's peak allocation; CPU: the process's
peak resident set). The first iteration (kernel selection, allocator warm-up) is not timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from mct.config import parse_params
from mct.io import write_json
from mct.nets.edm import ADM_IMAGENET64, DDPMPP_CIFAR10
from mct.nets.weights import count_parameters
from mct.student import init_student
from mct.teacher import denoiser_spec, save_denoiser
from mct.train import distill
from mct.worlds.registry import make_world

# world -> (params template, its teacher in params.yaml); the network each teacher's pickle/state dict holds
WORLDS = {"cifar10": ("cifar10", "cifar10_edm_cond"), "imagenet64": ("imagenet64", "imagenet64_edm"),
          "imagenet128": ("imagenet128", "imagenet128_adm")}
TINY_NETWORK = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "label_dim": 10, "model_channels": 32,
                "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]}
TINY_SONG = {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "label_dim": 10, "model_channels": 16,
             "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]}
TINY_ADM = {"image_size": 64, "class_cond": True, "learn_sigma": True, "num_channels": 32, "num_heads": 2,
            "num_res_blocks": 1, "attention_resolutions": "16", "resblock_updown": True, "use_fp16": False,
            "use_scale_shift_norm": True, "diffusion_steps": 1000, "noise_schedule": "linear"}


def teacher_network(world: str, raw: dict, tiny: bool) -> tuple[str, dict]:
    """(arch, arch_kwargs) of the world's teacher at real (or toy) size, as the teacher stage would build it."""
    if world == "cifar10":
        network = TINY_SONG if tiny else {**DDPMPP_CIFAR10, "label_dim": 10}
        return "edm", {"model_type": "SongUNet", "network": dict(network), "precond": "VPPrecond"}
    if world == "imagenet64":
        network = TINY_NETWORK if tiny else dict(ADM_IMAGENET64)
        return "edm", {"model_type": "DhariwalUNet", "network": dict(network), "sigma_data": 0.5}
    flags = TINY_ADM if tiny else raw["teachers"][WORLDS[world][1]]["arch_kwargs"]
    return "adm", dict(flags)


def _raw_params(raw: dict, world: str, tiny: bool, batch: int, iterations: int, mixed_precision: str | None) -> dict:
    template_name, _ = WORLDS[world]
    world_cfg = dict(raw["worlds"][world])
    if tiny and world == "imagenet64":
        world_cfg.update(resolution=16, num_classes=10)
    if tiny and world == "imagenet128":  # guided-diffusion's class embedding is fixed at 1000 classes
        world_cfg.update(resolution=64)
    template = copy.deepcopy(raw["templates"][template_name])
    distill_cfg = template["distill"]
    distill_cfg.update(iterations=iterations, batch_size=batch, gpus=0, num_processes=1, checkpoint_every=iterations)
    if mixed_precision is not None:
        distill_cfg["mixed_precision"] = mixed_precision
    template.update(world="bench", teacher="bench")
    return {"suite": "bench", "worlds": {"bench": world_cfg},
            "teachers": {"bench": {"world": "bench", "kind": "fetch", "arch": "edm", "source": "random-weights"}},
            "templates": {}, "experiments": {"bench": template}, "suites": {"bench": ["bench"]}}


def run_world(args: argparse.Namespace, world_name: str) -> dict:
    """Every K of one world, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params_raw = yaml.safe_load(Path(args.params).read_text())
    raw = _raw_params(params_raw, world_name, args.tiny, args.batch, args.iterations, args.mixed_precision)
    params = parse_params(raw)
    world = make_world("bench", params.worlds["bench"])
    arch, arch_kwargs = teacher_network(world_name, params_raw, args.tiny)
    torch.manual_seed(0)
    teacher = world.build_network(arch, arch_kwargs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mct-gpu-bench-") as tmp:
        tmp = Path(tmp)
        teacher_path, student_path = tmp / "teacher.pt", tmp / "student.pt"
        save_denoiser(teacher_path, teacher, denoiser_spec(world, arch, arch_kwargs), {"weights": "random"})
        init_student(world, params.experiment("bench"), teacher_path, student_path)
        for k in [int(v) for v in args.ks.split(",")]:
            raw["experiments"]["bench"]["distill"]["K"] = k
            exp = parse_params(raw).experiment("bench")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            distill(world, exp, teacher_path, student_path, tmp / f"out_k{k}", tmp / f"work_k{k}", progress=False)
            log = [json.loads(line) for line in (tmp / f"out_k{k}" / "log.jsonl").read_text().splitlines()]
            timed = log[1:] or log
            sec = statistics.median(r["t_score"] + r["t_estep"] + r["t_mstep"] for r in timed)
            row = {"world": world_name, "K": k, "sec_per_iter": sec, "iter_per_s": 1.0 / sec,
                   "sec_estep": statistics.median(r["t_estep"] for r in timed),
                   "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                    else None),
                   "timed_iterations": len(timed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # ru_maxrss is in KiB on Linux: the peak resident set of this process, which ran this world only
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"world": world_name, "mixed_precision": exp.distill.mixed_precision,
            "grad_checkpoint": exp.distill.grad_checkpoint, "teacher_parameters": count_parameters(teacher),
            "teacher": {"arch": arch, **arch_kwargs}, "peak_rss_gib": peak_rss, "rows": rows}


def _child(args: argparse.Namespace, world: str, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(run_world(args, world))
    except BaseException as e:  # the parent reports it, naming the world
        queue.put({"world": world, "error": f"{type(e).__name__}: {e}"})
        raise


def run(args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a fresh process per world: its own peak memory, no CUDA fork
    results = []
    for world in args.worlds.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(args, world, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if "error" in result:
            raise RuntimeError(f"world {world}: {result['error']}")
        results.append(result)
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "batch_per_device": args.batch, "iterations": args.iterations,
            "tiny": args.tiny, "worlds": results}


def table(result: dict) -> str:
    """One Markdown row per world and K (what README quotes from the committed record, tests/test_benchmarks.py
    checks the copy), and a line naming the device and what the memory column measures."""
    cpu = result["device"] == "cpu"
    lines = ["| world | teacher parameters | K | s / iteration | E-step s | peak memory GiB | mixed precision | "
             "gradient checkpointing |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for w in result["worlds"]:
        for r in w["rows"]:
            mem = w["peak_rss_gib"] if cpu else r["peak_mem_gib"]
            lines.append(f"| {w['world']} | {w['teacher_parameters']:,} | {r['K']} | {r['sec_per_iter']:.1f} | "
                         f"{r['sec_estep']:.1f} | {mem:.1f} | {w['mixed_precision']} | "
                         f"{'on' if w['grad_checkpoint'] else 'off'} |")
    kind = "peak resident set of the world's process" if cpu else "torch's peak GPU allocation"
    return "\n".join([*lines, "", f"Device: {result['device']} ({result['cpu_threads']} threads); batch "
                      f"{result['batch_per_device']} per device; {result['iterations']} iterations per K, the first "
                      f"not timed; memory: {kind}."])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--worlds", default=",".join(WORLDS), help=f"comma-separated, of {', '.join(WORLDS)}")
    ap.add_argument("--ks", default="1,2,4,8", help="comma-separated Langevin steps K")
    ap.add_argument("--batch", type=int, default=32, help="per-device batch (even: chains are paired antithetically)")
    ap.add_argument("--iterations", type=int, default=6, help="iterations per K (the first is not timed)")
    ap.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                    help="override the templates' setting (bf16)")
    ap.add_argument("--tiny", action="store_true", help="toy-size networks (CPU smoke test)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the real-size networks on a CPU (slow)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.batch < 2 or args.batch % 2:
        ap.error("--iterations must be >= 1 and --batch an even number >= 2 (the E-step pairs its chains)")
    unknown = sorted(set(args.worlds.split(",")) - set(WORLDS))
    if unknown:
        ap.error(f"unknown world(s) {unknown}; known: {', '.join(WORLDS)}")
    if not (args.tiny or args.allow_cpu or torch.cuda.is_available()):
        print("no GPU: the real-size benchmark needs one (--tiny: a CPU smoke run; --allow-cpu: real size, slow)",
              file=sys.stderr)
        return 2
    result = run(args)
    if args.out:
        write_json(result, Path(args.out))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
