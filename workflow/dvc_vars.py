"""Write workflow/dvc_vars.yaml: the default suite of params.yaml, resolved, for dvc.yaml's `foreach` loops.

DVC interpolation cannot look up ``suites.${suite}``, an experiment's template or a world's kind, so dvc.yaml
iterates over tables computed here by mct.config.load_params. Regenerate after changing params.yaml's default
suite, its experiments' worlds/teachers/templates or distill.gpus/num_processes:

    python workflow/dvc_vars.py --write      # rewrite workflow/dvc_vars.yaml
    python workflow/dvc_vars.py --check      # exit 1 when it is out of date (tests/test_dag.py does this)
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
HEADER = """\
# Generated from params.yaml by `python workflow/dvc_vars.py --write`: do not edit by hand.
# The default suite, resolved for dvc.yaml's foreach loops (DVC cannot look up suites.${suite}, templates or
# world kinds). `with_fnet` lists what is measured through a trained FID feature network (digits worlds),
# `without_fnet` the rest. tests/test_dag.py fails when this file is out of date.
"""


def distill_launcher(params: Params, experiment: str) -> str:
    """Same rule as workflow/rules/common.smk: accelerate for GPUs or several processes, else the console script."""
    d = params.experiment(experiment).distill
    if d.gpus > 0 or d.num_processes > 1:
        return f"accelerate launch --num_processes {d.num_processes} -m mct.cli"
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(VARS_FILE))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the vars file")
    mode.add_argument("--check", action="store_true", help="exit 1 when the vars file is out of date")
    args = ap.parse_args(argv)
    text = render(dvc_tables(load_params(args.params)))
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date with {args.params}; run: python workflow/dvc_vars.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if args.write:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"wrote {out}")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
