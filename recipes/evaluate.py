"""Evaluate a checkpoint and write JSON:
`[torchrun --nproc_per_node=N] recipes/evaluate.py --checkpoint RUN_OR_CHECKPOINT_DIR [--sets a,b] [--out FILE.json]
[--max_items N] [--config CONFIG.yaml] [--section.key=value ...]`.

Uses the run's resolved config.yaml (RUN/config.yaml); writes {"checkpoint", "step", "metrics": {"<set>/<metric>"}}
to CHECKPOINT_DIR/eval.json by default. See training/evaluate_checkpoint.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from training.evaluate_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
