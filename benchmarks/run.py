"""The benchmark runner: what sparse memory finetuning costs, as ratios measured side by side.

    python -m benchmarks.run [--quick | --smoke] [--out benchmarks/results.json] [--only ITEM,...]

Prints a table and writes a JSON file whose top-level keys are the figures (see FIGURES) plus, under
"items", every item's inputs, per-rep samples and medians, and under "machine" where it ran.
benchmarks/README.md explains each figure. --quick keeps N = 1024², value dim 256 and t = 500 and
lowers repetitions and token counts (under 10 minutes on 2 cores); --smoke shrinks everything for the
test suite (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from data_pipeline.atomic import atomic_write
from benchmarks.common import PROFILES, REPO, Profile, git_commit, loadavg, machine_info, median, run_json, summary

# key -> (item, goal text, goal check or None, DESIGN.md §4 probe figure or None)
FIGURES: dict[str, tuple] = {
    "smf_overhead_ratio": ("smf_overhead", "<= 1.05", lambda v: v <= 1.05, None),
    "smf_overhead_ratio_stepper": ("smf_overhead_stepper", "<= 1.05", lambda v: v <= 1.05, None),
    "trainer_vs_plain_loop_ratio": ("trainer_vs_plain_loop", ">= 0.9", lambda v: v >= 0.9, None),
    "smf_overhead_ratio_2rank": ("sync_traffic", "<= 1.05", lambda v: v <= 1.05, None),
    "smf_vs_union_sync_ratio_2rank": ("sync_traffic", None, None, None),
    "cpu_parallel_capacity_2rank": ("sync_traffic", None, None, None),
    "sparse_vs_dense_time_ratio": ("sparse_vs_dense", "<= 0.6", lambda v: v <= 0.6, "0.57 (0.84 / 1.48 s)"),
    "sparse_vs_dense_mem_ratio": ("sparse_vs_dense", "<= 0.6", lambda v: v <= 0.6, None),
    "sparse_vs_dense_peak_rss_ratio": ("sparse_vs_dense", None, None, "0.69 (1.87 / 2.70 GB)"),
    "sync_bytes_ratio": ("sync_traffic", ">= 1000", lambda v: v >= 1000, None),
    "sync_bytes_ratio_incl_counts": ("sync_traffic", None, None, None),
    "count_bytes_ratio": ("sync_traffic", "<= 1", lambda v: v <= 1, None),
    "pk_vs_bruteforce_speedup": ("pk_lookup", None, None, None),
    "pk_matches_bruteforce": ("pk_lookup", "True", lambda v: v is True, None),
    "memory_vs_ffn_time_ratio": ("memory_vs_ffn", None, None, None),
    "tokens_per_s_1rank": ("throughput", None, None, None),
    "tokens_per_s_2rank": ("throughput", None, None, None),
    "cpu_parallel_capacity": ("throughput", None, None, None),
}
REQUIRED = ("smf_overhead_ratio", "smf_overhead_ratio_stepper", "trainer_vs_plain_loop_ratio", "sparse_vs_dense_time_ratio", "sparse_vs_dense_mem_ratio", "sync_bytes_ratio",
            "pk_vs_bruteforce_speedup", "pk_matches_bruteforce", "memory_vs_ffn_time_ratio",
            "tokens_per_s_1rank", "tokens_per_s_2rank")
ITEMS = ("smf_overhead", "smf_overhead_stepper", "trainer_vs_plain_loop", "sparse_vs_dense", "sync_traffic", "pk_lookup", "memory_vs_ffn", "throughput",
         "throughput_cuda")


# ------------------------------------------------------------------------------------------- items
def item_smf_overhead(p: Profile, figures: dict) -> dict:
    from benchmarks import smf_overhead
    r = smf_overhead.run(p)
    figures["smf_overhead_ratio"] = r["ratio"]
    return r


def item_smf_overhead_stepper(p: Profile, figures: dict) -> dict:
    """The trainer's own Stepper.step (sparse finetune) vs a plain SGD hand loop; see stepper_bench.py."""
    from benchmarks import stepper_bench
    r = stepper_bench.run_finetune(p)
    figures["smf_overhead_ratio_stepper"] = r["ratio"]
    return r


