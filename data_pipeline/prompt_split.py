"""The exact prompt/continuation split shared by every tokenizer (sentencepiece and HF)."""
from __future__ import annotations


def split_after_prompt(full: list[int], head: list[int]) -> tuple[list[int], list[int]]:
    """``full`` (ids of prompt + continuation) cut after its longest common prefix with ``head`` (the
    prompt's own ids): exactly ``(head, rest)`` when the boundary did not merge into one piece."""
    n = 0
    while n < min(len(head), len(full)) and head[n] == full[n]:
        n += 1
    return full[:n], full[n:]
