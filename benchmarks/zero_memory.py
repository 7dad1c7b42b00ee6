"""Peak resident memory per rank: ZeRO-3 against FSDP2, the `small` preset, 2 ranks (issue 22, item 5).

    python -m benchmarks.zero_memory [--steps 3] [--out benchmarks/zero_memory.json]

For each strategy (fsdp2, zero3) one `recipes/train.py` pretrain run of the `small` preset (vocab set to
the bundled tokenizer's 8192; AdamW on everything, the values table included) under torchrun with 2
ranks x 1 thread, through this module's worker, which records on every rank the kernel's high-water RSS
(`ru_maxrss`) three times: once the strategy has materialised the model (`materialize`: what item 5
changes), once the optimizer/engine exists (`setup`), and at the end of the run (`run`: setup plus
`--steps` training steps). Figures (max over ranks, zero3 / fsdp2):
  zero3_vs_fsdp2_peak_rss_ratio              the run peak
  zero3_vs_fsdp2_setup_peak_rss_ratio        the peak once the engine / optimizer exists
  zero3_vs_fsdp2_materialize_peak_rss_ratio  the peak once the model is materialised
The values table (N x d fp32, replicated, with its AdamW state) is the same on both sides; the
difference is how the dense model is held. Not part of `benchmarks.run` (two `small` launches take
several minutes on 2 cores); the last result is committed as benchmarks/zero_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):      # the torchrun worker runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, child_env, git_commit, machine_info, peak_rss_bytes, rss_bytes  # noqa: E402

STRATEGIES = ("fsdp2", "zero3")
MODEL = ["--model.preset=small", "--model.vocab_size=8192"]


def worker(argv: list[str]) -> int:
    """torchrun worker: recipes/train.py's main, with the strategy's setup_optimizer wrapped to record
    this rank's RSS once the model and the optimizer/engine exist. argv: OUT_DIR then train.py args."""
    import importlib.util
    import os

    from training import build
    from training.parallel import build_strategy

    out_dir, args = Path(argv[0]), argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank}

    def recorded_build_strategy(name, model, **kw):
        strategy = build_strategy(name, model, **kw)
        materialize, setup = strategy.materialize, strategy.setup_optimizer

        def materialize_and_record(*a, **k):
            materialize(*a, **k)
            record.update(materialize_peak_rss=peak_rss_bytes(), materialize_rss=rss_bytes())
        strategy.materialize = materialize_and_record

        def setup_and_record(*a, **k):
            setup(*a, **k)
            record.update(setup_peak_rss=peak_rss_bytes(), setup_rss=rss_bytes())
        strategy.setup_optimizer = setup_and_record
        return strategy

    build.build_strategy = recorded_build_strategy
    spec = importlib.util.spec_from_file_location("smf_train_recipe", REPO / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rc = recipe.main(args)
    record.update(run_peak_rss=peak_rss_bytes(), rc=rc)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return rc


def measure(strategy: str, *, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="smf_zero_mem_") as tmp:
        run_dir, rec_dir = Path(tmp) / "run", Path(tmp) / "rss"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), "--worker", str(rec_dir),
               "--config=recipes/configs/tiny_pretrain.yaml", *MODEL, f"--strategy={strategy}",
               f"--output_dir={run_dir}", f"--max_steps={steps}", "--data.batch_size=2", "--data.seq_len=64",
               "--optim.warmup_steps=0", "--eval.sets=[]", "--checkpoint.interval=0",
               "--logging.progress=False", "--logging.interval=1"]
        if strategy == "zero3":
            cmd.append("--deepspeed_config=recipes/configs/deepspeed/zero3.json")
        env = child_env(1)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{strategy} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads((rec_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    gb = 1e9
    return {"strategy": strategy, "wall_s": round(time.perf_counter() - t0, 1),
            "materialize_peak_rss_gb": [round(r["materialize_peak_rss"] / gb, 3) for r in ranks],
            "materialize_rss_gb": [round(r["materialize_rss"] / gb, 3) for r in ranks],
            "setup_peak_rss_gb": [round(r["setup_peak_rss"] / gb, 3) for r in ranks],
            "setup_rss_gb": [round(r["setup_rss"] / gb, 3) for r in ranks],
            "run_peak_rss_gb": [round(r["run_peak_rss"] / gb, 3) for r in ranks]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "zero_memory.json"))
    args = ap.parse_args(argv)
    runs = {s: measure(s, steps=args.steps, timeout=args.timeout) for s in STRATEGIES}
    z, f = runs["zero3"], runs["fsdp2"]
    result = {
        **git_commit(), "machine": machine_info(),
        "inputs": {"preset": "small", "overrides": MODEL, "ranks": 2, "threads_per_rank": 1, "steps": args.steps,
                   "batch_per_rank": 2, "seq": 64, "stage": "pretrain (AdamW on everything, values included)",
                   "zero3_config": "recipes/configs/deepspeed/zero3.json",
                   "measure": "ru_maxrss per rank: after strategy.materialize (materialize), after "
                              "setup_optimizer (setup), at the end (run)"},
        "zero3_vs_fsdp2_peak_rss_ratio": max(z["run_peak_rss_gb"]) / max(f["run_peak_rss_gb"]),
        "zero3_vs_fsdp2_setup_peak_rss_ratio": max(z["setup_peak_rss_gb"]) / max(f["setup_peak_rss_gb"]),
        "zero3_vs_fsdp2_materialize_peak_rss_ratio": (max(z["materialize_peak_rss_gb"])
                                                      / max(f["materialize_peak_rss_gb"])),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for s, r in runs.items():
        print(f"{s}: peak after materialize {r['materialize_peak_rss_gb']} GB, after setup "
              f"{r['setup_peak_rss_gb']} GB, run {r['run_peak_rss_gb']} GB per rank")
    print(f"zero3_vs_fsdp2_peak_rss_ratio {result['zero3_vs_fsdp2_peak_rss_ratio']:.3f}  "
          f"(materialize {result['zero3_vs_fsdp2_materialize_peak_rss_ratio']:.3f}, "
          f"setup {result['zero3_vs_fsdp2_setup_peak_rss_ratio']:.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
