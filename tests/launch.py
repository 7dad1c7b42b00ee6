"""Launch recipes/train.py (one process or real torchrun) from tests; shared by the test modules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "recipes" / "train.py"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=e.get("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions")))
    return e


def train(*args: str, nproc: int = 2, timeout: int = 900, check: bool = True,
          extra: list[str] | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(extra or []), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**env(), **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train":
            out[row["step"]] = row["train/loss"]
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


# Small settings every trainer test shares: tiny model, few facts, few paraphrases, short evaluation.
SMALL = ["--logging.progress=False", "--data.num_known_facts=40", "--data.fact_offset=40",
         "--data.num_new_facts=4", "--data.num_background_facts=40", "--data.batch_size=8",
         "--data.num_paraphrases=8", "--eval.max_items=4", "--eval.max_new_tokens=4", "--eval.batch_size=4"]
