"""Start and stop the one-node Slurm cluster of scripts/slurm_local.sh from tests.

The script needs root (it may apt-get install Slurm and munge, and it runs the daemons); tests that need the
cluster skip with cluster_unavailable_reason() or the SlurmUnavailable message when that cannot work here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"
INSTALLED = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")
START_TIMEOUT_S = 900  # an apt-get install from scratch takes seconds to minutes


class SlurmClusterError(RuntimeError):
    """The cluster could not be started or stopped although this machine should support it."""


class SlurmUnavailable(SlurmClusterError):
    """This machine cannot get Slurm (e.g. the packages could not be installed); tests skip."""


def _run(action: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout_s, check=False)


def _installed() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in INSTALLED)


def cluster_unavailable_reason() -> str | None:
    """Why the local cluster cannot be started here, or None when start_cluster() may be tried."""
    if os.environ.get("MCT_SKIP_SLURM"):
        return "MCT_SKIP_SLURM is set"
    if not sys.platform.startswith("linux"):
        return f"the local Slurm cluster needs Linux, not {sys.platform}"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    if shutil.which("bash") is None:
        return "bash is missing"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (to install packages and run slurmctld/slurmd/munged)"
    for tool in ("setsid", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    if not _installed() and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def cluster_running() -> bool:
    """True when the daemons started by scripts/slurm_local.sh are up and the node answers."""
    return _run("status", 60).returncode == 0


def start_cluster() -> None:
    """Start the cluster (no-op if it is already up); raise SlurmUnavailable or SlurmClusterError."""
    reason = cluster_unavailable_reason()
    if reason is not None:
        raise SlurmUnavailable(reason)
    proc = _run("start", START_TIMEOUT_S)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 3:
        raise SlurmUnavailable(output.splitlines()[-1] if output else "cannot install Slurm")
    if proc.returncode != 0:
        raise SlurmClusterError(f"scripts/slurm_local.sh start failed (exit {proc.returncode}):\n{output}")


def stop_cluster() -> None:
    """Stop the daemons that scripts/slurm_local.sh started (and only those)."""
    proc = _run("stop", 120)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise SlurmClusterError(f"scripts/slurm_local.sh stop failed (exit {proc.returncode}):\n{output}")
