"""The report's figures (matplotlib through seaborn, PNG without varying metadata): K sweep, noise cancellation,
toy2d samples over the true density, image sample grids, speed-up."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mct.diffusion import heun_nfe
from mct.report_collect import NOT_RUN, Entry, Sources, is_number
from mct.report_tables import metric_name
from mct.worlds.base import World


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.2, 3.4)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def _not_run(ax, text: str = NOT_RUN) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set_xticks([])
    ax.set_yticks([])


def k_sweep_metrics(world_def: World | None) -> list[str]:
    """The metrics the K-sweep figure draws: the world's primary ones (what its claims are judged on)."""
    return [k for k, _ in world_def.primary_metrics] if world_def is not None else ["fid", "recall"]


def fig_k_sweep(world: str, entries: Sequence[Entry], k_members, path: Path,
                world_def: World | None = None) -> None:
    import seaborn as sns

    keys = k_sweep_metrics(world_def)
    metrics = [(k, metric_name(k, world_def)) for k in keys]
    rows = [{"K": k, "metric": label, "value": e.get(key)} for k, group in k_members for e in group
            for key, label in metrics if is_number(e.get(key))]
    data = pd.DataFrame(rows, columns=["K", "metric", "value"])
    dis = [e for e in entries if e.kind == "experiment" and e.setting["method"] == "diff_instruct"]
    teachers = [e for e in entries if e.kind == "teacher"]
    fig, axes = new_figure(len(metrics), size=(3.6, 3.2))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        d = data[data["metric"] == label]
        if d.empty:
            _not_run(ax)
        else:
            sns.lineplot(data=d, x="K", y="value", marker="o", errorbar=None, ax=ax, label="EMD")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(d.K.unique()), [str(k) for k in sorted(d.K.unique())])
            lines = [(e, "--", "C3", "Diff-Instruct") for e in dis]
            lines += [(t, ":", "0.3", "teacher") for t in teachers]
            for e, style, color, name in lines:
                if is_number(e.get(key)):
                    ax.axhline(e.get(key), ls=style, color=color, label=name)
            ax.legend(fontsize=8)
            if key == "modes_covered":
                ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{label} vs K")
        ax.set_ylabel(label)
    fig.suptitle(f"{world}: K sweep")
    save_figure(fig, path)


