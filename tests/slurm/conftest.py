"""A real single-node Slurm cluster on localhost for the tests in this folder (tests/slurm/cluster.sh)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _packages_present() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


@dataclass
class Cluster:
    env: dict[str, str]
    dir: Path
    startup_s: float

    def run(self, *args: str, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=env or self.env, cwd=cwd or REPO, check=check, text=True,
                              capture_output=True, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (no accounting database here: sacct has nothing)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields: dict[str, str] = {}
        for word in out.split():
            key, eq, value = word.partition("=")
            if eq and key not in fields:
                fields[key] = value
        return fields

    def wait(self, job_id: str, until, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: timed out after {timeout:.0f}s waiting for {what}; "
                                     f"state {info.get('JobState')} reason {info.get('Reason')}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (munged runs as munge, slurmd as root)")
    if not _packages_present() and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    # not pytest's tmp_path: its parents are mode 0700 and munged (user munge) must reach its socket
    cluster_dir = Path(tempfile.mkdtemp(prefix="smf-slurm-"))
    cluster_dir.chmod(0o755)
    env = dict(os.environ)
    env.update(SMF_SLURM_DIR=str(cluster_dir), SMF_SLURMCTLD_PORT=str(_free_port()),
               SMF_SLURMD_PORT=str(_free_port()), SLURM_CONF=str(cluster_dir / "slurm.conf"),
               # the job finds torchrun on PATH, as it would with an activated environment
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]   # we may ourselves run inside a Slurm job
    t0 = time.monotonic()
    start = subprocess.run([str(CLUSTER_SH), "start"], env=env, text=True, capture_output=True, timeout=600)
    startup = time.monotonic() - t0
    cluster = Cluster(env=env, dir=cluster_dir, startup_s=startup)
    try:
        if start.returncode != 0:
            pytest.fail(f"cluster.sh start failed ({start.returncode}):\n{start.stdout}\n{start.stderr}")
        print(f"\nlocal Slurm cluster up in {startup:.1f}s ({cluster_dir})")
        yield cluster
    finally:
        subprocess.run([str(CLUSTER_SH), "stop"], env=env, text=True, capture_output=True, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)
