"""Command line of recipes/train.py: fire parses `--key=value` words; errors are one line, exit code 2."""
from __future__ import annotations

import os
import sys
import traceback

import fire

from training.replicas import ReplicaDivergence

USAGE = """usage: [torchrun --nproc_per_node=N] recipes/train.py --config recipes/configs/NAME.yaml [--section.key=value ...]

stages (--stage): pretrain | background | finetune
finetune methods (--method): sparse | tf_only | memory_all | full | lora
strategies (--strategy): fsdp2 | zero1 | zero2 | zero3
every stage accepts --output_dir=DIR --max_steps=N --init_from=DIR

config sections and keys (defaults):
"""


def _train(config: str | None = None, **overrides) -> None:
    from training.config import resolve_config
    from training.trainer import run
    run(resolve_config(config, overrides))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        from training.config import describe
        print(USAGE + describe())
        return 0
    return run_cli(_train, argv, name="train.py")


def run_cli(fn, argv: list[str], *, name: str) -> int:
    """Run `fn` through fire; user errors become one `error: ...` line and exit code 2 (SMF_TRACEBACK=1
    shows the traceback)."""
    try:
        fire.Fire(fn, command=argv, name=name)
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError, ReplicaDivergence) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        if os.environ.get("SMF_TRACEBACK"):
            traceback.print_exc()
        return 2
    except fire.core.FireExit as err:
        return int(err.code or 0)
