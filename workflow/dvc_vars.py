"""Generate the parts of the DVC pipeline that depend on the default suite of params.yaml.

DVC interpolation cannot look up ``suites.${suite}``, an experiment's template or a world's kind, nor expand
a list into a stage's deps. So dvc.yaml's `foreach` loops iterate over tables written here to
workflow/dvc_vars.yaml, and its `report` stage (which reads every experiment of the suite) is written here
between marker lines. Both come from mct.config.load_params. Regenerate after changing params.yaml's default
suite, the worlds/teachers/templates of its experiments or their distill.gpus/num_processes:

    python workflow/dvc_vars.py --write      # rewrite workflow/dvc_vars.yaml and dvc.yaml's report stage
    python workflow/dvc_vars.py --check      # exit 1 when either is out of date (tests/test_dag.py checks too)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from mct import paths
from mct.config import Params, load_params

VARS_FILE = Path("workflow/dvc_vars.yaml")
DVC_FILE = Path("dvc.yaml")
REPORT_BEGIN = "  # >>> report stage, generated from params.yaml by `python workflow/dvc_vars.py --write`\n"
REPORT_END = "  # <<< report stage\n"
HEADER = """\
# Generated from params.yaml by `python workflow/dvc_vars.py --write`: do not edit by hand.
# The default suite, resolved for dvc.yaml's foreach loops (DVC cannot look up suites.${suite}, templates or
# world kinds). `with_fnet` lists what is measured through a trained FID feature network (digits worlds),
# `without_fnet` the rest. tests/test_dag.py fails when this file is out of date.
"""


def distill_launcher(params: Params, experiment: str) -> str:
    """Same rule as workflow/rules/common.smk: accelerate for GPUs or several processes, else the console script."""
    d = params.experiment(experiment).distill
    if d.num_processes > 1:  # --multi_gpu: N processes (torchrun) on GPU and CPU hosts; without it a CPU host gets 1
        return f"accelerate launch --multi_gpu --num_processes {d.num_processes} -m mct.cli"
    if d.gpus > 0:
        return "accelerate launch --num_processes 1 -m mct.cli"
    return "mct"


def has_feature_net(params: Params, world: str) -> bool:
    return params.worlds[world].kind == "digits"


def dvc_tables(params: Params) -> dict[str, Any]:
    """The `dag` mapping that dvc.yaml interpolates, for params.suite."""
    worlds = {w: {"data": str(paths.world_data(w, params.worlds[w].kind))} for w in params.suite_worlds()}
    teachers = {}
    for t in params.suite_teachers():
        w = params.teachers[t].world
        teachers[t] = {"world": w, "data": worlds[w]["data"]}
    experiments = {}
    for e in sorted(params.suite_experiments()):
        exp = params.experiment(e)
        experiments[e] = {"world": exp.world, "teacher": exp.teacher, "data": worlds[exp.world]["data"],
                          # the params key of the template it merges (its own entry when it has none)
                          "template": f"templates.{exp.template}" if exp.template else f"experiments.{e}",
                          "launch": distill_launcher(params, e)}

    def split(table: dict[str, dict], world_of) -> tuple[dict, dict]:
        yes = {k: v for k, v in table.items() if has_feature_net(params, world_of(k, v))}
        return yes, {k: v for k, v in table.items() if k not in yes}

    fw, nw = split(worlds, lambda k, v: k)
    ft, nt = split(teachers, lambda k, v: v["world"])
    fe, ne = split(experiments, lambda k, v: v["world"])
    return {"suite": params.suite, "worlds": worlds, "teachers": teachers, "experiments": experiments,
            "with_fnet": {"worlds": fw, "teachers": ft, "experiments": fe},
            "without_fnet": {"worlds": nw, "teachers": nt, "experiments": ne}}


def render(tables: dict[str, Any]) -> str:
    """YAML with one line per name, so a diff shows which entry changed."""

    def block(table: dict[str, dict], indent: str) -> str:
        if not table:
            return " {}\n"
        rows = (f"{indent}{k}: {yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()}\n"
                for k, v in table.items())
        return "\n" + "".join(rows)

    out = [HEADER, "dag:\n", f"  suite: {tables['suite']}\n"]
    for name in ("worlds", "teachers", "experiments"):
        out.append(f"  {name}:{block(tables[name], '    ')}")
    for group in ("with_fnet", "without_fnet"):
        out.append(f"  {group}:\n")
        for name in ("worlds", "teachers", "experiments"):
            out.append(f"    {name}:{block(tables[group][name], '      ')}")
    return "".join(out)


def report_stage(params: Params) -> str:
    """dvc.yaml's `report` stage for params.suite: it reads the suite's records, samples and training logs."""
    exps, teachers, worlds = params.suite_experiments(), params.suite_teachers(), params.suite_worlds()
    templates = sorted({params.experiment(e).template for e in exps} - {""})
    deps = [str(p) for e in exps for p in (paths.experiment_metrics(e), paths.samples_file(e), paths.distill_dir(e))]
    deps += [str(paths.teacher_metrics(t)) for t in teachers] + ["mct/report.py", "mct/config.py"]
    keys = ([f"suites.{params.suite}"] + [f"experiments.{e}" for e in exps] + [f"templates.{t}" for t in templates]
            + [f"teachers.{t}" for t in teachers] + [f"worlds.{w}" for w in worlds])
    outs = [paths.report_index(), paths.REPORTS / "index.html", paths.REPORTS / "tables", paths.REPORTS / "figures"]
    lines = [REPORT_BEGIN, "  report:\n",
             f"    cmd: mct report --suite {params.suite} --params params.yaml --no-progress\n", "    deps:\n"]
    lines += [f"      - {d}\n" for d in deps]
    lines += ["    params:\n"] + [f"      - {k}\n" for k in keys]
    lines += ["    metrics:\n", f"      - {paths.metrics_file()}:\n", "          cache: false\n", "    outs:\n"]
    lines += [f"      - {o}:\n          cache: false\n" for o in outs]
    return "".join(lines + [REPORT_END])


def with_report_stage(dvc_yaml: str, stage: str) -> str:
    """dvc.yaml's text with the block between the report markers replaced by ``stage``."""
    begin, end = dvc_yaml.find(REPORT_BEGIN), dvc_yaml.find(REPORT_END)
    if begin < 0 or end < begin:
        raise ValueError(f"dvc.yaml lacks the report stage markers {REPORT_BEGIN.strip()!r} ... {REPORT_END.strip()!r}")
    return dvc_yaml[:begin] + stage + dvc_yaml[end + len(REPORT_END):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vars", default=str(VARS_FILE))
    ap.add_argument("--dvc", default=str(DVC_FILE))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the vars file and dvc.yaml's report stage")
    mode.add_argument("--check", action="store_true", help="exit 1 when either is out of date")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    wanted = {Path(args.vars): render(dvc_tables(params)),
              Path(args.dvc): with_report_stage(Path(args.dvc).read_text(), report_stage(params))}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date with {args.params}; run: python workflow/dvc_vars.py --write",
                  file=sys.stderr)
        return 1 if stale else 0
    if not args.write:
        sys.stdout.write(wanted[Path(args.vars)] + "\n" + report_stage(params))
        return 0
    for path in stale:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(wanted[path])
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
