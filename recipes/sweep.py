"""Run a grid of finetunes, one run directory per point, locally or as one Slurm job array.

    python recipes/sweep.py --preset NAME | --grid 'method=sparse t=25,500 lr=0.1,2' [--grid ...]
        [--base-config CONFIG.yaml] --init_from RUN --out runs/sweep [--nproc N] [--slurm]
        [--dry_run] [--plot FILE.png] [--section.key=value ...]

A grid is axes `KEY=V1,V2,...` (their product); several --grid options (or a preset's `grids`) add up,
which is how each method gets its own lr grid. KEY is a config key (`optim.lr`) or a short name
(lr, t, rank, alpha, wd, seed, passes, steps, ranking, maxnorm, stream = data.fact_offset, opt = optim.optimizer). Each point runs

    [torchrun --standalone --nproc_per_node=N] recipes/train.py --config BASE --output_dir=OUT/NAME
        --method=... --optim.lr=... --sparse.top_t=... --init_from=RUN [--section.key=value ...]

with NAME built from the point (`sparse_lr2_t500`). A point whose run directory already holds
summary.json of the same config (the fingerprint in its config.yaml) is finished and skipped; one finished by
a run of another config is an error (`--rerun_stale`: run it again); an unfinished one resumes from its
latest checkpoint. Every point's
config is validated before anything runs. Presets are recipes/configs/sweeps/NAME.yaml (the paper's
grids, DESIGN.md 2, and a tiny CPU one). `--slurm` writes OUT/sweep_points.tsv and submits
slurm/sweep_array.sh as one array (a task per unfinished point) instead of running locally.
With `--slurm` and a `--dependency` in --sbatch_args, --init_from may name a run that the awaited job
has yet to write (slurm/pipeline.sh submits the array after the background job that way).
`--plot FILE.png` runs recipes/plot_pareto.py on the finished points afterwards.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run from a checkout without install

PRESET_DIR = REPO / "recipes" / "configs" / "sweeps"
TRAIN = REPO / "recipes" / "train.py"
PLOT = REPO / "recipes" / "plot_pareto.py"
ARRAY_SCRIPT = REPO / "slurm" / "sweep_array.sh"
POINTS_FILE = "sweep_points.tsv"
ALIASES = {"lr": "optim.lr", "t": "sparse.top_t", "top_t": "sparse.top_t", "rank": "lora.rank",
           "alpha": "lora.alpha", "wd": "optim.weight_decay", "seed": "seed", "passes": "data.passes",
           "steps": "max_steps", "method": "method", "ranking": "sparse.ranking",
           "maxnorm": "optim.values_max_row_norm", "stream": "data.fact_offset", "opt": "optim.optimizer"}
LABELS = {v: k for k, v in reversed(list(ALIASES.items()))}    # config key -> short name used in run names


class UsageError(Exception):
    """Bad input; reported as one line, exit code 2."""


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]          # config key -> value (axes and fixed keys), method first
    run_dir: Path = Path()
    args: list[str] = field(default_factory=list)
    fingerprint: str = ""              # of the config train.py will resolve for it (set by validate)

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def recorded_fingerprint(self) -> str | None:
        """The fingerprint train.py recorded in the run directory's config.yaml (None when unreadable)."""
        import yaml

        try:
            recorded = yaml.safe_load((self.run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        return recorded.get("fingerprint") if isinstance(recorded, dict) else None

    @property
    def stale(self) -> bool:
        """Finished, but by a run of another config (the grid, base config or init_from changed since)."""
        return self.finished and self.recorded_fingerprint() != self.fingerprint


# ---- grids ------------------------------------------------------------------------------------------
def parse_value(value: Any) -> Any:
    """'2' -> 2, '5e-6' -> 5e-06, 'sparse' -> 'sparse' (YAML 1.1 reads 5e-6 as a string: so do we, then this)."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def format_value(value: Any) -> str:
    """A value as a train.py word and in run names: 2.0 -> '2', 5e-06 -> '5e-6'."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), repr(value))
    return str(value)


def config_key(key: str) -> str:
    return ALIASES.get(key, key)


def parse_grid(text: str) -> dict[str, list]:
    """'method=sparse,full lr=0.1,2' -> {'method': ['sparse', 'full'], 'lr': [0.1, 2]}."""
    grid: dict[str, list] = {}
    for word in text.split():
        key, eq, values = word.partition("=")
        if not eq or not key or not values:
            raise UsageError(f"--grid: '{word}' is not KEY=V1,V2,...")
        grid[key] = [parse_value(v) for v in values.split(",") if v]
    if not grid:
        raise UsageError("--grid is empty")
    return grid


def expand(grid: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The product of a grid's axes as (name, overrides). Lists are axes (they name the point); scalars are
    fixed settings; an axis of mappings sets several keys at once (e.g. LoRA rank with its alpha)."""
    grid = dict(grid)
    method = grid.pop("method", None)
    if method is None:
        raise UsageError(f"grid {grid} has no 'method' axis")
    axes = [("method", method if isinstance(method, list) else [method])]
    fixed: dict[str, Any] = {}
    for key, values in grid.items():
        if isinstance(values, list):
            if not values:
                raise UsageError(f"grid axis '{key}' has no values")
            axes.append((key, values))
        else:
            fixed[config_key(key)] = parse_value(values)
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        parts, overrides = [], {}
        for (key, _), value in zip(axes, combo):
            items = value.items() if isinstance(value, dict) else [(key, value)]
            for k, v in items:
                ck, v = config_key(k), parse_value(v)
                overrides[ck] = v
                label = "" if ck == "method" else LABELS.get(ck, ck.rsplit(".", 1)[-1])
                parts.append(f"{label}{format_value(v)}")
        for ck, v in fixed.items():
            overrides.setdefault(ck, v)
        name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))
        points.append((name, overrides))
    return points


def build_points(grids: list[dict[str, Any]]) -> list[Point]:
    points: dict[str, Point] = {}
    for grid in grids:
        for name, overrides in expand(grid):
            old = points.get(name)
            if old is not None and old.overrides != overrides:
                raise UsageError(f"two points are both named '{name}' but differ ({old.overrides} vs {overrides}); "
                                 "make the key they differ in an axis (a list)")
            points.setdefault(name, Point(name, overrides))
    return list(points.values())


def load_preset(name: str) -> tuple[dict[str, Any], Path]:
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise UsageError(f"--preset {name}: no such preset (have: {have})")
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"preset {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(preset, dict) or not isinstance(preset.get("grids"), list) or not preset["grids"] \
            or not all(isinstance(g, dict) for g in preset["grids"]):
        raise UsageError(f"preset {path} needs 'grids': a list of mappings KEY: value or [values]")
    return preset, path


# ---- commands -----------------------------------------------------------------------------------------
def parse_extra(words: list[str]) -> dict[str, str]:
    """Unrecognised `--section.key=value` words, forwarded to every point."""
    extra: dict[str, str] = {}
    for word in words:
        key, eq, value = word[2:].partition("=")
        if not word.startswith("--") or not eq or not key:
            raise UsageError(f"unexpected argument '{word}'; config overrides for every point are --section.key=value")
        extra[key] = value
    return extra


def existing(path: str, what: str) -> Path:
    """A path as given (relative to the working directory) or relative to the repository."""
    p = Path(path)
    for candidate in (p, REPO / p):
        if candidate.exists():
            return candidate.resolve()
    raise UsageError(f"{what} {path} does not exist")


def _waits_on_a_job(sbatch_args: str) -> bool:
    """Whether --sbatch_args hold a --dependency (or -d): then --init_from may be written by that job."""
    return any(w.startswith(("--dependency", "-d")) for w in sbatch_args.split())


def train_args(point: Point, *, base_config: Path, init_from: str | None, extra: dict[str, str]) -> list[str]:
    args = ["--config", str(base_config), f"--output_dir={point.run_dir}"]
    args += [f"--{k}={format_value(v)}" for k, v in point.overrides.items()]
    if init_from:
        args.append(f"--init_from={init_from}")
    args += [f"--{k}={v}" for k, v in extra.items()]
    return args


def launch_command(args: list[str], *, nproc: int, train_script: Path) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(train_script), *args]
    return [sys.executable, str(train_script), *args]


def validate(points: list[Point], *, base_config: Path, init_from: str | None, extra: dict[str, str]) -> None:
    """Resolve every point's config as train.py will, so a typo fails now and not after hours of runs."""
    from training.config import resolve_config

    for point in points:
        cli = {**extra, **{k: format_value(v) for k, v in point.overrides.items()},
               "output_dir": str(point.run_dir)}
        if init_from:
            cli["init_from"] = init_from
        try:
            point.fingerprint = resolve_config(str(base_config), cli).fingerprint()
        except ValueError as err:
            raise UsageError(f"point {point.name}: {str(err).splitlines()[0]}") from None


def run_local(points: list[Point], *, nproc: int, train_script: Path) -> list[str]:
    """Run the unfinished points one after another; returns the names of those that failed."""
    failed = []
    todo = [p for p in points if not p.finished]
    for i, point in enumerate(todo, 1):
        point.run_dir.mkdir(parents=True, exist_ok=True)
        log = point.run_dir / "sweep.log"
        print(f"[{i}/{len(todo)}] {point.name}: running (log {log})", flush=True)
        start = time.time()
        with open(log, "a") as f:
            rc = subprocess.call(launch_command(point.args, nproc=nproc, train_script=train_script),
                                 stdout=f, stderr=subprocess.STDOUT)
        if rc == 0 and point.finished:
            print(f"[{i}/{len(todo)}] {point.name}: done in {time.time() - start:.0f}s", flush=True)
            continue
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        reason = next((l for l in reversed(lines) if l.startswith("error:")), lines[-1] if lines else "")
        print(f"[{i}/{len(todo)}] {point.name}: FAILED (exit {rc}{', no summary.json' if rc == 0 else ''}) "
              f"{reason[:300]}", flush=True)
        failed.append(point.name)
    return failed


def submit_slurm(points: list[Point], *, out: Path, base_config: Path, nproc: int | None, sbatch_args: list[str],
                 max_parallel: int, train_script: Path, dry_run: bool) -> None:
    todo = [p for p in points if not p.finished]
    if not todo:
        print("nothing to submit: every point is finished")
        return
    lines = []
    for p in todo:
        overrides = p.args[3:]       # after --config BASE --output_dir=DIR: read by slurm/sweep_array.sh
        if any(re.search(r"\s", w) for w in overrides) or re.search(r"\s", str(p.run_dir)):
            raise UsageError(f"point {p.name}: values and paths must not contain whitespace for --slurm")
        lines.append(f"{p.name}\t{p.run_dir}\t{' '.join(overrides)}\n")
    points_file = out / POINTS_FILE
    env = {"SWEEP_POINTS": str(points_file), "CONFIG": str(base_config), "REPO_DIR": str(REPO)}
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    if train_script != TRAIN:
        env["TRAIN_SCRIPT"] = str(train_script)
    array = f"--array=0-{len(todo) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    cmd = ["sbatch", array, *sbatch_args, str(ARRAY_SCRIPT)]
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd)
    if dry_run:
        print(f"would write {points_file}:\n" + "".join(lines).rstrip("\n"))
        print(f"would submit: {shown}")
        return
    if shutil.which("sbatch") is None:
        raise UsageError("--slurm: sbatch not found on PATH (run on a Slurm login node, or drop --slurm)")
    out.mkdir(parents=True, exist_ok=True)
    points_file.write_text("".join(lines))
    print(f"+ {shown}", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"sbatch failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[:300]}")
    print(proc.stdout.strip() + f" ({len(todo)} tasks; re-run this command when they end to see what is left, "
                                "and with --plot to plot)", flush=True)


def plot(points: list[Point], *, out_png: str, y: str | None) -> int:
    done = [p for p in points if p.finished]
    if not done:
        print("--plot: no finished point to plot yet")
        return 0
    label_keys = sorted({k for p in points for k in p.overrides if k != "method"})
    cmd = [sys.executable, str(PLOT), *(str(p.run_dir) for p in done), "--out", out_png]
    if y:
        cmd += ["--y", y]
    if label_keys:
        cmd += ["--label-keys", ",".join(label_keys)]
    return subprocess.call(cmd)


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):      # one line, like every other error of the recipes
            raise UsageError(f"{message} (see --help)")

    parser = Parser(prog="sweep.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="recipes/configs/sweeps/NAME.yaml (or a path to such a file)")
    what.add_argument("--grid", action="append", help="'KEY=V1,V2 KEY=...' (repeat for per-method grids)")
    parser.add_argument("--base-config", "--base_config", dest="base_config",
                        help="train.py config of every point (default: the preset's base_config)")
    parser.add_argument("--init_from", "--init-from", dest="init_from", help="run or checkpoint every point starts from")
    parser.add_argument("--out", required=True, help="sweep directory: one run directory per point in it")
    parser.add_argument("--nproc", type=int, default=None, help="processes per point (torchrun when > 1; default 1)")
    parser.add_argument("--slurm", action="store_true", help="submit one Slurm job array instead of running here")
    parser.add_argument("--sbatch_args", "--sbatch-args", default="", help="extra sbatch options: --sbatch_args='--gres=gpu:8 --time=4:00:00'")
    parser.add_argument("--max_parallel", "--max-parallel", type=int, default=0, help="array tasks at once (0 = no cap)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the points and commands; run nothing")
    parser.add_argument("--rerun_stale", "--rerun-stale", action="store_true",
                        help="a point finished by a run of another config is deleted and run again (default: error)")
    parser.add_argument("--plot", help="afterwards, plot the finished points (recipes/plot_pareto.py) to this PNG")
    parser.add_argument("--plot_y", "--plot-y", default=None, help="held-out metric of the plot (default: preset's)")
    parser.add_argument("--train_script", "--train-script", default=str(TRAIN), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    return args, parse_extra(rest)


def main(argv: list[str]) -> int:
    try:
        args, extra = parse_args(argv)
        return _main(args, extra)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def _main(args: argparse.Namespace, extra: dict[str, str]) -> int:
    preset: dict[str, Any] = {}
    if args.preset:
        preset, preset_path = load_preset(args.preset)
        grids = preset["grids"]
        base = args.base_config or (str((preset_path.parent / preset["base_config"]).resolve())
                                    if preset.get("base_config") else None)
    else:
        grids = [parse_grid(g) for g in args.grid]
        base = args.base_config
    if not base:
        raise UsageError("--base-config CONFIG.yaml is required (the train.py config of every point)")
    base_config = existing(base, "--base-config")
    if args.nproc is not None and args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    for key in ("config", "output_dir", "init_from"):
        if key in extra:
            raise UsageError(f"--{key} is set by the sweep; use --base-config / --out / --init_from")
    init_from = None
    if args.init_from:
        if args.slurm and _waits_on_a_job(args.sbatch_args) and not Path(args.init_from).exists():
            # the array runs after the job that writes it (slurm/pipeline.sh: afterok of the background job)
            init_from = str(Path(args.init_from).resolve())
            print(f"sweep: --init_from {init_from} does not exist yet; the array waits on its --dependency",
                  flush=True)
        else:
            init_from = str(existing(args.init_from, "--init_from"))
    from training.paths import output_path_problem
    problem = output_path_problem(args.out, want_dir=True)
    if problem is not None:
        raise UsageError(f"--out {args.out} {problem}; name the sweep directory (one run directory per point)")
    out = Path(args.out).resolve()
    train_script = Path(args.train_script).resolve()

    points = build_points(grids)
    for point in points:
        clash = [k for k in point.overrides if k in extra]
        if clash:
            raise UsageError(f"--{clash[0]} is a sweep key (point {point.name}); drop it from the command line")
        point.run_dir = out / point.name
        point.args = train_args(point, base_config=base_config, init_from=init_from, extra=extra)
    validate(points, base_config=base_config, init_from=init_from, extra=extra)
    stale = [p for p in points if p.stale]
    if stale and not args.rerun_stale:
        raise UsageError(f"{stale[0].run_dir} holds a finished run of another config" +
                         (f" ({len(stale) - 1} more point(s) too)" if len(stale) > 1 else "") +
                         "; pass --rerun_stale to run them again, or use another --out")
    for point in stale:
        if not args.dry_run:
            print(f"sweep: {point.name}: finished with another config; running it again", flush=True)
            shutil.rmtree(point.run_dir)

    nproc = args.nproc or 1
    num_done = sum(p.finished for p in points)
    print(f"sweep: {len(points)} points, {num_done} finished, {len(points) - num_done} to run -> {out}", flush=True)
    if args.dry_run:
        for p in points:
            status = "finished, skip" if p.finished else "to run"
            cmd = " ".join(launch_command(p.args, nproc=nproc, train_script=train_script))
            print(f"{p.name}\t[{status}]\t{cmd}" if not args.slurm else f"{p.name}\t[{status}]")
    if args.slurm:
        submit_slurm(points, out=out, base_config=base_config, nproc=args.nproc, sbatch_args=args.sbatch_args.split(),
                     max_parallel=args.max_parallel, train_script=train_script, dry_run=args.dry_run)
        if args.plot and not args.dry_run:
            if all(p.finished for p in points):
                return plot(points, out_png=args.plot, y=args.plot_y or preset.get("plot_y"))
            print("--plot: points are still to run; re-run this command with --plot when the array has ended")
        return 0
    if args.dry_run:
        return 0
    failed = run_local(points, nproc=nproc, train_script=train_script)
    rc = 0
    if failed:
        print(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)} (logs: OUT/NAME/sweep.log); "
              "re-run to retry them (finished points are skipped)", flush=True)
        rc = 1
    if args.plot:
        rc = plot(points, out_png=args.plot, y=args.plot_y or preset.get("plot_y")) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