def fig_noise(world: str, members, logs: dict[str, pd.DataFrame | None], path: Path) -> None:
    import seaborn as sns

    curves = []
    for label, group in members:
        for e in group:
            log = logs.get(e.name)
            if log is None:
                continue
            window = max(1, len(log) // 50)  # a running mean keeps the trend readable; raw values: log.jsonl
            for key in ("grad_norm_gen", "loss_gen"):
                if key in log:
                    y = log[key].astype(float).rolling(window, min_periods=1).mean()
                    it = log["iteration"] if "iteration" in log else pd.Series(np.arange(len(log)))
                    curves.append(pd.DataFrame({"iteration": it, "value": y, "key": key,
                                                "run": f"{label} ({e.name})"}))
    data = pd.concat(curves, ignore_index=True) if curves else None
    panels = [("grad_norm_gen", "generator gradient norm"), ("loss_gen", "generator loss")]
    fig, axes = new_figure(2, size=(5.0, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        d = None if data is None else data[data["key"] == key]
        if d is None or d.empty:
            _not_run(ax)
        else:
            sns.lineplot(data=d, x="iteration", y="value", hue="run", errorbar=None, ax=ax)
            ax.legend(fontsize=7)
            if key == "grad_norm_gen":
                ax.set_yscale("log")
        ax.set_title(label)
        ax.set_ylabel(label)
    fig.suptitle(f"{world}: noise cancellation")
    save_figure(fig, path)


def _load_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    if not path.exists():
        return None
    with np.load(path) as f:
        return f["x"], (f["labels"] if "labels" in f else None)


def _teacher_points(path: Path, world, tcfg, n: int) -> np.ndarray | None:
    """n samples of a trained toy2d teacher (Heun, its evaluation steps, seed 0, CPU); None without the file."""
    import torch

    from mct.diffusion import edm_heun_sample
    from mct.teacher import load_denoiser

    if not path.exists():
        return None
    net, _ = load_denoiser(path, world)
    latents = torch.randn((n, *world.data_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, _ = edm_heun_sample(net.eval(), latents, None, tcfg.sampler_steps, tcfg.sigma_min, tcfg.sigma_max)
    return x.numpy()


def _extent(dist: Any, points: Sequence[np.ndarray]) -> tuple[float, float]:
    """The square window of the points figure: a mixture's means padded by its spread, else the central 99% of
    every panel's points, padded by a tenth."""
    if dist is not None and hasattr(dist, "means"):
        means = dist.means.numpy()
        pad = 0.15 * float(np.ptp(means)) + 5 * dist.std
        return float(means.min() - pad), float(means.max() + pad)
    allx = np.concatenate([p[:, :2].ravel() for p in points]) if points else np.array([-1.0, 1.0])
    lo, hi = np.quantile(allx, [0.005, 0.995])
    pad = 0.1 * float(hi - lo) + 1e-6
    return float(lo - pad), float(hi + pad)


def fig_points(world, entries: Sequence[Entry], src: Sources, path: Path, max_points: int = 2000,
               teachers: Sequence[tuple[str, Any]] = ()) -> str:
    """Panels of a low-dimensional world's samples: the data (a fresh draw, where the world knows its distribution:
    World.true_distribution), each teacher (``teachers``: (name, TeacherConfig), sampled here from its checkpoint),
    then every experiment, titled by name and method; a 2-D world's density as contours, a higher-dimensional
    one's first two coordinates, a 1-D one's histogram. Returns the figure's caption."""
    import torch

    dist = world.true_distribution()
    dim = world.data_shape[0]
    panels: list[tuple[str, np.ndarray | None, str]] = []
    if dist is not None:
        panels.append(("data (true distribution)", dist.sample(max_points, torch.Generator().manual_seed(0)).numpy(),
                       "C1"))
    for name, tcfg in teachers:
        pts = _teacher_points(src.teacher(name), world, tcfg, max_points)
        panels.append((f"teacher {name}\n{heun_nfe(tcfg.sampler_steps)} NFE", pts, "C2"))
    for e in (e for e in entries if e.kind == "experiment"):
        s = _load_samples(src.samples(e.shown_run))
        panels.append((f"{e.name}\n{_method_label(e)}", None if s is None else s[0].reshape(len(s[0]), -1), "C0"))
    lo, hi = _extent(dist, [x[:max_points] for _, x, _ in panels if x is not None])
    contour = None
    if dist is not None and dim == 2:
        g = np.linspace(lo, hi, 400)
        gx, gy = np.meshgrid(g, g)
        grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
        logp = dist.log_prob(grid).numpy().reshape(gx.shape)
        contour = gx, gy, logp, np.linspace(max(logp.max() - 10.0, logp.min()), logp.max(), 6)  # each mode's core
    ncols = min(5, len(panels))
    fig, axes = new_figure(ncols, -(-len(panels) // ncols), size=(2.3, 2.45))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (title, x, color) in zip(axes, panels, strict=False):
        if contour is not None:
            ax.contourf(*contour, cmap="Greys", alpha=0.5)
        if x is None:
            _not_run(ax, "samples not found")
        elif dim == 1:
            ax.hist(x[:max_points, 0], bins=60, range=(lo, hi), color=color, alpha=0.7)
        else:
            x = x[:max_points]
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.6, color=color, linewidths=0)
        ax.set_xlim(lo, hi)
        if dim > 1:
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal")
        ax.tick_params(labelsize=8)
        ax.set_title(title, fontsize=10)
    where = (" over the true density (grey: top 10 nats)" if contour is not None
             else f", coordinates 1 and 2 of {dim}" if dim > 2 else "")
    fig.suptitle(f"{world.name}: {max_points:,} samples per panel" + ("\n" if ncols < 3 else "") + where)
    save_figure(fig, path)
    shown = ("the data, " if dist is not None else "") + "the teacher and each experiment"
    return (f"{world.name}: {shown}" + (" over the true density" if contour is not None else
                                        f" (coordinates 1 and 2 of {dim})" if dim > 2 else ""))


def _method_label(e: Entry) -> str:
    return "Diff-Instruct" if e.setting["method"] == "diff_instruct" else f"EMD-{e.setting['K']}"


def image_samples(x: np.ndarray, labels: np.ndarray | None, per_class: int = 10,
                  classes: int = 10) -> np.ndarray:
    """Up to ``classes`` x ``per_class`` images in class order when labels exist, else the first 100."""
    if labels is None:
        return x[:per_class * classes]
    y = labels.argmax(1) if labels.ndim == 2 else labels.astype(int)
    picks = [np.flatnonzero(y == c)[:per_class] for c in range(classes)]
    idx = np.concatenate([p for p in picks if len(p)]) if any(len(p) for p in picks) else np.arange(0)
    return x[idx]


def fig_image_samples(world: str, entries: Sequence[Entry], src: Sources, figures: Path) -> list[str]:
    """One grid PNG per experiment (mct.images.image_grid) and an overview figure; returns the grid names."""
    import torch

    from mct.images import image_grid

    exps = [e for e in entries if e.kind == "experiment"] or [None]
    ncols = min(4, len(exps))
    fig, axes = new_figure(ncols, -(-len(exps) // ncols), size=(2.7, 2.9))
    for ax in axes[len(exps):]:
        ax.set_axis_off()
    names = []
    for ax, e in zip(axes, exps, strict=False):
        s = None if e is None else _load_samples(src.samples(e.shown_run))
        shown = None if s is None else image_samples(*s)
        if shown is None or len(shown) == 0:
            _not_run(ax, "samples: " + NOT_RUN)
        else:
            grid = image_grid(torch.from_numpy(shown).float(), nrow=10, upscale=4)
            name = f"{world}_grid_{_safe(e.name)}.png"
            grid.save(figures / name, format="PNG")
            names.append(name)
            ax.imshow(np.asarray(grid), cmap="gray" if grid.mode == "L" else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_axis_off()
        ax.set_title("no experiment" if e is None else f"{e.name}\n{_method_label(e)}", fontsize=9)
    fig.suptitle(f"{world}: samples (rows: classes 0-9 where labels exist)")
    save_figure(fig, figures / f"{world}_samples.png")
    return names


def fig_speed(world: str, entries: Sequence[Entry], path: Path) -> None:
    """Student speed-up over the teacher (samples/s ratio, same process and batch) on a linear axis, with the
    teacher's NFE as the reference line (the speed-up if time were proportional to network evaluations)."""
    rows = [(e.name, e.get("speedup"), e.get("teacher_nfe")) for e in entries
            if e.kind == "experiment" and is_number(e.get("speedup"))]
    fig, (ax,) = new_figure(size=(8.0, 1.4 + 0.32 * max(1, len(rows))))
    if rows:
        names, ratio, nfe = zip(*rows, strict=True)
        y = np.arange(len(rows))
        ax.barh(y, ratio, color="C0", height=0.6)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        for yi, r in zip(y, ratio, strict=True):
            ax.text(r, yi, f" {r:.1f}x", va="center", fontsize=9)
        for n in sorted({n for n in nfe if is_number(n)}):
            ax.axvline(n, ls="--", color="0.3", lw=1, label=f"teacher NFE = {n:g} (time proportional to NFE)")
        ax.set_xlim(0, 1.15 * max(max(ratio), *(n for n in nfe if is_number(n))))
        ax.set_xlabel("speed-up: student samples/s / teacher samples/s (linear)")
        if any(is_number(n) for n in nfe):
            ax.legend(loc="lower right", fontsize=8)
    else:
        _not_run(ax)
    ax.set_title(f"{world}: one-step student speed-up over the teacher (same process, same batch)")
    save_figure(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
