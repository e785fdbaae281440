"""Benchmark: training cost per iteration of Diff-Instruct, EMD-K and the peers (SiD, DMD2), and sampling cost of a
one-step student against its teacher's sampler, timed side by side in one process.

The report's cost table, its "cost linear in K" measurement and its speed-up come from here, not from the suite's
runs (those are timed on whatever else the machine was doing). Each experiment is built exactly as `mct distill`
builds it (mct.train: networks of params.yaml's teacher, the template's batch, E-step and cancellation scheme) from
random-weight teacher and student files (timing does not depend on the weights), then every repeat times
``--iterations`` training iterations of each experiment in a rotated order, so a slow spell of the machine falls on
every experiment alike. Per repeat: seconds per iteration, the ratio to Diff-Instruct, and the least-squares slope of
seconds per iteration against K; over repeats: means with 95% Student-t intervals. Sampling: samples/s of the
one-step generator and of the teacher's Heun sampler, interleaved the same way, and their ratio per repeat.

    python benchmarks/estep_cost.py --world toy2d --repeats 7 --out reports/benchmarks/estep_cost \\
        --note "machine otherwise idle"

Writes <out>/<world>.json (the machine, its load average before and after, the note) and <out>/<world>_runs.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mct.claims import t_interval
from mct.config import load_params
from mct.diffusion import heun_nfe
from mct.io import write_json
from mct.student import generate, init_student
from mct.teacher import denoiser_spec, save_denoiser
from mct.worlds.registry import make_world

# The report's rows per world: Diff-Instruct, the template's EMD-K at each K the suites run, and the peers.
EXPERIMENTS = {"toy2d": ("toy2d_di", "toy2d_emd_k2", "toy2d_emd_k4", "toy2d_emd_k8", "toy2d_emd_k16", "toy2d_sid",
                         "toy2d_dmd2"),
               "digits": ("digits_di", "digits_emd_k1", "digits_emd_k2", "digits_emd_k4", "digits_emd_k8",
                          "digits_sid", "digits_dmd2")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(note: str) -> dict[str, Any]:
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min_before": os.getloadavg()[0], "note": note, "torch": torch.__version__}


def _runs(params, world, names: tuple[str, ...], tmp: Path):
    """Each experiment's training state (mct.train.Run), built as `mct distill` builds it."""
    from mct.train import _start_run  # the training loop's own set-up: what is timed is what a run executes

    tcfg = params.teacher(params.experiment(names[0]).teacher)
    teacher = tmp / "teacher.pt"
    torch.manual_seed(0)
    save_denoiser(teacher, world.build_network(tcfg.arch, tcfg.arch_kwargs),
                  denoiser_spec(world, tcfg.arch, tcfg.arch_kwargs))
    runs = {}
    for name in names:
        exp = params.experiment(name)
        student = tmp / name / "student_init.pt"
        student.parent.mkdir(parents=True)
        init_student(world, exp, teacher, student)
        runs[name] = _start_run(world, exp, teacher, student, tmp / name / "work", None)
    return runs, teacher, tcfg


def _iterate(run, n: int) -> float:
    from mct.train import _generator_phase, _score_phase

    t0 = time.perf_counter()
    for it in range(n):
        score = _score_phase(run)
        _generator_phase(run, it, score.loss)
    return (time.perf_counter() - t0) / n


