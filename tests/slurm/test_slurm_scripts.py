"""Static checks of slurm/*.sh (no cluster needed): syntax, the shared #SBATCH defaults, default configs exist."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["fact_learning.sh", "document_learning.sh", "pretrain.sh", "collect_background.sh"]
REQUIRED = ("--nodes", "--ntasks-per-node", "--gres", "--cpus-per-task", "--time", "--signal", "--requeue",
            "--open-mode", "--output")


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_defaults(name):
    path = REPO / "slurm" / name
    text = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    # sbatch stops reading #SBATCH lines at the first command: all of them come first
    head = text.split("\n: ")[0]
    options = {line.split()[1].split("=")[0] for line in head.splitlines() if line.startswith("#SBATCH")}
    assert options >= set(REQUIRED), set(REQUIRED) - options
    assert not [ln for ln in text.split("\n: ", 1)[1].splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@" in text
    config = re.search(r'CONFIG:=([^}"]+)', text).group(1)
    assert (REPO / config).is_file(), f"{name}: default config {config} does not exist"
    assert 'source "$REPO_DIR/slurm/common.sh"' in text


def test_common_syntax():
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "common.sh")], check=True)
    subprocess.run(["bash", "-n", str(REPO / "tests" / "slurm" / "cluster.sh")], check=True)
