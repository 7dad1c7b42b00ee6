"""`make demo`: the paper's experiment in miniature, end to end, through the same stages users run at scale.

    python recipes/demo.py [--world synthetic|triviaqa] [--out runs/demo] [--nproc 2] [--quick] [--fresh-base]
                           [--fresh-sweep]

--world synthetic (default): the synthetic knowledge world of data_pipeline/world.py (people with
   two-token names, three relations with one-token answers; generated into data/world/ when missing),
   configs recipes/configs/world/, sweep preset `world`. A miniature in which a fact is learnable
   from a few statements and has one right answer (see the README for why it is synthetic).
--world triviaqa: the real-TriviaQA miniature (recipes/configs/demo/, preset `demo`), kept with its result.

1. pretrain the tiny model on prose + the "known" facts (cached in OUT/base: reused when complete);
2. background statistics over prose + statements of other facts (cached in OUT/background); its
   summary holds the memory-health gate (health/*), printed before any finetune;
3. learn a stream of new facts with every method, a small lr sweep each (recipes/sweep.py, one run
   directory per point in OUT/finetune; a point finished with the same config is reused, as the base is:
   a second run only redraws the tables, `--fresh-sweep` runs every point again);
4. every run evaluates new-fact F1 (learning), known-fact F1 and held-out prose NLL (forgetting; the
   TriviaQA world adds GSM8K NLL and HellaSwag accuracy) before and after (its summary.json);
5. print a table, write OUT/pareto.png, OUT/pareto_nll.png and OUT/results.md.

`--quick` is the cut-down version the end-to-end test runs (a few steps and facts, same code path).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORLDS = {  # world -> (config folder, sweep preset, the data file that must exist)
    "synthetic": (REPO / "recipes" / "configs" / "world_n65k", "world_n65k", REPO / "data" / "world" / "facts.jsonl"),
    "triviaqa": (REPO / "recipes" / "configs" / "demo", "demo", REPO / "data" / "triviaqa_validation.jsonl"),
}
QUICK = ["--data.num_known_facts=16", "--data.fact_offset=16", "--data.num_new_facts=2",
         "--data.num_background_facts=16", "--data.num_paraphrases=4", "--data.passes=1", "--data.batch_size=8",
         "--eval.max_items=4", "--eval.max_new_tokens=4", "--eval.batch_size=4", "--checkpoint.interval=0"]
QUICK_TEXT = ["--data.text=[data_pipeline/samples/prose_sample.jsonl.zst]"]
QUICK_DATA = ["--data.facts=data_pipeline/samples/triviaqa_validation_sample.jsonl",
              "--eval.gsm8k=data_pipeline/samples/gsm8k_test_sample.jsonl",
              "--eval.hellaswag=data_pipeline/samples/hellaswag_val_sample.jsonl"]
COLUMNS = [("new_facts/f1", "new F1"), ("known_facts/f1", "known F1"), ("heldout_text/nll", "prose NLL"),
           ("gsm8k/nll", "GSM8K NLL"), ("hellaswag/acc_norm", "HellaSwag acc_norm")]


QUICK_GRIDS = ["method=sparse lr=100 t=50", "method=full lr=1e-4", "method=lora lr=1e-3", "method=tf_only lr=100 t=50",
               "method=memory_all lr=100"]


def sweep_points(preset: str, grids: list[str]) -> set[str]:
    """The point names of this demo's sweep (the preset's, or the quick grids'), as recipes/sweep.py names
    them: the tables hold these only, whatever else lies in the sweep directory."""
    spec = importlib.util.spec_from_file_location("demo_sweep", REPO / "recipes" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep          # dataclasses look their module up
    spec.loader.exec_module(sweep)
    parsed = [sweep.parse_grid(g) for g in grids] if grids else sweep.load_preset(preset)[0]["grids"]
    return {p.name for p in sweep.build_points(parsed)}


def launcher(nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


PROGRESS = re.compile(r"(pretrain|background|finetune):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^\]]*\]")


def stage(title: str, cmd: list[str], log: Path) -> float:
    """Run one stage, streaming its console lines to the terminal and to `log`; fail loudly. A cached stage
    runs too: train.py leaves a complete run of the same config as it is and refuses one of another config."""
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    stale, bar_shown, last_bar = False, False, 0.0
    with open(log, "a") as f:
        # text mode reads tqdm's carriage returns as line ends: every progress update arrives as a line
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            stale |= "holds a run with a different config" in line
            bar = PROGRESS.search(line)
            if bar and (time.time() - last_bar > 1.0 or bar.group(2) == bar.group(3)):
                print("\r  " + bar.group(0), end="", flush=True)      # one progress line, rewritten in place
                bar_shown, last_bar = True, time.time()
            if line.startswith(("[eval]", "initialised", "resumed", "error", "===", "[sweep]", "sweep")) or \
                    "Traceback" in line or "Error" in line:
                print(("\n" if bar_shown else "") + "  " + line.rstrip(), flush=True)
                bar_shown = False
        proc.wait()
    if bar_shown:
        print(flush=True)
    elapsed = time.time() - t0
    if proc.returncode != 0 and stale:
        raise SystemExit(f"demo: the cached run of '{title}' was made with another config (the configs changed "
                         f"since); re-run with --fresh-base to retrain it")
    if proc.returncode != 0:
        raise SystemExit(f"demo: {title} failed (exit {proc.returncode}); see {log}")
    print(f"--- {title}: {elapsed:.0f} s", flush=True)
    return elapsed


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def fmt(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def table(runs: list[tuple[str, dict]]) -> str:
    columns = [(key, label) for key, label in COLUMNS if any(key in s["metrics"] for _, s in runs)]  # the world's sets
    head = "| run | method | trainable/step | " + " | ".join(f"{label} before → after (rel)" for _, label in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    for name, s in runs:
        cells = []
        for key, _ in columns:
            m = s["metrics"].get(key)
            if m is None:
                cells.append("–")
                continue
            rel = m.get("rel_change")
            cells.append(f"{fmt(m['before'])} → {fmt(m['after'])} ({'–' if rel is None else f'{rel:+.1%}'})")
        lines.append(f"| {name} | {s['method']} | {s['trainable_params_per_step']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(runs: list[tuple[str, dict]]) -> str:
    keys = ["memory/new_answer_lookups_high_df", "memory/answer_slot_coverage_mean", "memory/prompt_slot_coverage_mean",
            "memory/topt_overlap_memory_all_mean", "memory/known_answer_lookups_in_updated_rows", "memory/updated_rows"]
    lines = ["| run | " + " | ".join(k.split("/", 1)[1] for k in keys) + " |", "|" + "---|" * (1 + len(keys))]
    for name, s in runs:
        d = s.get("diagnostics", {})
        lines.append(f"| {name} | " + " | ".join(fmt(d.get(k)) if k != "memory/updated_rows" else str(d.get(k, "–"))
                                                  for k in keys) + " |")
    return "\n".join(lines)


STREAM = re.compile(r"^(?P<point>.+)_stream(?P<offset>\d+)$")


def _delta(s: dict, key: str, kind: str) -> float | None:
    m = s["metrics"].get(key)
    if m is None:
        return None
    return m.get("rel_change") if kind == "rel" else m["after"] - m["before"]


def stream_groups(runs: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """Points run on several new-fact streams: `NAME` (the config's stream) and `NAME_streamOFFSET` (sweep axis
    `stream` = data.fact_offset) -> {NAME: [(stream label, summary), ...]}, only for points with a variant."""
    by_name = dict(runs)
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, s in runs:
        m = STREAM.match(name)
        if m and m["point"] in by_name:
            groups.setdefault(m["point"], [("config's", by_name[m["point"]])]).append((m["offset"], s))
    return groups


def _mean_sd(values: list[float], percent: bool = False) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{100 * mean:+.1f}% ± {100 * sd:.1f}%" if percent else f"{mean:+.3f} ± {sd:.3f}"


def stream_table(runs: list[tuple[str, dict]]) -> str:
    """Mean ± sd (sample) over the streams of each point run on several: new-fact F1 gain (after - before),
    relative known-fact F1 change and prose NLL change."""
    groups = stream_groups(runs)
    if not groups:
        return "(no point was run on several streams)"
    lines = ["| point | streams | new F1 gain | known F1 rel. change | prose NLL change |", "|---|---|---|---|---|"]
    for point, members in groups.items():
        cols = []
        for key, kind in (("new_facts/f1", "abs"), ("known_facts/f1", "rel"), ("heldout_text/nll", "abs")):
            cols.append(_mean_sd([v for _, s in members if (v := _delta(s, key, kind)) is not None], kind == "rel"))
        lines.append(f"| {point} | {len(members)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _line(label: str, name: str, s: dict) -> str:
    known, prose = _delta(s, "known_facts/f1", "rel"), _delta(s, "heldout_text/nll", "abs")
    return (f"- {label}: {name}: new F1 {fmt(s['metrics']['new_facts/f1']['after'])}, known F1 "
            f"{fmt(None if known is None else 100 * known, 1)}%, prose NLL {fmt(prose, 3)} nats")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def headline(runs: list[tuple[str, dict]]) -> list[str]:
    """Issue 17's comparison on the config's stream, per regime (passes over the stream, `_passes` of each
    summary as demo.py reads it from the run's config.yaml): the best full-finetuning and LoRA runs (highest
    new-fact F1), the sparse runs at comparable learning (new F1 within 0.1 of the better of the two) with the
    forgetting ratios the criterion names, and the best sparse run. Facts read from the summaries, no verdict."""
    out: list[str] = []
    regimes = sorted({s.get("_passes", 1) for n, s in runs if not STREAM.match(n)})
    for passes in regimes:
        main = [(n, s) for n, s in runs if not STREAM.match(n) and s.get("_passes", 1) == passes]
        f1 = {n: s["metrics"]["new_facts/f1"]["after"] for n, s in main if "new_facts/f1" in s["metrics"]}
        best = {}
        for method in ("sparse", "full", "lora"):
            cands = [(f1[n], n, s) for n, s in main if s["method"] == method and n in f1]
            if cands:
                best[method] = max(cands, key=lambda c: c[0])
        if len(regimes) > 1:
            out += [""] if out else []
            out.append(f"**{passes} pass{'es' if passes > 1 else ''} over the stream "
                       f"({'each fact once' if passes == 1 else f'each fact {passes} times'}):**")
        for method in ("full", "lora"):
            if method in best:
                out.append(_line(f"best {method} run", best[method][1], best[method][2]))
        if "sparse" not in best:
            out.append("- (no sparse run)")
            continue
        base_f1 = max((best[m][0] for m in ("full", "lora") if m in best), default=None)
        if base_f1 is not None:
            near = [(_delta(s, "known_facts/f1", "rel"), n, s) for n, s in main if s["method"] == "sparse"
                    and n in f1 and abs(f1[n] - base_f1) <= 0.1 and _delta(s, "known_facts/f1", "rel") is not None]
            if not near:
                out.append(f"- no sparse run learns within 0.1 of the best full/LoRA run's new F1 {fmt(base_f1)}")
            else:
                known, name, s = max(near, key=lambda c: c[0])
                prose = _delta(s, "heldout_text/nll", "abs")
                out.append(_line(f"sparse at comparable learning (new F1 within 0.1 of {fmt(base_f1)}; least "
                                 "forgetting)", name, s))
                for method in ("full", "lora"):
                    if method in best:
                        sb = best[method][2]
                        out.append(f"  - against best {method}: known-F1 drop ratio sparse/{method} "
                                   f"{fmt(_ratio(known, _delta(sb, 'known_facts/f1', 'rel')), 2)}, prose-NLL rise ratio "
                                   f"{fmt(_ratio(prose, _delta(sb, 'heldout_text/nll', 'abs')), 2)}")
        out.append(_line("best sparse run (highest new F1)", best["sparse"][1], best["sparse"][2]))
    return out


HEALTH_KEYS = ["slots_read_frac", "usage_entropy", "usage_entropy_max", "topk_exp_entropy", "new_answer_weight_low_df",
               "known_answer_weight_low_df", "known_facts_per_answer_slot", "jaccard_new_known_max",
               "jaccard_lowdf_prompt_new_known_max", "known_f1", "known_f1_memory_off", "known_memory_reliance"]


def health_lines(health: dict) -> list[str]:
    """The memory-health gate of the base (background stage summary), as a table and the targets' verdicts."""
    if not health:
        return ["(no health numbers in the background summary)"]
    lines = ["| " + " | ".join(HEALTH_KEYS) + " |", "|" + "---|" * len(HEALTH_KEYS),
             "| " + " | ".join(fmt(health.get(f"health/{k}")) for k in HEALTH_KEYS) + " |", ""]
    for key, t in health.get("health/targets", {}).items():
        lines.append(f"- {key}: {fmt(t['value'])} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return lines


def ensure_world() -> None:
    """Write data/world/ (deterministic, no download) when it is missing."""
    if not WORLDS["synthetic"][2].is_file():
        subprocess.run([sys.executable, "-m", "data_pipeline.world", "--out", str(REPO / "data" / "world")],
                       cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=sorted(WORLDS), default="synthetic",
                    help="synthetic (default): the generated knowledge world; triviaqa: the real-TriviaQA miniature")
    ap.add_argument("--out", default=None, help="default runs/demo (synthetic) or runs/demo_triviaqa")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="cut-down run (tests): few steps, facts and points")
    ap.add_argument("--fresh-base", action="store_true", help="retrain the cached base and background (and the sweep)")
    ap.add_argument("--fresh-sweep", action="store_true",
                    help="run every finetune point again (default: reuse the finished points of the same config)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "runs/demo" if args.world == "synthetic" else "runs/demo_triviaqa"
    configs, preset, needed = WORLDS[args.world]
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    t_start = time.time()
    if args.world == "synthetic":
        ensure_world()
    extra = (QUICK + QUICK_TEXT + (QUICK_DATA if args.world == "triviaqa" else [])) if args.quick else []
    if not args.quick and not (needed.is_file() and (REPO / "data" / "prose.jsonl.zst").is_file()):
        raise SystemExit("demo: data/ is missing; run `make data` (or `make demo`, which does it)")
    base, background, sweep = out / "base", out / "background", out / "finetune"
    if args.fresh_base:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(background, ignore_errors=True)
    timings: dict[str, float] = {}
    train = [*launcher(args.nproc), str(REPO / "recipes" / "train.py")]
    steps = ["--max_steps=4"] if args.quick else []
    cached = " (cached: train.py checks it matches this config)" if finished(base) else ""
    timings["pretrain"] = stage("1/3 pretrain the tiny base model" + cached,
                                [*train, "--config", str(configs / "pretrain.yaml"), f"--output_dir={base}", *steps,
                                 *extra], log)
    batches = ["--sparse.background_batches=3"] if args.quick else []
    cached = " (cached: train.py checks it matches this config)" if finished(background) else ""
    timings["background"] = stage("2/3 background statistics" + cached,
                                  [*train, "--config", str(configs / "background.yaml"), f"--output_dir={background}",
                                   f"--init_from={base}", *batches, *extra], log)
    health = json.loads((background / "summary.json").read_text()).get("health", {})
    print("\n=== memory health of the base (the gate before a finetune sweep)\n" + "\n".join(health_lines(health)),
          flush=True)
    if args.fresh_sweep or args.fresh_base:
        shutil.rmtree(sweep, ignore_errors=True)
    # quick: one point per method instead of the preset's lr sweep
    grids = QUICK_GRIDS if args.quick else []
    grid = ["--base-config", str(configs / "fact_learning.yaml"), *[w for g in grids for w in ("--grid", g)]] \
        if args.quick else ["--preset", preset]
    # finished points of the same config are reused (sweep.py compares each one's recorded fingerprint) and
    # those of another config are run again
    sweep_cmd = [sys.executable, str(REPO / "recipes" / "sweep.py"), *grid, f"--init_from={background}",
                 f"--out={sweep}", f"--nproc={args.nproc}", "--rerun_stale", *extra]
    timings["finetune sweep"] = stage(f"3/3 learn new facts: every method of the {preset!r} sweep",
                                      sweep_cmd, log)

    names = sweep_points(preset, grids)
    runs = []
    for run_dir in sorted(p for p in sweep.iterdir() if p.name in names and finished(p)):
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        summary["_passes"] = int((config.get("data") or {}).get("passes", 1))    # the regime of the run
        runs.append((run_dir.name, summary))
    if not runs:
        raise SystemExit(f"demo: no finished finetune runs in {sweep}; see {log}")
    plots = []
    for y, name in (("known_facts/f1", "pareto.png"), ("heldout_text/nll", "pareto_nll.png")):
        one_stream = [str(sweep / n) for n, _ in runs if not STREAM.match(n)]     # the config's stream only
        cmd = [sys.executable, str(REPO / "recipes" / "plot_pareto.py"), *one_stream,
               "--out", str(out / name), "--x", "new_facts/f1", "--y", y]
        if subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).returncode == 0:
            plots.append(out / name)
    bg = json.loads((background / "summary.json").read_text()).get("background", {})
    total = time.time() - t_start
    results = "\n".join([
        f"# Sparse memory finetuning demo ({args.world} world) — results", "",
        f"Command: `python recipes/demo.py --world {args.world} --out {args.out} --nproc {args.nproc}"
        f"{' --quick' if args.quick else ''}`; {args.nproc} ranks, torchrun, gloo). This run took {total / 60:.1f} min"
        f" ({', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}; a cached stage is only checked).", "",
        "## Learning vs forgetting (before → after finetuning, relative change)", "", table(runs), "",
        "## The best run of each method (the config's stream)", "", *headline(runs), "",
        "## Over the new-fact streams (mean ± sd)", "", stream_table(runs), "",
        "new F1: greedy QA F1 on the learned facts; known F1: facts the base was pretrained on (the stand-in for "
        "NaturalQuestions); prose NLL: held-out prose never trained on; GSM8K NLL of gold solutions; HellaSwag acc_norm.",
        "", "## Memory health of the base", "", *health_lines(health), "", "## Memory diagnostics", "",
        "Background (base model): " + ", ".join(f"{k.split('/')[-1]} = {fmt(float(v))}" for k, v in bg.items()), "",
        diagnostics_table(runs), "",
        "new/known_answer_lookups_high_df: share of the evaluation prompt's answer-position lookups in slots read by "
        ">= 75% of background batches; answer_slot_coverage_mean: share of a fact's answer slots inside the step's "
        "trainable selection; prompt_slot_coverage_mean: the same for the slots read at any token of the prompt (where a "
        "memory below the top layer can hold the fact); known_answer_lookups_in_updated_rows: interference with known facts.", "",
        "## Files", "", *[f"- `{p.relative_to(out)}`" for p in plots],
        f"- TensorBoard: `tensorboard --logdir {out}`", f"- run directories: `{sweep}/<point>/summary.json`", "",
    ])
    (out / "results.md").write_text(results)
    print("\n" + table(runs))
    print("\n" + "\n".join(headline(runs)) + "\n\nover the new-fact streams (mean ± sd):\n" + stream_table(runs))
    print(f"\nwrote {out / 'results.md'}" + "".join(f", {p}" for p in plots))
    print(f"TensorBoard logs: tensorboard --logdir {out}")
    print(f"demo finished in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
