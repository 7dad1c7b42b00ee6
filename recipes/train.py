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

from training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