def _network_passes(run) -> dict[str, int]:
    """Forward calls per iteration of each network (generator, fake score, teacher), counted by forward hooks over
    one iteration: the calls a method's iteration makes, whatever their batch."""
    counts = {"generator": 0, "score": 0, "teacher": 0}
    nets = {"generator": run.gen_raw.denoiser, "score": run.score_raw, "teacher": run.estep_teacher}
    hooks = [m.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1)) for k, m in nets.items()]
    try:
        _iterate(run, 1)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _summary(values: np.ndarray) -> dict[str, float]:
    mean, _, lo, hi = t_interval(values)
    return {"mean": float(mean), "ci95_lo": float(lo), "ci95_hi": float(hi), "n": int(len(values))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", choices=sorted(EXPERIMENTS), default="toy2d")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=20, help="training iterations timed per experiment per repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--note", default="", help="what else ran on the machine (say 'machine otherwise idle')")
    ap.add_argument("--out", default="reports/benchmarks/estep_cost")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats must be >= 2 (the intervals are over repeats)")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    names = EXPERIMENTS[args.world]
    world_name = params.experiment(names[0]).world
    world = make_world(world_name, params.worlds[world_name])
    info = machine(args.note)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs, teacher_path, tcfg = _runs(params, world, names, Path(tmp))
        for run in runs.values():
            _iterate(run, 2)  # warm-up: allocator, first-call dispatch
        passes = {name: _network_passes(run) for name, run in runs.items()}
        from mct.evaluate import _teacher_sampler
        from mct.teacher import load_denoiser

        teacher, _ = load_denoiser(teacher_path, world)
        teacher_fn = _teacher_sampler(teacher.eval(), world, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max,
                                      torch.device("cpu"), tcfg.guidance_scale)
        gen = runs[names[-1]].ema
        n = world.speed_batch
        samplers = {"student": lambda: generate(gen, world.data_shape, n, 0, world.eval_labels, batch_size=n,
                                                device="cpu"),
                    "teacher": lambda: teacher_fn(n, finish=False)}
        for f in samplers.values():
            f()
        for r in range(args.repeats):
            order = list(names[r % len(names):] + names[:r % len(names)])
            for name in order:
                rows.append({"repeat": r, "kind": "train", "experiment": name, "K": runs[name].d.K,
                             "method": params.experiment(name).method_name,
                             "seconds": _iterate(runs[name], args.iterations)})
            for who in (("student", "teacher") if r % 2 == 0 else ("teacher", "student")):
                t0 = time.perf_counter()
                samplers[who]()
                rows.append({"repeat": r, "kind": "sample", "experiment": who, "K": None, "method": who,
                             "seconds": (time.perf_counter() - t0) / n})
    info["load_average_1min_after"] = os.getloadavg()[0]
    df = pd.DataFrame(rows)
    train = df[df.kind == "train"].pivot(index="repeat", columns="experiment", values="seconds")
    di = next(e for e in names if params.experiment(e).method_name == "diff_instruct")
    emd = [e for e in names if params.experiment(e).method_name == "emd"]  # the K fit: EMD rows only
    ks = np.array([runs[e].d.K for e in emd], dtype=float)
    slopes, r2 = [], []
    for _, row in train.iterrows():
        y = row[emd].to_numpy(float)
        b, a = np.polyfit(ks, y, 1)
        slopes.append(b)
        r2.append(1 - ((y - (a + b * ks)) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    sample = df[df.kind == "sample"].pivot(index="repeat", columns="experiment", values="seconds")
    result = {
        "world": world_name, "machine": info, "repeats": args.repeats, "iterations_per_repeat": args.iterations,
        "batch_size": runs[di].d.batch_size, "teacher": f"{tcfg.arch} {dict(tcfg.arch_kwargs)}",
        "estep_teacher": runs[emd[-1]].d.estep_teacher,
        "sec_per_iter": {e: {"K": runs[e].d.K, "method": params.experiment(e).method_name,
                             **_summary(train[e].to_numpy(float))} for e in names},
        "ratio_to_diff_instruct": {e: _summary((train[e] / train[di]).to_numpy(float)) for e in names if e != di},
        "network_passes_per_iter": passes,
        "slope_sec_per_K": {**_summary(np.array(slopes)), "r2_median": float(np.median(r2))},
        "sampling": {"student_sec_per_sample": _summary(sample["student"].to_numpy(float)),
                     "teacher_sec_per_sample": _summary(sample["teacher"].to_numpy(float)),
                     "teacher_nfe": heun_nfe(tcfg.sampler_steps),
                     "speedup": _summary((sample["teacher"] / sample["student"]).to_numpy(float))},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / f"{world_name}.json")
    df.to_csv(out / f"{world_name}_runs.csv", index=False)
    for e, s in result["ratio_to_diff_instruct"].items():
        print(f"{e}: {s['mean']:.3g}x Diff-Instruct [{s['ci95_lo']:.3g}, {s['ci95_hi']:.3g}]")
    sl = result["slope_sec_per_K"]
    print(f"slope {sl['mean']:.3g} s per Langevin step [{sl['ci95_lo']:.3g}, {sl['ci95_hi']:.3g}], "
          f"median R^2 {sl['r2_median']:.3f}; speed-up {result['sampling']['speedup']['mean']:.3g}x; "
          f"load {info['load_average_1min_before']:.2f} -> {info['load_average_1min_after']:.2f}")


if __name__ == "__main__":
    main()
