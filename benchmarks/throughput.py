"""Item 6: training throughput of recipes/train.py, read from its own metrics.jsonl.

CPU: the tiny preset's pretrain stage (recipes/configs/tiny_pretrain.yaml: FSDP2, AdamW, values
synced over the accessed rows) under torchrun with 1 and 2 ranks, the machine's cores split evenly
between ranks (OMP_NUM_THREADS = cores // ranks) when --threads=0, else --threads per rank (default 1,
so "2 ranks" is data-parallel scaling on twice the cores); the two runs alternated `rounds` times.
`train/tokens_per_s` is what the trainer logs per step: global non-pad tokens / rank 0's step time.
The first `train_warmup` steps are dropped; the median of the rest is the run's figure.

CUDA (only when torch.cuda.is_available()): the same recipe on one GPU for `small` and, with
>= 80 GB of GPU memory, `paper-1.3b` (vocab set to the bundled tokenizer's 8192), reporting
tokens/s and the trainer's memory/cuda_peak_gb.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, child_env, median, parallel_capacity

CONFIG = "recipes/configs/tiny_pretrain.yaml"
PAPER_MIN_GPU_GB = 80


def _read_metrics(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"])
    kept = [r for r in train if r["step"] > warmup] or train
    tps = [r["train/tokens_per_s"] for r in kept]
    out = {"tokens_per_s": median(tps), "steps_used": len(tps), "samples": [round(x, 1) for x in tps],
           "step_time_s": median([r["train/step_time_s"] for r in kept])}
    peaks = [r["memory/cuda_peak_gb"] for r in kept if "memory/cuda_peak_gb" in r]
    if peaks:
        out["cuda_peak_gb"] = max(peaks)
    rss = [r["memory/rss_gb"] for r in kept if "memory/rss_gb" in r]
    if rss:
        out["rank0_peak_rss_gb"] = max(rss)
    return out


def train_run(*, nproc: int, steps: int, warmup: int, extra: list[str], device: str, threads: int,
              timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="smf_bench_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "recipes" / "train.py"), f"--config={CONFIG}", f"--output_dir={run_dir}",
               f"--max_steps={steps}", f"--device={device}", "--logging.progress=False",
               "--logging.interval=1", "--checkpoint.interval=0", *extra]
        env = child_env(threads)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"train.py ({nproc} ranks) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = _read_metrics(run_dir, warmup)
    result.update({"ranks": nproc, "threads_per_rank": threads})
    return result


def run_cpu(profile, *, rounds: int = 1) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    capacity = parallel_capacity(2.0 if profile.name == "smoke" else 4.0)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(rounds):
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs[nproc].append(train_run(nproc=nproc, steps=profile.train_steps, warmup=profile.train_warmup,
                                         extra=list(profile.train_overrides), device="cpu",
                                         threads=profile.threads or max(1, cores // nproc), timeout=1800))
    tps = {n: median([x["tokens_per_s"] for x in v]) for n, v in runs.items()}
    return {
        "tokens_per_s_1rank": tps[1], "tokens_per_s_2rank": tps[2],
        "scaling_2rank_over_1rank": tps[2] / tps[1] if tps[1] else None,
        "cpu_parallel_capacity": capacity,
        "inputs": {"recipe": CONFIG, "stage": "pretrain", "strategy": "fsdp2", "preset": "tiny",
                   "overrides": list(profile.train_overrides), "steps": profile.train_steps,
                   "warmup_steps_dropped": profile.train_warmup, "rounds": rounds, "cores": cores,
                   "threads_per_rank": _same_or_all({n: v[0]["threads_per_rank"] for n, v in runs.items()}),
                   "batch": _override("batch_size", profile), "seq": _override("seq_len", profile)},
        "runs": {f"{n}rank": v for n, v in runs.items()},
    }


def _same_or_all(d: dict):
    values = set(d.values())
    return values.pop() if len(values) == 1 else d


def _override(key: str, profile):
    """data.<key> of the run: the profile's --data.<key>= override, else the recipe's value."""
    for arg in profile.train_overrides:
        if arg.startswith(f"--data.{key}="):
            return int(arg.split("=", 1)[1])
    import yaml
    return yaml.safe_load((REPO / CONFIG).read_text()).get("data", {}).get(key)


def run_cuda(profile) -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    out: dict = {"device": torch.cuda.get_device_name(0), "gpu_mem_gb": round(gpu_gb, 1)}
    common = ["--model.vocab_size=8192", "--data.seq_len=512", "--data.batch_size=16"]
    presets = [("small", common)]
    if gpu_gb >= PAPER_MIN_GPU_GB:
        presets.append(("paper-1.3b", common[:1] + ["--data.seq_len=1024", "--data.batch_size=8"]))
    else:
        out["paper-1.3b"] = {"skipped": f"GPU has {gpu_gb:.0f} GB < {PAPER_MIN_GPU_GB} GB"}
    for preset, extra in presets:
        try:
            out[preset] = train_run(nproc=1, steps=profile.cuda_train_steps, warmup=min(5, profile.cuda_train_steps // 2),
                                    extra=[f"--model.preset={preset}", *extra], device="cuda",
                                    threads=4, timeout=3600)
        except Exception as err:  # record, do not lose the CPU figures
            out[preset] = {"error": str(err)[-2000:]}
    return out
