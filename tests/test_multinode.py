"""Distillation over several nodes: `distill.nodes` in params, the per-node launch line both engines run, the Slurm
resources Snakemake asks for, the checks, and the launch line itself run (two launchers meeting on this host; one
node of the local Slurm cluster through srun)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mct import stages
from mct.config import ConfigError, DistillConfig, load_params
from tests.test_dag import REPO, dry_run, job_blocks, no_slurm_probe, parse_dry_run, scratch_copy, set_params  # noqa: F401
from tests.test_slurm import _wait_final, cluster  # noqa: F401 (fixture)

MAIN_IP = '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
RUN = ("tiny_big", None)


def _params(tmp_path: Path, raw: dict, **distill):
    raw["experiments"]["tiny_big"] = {"template": "toy2d", "distill": distill}
    raw["suites"]["smoke"].append("tiny_big")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def test_two_nodes_of_four_gpus_launch_one_accelerate_per_node(tiny_raw, tmp_path):
    """nodes 2, gpus 4 (per node), num_processes 8 (total): srun starts one task per node; each runs accelerate with
    the machine rank from Slurm, the main address from the allocation, 2 machines and 8 processes in all."""
    params = _params(tmp_path, tiny_raw, nodes=2, gpus=4, num_processes=8)
    job = stages.job(params, "distill", RUN)
    assert job.command == (
        "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c 'accelerate launch --multi_gpu "
        f"--num_machines 2 --machine_rank $SLURM_NODEID {MAIN_IP} --main_process_port $((29500 + SLURM_JOB_ID % 1000)) "
        "--num_processes 8 -m mct.cli \"$@\"' mct distill --experiment tiny_big --work runs/work/tiny_big "
        "--params params.yaml --no-progress")
    # The arguments each node's accelerate receives, through the engines' shells (sh for DVC, bash for Snakemake)
    # and srun's bash -c: the machine rank and main host come from Slurm's variables, the stage's arguments follow.
    for shell in ("sh", "bash"):
        assert _node_argv(tmp_path, shell, job.command, SLURM_NODEID="1") == [
            "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node07",
            "--main_process_port", "29734", "--num_processes", "8", "-m", "mct.cli", "distill", "--experiment",
            "tiny_big", "--work", "runs/work/tiny_big", "--params", "params.yaml", "--no-progress"]
    assert (tmp_path / "srun.args").read_text().split() == ["--nodes", "2", "--ntasks-per-node", "1",
                                                             "--kill-on-bad-exit=1"]
    # dvc.yaml carries it unchanged: YAML round trip, and nothing DVC would take for a ${...} interpolation
    assert yaml.safe_load(yaml.safe_dump({"cmd": job.command}))["cmd"] == job.command and "${" not in job.command

    # Resources per node, on 2 nodes; Snakemake asks the Slurm plugin for nodes=2, one task per node, 4 GPUs each.
    assert job.resources == stages.Resources(16, 96000, 24 * 60, 4, nodes=2)
    assert stages.snakemake_resources(job.resources) == {
        "mem_mb": 96000, "runtime": 1440, "gpu": None, "nodes": 2, "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:4",
        "mpi": "srun"}


def _node_argv(tmp_path: Path, shell: str, command: str, **slurm: str) -> list[str]:
    """Run ``command`` as the engine would (``shell -c``) with stand-ins on PATH: srun (records its options, runs
    the task), scontrol (a two-node allocation, node07 and node08) and accelerate (prints its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"srun": f'while [ "$1" != bash ]; do echo "$1" >> {tmp_path}/srun.args; shift; done\nexec "$@"',
             "scontrol": '[ "$1 $2 $3" = "show hostnames node[07-08]" ] && printf "node07\\nnode08\\n"',
             "accelerate": 'printf "%s\\n" "$@"'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "srun.args").unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_JOB_ID": "1234", **slurm}
    r = subprocess.run([shell, "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


class _Resources(dict):
    __getattr__ = dict.__getitem__


def test_the_slurm_plugin_turns_the_resources_into_per_node_sbatch_flags(tiny_raw, tmp_path):
    """snakemake-executor-plugin-slurm's own sbatch line for the job: --nodes=2 --ntasks=2, per node 16 CPUs, the
    memory and --gres=gpu:4; no --gpus (a count over the whole job) and no --ntasks-per-gpu."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = stages.job(_params(tmp_path, tiny_raw, nodes=2, gpus=4, num_processes=8), "distill", RUN)
    res = {k: v for k, v in stages.snakemake_resources(job.resources).items() if v is not None}
    threads = job.resources.threads  # the profile's default-resources: cpus_per_task = threads
    fake = SimpleNamespace(resources=_Resources(res, cpus_per_task=threads), threads=threads)
    call = submit.get_submit_command(fake, {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
                                            "partition": "", "workdir": ""}) + set_gres_string(fake)
    flags = call.split()
    for f in ("--nodes=2", "--ntasks=2", "--cpus-per-task=16", "--gres=gpu:4"):
        assert f in flags, call
    assert "--mem 96000" in call and "--gpus" not in call and "--ntasks-per-gpu" not in call, call


def test_snakemake_plans_the_multinode_job_with_its_resources(tmp_path):
    """The rule file passes the table's resources: the nodes=2 run gets nodes/tasks/gres/mpi and the per-node
    launch line; a one-node run's resources are what they were (mem_mb, runtime, gpu)."""
    root = scratch_copy(tmp_path / "repo")

    def edit(raw):
        exp = raw["suites"]["smoke"][0]
        raw["experiments"][exp].setdefault("distill", {}).update(nodes=2, gpus=4, num_processes=8)
    set_params(root, edit)
    text = dry_run(root, "--config", "suite=smoke")
    params = load_params(root / "params.yaml")
    big, small = params.suites["smoke"][:2]
    jobs = parse_dry_run(text)
    assert jobs[("distill", big)].command == stages.job(params, "distill", (big, None)).command
    assert jobs[("distill", big)].command.startswith("srun --nodes 2 ")
    res = {f["wildcards"].removeprefix("run="): f["resources"].split(", ") for rule, f in job_blocks(text)
           if rule == "distill"}
    big_res, small_res = res[big], res[small]
    for r in ("nodes=2", "tasks=2", "tasks_per_gpu=0", "gres=gpu:4", "mpi=srun", "mem_mb=96000"):
        assert r in big_res, big_res
    assert not any(x.startswith("gpu=") for x in big_res), big_res
    for r in ("nodes", "tasks", "gres", "mpi"):
        assert not any(x.startswith(f"{r}=") for x in small_res), small_res
    assert "gpu=0" in small_res, small_res


def test_one_node_launch_and_resources_are_unchanged():
    assert stages.launcher(DistillConfig()) == "mct"
    assert stages.launcher(DistillConfig(gpus=1)) == "accelerate launch --num_processes 1 -m mct.cli"
    assert stages.launcher(DistillConfig(gpus=8, num_processes=8)) == \
        "accelerate launch --multi_gpu --num_processes 8 -m mct.cli"
    r = stages.distill_resources(DistillConfig(gpus=8, num_processes=8))
    assert r == stages.Resources(32, 192000, 1440, 8) and r.nodes == 1
    assert {k: v for k, v in stages.snakemake_resources(r).items() if v is not None} == \
        {"mem_mb": 192000, "runtime": 1440, "gpu": 8}


def test_cpu_nodes_split_the_processes_evenly(tiny_raw, tmp_path):
    params = _params(tmp_path, tiny_raw, nodes=2, num_processes=6)
    job = stages.job(params, "distill", RUN)
    assert "--num_machines 2 " in job.command and "--num_processes 6 " in job.command
    assert job.resources.threads == 3 and job.resources.nodes == 2 and job.resources.gpu == 0
    res = stages.snakemake_resources(job.resources)
    assert res["gres"] is None and res["gpu"] is None and res["tasks"] == 2 and res["mpi"] == "srun"


@pytest.mark.parametrize(("distill", "message"), [
    ({"nodes": 2, "gpus": 4, "num_processes": 4},
     "experiments.tiny_big.distill.num_processes: the total process count must be nodes * gpus = 2 * 4 = 8"),
    ({"nodes": 2, "gpus": 4}, "nodes * gpus = 2 * 4 = 8 (distill.gpus is per node, one process per GPU), not 1"),
    ({"nodes": 3, "num_processes": 4},
     "experiments.tiny_big.distill.num_processes: the total process count must be a multiple of nodes (3)"),
    ({"nodes": 0}, "experiments.tiny_big.distill.nodes: must be > 0"),
    ({"nodes": 5000}, "experiments.tiny_big.distill.nodes: must be <= 1,024"),
])
def test_inconsistent_node_layouts_are_refused_naming_the_keys(tiny_raw, tmp_path, distill, message):
    with pytest.raises(ConfigError) as e:
        _params(tmp_path, tiny_raw, **distill)
    assert message in str(e.value)


def test_the_launcher_refuses_a_layout_built_directly():
    with pytest.raises(ValueError, match=r"distill\.num_processes: .* nodes \* gpus = 2 \* 4 = 8"):
        stages.launcher(DistillConfig(nodes=2, gpus=4, num_processes=6))


# --- the launch line, run ------------------------------------------------------------------------------------

PROBE = '''\
"""Each process all-reduces over the whole group, then writes rank<k>.json into sys.argv[1]."""
import json, os, socket, sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

state = PartialState(cpu=not torch.cuda.is_available())  # as mct.train does: gloo on a CPU host
total = torch.tensor([state.process_index + 1.0])
dist.all_reduce(total)
env = {k: os.environ.get(k) for k in ("GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID", "SLURM_JOB_ID")}
record = {"rank": state.process_index, "world": state.num_processes, "sum": total.item(),
          "backend": dist.get_backend(), "host": socket.gethostname(), **env}
Path(sys.argv[1], f"rank{state.process_index}.json").write_text(json.dumps(record))
'''


def _probe(tmp_path: Path) -> tuple[dict[str, str], Path]:
    (tmp_path / "mct_rank_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return env, out


def _records(out: Path, n: int) -> list[dict]:
    found = sorted(out.glob("rank*.json"))
    assert [p.name for p in found] == [f"rank{k}.json" for k in range(n)], found
    return [json.loads(p.read_text()) for p in found]


@pytest.mark.slow
def test_two_launchers_meet_as_two_machines(tmp_path):
    """The per-node script of a nodes=2 run (1 CPU process per node, gloo), run twice on this host as Slurm would
    on two nodes (SLURM_NODEID 0 and 1, the allocation's node list): machine rank 1 finds machine rank 0 at the
    first listed host and port, and the 2-process group all-reduces. About 20 s on 2 cores."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol (Slurm's client) is not installed")
    env, out = _probe(tmp_path)
    script = stages.node_command(DistillConfig(nodes=2, num_processes=2), module="mct_rank_probe")
    env.update(SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(40_000 + os.getpid() % 1000))
    procs = [subprocess.Popen(["bash", "-c", script, "mct", str(out)], env={**env, "SLURM_NODEID": str(k)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    port = str(29500 + int(env["SLURM_JOB_ID"]) % 1000)
    for k, r in enumerate(_records(out, 2)):
        assert (r["world"], r["sum"], r["backend"], r["GROUP_RANK"], r["SLURM_NODEID"]) == (2, 3.0, "gloo", str(k),
                                                                                             str(k)), r
        assert r["MASTER_PORT"] == port, r


@pytest.mark.slurm
@pytest.mark.slow
def test_the_launch_line_runs_in_a_slurm_allocation(cluster, tmp_path):  # noqa: F811
    """The launch line of the multi-node path (launcher(..., multinode=True)), submitted as the batch script of a
    real Slurm job: srun starts the node's task, accelerate starts 2 CPU processes (gloo) with the port of the job.
    The local cluster has one node, so this is nodes=1 through the per-node code path; two machines meeting is
    test_two_launchers_meet_as_two_machines."""
    env, out = _probe(tmp_path)
    line = stages.launcher(DistillConfig(num_processes=2), multinode=True, module="mct_rank_probe")
    assert line.startswith("srun --nodes 1 --ntasks-per-node 1 ")
    log = tmp_path / "job.log"
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--time=10",
                          "--output", str(log), "--wrap", f"{line} {shlex.quote(str(out))}"],
                         capture_output=True, text=True, check=True, cwd=tmp_path, env=env)
    job_id = sub.stdout.strip().split(";")[0]
    state = _wait_final(job_id, timeout_s=300)
    assert state == "COMPLETED", log.read_text()[-3000:] if log.exists() else state
    records = _records(out, 2)
    for r in records:
        assert (r["world"], r["sum"], r["backend"], r["SLURM_JOB_ID"], r["SLURM_NODEID"]) == (2, 3.0, "gloo", job_id,
                                                                                               "0"), r
        assert r["MASTER_PORT"] == str(29500 + int(job_id) % 1000), r


@pytest.mark.slurm
@pytest.mark.slow
def test_the_slurm_profile_runs_the_launch_line_in_the_batch_step(cluster, tmp_path):  # noqa: F811
    """The same launch line as a Snakemake rule with the table's multi-node resources (nodes set to 1: the local
    cluster has one node), through `--profile slurm`: the plugin submits --ntasks=2, its `mpi` resource keeps the
    job's shell out of the plugin's own `srun -n1` step (which also strips SLURM_* but the job id from it), and the
    command's srun still starts the node's task, whose accelerate runs 2 processes. About 40 s."""
    env, out = _probe(tmp_path)
    line = stages.launcher(DistillConfig(num_processes=2), multinode=True, module="mct_rank_probe")
    res = {k: v for k, v in stages.snakemake_resources(stages.Resources(1, 1000, 10, 0, nodes=2)).items()
           if v is not None}
    res["nodes"] = 1
    (tmp_path / "Snakefile").write_text(
        "rule probe:\n"
        '    output: "probe.done"\n'
        f"    params: cmd={line!r}\n"
        f"    resources: {', '.join(f'{k}={v!r}' for k, v in res.items())}\n"
        '    shell: "env | grep ^SLURM_ | sort > env.txt; {params.cmd} out > probe.log 2>&1; touch {output}"\n')
    shutil.copytree(REPO / "workflow" / "profiles" / "slurm", tmp_path / "slurm")
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--profile", "slurm"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shell_env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines())
    assert "SLURM_JOB_ID" in shell_env and "SLURM_NODEID" not in shell_env and "SLURM_STEP_ID" not in shell_env
    for r in _records(out, 2):
        assert (r["world"], r["sum"], r["SLURM_JOB_ID"], r["SLURM_NODEID"]) == (2, 3.0, shell_env["SLURM_JOB_ID"],
                                                                                "0"), r
