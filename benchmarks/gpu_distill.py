"""Benchmark: a few EM-distillation iterations of the imagenet64 configuration with a random-weight teacher of the
real size (EDM's ImageNet-64 ADM U-Net, 296M parameters), through the library's own ``mct.train.distill``: seconds
per iteration, iterations per second and peak GPU memory against K.

On a GPU (the numbers that matter):
    python benchmarks/gpu_distill.py --ks 1,2,4,8 --batch 32 --iterations 6 --out reports/benchmarks/gpu_distill.json
On a CPU, a toy-size smoke run of the same path (what the tests run):
    python benchmarks/gpu_distill.py --tiny --ks 1,2 --batch 2 --iterations 2

Settings (Langevin step sizes, lambda*, learning rates, bf16 autocast) come from the `imagenet64` template of
params.yaml; --batch is the per-GPU batch. The first iteration (kernel selection, allocator warm-up) is not timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from mct.config import parse_params
from mct.diffusion import EDMPrecond
from mct.io import write_json
from mct.nets.edm import ADM_IMAGENET64, build_network
from mct.nets.weights import count_parameters
from mct.student import init_student
from mct.teacher import denoiser_spec, save_denoiser
from mct.train import distill
from mct.worlds.registry import make_world

TINY_NETWORK = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "label_dim": 10, "model_channels": 32,
                "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]}


def _raw_params(params_file: Path, tiny: bool, batch: int, iterations: int, mixed_precision: str | None) -> dict:
    raw = yaml.safe_load(params_file.read_text())
    world = dict(raw["worlds"]["imagenet64"])
    if tiny:
        world.update(resolution=16, num_classes=10)
    template = copy.deepcopy(raw["templates"]["imagenet64"])
    distill_cfg = template["distill"]
    distill_cfg.update(iterations=iterations, batch_size=batch, gpus=0, num_processes=1, checkpoint_every=iterations)
    if mixed_precision is not None:
        distill_cfg["mixed_precision"] = mixed_precision
    template.update(world="bench", teacher="bench")
    return {"suite": "bench", "worlds": {"bench": world},
            "teachers": {"bench": {"world": "bench", "kind": "fetch", "arch": "edm", "source": "random-weights"}},
            "templates": {}, "experiments": {"bench": template}, "suites": {"bench": ["bench"]}}


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = _raw_params(Path(args.params), args.tiny, args.batch, args.iterations, args.mixed_precision)
    params = parse_params(raw)
    mp = params.experiment("bench").distill.mixed_precision
    world = make_world("bench", params.worlds["bench"])
    network = TINY_NETWORK if args.tiny else dict(ADM_IMAGENET64)
    arch_kwargs = {"model_type": "DhariwalUNet", "network": network, "sigma_data": 0.5}
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network("DhariwalUNet", **network), sigma_data=0.5, label_dim=world.label_dim)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mct-gpu-bench-") as tmp:
        tmp = Path(tmp)
        teacher_path, student_path = tmp / "teacher.pt", tmp / "student.pt"
        save_denoiser(teacher_path, teacher, denoiser_spec(world, "edm", arch_kwargs), {"weights": "random"})
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
            row = {"K": k, "sec_per_iter": sec, "iter_per_s": 1.0 / sec,
                   "sec_estep": statistics.median(r["t_estep"] for r in timed),
                   "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                    else None),
                   "timed_iterations": len(timed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "mixed_precision": mp, "batch_per_gpu": args.batch,
            "teacher_parameters": count_parameters(teacher), "network": network, "tiny": args.tiny, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ks", default="1,2,4,8", help="comma-separated Langevin steps K")
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    ap.add_argument("--iterations", type=int, default=6, help="iterations per K (the first is not timed)")
    ap.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                    help="override the template's setting (imagenet64: bf16)")
    ap.add_argument("--tiny", action="store_true", help="toy-size network at 16x16 (CPU smoke test)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the real-size network on a CPU (slow)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.batch < 1:
        ap.error("--iterations and --batch must be >= 1")
    if not (args.tiny or args.allow_cpu or torch.cuda.is_available()):
        print("no GPU: the real-size benchmark needs one (--tiny: a CPU smoke run; --allow-cpu: real size, slow)",
              file=sys.stderr)
        return 2
    result = run(args)
    if args.out:
        write_json(result, Path(args.out))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
