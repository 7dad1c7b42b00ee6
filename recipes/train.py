"""Train one stage: `[torchrun --nproc_per_node=N] recipes/train.py --config CONFIG.yaml [--section.key=value ...]`.

Stages: pretrain | background | finetune (methods: sparse, tf_only, memory_all, full, lora).
Every stage accepts --output_dir=DIR, --max_steps=N and --init_from=DIR.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from training import signals  # noqa: E402

signals.install()   # before the heavy imports: a preemption signal during start-up is not lost

from training.cli import run_cli  # noqa: E402

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"   # zero{N}.json

USAGE = """usage: [torchrun --nproc_per_node=N] recipes/train.py --config recipes/configs/NAME.yaml [--section.key=value ...]

stages (--stage): pretrain | background | finetune
finetune methods (--method): sparse | tf_only | memory_all | full | lora
strategies (--strategy): fsdp2 | zero1 | zero2 | zero3
every stage accepts --output_dir=DIR --max_steps=N --init_from=DIR

config sections and keys (defaults):
"""


def _train(config: str | None = None, **overrides) -> None:
    from training import faults
    from training.config import resolve_config, with_deepspeed_default
    from training.trainer import run
    # the reliability tests inject faults into a torchrun subprocess through SMF_FAULT (read here, once)
    callbacks = faults.from_env()
    run(with_deepspeed_default(resolve_config(config, overrides), DEEPSPEED_CONFIGS), callbacks=callbacks)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        from training.config import describe
        print(USAGE + describe())
        return 0
    return run_cli(_train, argv, name="train.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
