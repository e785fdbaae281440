"""`mct <stage>`: one thin subcommand per pipeline stage; settings come from params.yaml by name."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mct import paths
from mct.checkpoint import CheckpointError as CheckpointRefused
from mct.config import ConfigError, Params, load_params


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params entry, e.g. -S experiments.toy2d_emd_k8.distill.K=16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def _world(params: Params, name: str):
    from mct.worlds.registry import make_world

    if name not in params.worlds:
        raise ConfigError(f"worlds: unknown world {name!r}; known: {sorted(params.worlds)}")
    return make_world(name, params.worlds[name])


def _run(params: Params, args: argparse.Namespace):
    """The experiment's settings for this run and the run's name (mct.paths.run_name): with --run-seed K,
    distill.seed is K and the outputs go under <experiment>/seedK (one run of the experiment's `seeds`)."""
    return params.run_config(args.experiment, args.run_seed), paths.run_name(args.experiment, args.run_seed)


def _teacher_path(params: Params, name: str) -> Path:
    params.teacher(name)  # unknown names fail here, naming the key
    return paths.teacher_file(name)


class MissingInput(FileNotFoundError):
    """An input of a stage is not there: the message names the file and the command that makes it."""


def _need(path: Path, made_by: str) -> Path:
    """``path`` if it exists; else stop before any work (no output or work folder is created) naming the stage
    that makes it, and the whole DAG as the other way."""
    if not Path(path).exists():
        raise MissingInput(f"{path}: missing; it is made by `{made_by}` (or run the suite's whole DAG: `dvc repro` "
                           f"or `snakemake --cores all`)")
    return Path(path)


class RunMismatch(ValueError):
    """A distilled generator was made under other settings than the params a later stage runs it under."""


def _check_distilled(exp, distill_dir: Path, args: argparse.Namespace) -> None:
    """Stop (before any work) when the generator's recorded settings (its summary.json, written by distill) differ
    from the params this stage runs under: the record would carry settings the numbers were not made with. Said
    as every differing key, recorded -> now; --allow-settings-mismatch goes on, with a warning."""
    from mct.config import numeric_settings, settings_changes

    summary = Path(distill_dir) / "summary.json"
    if not summary.exists():  # a generator from elsewhere (--generator): nothing recorded to check
        return
    recorded = json.loads(summary.read_text()).get("settings")
    if recorded is None:
        print(f"warning: {summary} records no settings (written by an older mct): the generator is not checked "
              "against the params", file=sys.stderr)
        return
    changes = settings_changes(recorded, numeric_settings(exp))
    if not changes:
        return
    what = (f"the generator in {distill_dir} was distilled under other settings than these params give "
            f"(recorded -> now): {'; '.join(changes)}")
    if getattr(args, "allow_settings_mismatch", False):
        print(f"warning: {what}; going on (--allow-settings-mismatch): the output is labelled with the current "
              "params", file=sys.stderr)
        return
    raise RunMismatch(f"{what}. Give this stage the same -S overrides the distill run had, rerun distill under "
                      "these params, or pass --allow-settings-mismatch")


def _seed_flag(args: argparse.Namespace) -> str:
    return f" --run-seed {args.run_seed}" if getattr(args, "run_seed", None) is not None else ""


def _need_teacher(params: Params, name: str, given: str | None = None) -> Path:
    return _need(Path(given) if given else _teacher_path(params, name), f"mct teacher --teacher {name}")


def _need_world_inputs(world) -> None:
    """The evaluation inputs of a world: its reference statistics and, for image worlds, the feature network."""
    _need(paths.reference_stats(world.name), f"mct ref-stats --world {world.name}")
    if world.needs_feature_net:
        _need(paths.feature_net(world.name), f"mct features --world {world.name}")


def cmd_validate(args: argparse.Namespace) -> int:
    params = _params(args)
    names = params.suite_experiments(args.suite)
    print(f"params OK: {len(params.experiments)} experiments; suite {args.suite or params.suite!r} runs "
          f"{len(names)}: {', '.join(names)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    params = _params(args)
    world = _world(params, args.world)
    out = Path(args.out or world.data_file)
    world.prepare(out)
    print(f"prepared {args.world} -> {out}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from mct.teacher import train_teacher
    params = _params(args)
    tcfg = params.teacher(args.teacher)
    world = _world(params, tcfg.world)
    out = Path(args.out or _teacher_path(params, args.teacher))
    if tcfg.kind == "local":  # a world's own model folder (text2image: Stable Diffusion), verified and imported
        info = world.import_teacher(tcfg, out)
        print(f"imported teacher {args.teacher} -> {out}: {info}")
        return 0
    if tcfg.kind == "fetch":
        from mct.fetch import check_sha256, fetch_pinned

        if tcfg.arch != "adm":  # EDM pickles are kept as published and loaded by the restricted unpickler
            fetch_pinned(tcfg.source, tcfg.sha256, out, progress=not args.no_progress)
            print(f"fetched teacher {args.teacher} -> {out}")
            return 0
        from mct.nets.adm import adm_model_kwargs
        from mct.teacher import import_adm_teacher

        adm_model_kwargs(dict(tcfg.arch_kwargs))  # unknown flags fail before any download
        sha = check_sha256(tcfg.sha256)
        # The verified download sits beside the output until the conversion succeeds (a failed conversion keeps
        # it, so a rerun does not download again); the converted mct checkpoint is the stage's output.
        raw = out.with_name(f".{out.name}.download")
        fetch_pinned(tcfg.source, sha, raw, progress=not args.no_progress)
        import_adm_teacher(raw, world, dict(tcfg.arch_kwargs), out, {"source": tcfg.source, "sha256": sha})
        raw.unlink()
        print(f"fetched ADM teacher {args.teacher} ({tcfg.source}) -> {out}")
        return 0
    data = _need(Path(args.data or world.data_file), f"mct prepare --world {tcfg.world}")
    x, y = world.load_split(data, "train")
    summary = train_teacher(world, tcfg, x, y, out, progress=not args.no_progress)
    print(f"trained teacher {args.teacher} -> {out}: {summary}")
    return 0


def cmd_init_student(args: argparse.Namespace) -> int:
    from mct.student import init_student
    params = _params(args)
    exp, run = _run(params, args)
    world = _world(params, exp.world)
    teacher = _need_teacher(params, exp.teacher, args.teacher)
    out = Path(args.out or paths.student_init(run))
    info = init_student(world, exp, teacher, out)
    print(f"student {args.experiment} -> {out}: {info}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from mct.train import distill
    params = _params(args)
    exp, run = _run(params, args)
    world = _world(params, exp.world)
    teacher = _need_teacher(params, exp.teacher, args.teacher)
    student = _need(Path(args.student or paths.student_init(run)),
                    f"mct init-student --experiment {args.experiment}{_seed_flag(args)}")
    summary = distill(world, exp, teacher, student,
                      Path(args.out or paths.distill_dir(run)),
                      Path(args.work or paths.work_dir(run)),
                      progress=not args.no_progress, stop_after=args.stop_after)
    print(f"distilled {args.experiment}: {summary}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """One process, or sharded over `accelerate launch` processes (each draws its own seeded batches)."""
    import os

    import numpy as np
    import torch

    from mct.io import atomic_path
    from mct.student import generate_all, load_generator
    params = _params(args)
    exp, run = _run(params, args)
    world = _world(params, exp.world)
    generator = _need(Path(args.generator or paths.distill_dir(run) / "generator.pt"),
                      f"mct distill --experiment {args.experiment}{_seed_flag(args)}")
    _check_distilled(exp, generator.parent, args)
    gen = load_generator(generator, world, "ema")
    n = args.num or exp.eval.num_samples
    seed = exp.eval.seed if args.seed is None else args.seed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    main_process, processes = True, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: it sets up the process group
        from accelerate import Accelerator

        # cpu=True on a CPU host: a plain Accelerator() there sees one process and every rank would draw the whole set
        acc = Accelerator(cpu=not torch.cuda.is_available())
        device, main_process, processes = acc.device, acc.is_main_process, acc.num_processes
    # uint8 for image worlds at scale: 50k float images would be 4x larger; FID reads them quantised anyway
    x, y = generate_all(gen, world.data_shape, n, seed, world.eval_labels, exp.eval.batch_size, device,
                        finish=world.finish_samples)
    if not main_process:
        return 0
    out = Path(args.out or paths.samples_file(run))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x.numpy(), **({"labels": y.numpy()} if y is not None else {}))
    print(f"{n} samples of {args.experiment} ({processes} process{'es' if processes > 1 else ''}) -> {out}")
    return 0


def _feature_path(world) -> Path | None:
    return paths.feature_net(world.name) if world.needs_feature_net else None


def cmd_features(args: argparse.Namespace) -> int:
    from mct.evaluate import train_features

    params = _params(args)
    world = _world(params, args.world)
    out = Path(args.out or paths.feature_net(args.world))
    meta = train_features(world, world.data_file, out)
    print(f"feature network for {args.world}: held-out accuracy {meta['held_out_accuracy']:.4f}")
    return 0


def cmd_ref_stats(args: argparse.Namespace) -> int:
    from mct.evaluate import reference_stats

    params = _params(args)
    world = _world(params, args.world)
    out = Path(args.out or paths.reference_stats(args.world))
    meta = reference_stats(world, world.data_file, _feature_path(world), out,
                           progress=not args.no_progress)
    print(f"reference statistics {meta} -> {out}")
    return 0


def cmd_teacher_eval(args: argparse.Namespace) -> int:
    from mct.evaluate import evaluate_teacher

    params = _params(args)
    tcfg = params.teacher(args.teacher)
    world = _world(params, tcfg.world)
    teacher = _need_teacher(params, args.teacher)
    _need_world_inputs(world)
    rec = evaluate_teacher(world, args.teacher, tcfg, teacher, _feature_path(world),
                           paths.reference_stats(world.name), args.num or 10000, args.seed,
                           Path(args.out or paths.teacher_metrics(args.teacher)), progress=not args.no_progress)
    print(json.dumps(rec, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mct.evaluate import evaluate_experiment

    params = _params(args)
    exp, run = _run(params, args)
    world = _world(params, exp.world)
    samples = _need(paths.samples_file(run), f"mct sample --experiment {args.experiment}{_seed_flag(args)}")
    distilled = _need(paths.distill_dir(run), f"mct distill --experiment {args.experiment}{_seed_flag(args)}")
    _check_distilled(exp, distilled, args)
    teacher = _need_teacher(params, exp.teacher)
    _need_world_inputs(world)
    rec = evaluate_experiment(world, args.experiment, exp, params.teacher(exp.teacher), samples, distilled,
                              teacher, _feature_path(world),
                              paths.reference_stats(world.name),
                              Path(args.out or paths.experiment_metrics(run)))
    print(json.dumps(rec, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mct.report import build_report

    params = _params(args)
    suite = args.suite or params.suite
    out = build_report(params, suite, Path(args.out or paths.report_dir(suite, params.suite)))
    print(f"report -> {out}")
    return 0


def cmd_inspect_checkpoint(args: argparse.Namespace) -> int:
    from mct.checkpoint import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(Path(args.path))))
    return 0


# (name, help, handler, extra options); every stage also takes the common options of _common().
_NAME = {"required": True}
_INT = {"type": int, "default": None}
_TEACHER = {"help": "the teacher file to use instead of params.yaml's (default: runs/teachers/<T>/teacher.pt, as "
                    "`mct teacher` writes it)"}
_OUT = {"help": "where to write the stage's output (default: its place under runs/, as the DAG expects)"}
_MISMATCH = {"--allow-settings-mismatch": {
    "action": "store_true", "help": "go on when the generator's recorded settings (its distill summary.json) differ "
                                    "from these params (default: stop, naming the keys)"}}
_RUN_SEED = {"--run-seed": {"type": int, "default": None, "metavar": "K",
                            "help": "one seed of the experiment's `seeds`: distill.seed = K, outputs under E/seedK"}}
STAGES: list[tuple[str, str, object, dict[str, dict]]] = [
    ("validate", "check params.yaml and list a suite's experiments", cmd_validate,
     {"--suite": {"help": "the suite to list (default: params.yaml `suite`)"}}),
    ("prepare", "prepare a world's data", cmd_prepare, {"--world": _NAME, "--out": _OUT}),
    ("teacher", "train (or fetch, or import) a teacher", cmd_teacher,
     {"--teacher": _NAME, "--data": {"help": "the prepared data to train on (default: the world's data file)"},
      "--out": _OUT}),
    ("features", "train the FID feature network of an image world (digits)", cmd_features,
     {"--world": _NAME, "--out": _OUT}),
    ("ref-stats", "reference FID statistics of a world's held-out split", cmd_ref_stats,
     {"--world": _NAME, "--out": _OUT}),
    ("teacher-eval", "metrics of the teacher's multistep sampler", cmd_teacher_eval,
     {"--teacher": _NAME, "--num": _INT, "--seed": {"type": int, "default": 4321}, "--out": _OUT}),
    ("init-student", "initialise the one-step generator and score network", cmd_init_student,
     {**_RUN_SEED, "--experiment": _NAME, "--teacher": _TEACHER, "--out": _OUT}),
    ("distill", "EM distillation (resumes from its last checkpoint)", cmd_distill,
     {**_RUN_SEED, "--experiment": _NAME, "--teacher": _TEACHER,
      "--student": {"help": "the initialised student (default: runs/experiments/<run>/student_init.pt)"},
      "--out": _OUT, "--work": {"help": "resume state (default: runs/work/<run>/; kept across runs, never an output)"},
      "--stop-after": {"type": int, "default": None, "help": argparse.SUPPRESS}}),
    ("sample", "draw one-step samples from a distilled generator", cmd_sample,
     {**_RUN_SEED, "--experiment": _NAME, **_MISMATCH,
      "--generator": {"help": "the distilled generator (default: runs/experiments/<run>/distill/generator.pt)"},
      "--out": _OUT, "--num": {**_INT, "help": "samples to draw (default: the experiment's eval.num_samples)"},
      "--seed": {**_INT, "help": "sampling seed (default: the experiment's eval.seed)"}}),
    ("evaluate", "metrics of a distilled experiment", cmd_evaluate,
     {**_RUN_SEED, "--experiment": _NAME, **_MISMATCH, "--out": _OUT}),
    ("report", "tables and figures of a suite into reports/ (the default suite) or reports/suites/<suite>/",
     cmd_report, {"--suite": {"help": "the suite to report (default: params.yaml `suite`)"},
                  "--out": {"help": "the folder to write (default: reports/ for the default suite, "
                                    "reports/suites/<suite>/ for any other)"}}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mct", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, fn, options in STAGES:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        for flag, kwargs in options.items():
            p.add_argument(flag, **kwargs)
        p.set_defaults(fn=fn)
    p = sub.add_parser("inspect-checkpoint", help="show what a checkpoint holds, through the safe loader")
    p.add_argument("path")
    p.set_defaults(fn=cmd_inspect_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"mct: invalid params: {e}", file=sys.stderr)
        return 2
    except CheckpointRefused as e:
        print(f"mct {args.command}: refused: {e}", file=sys.stderr)
        return 3
    except RunMismatch as e:
        print(f"mct {args.command}: refused: {e}", file=sys.stderr)
        return 2
    except MissingInput as e:  # nothing was started: like bad params, a usage error
        print(f"mct {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"mct {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