def item_trainer_vs_plain_loop(p: Profile, figures: dict) -> dict:
    """The trainer's pretrain Stepper.step vs a minimal AdamW hand loop, tokens/s; see stepper_bench.py."""
    from benchmarks import stepper_bench
    r = stepper_bench.run_pretrain(p)
    figures["trainer_vs_plain_loop_ratio"] = r["ratio"]
    return r


def item_sparse_vs_dense(p: Profile, figures: dict) -> dict:
    """Fresh subprocess per variant per round (peak RSS is per process); variants alternate order."""
    variants = tuple(p.grad_variants)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="smf_bench_") as tmp:
        for r in range(p.grad_rounds):
            got = {}
            for v in (variants if r % 2 == 0 else variants[::-1]):
                out = Path(tmp) / f"{v}{r}.json"
                got[v] = run_json([sys.executable, "-m", "benchmarks.grad_worker", "--variant", v,
                                   "--profile", json.dumps(p.to_dict()), "--out", str(out)],
                                  out=out, timeout=1800, threads=p.threads or None)
            rounds.append(got)
    clock = rounds[0]["sparse"]["clock"]
    steps = {v: [x for r in rounds for x in r[v]["step_cpu_s" if clock == "cpu" else "step_s"]] for v in variants}
    wall = {v: [x for r in rounds for x in r[v]["step_s"]] for v in variants}
    extra = {v: [r[v]["extra_rss"] for r in rounds] for v in variants}
    peak = {v: [r[v]["peak_rss"] for r in rounds] for v in variants}

    def ratios(base: str) -> dict:
        # time: ratio of medians over all timed steps (the variants run in separate processes, so there
        # is no step-level pairing); memory: per-round ratio, median (memory is not noisy)
        return {"time_ratio": median(steps["sparse"]) / median(steps[base]),
                "time_ratio_wall": median(wall["sparse"]) / median(wall[base]),
                "mem_ratio": median([a / b for a, b in zip(extra["sparse"], extra[base])]),
                "peak_rss_ratio": median([a / b for a, b in zip(peak["sparse"], peak[base])])}
    first = rounds[0]["sparse"]
    res = {
        **ratios("dense_mask"),
        "vs_dense_lib": ratios("dense_lib") if "dense_lib" in variants else None,
        "inputs": {"N": first["N"], "d": first["d"], "t": p.top_t, "batch": p.batch, "seq": p.seq,
                   "rounds": p.grad_rounds, "steps": p.grad_steps, "threads": first["threads"],
                   "variants": list(variants),
                   "model": "tiny preset, " + ", ".join(f"{k}={v}" for k, v in p.model.items()),
                   "memory_measure": "VmHWM after /proc/self/clear_refs reset, minus VmRSS at the reset"
                                     if all(r[v]["hwm_reset"] for r in rounds for v in variants)
                                     else "ru_maxrss (lifetime peak; HWM reset refused) minus VmRSS before steps"},
        "clock": clock,
        "step_s": {v: summary(xs) for v, xs in wall.items()},
        "step_cpu_s": {v: summary([x for r in rounds for x in r[v]["step_cpu_s"]]) for v in variants},
        "extra_rss_gb": {v: [round(x / 1e9, 3) for x in xs] for v, xs in extra.items()},
        "peak_rss_gb": {v: [round(x / 1e9, 3) for x in xs] for v, xs in peak.items()},
        "rounds": rounds,
    }
    figures["sparse_vs_dense_time_ratio"] = res["time_ratio"]
    figures["sparse_vs_dense_mem_ratio"] = res["mem_ratio"]
    figures["sparse_vs_dense_peak_rss_ratio"] = res["peak_rss_ratio"]
    return res


