"""Batched greedy generation: left padding + padding_mask, full forward each step (no KV cache).

Left padding keeps every row's last real token in the last column, so one ``logits[:, -1]`` serves the
whole batch; the model masks padded keys and uses relative (RoPE) positions, so a left-padded prompt
gives the same logits as the same prompt alone. Generation of a row stops at EOS (not included in the
text), when its decoded text contains a stop string (the text is cut before it; default: newline), or
after ``max_new_tokens`` tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from evaluation.distributed import (Shard, any_across, dummy_forward, eval_mode, forward_logits,
                                    infer_device, model_max_seq_len)

__all__ = ["greedy_generate", "generate_batch", "cut_at_stop"]

DEFAULT_STOP = ("\n",)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _fit_prompt(ids: list[int], *, max_new_tokens: int, max_len: int | None, bos_id: int) -> list[int]:
    # Keep BOS and the end of an over-long prompt: the question sits right before "Answer:".
    if max_len is None or len(ids) + max_new_tokens <= max_len:
        return ids
    keep = max(1, max_len - max_new_tokens)
    if ids[0] == bos_id and keep > 1:
        return [bos_id] + ids[len(ids) - keep + 1:]
    return ids[-keep:]


def generate_batch(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[list[int]] | None, *,
                   max_new_tokens: int, stop_strings: Sequence[str], device: torch.device,
                   shard: Shard) -> list[str]:
    """Greedy continuation texts of one batch of token-id prompts (inside eval_mode).

    With several ranks, every rank must call this the same number of times: the step loop runs in
    lock-step (one forward per step on every rank, a 1-token dummy forward on a rank with nothing left
    to generate) until no rank has an unfinished row. `prompt_ids=None` is a dummy batch.
    """
    rows = list(prompt_ids) if prompt_ids is not None else []
    if any(len(p) == 0 for p in rows):
        raise ValueError("empty prompt: encode prompts with bos=True")
    max_len = model_max_seq_len(model)
    rows = [_fit_prompt(list(p), max_new_tokens=max_new_tokens, max_len=max_len, bos_id=tokenizer.bos_id)
            for p in rows]
    pad_id, eos_id = tokenizer.pad_id, tokenizer.eos_id
    width = max((len(p) for p in rows), default=0)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, p in enumerate(rows):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    tokens, mask = tokens.to(device), mask.to(device)
    generated: list[list[int]] = [[] for _ in rows]
    texts = ["" for _ in rows]
    done = [False for _ in rows]
    for _ in range(max_new_tokens):
        active = not all(done)
        if not any_across(active, shard):
            break
        if not active:
            dummy_forward(model, pad_like_id=tokenizer.bos_id, device=device)
            continue
        next_ids = forward_logits(model, tokens, mask)[:, -1].argmax(dim=-1).tolist()
        column, column_mask = [], []
        for i, tok in enumerate(next_ids):
            appended = not done[i] and tok != eos_id
            column.append(tok if appended else pad_id)
            column_mask.append(appended)
            if done[i]:
                continue
            if tok == eos_id:
                done[i] = True
                continue
            generated[i].append(tok)
            texts[i], stopped = cut_at_stop(tokenizer.decode(generated[i]), stop_strings)
            done[i] = stopped or len(generated[i]) >= max_new_tokens
        tokens = torch.cat([tokens, torch.tensor(column, dtype=torch.long, device=device)[:, None]], dim=1)
        mask = torch.cat([mask, torch.tensor(column_mask, dtype=torch.bool, device=device)[:, None]], dim=1)
    return texts


def greedy_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    batch_size: int = 8, device: torch.device | str | None = None,
                    stop_strings: Sequence[str] = DEFAULT_STOP) -> list[str]:
    """Greedy continuations of `prompts` on this process alone (prompts encoded with BOS).

    Returns one text per prompt, cut before the first stop string; EOS ends a text without appearing.
    A prompt longer than ``model.config.max_seq_len - max_new_tokens`` keeps BOS and its last tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = infer_device(model, device)
    shard = Shard(rank=0, world_size=1)  # local only: no collectives even under torch.distributed
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    out: list[str] = []
    with eval_mode(model):
        for start in range(0, len(ids), batch_size):
            out.extend(generate_batch(model, tokenizer, ids[start:start + batch_size],
                                      max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                                      device=dev, shard=shard))
    return out
