"""Shared helpers of the benchmark suite: sizes per profile, interleaved timing, memory, machine info.

Every figure is a ratio of two things measured side by side in one process (or one pair of
processes), interleaved rep by rep, so that load from other processes on a shared machine hits both
sides alike. A figure is the median over reps of the per-rep ratio (paired), never a ratio of
averages taken minutes apart.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------- profiles
@dataclass
class Profile:
    """Sizes of one run. `full` is the default; `quick` keeps every size the issue fixes (N = 1024²,
    value dim 256, t = 500) and only lowers repetitions and token counts; `smoke` shrinks everything
    so the runner's plumbing can be tested in seconds (its numbers mean nothing)."""

    name: str
    # the model of items 1-3: the tiny preset with N slots (N = 1024² except in smoke)
    model: dict = field(default_factory=dict)
    batch: int = 8            # finetune rows per step (global; split across ranks in the 2-rank worker)
    seq: int = 64
    top_t: int = 500
    reps: int = 15            # interleaved repetitions of in-process comparisons (items 1, 5, smf_overhead_stepper)
    trainer_reps: int = 7     # trainer_vs_plain_loop: interleaved pretrain steps per side (recipe batch 32 x 64)
    warmup: int = 1
    grad_rounds: int = 1      # item 2: rounds of fresh subprocesses, one per variant per round
    grad_steps: int = 3       # item 2: timed steps per subprocess (after one warm-up step)
    grad_variants: tuple = ("sparse", "dense_mask", "dense_lib")   # item 2 (see grad_worker.py)
    dist_reps: int = 6        # item 3 (and the 2-rank overhead): timed steps per variant
    dense_allreduce_reps: int = 2
    pk_tokens: int = 256      # item 4: queries (tokens) per lookup
    pk_brute_tokens: int = 32  # item 4: queries given to the brute forces (O(N) each) and checked
    pk_reps: int = 5
    ffn_tokens: int = 512     # item 5
    train_steps: int = 8      # item 6: steps per run, the first `train_warmup` are dropped
    train_warmup: int = 3
    train_rounds: int = 1     # item 6: 1-rank and 2-rank runs alternated this many times
    train_overrides: tuple = ()
    cuda_train_steps: int = 20
    threads: int = 1          # torch threads per process (0: torch's default, all cores); see README

    def to_dict(self) -> dict:
        return asdict(self)


BENCH_MODEL = {"memory.num_slots": 1024 ** 2}   # tiny preset: dim 256, 6 layers, value dim 256, k_dim 128

PROFILES: dict[str, Profile] = {
    "full": Profile(name="full", model=dict(BENCH_MODEL), batch=16, reps=21, grad_rounds=3, grad_steps=4,
                    dist_reps=9, dense_allreduce_reps=3, trainer_reps=11, pk_tokens=1024, pk_brute_tokens=128, pk_reps=7,
                    ffn_tokens=1024, train_steps=20, train_warmup=5, train_rounds=2),
    "quick": Profile(name="quick", model=dict(BENCH_MODEL)),
    "smoke": Profile(
        name="smoke",
        model={"dim": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden": 128, "memory_layers": (1,),
               "memory.num_slots": 64 ** 2, "memory.k_dim": 32, "memory.value_dim": 32, "memory.k": 8},
        batch=4, seq=16, top_t=20, reps=2, trainer_reps=2, grad_rounds=1, grad_steps=1, dist_reps=2, dense_allreduce_reps=1,
        pk_tokens=16, pk_brute_tokens=8, pk_reps=2, ffn_tokens=64, train_steps=3, train_warmup=1,
        train_overrides=("--model.n_layers=2", "--model.memory_layers=1", "--model.dim=64",
                         "--model.ffn_hidden=128", "--model.n_heads=2", "--model.memory.num_slots=1024",
                         "--model.memory.k_dim=32", "--model.memory.value_dim=32", "--model.memory.k=8",
                         "--data.batch_size=4", "--data.seq_len=16"),
        cuda_train_steps=3),
}


def profile_from_dict(d: dict) -> Profile:
    d = dict(d)
    d["train_overrides"] = tuple(d.get("train_overrides", ()))
    d["grad_variants"] = tuple(d.get("grad_variants", ()))
    return Profile(**d)


