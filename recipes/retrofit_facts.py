"""Choose the facts of a retrofit experiment by what the base model answers: `recipes/retrofit_facts.py
--init_from RUN --out data/retrofit_smollm2/facts.jsonl [--facts data/triviaqa_validation.jsonl] [--scan N]
[--num_known K] [--num_new M] [--num_background B] [--known_min_f1 F] [--seq_len L] [--max_new_tokens T]`.

The library is training/retrofit_facts.py; this file is its command line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from training.cli import run_cli  # noqa: E402

USAGE = """usage: recipes/retrofit_facts.py --init_from RUN --out FILE.jsonl [--facts TRIVIAQA] [--scan N]
         [--num_known K] [--num_new M] [--num_background B] [--known_min_f1 F] [--seq_len L]
         [--max_new_tokens T] [--batch_size S] [--device cpu|cuda]

Scores RUN's model (a recipes/retrofit.py run: the base's function) on the first N TriviaQA questions whose
template statements fit L tokens, with the finetune's evaluation (greedy, T new tokens, F1 over aliases), and
writes FILE.jsonl: K known facts (F1 >= F), then M new facts (F1 = 0), then B background facts (F1 = 0);
FILE.json holds the offsets (data.num_known_facts = data.fact_offset = K, data.num_new_facts = M,
data.num_background_facts = B) and every scanned question's base F1.
Defaults: --facts data/triviaqa_validation.jsonl --scan 2000 --num_known 32 --num_new 16 --num_background 200
--known_min_f1 0.5 --seq_len 48 --max_new_tokens 8 --batch_size 64 (recipes/configs/retrofit_smollm2/ reads
that layout; SmolLM2-135M-Instruct answers 33 of the first 2000 with F1 >= 0.5, an hour on 2 busy CPU cores).
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0

    def _run(init_from: str | None = None, out: str | None = None, facts: str = "data/triviaqa_validation.jsonl",
             **options: Any) -> None:
        if init_from is None or out is None:
            raise ValueError("--init_from and --out are required (see --help)")
        allowed = {"scan", "num_known", "num_new", "num_background", "known_min_f1", "seq_len", "max_new_tokens",
                   "batch_size", "device"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown option --{unknown[0]} (see --help)")
        from training.retrofit_facts import select_facts
        select_facts(str(init_from), str(facts), str(out), **options)

    return run_cli(_run, argv, name="retrofit_facts.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
