"""Learning vs forgetting across runs (the paper's Figure 5): target F1 (x) vs a held-out metric (y).

    python recipes/plot_pareto.py RUN_DIR... --out FILE.png [--x new_facts/f1] [--y known_facts/f1]
                                  [--label-keys sparse.top_t,optimizer.lr]

Reads each run directory's ``summary.json`` (the "after" value of each metric), draws one marker style
per method with marker *area* proportional to ``trainable_params_per_step``, and the Pareto front (x
higher is better; y higher is better unless it is a loss-like metric such as ``.../nll``). Writes the
same numbers as a markdown table to FILE.md (next to the PNG) and prints it. ``--label-keys`` adds
columns read from each run's ``config.yaml`` (dotted paths). A run directory without summary.json
(an unfinished run) is refused with a one-line error.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
MIN_AREA, MAX_AREA = 25.0, 600.0  # points^2


class UsageError(Exception):
    """A problem with the inputs; reported as one line, no traceback."""


@dataclass
class Point:
    run: str
    method: str
    x: float
    y: float
    y_before: float | None
    y_rel_change: float | None
    params: int | None
    steps: int
    labels: dict[str, str]
    on_front: bool = False


def _config_value(config: Any, dotted: str) -> str:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return str(node)


def load_point(run_dir: Path, *, x: str, y: str, label_keys: list[str]) -> Point:
    from evaluation.summary import read_summary

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory")
    path = run_dir / "summary.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no summary.json (the run has not finished)")
    try:
        summary = read_summary(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    values = {}
    for name in (x, y):
        entry = summary["metrics"].get(name)
        if entry is None:
            have = ", ".join(sorted(summary["metrics"])) or "none"
            raise UsageError(f"{path}: no metric {name!r} (it has: {have})")
        if entry.get("after") is None:
            raise UsageError(f"{path}: metric {name!r} has no 'after' value")
        values[name] = float(entry["after"])
    labels: dict[str, str] = {}
    if label_keys:
        import yaml

        config_path = run_dir / "config.yaml"
        try:
            config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        except yaml.YAMLError as e:
            raise UsageError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        labels = {k: _config_value(config, k) for k in label_keys}
    y_entry = summary["metrics"][y]
    params = summary.get("trainable_params_per_step")
    return Point(run=str(run_dir), method=str(summary["method"]), x=values[x], y=values[y],
                 y_before=y_entry.get("before"), y_rel_change=y_entry.get("rel_change"),
                 params=None if params is None else int(params), steps=int(summary["steps"]), labels=labels)


def mark_pareto_front(points: list[Point], *, y_lower_is_better: bool) -> None:
    """Set on_front for points no other point beats on both axes (x higher; y per direction)."""
    sign = -1.0 if y_lower_is_better else 1.0
    for p in points:
        p.on_front = not any(
            q.x >= p.x and sign * q.y >= sign * p.y and (q.x > p.x or sign * q.y > sign * p.y) for q in points)


def _fmt(value: float | int | None, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(points: list[Point], *, x: str, y: str, label_keys: list[str]) -> str:
    head = ["run", "method", *label_keys, x, y, f"{y} before", f"{y} rel. change", "trainable params/step",
            "steps", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in sorted(points, key=lambda p: (p.method, p.x)):
        rel = "n/a" if p.y_rel_change is None else f"{100 * p.y_rel_change:+.1f}%"
        row = [p.run, p.method, *(p.labels.get(k, "") for k in label_keys), _fmt(p.x), _fmt(p.y),
               _fmt(p.y_before), rel, _fmt(p.params), str(p.steps), "yes" if p.on_front else ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], *, x: str, y: str, y_lower_is_better: bool, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = [p.params for p in points if p.params]
    largest = max(known, default=1)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    methods = sorted({p.method for p in points})
    for i, method in enumerate(methods):
        group = [p for p in points if p.method == method]
        # Area proportional to trainable params per step (a floor keeps tiny counts visible).
        sizes = [max(MIN_AREA, MAX_AREA * (p.params or 0) / largest) for p in group]
        ax.scatter([p.x for p in group], [p.y for p in group], s=sizes, marker=MARKERS[i % len(MARKERS)],
                   alpha=0.75, edgecolors="black", linewidths=0.5, label=method)
    front = sorted((p for p in points if p.on_front), key=lambda p: p.x)
    if front:
        ax.plot([p.x for p in front], [p.y for p in front], "k--", linewidth=1, label="Pareto front", zorder=0)
    ax.set_xlabel(f"{x} (higher is better)")
    ax.set_ylabel(f"{y} ({'lower' if y_lower_is_better else 'higher'} is better)")
    ax.set_title("Learning vs forgetting (marker area ∝ trainable params/step)", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=8)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([60.0])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write; the table goes to the same name .md")
    parser.add_argument("--x", default="new_facts/f1", help="learning metric (x axis)")
    parser.add_argument("--y", default="known_facts/f1", help="held-out metric (y axis)")
    parser.add_argument("--label-keys", default="", help="comma-separated dotted config.yaml keys to tabulate")
    args = parser.parse_args(argv)
    label_keys = [k for k in args.label_keys.split(",") if k]
    try:
        if args.out.suffix.lower() != ".png":
            raise UsageError(f"--out must name a .png file, got {args.out}")
        from training.paths import output_path_problem
        for target in (args.out, args.out.with_suffix(".md")):
            problem = output_path_problem(target, want_dir=False)
            if problem is not None:
                raise UsageError(f"--out {target} {problem}")
        # a shell glob over a sweep folder (runs/sweep/*) also names its files (pareto.png, sweep_points.tsv):
        # entries that are not directories are skipped, with a note
        runs = [d for d in args.run_dirs if d.is_dir()]
        for d in args.run_dirs:
            if not d.is_dir():
                print(f"plot_pareto: skipping {d}: not a run directory", file=sys.stderr)
        if not runs:
            raise UsageError("no run directory among the arguments; pass finished run directories")
        points = [load_point(d, x=args.x, y=args.y, label_keys=label_keys) for d in runs]
        bad = [p.run for p in points if not (math.isfinite(p.x) and math.isfinite(p.y))]
        if bad:
            raise UsageError(f"{bad[0]}: non-finite {args.x} or {args.y}")
    except UsageError as e:
        print(f"plot_pareto: error: {e}", file=sys.stderr)
        return 2
    from evaluation.summary import lower_is_better

    y_lower = lower_is_better(args.y)
    mark_pareto_front(points, y_lower_is_better=y_lower)
    plot(points, x=args.x, y=args.y, y_lower_is_better=y_lower, out=args.out)
    table = markdown_table(points, x=args.x, y=args.y, label_keys=label_keys)
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