# ------------------------------------------------------------------------------------------ timing
def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def interleaved(fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, cpu: dict | None = None) -> dict[str, list[float]]:
    """Wall time of each callable, `reps` times, alternating the order every rep (ABC, CBA, ...) so a
    slow spell of the machine lands on every variant alike. `sync` runs before each call (e.g. a
    barrier). Returns {name: [seconds per rep]}; if `cpu` is a dict it receives the same for this
    process's CPU time (user + system)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if sync:
                sync()
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            if sync:
                sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def ratio_clock() -> str:
    """Which clock one-process ratios use: "cpu" (process CPU time) when torch runs one thread, since
    then CPU time is the work done and ignores the time the process waited for a core on a busy
    machine; "wall" with more threads (idle OpenMP threads spin, which CPU time would count)."""
    import torch
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over reps of num[i] / den[i] (reps measured back to back)."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def summary(xs: list[float]) -> dict:
    return {"median": median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            "n": len(xs), "samples": [round(x, 6) for x in xs]}


# ------------------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return peak_rss_bytes()   # no /proc (macOS): best available


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    next peak_rss_bytes() covers only what runs from now on. False when the kernel refuses."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ machine info
def machine_info() -> dict:
    import torch
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "mem_total_gb": _mem_total_gb(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_device"] = props.name
        info["cuda_mem_gb"] = round(props.total_memory / 1024 ** 3, 1)
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_rate(seconds: float) -> float:
    """512 x 512 fp32 matmuls per second of this process on one torch thread, over `seconds`: the unit of
    parallel_capacity (and of the 2-rank worker's capacity, measured in its own two ranks)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(512, 512)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ a
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def capacity_from_rates(solo: float, pair: list[float]) -> dict:
    """(rate1 + rate2) / solo: 2.0 on an idle 2-core machine, ~1.0 when other load leaves one core."""
    return {"solo_matmul_per_s": round(solo, 1), "pair_matmul_per_s": [round(x, 1) for x in pair],
            "capacity_cores": round(sum(pair) / solo, 2)}


def parallel_capacity(seconds: float = 4.0) -> dict:
    """How many cores this run really gets: the rate of a 1-thread matmul loop (matmul_rate) alone, then of
    two such loops at once, in fresh processes; see capacity_from_rates. Context for the 2-rank figures;
    never asserted."""
    cmd = [sys.executable, "-c", f"from benchmarks.common import matmul_rate; print(matmul_rate({seconds}))"]

    def rates(k: int) -> list[float]:
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=child_env(1))
                 for _ in range(k)]
        return [float(p.communicate()[0]) for p in procs]
    solo = rates(1)[0]
    return capacity_from_rates(solo, rates(2))


# ----------------------------------------------------------------------------------- subprocesses
def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_json(cmd: list[str], *, out: Path, timeout: float, threads: int | None = None) -> dict:
    """Run a benchmark child that writes one JSON object to `out`; raise with its output tail if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def build_bench_model(model_overrides: dict, *, seed: int = 0):
    """The tiny preset with the profile's overrides (N = 1024² slots except in smoke)."""
    from model import build_model
    return build_model("tiny", seed=seed, **model_overrides)


def values_only(model) -> None:
    """Finetune setting of the paper: only the memory values train (everything else frozen)."""
    for p in model.parameters():
        p.requires_grad_(p is model.memory_values)


def synthetic_background(finetuner, *, num_batches: int = 100, seed: int = 0) -> None:
    """Background document frequencies without running background batches: IDF values do not change
    what a step costs (only which rows win), so random df in [0, num_batches] is enough here."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    df = torch.randint(0, num_batches + 1, (finetuner.num_slots,), generator=gen, dtype=torch.int64)
    finetuner.background_tracker.set_statistics(df, num_batches)


def token_batches(count: int, batch: int, seq: int, vocab: int, *, seed: int = 0) -> list:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(count)]


def git_commit() -> dict:
    """The commit measured: short sha and whether the work tree differed from it (tracked files)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None
    sha = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if status is None else bool(status)}
