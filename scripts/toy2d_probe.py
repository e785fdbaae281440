"""Quick probe: distill one toy2d experiment with overrides and print the exact mode statistics."""

import os
import sys
import time
from pathlib import Path

import torch

from mct.config import load_params
from mct.metrics.modes import mode_statistics
from mct.student import generate, init_student, load_generator
from mct.train import distill
from mct.worlds.registry import make_world

torch.set_num_threads(1)
TEACHER = Path(os.environ.get("TEACHER", "runs/teachers/toy2d_mlp/teacher.pt"))
name, tag, *ov = sys.argv[1:]
params = load_params("params.yaml", ov)
exp = params.experiment(name)
world = make_world(exp.world, params.worlds[exp.world])
root = Path(f"/tmp/probe/{tag}")
init_student(world, exp, TEACHER, root / "student.pt")
t = time.time()
s = distill(world, exp, TEACHER, root / "student.pt", root / "out", root / "work",
            progress=False)
m = world.mixture
for key in ("ema", "generator"):
    gen = load_generator(root / "out/generator.pt", world, key)
    x, _ = generate(gen, (2,), 20000, 1, 0)
    st = mode_statistics(x, m.means, m.weights, m.std)
    stats = {k: round(float(v), 3) for k, v in st.items()}
    print(tag, key, stats, f"{time.time() - t:.0f}s", s["sec_per_iter"], flush=True)
gen0 = load_generator(root / "student.pt", world)
x, _ = generate(gen0, (2,), 20000, 1, 0)
print(tag, "init", {k: round(float(v), 3) for k, v in mode_statistics(x, m.means, m.weights, m.std).items()})