def item_sync_traffic(p: Profile, figures: dict) -> dict:
    """The trainer's Stepper under a 2-rank gloo group (torchrun); see dist_worker.py, which also measures
    the CPU parallel capacity in its two ranks just before and just after the timed steps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    with tempfile.TemporaryDirectory(prefix="smf_bench_") as tmp:
        out = Path(tmp) / "dist.json"
        res = run_json([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "benchmarks.dist_worker", "--profile", json.dumps(p.to_dict()), "--out", str(out)],
                       out=out, timeout=1800, threads=p.threads or max(1, cores // 2))
    figures["cpu_parallel_capacity_2rank"] = res["cpu_parallel_capacity"]["capacity_cores"]
    figures["sync_bytes_ratio"] = res["sync_bytes_ratio"]
    figures["sync_bytes_ratio_incl_counts"] = res["sync_bytes_ratio_incl_counts"]
    figures["count_bytes_ratio"] = res["count_bytes_ratio"]
    figures["smf_overhead_ratio_2rank"] = res["smf_overhead_ratio"]
    figures["smf_vs_union_sync_ratio_2rank"] = res["smf_vs_union_sync_ratio"]
    return res


def item_pk_lookup(p: Profile, figures: dict) -> dict:
    from benchmarks import lookup
    m = lookup.memory_config(p.model)
    r = lookup.run_pk(p, num_slots=m.num_slots, heads=m.heads, k=m.k, k_dim=m.k_dim)
    figures["pk_vs_bruteforce_speedup"] = r["speedup_flat"]
    figures["pk_matches_bruteforce"] = bool(r["matches"])
    return r


def item_memory_vs_ffn(p: Profile, figures: dict) -> dict:
    from benchmarks import lookup
    r = lookup.run_ffn(p, model_overrides=p.model)
    figures["memory_vs_ffn_time_ratio"] = r["ratio"]
    return r


def item_throughput(p: Profile, figures: dict) -> dict:
    from benchmarks import throughput
    r = throughput.run_cpu(p, rounds=p.train_rounds)
    figures["tokens_per_s_1rank"] = r["tokens_per_s_1rank"]
    figures["tokens_per_s_2rank"] = r["tokens_per_s_2rank"]
    figures["cpu_parallel_capacity"] = r["cpu_parallel_capacity"]["capacity_cores"]
    return r


def item_throughput_cuda(p: Profile, figures: dict) -> dict:
    from benchmarks import throughput
    r = throughput.run_cuda(p)
    for preset in ("small", "paper-1.3b"):
        got = r.get(preset)
        if isinstance(got, dict) and "tokens_per_s" in got:
            key = preset.replace("-", "_").replace(".", "_")
            figures[f"tokens_per_s_cuda_{key}"] = got["tokens_per_s"]
            figures[f"cuda_peak_gb_{key}"] = got.get("cuda_peak_gb")
    return r


RUNNERS = {name: globals()[f"item_{name}"] for name in ITEMS}


# ------------------------------------------------------------------------------------------ output
def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _inputs_text(item: dict | None) -> str:
    if not item or "inputs" not in item:
        return ""
    keep = ("N", "d", "t", "batch", "batch_global", "seq", "ranks", "queries", "queries_brute", "tokens", "dim",
            "ffn_hidden", "reps", "rounds", "steps", "threads", "threads_per_rank")
    return " ".join(f"{k}={item['inputs'][k]}" for k in keep if k in item["inputs"])


def table(results: dict) -> str:
    rows = [("figure", "value", "goal", "met", "probe (DESIGN §4)", "inputs")]
    for key, (item, goal, check, probe) in FIGURES.items():
        if key not in results:
            continue
        v = results[key]
        met = "" if check is None or v is None else ("yes" if check(v) else "NO")
        rows.append((key, _fmt(v), goal or "", met, probe or "", _inputs_text(results["items"].get(item))))
    for key in sorted(k for k in results if k.startswith(("tokens_per_s_cuda", "cuda_peak_gb"))):
        rows.append((key, _fmt(results[key]), "", "", "", "throughput_cuda"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """The README table: figure, value, goal, inputs."""
    m = results["machine"]
    at = f" at commit {results['commit']}{' (dirty)' if results.get('dirty') else ''}" if results.get("commit") else ""
    out = [f"Measured with `python -m benchmarks.run --{results['profile']}`{at} on {m['cpu_count']} CPU cores "
           f"({m.get('cpu_model') or 'unknown CPU'}), {m.get('mem_total_gb')} GB RAM, torch {m['torch_version']}, "
           f"torch threads per process: {m['torch_threads']}; load average {results.get('loadavg_start')} at start, "
           f"{results.get('loadavg_end')} at the end; {results.get('elapsed_s')} s in all.", "",
           "| figure | value | goal | inputs |", "|---|---|---|---|"]
    for key, (item, goal, check, probe) in FIGURES.items():
        if key in results:
            out.append(f"| `{key}` | {_fmt(results[key])} | {goal or ''} | "
                       f"{_inputs_text(results['items'].get(item))} |")
    for key in sorted(k for k in results if k.startswith(("tokens_per_s_cuda", "cuda_peak_gb"))):
        out.append(f"| `{key}` | {_fmt(results[key])} |  | one GPU, recipes/configs/tiny_pretrain.yaml |")
    cuda = results["items"].get("throughput_cuda", {})
    if "skipped" in cuda:
        out.append(f"\nCUDA throughput: skipped ({cuda['skipped']}).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer reps and tokens, same N (< 10 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite (numbers mean nothing)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process, every item and rank (default 1; 0 = torch's default, "
                         "all cores). One thread per process keeps a busy shared machine from stalling "
                         "every parallel op on a descheduled thread; see benchmarks/README.md")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ITEMS)}")
    ap.add_argument("--markdown", metavar="RESULTS_JSON",
                    help="run nothing: print the README (markdown) table of an existing results file")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    profile = dataclasses.replace(PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"],
                                  threads=args.threads)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    only = [x for x in args.only.split(",") if x]
    for name in only:
        if name not in ITEMS:
            ap.error(f"unknown item {name!r}; choose from {', '.join(ITEMS)}")

    t_start = time.time()
    results: dict = {"schema": 1, "profile": profile.name, **git_commit(), "machine": machine_info(),
                     "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "profile_sizes": profile.to_dict(), "items": {}, "errors": {}}
    figures: dict = {}
    for name in ITEMS:
        if only and name not in only:
            continue
        t0 = time.time()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            item = RUNNERS[name](profile, figures)
        except Exception as err:   # one failing item must not lose the others' figures
            traceback.print_exc()
            results["errors"][name] = f"{type(err).__name__}: {str(err)[-3000:]}"
            item = {"error": results["errors"][name]}
        item["wall_s"] = round(time.time() - t0, 1)
        item["loadavg_after"] = loadavg()
        results["items"][name] = item
        print(f"[bench] {name} done in {item['wall_s']} s", file=sys.stderr, flush=True)
        gc.collect()
    for key in FIGURES:
        if key in figures:
            results[key] = figures[key]
    for key, value in figures.items():
        results.setdefault(key, value)
    results["elapsed_s"] = round(time.time() - t_start, 1)
    results["loadavg_end"] = loadavg()

    out = Path(args.out)
    atomic_write(out, json.dumps(results, indent=1, default=str) + "\n")
    print(table(results))
    print(f"\n{results['elapsed_s']} s; wrote {out}")
    missing = [k for k in REQUIRED if k not in results and not only]
    if results["errors"] or missing:
        print(f"errors in: {', '.join(results['errors']) or '-'}; missing figures: {', '.join(missing) or '-'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
