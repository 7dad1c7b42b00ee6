"""Evaluate a checkpoint and write JSON:
`[torchrun --nproc_per_node=N] recipes/evaluate.py --checkpoint RUN_OR_CHECKPOINT_DIR [--sets a,b] [--out FILE.json]
[--max_items N] [--config CONFIG.yaml] [--section.key=value ...]`.

Uses the run's resolved config.yaml (RUN/config.yaml); writes {"checkpoint", "step", "metrics": {"<set>/<metric>"}}
to CHECKPOINT_DIR/eval.json by default. The library is training/evaluate_checkpoint.py; this file is its
command line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from training.cli import run_cli  # noqa: E402

USAGE = """usage: [torchrun --nproc_per_node=N] recipes/evaluate.py --checkpoint RUN_OR_CHECKPOINT_DIR
         [--sets new_facts,known_facts,heldout_text,nq,hellaswag,gsm8k] [--out FILE.json] [--max_items N]
         [--config CONFIG.yaml] [--memory_off] [--section.key=value ...]

--checkpoint  a run directory (its latest checkpoint) or a checkpoint directory (RUN/checkpoints/step_N)
--sets        sets to evaluate (default: the run's eval.sets)
--out         JSON to write (default: CHECKPOINT_DIR/eval.json)
--max_items   items per set (default: the run's eval.max_items)
--config      config to use instead of the run's config.yaml (needed when the checkpoint has none)
--memory_off  switch every memory layer's output off (an ablation: what the model knows without its memory);
              default --out CHECKPOINT_DIR/eval_memory_off.json
--section.key=value  any config override, e.g. --eval.batch_size=8 --eval.nq=data/nq.jsonl --device=cpu
"""



def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "false", "0"):
        return str(value).lower() in ("true", "1")
    raise ValueError(f"{name} takes no value or true/false, got {value!r}")


def main(argv: list[str]) -> int:
    """fire parses `--key=value` words, as recipes/train.py; errors are one line, exit code 2."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0

    def _run(checkpoint: str | None = None, sets: Any = None, out: str | None = None, max_items: int | None = None,
             config: str | None = None, memory_off: bool = False, **overrides: Any) -> None:
        if checkpoint is None:
            raise ValueError("--checkpoint RUN_OR_CHECKPOINT_DIR is required (see --help)")
        from training.evaluate_checkpoint import evaluate_checkpoint
        evaluate_checkpoint(str(checkpoint), sets=sets, out=None if out is None else str(out),
                            max_items=max_items, config=None if config is None else str(config),
                            overrides=overrides, memory_off=_flag(memory_off, "--memory_off"),
                            deepspeed_configs=Path(__file__).resolve().parent / "configs" / "deepspeed")

    return run_cli(_run, argv, name="evaluate.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
