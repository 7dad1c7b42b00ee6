"""Stand-ins for the evaluation tests (no dependency on model/ or data_pipeline/).

* CharTokenizer: one id per character, with pad/bos/eos ids like data_pipeline.Tokenizer.
* PrefixMeanLM: a tiny causal LM (float64) whose logits at position t depend on the mean embedding of
  the real tokens up to t and on token t itself. It honours padding_mask exactly (padded tokens add
  nothing), so left padding gives bit-identical logits for real tokens, and ignoring the mask changes
  them (padded tokens have non-zero embeddings).
* UnigramLM: context-free logits (a fixed log-probability table), for hand-computable likelihoods.
* OracleLM: answers known prompts with scripted continuations (for QA scoring tests).
* Records mirroring data_pipeline.records (same field names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

PAD, BOS, EOS = 0, 1, 2
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


class CharTokenizer:
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self) -> None:
        self._id = {ch: i + 3 for i, ch in enumerate(_CHARS)}
        self._ch = {i: ch for ch, i in self._id.items()}
        self.vocab_size = len(_CHARS) + 3

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self._id.get(ch, self._id["?"]) for ch in text]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return "".join(self._ch.get(int(i), "") for i in ids)

    def id_of(self, ch: str) -> int:
        return self._id[ch]


def _memory_indices(tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    idx = torch.stack([tokens * 7 % 97, tokens * 13 % 97], dim=-1)
    return [torch.where(mask[..., None], idx, torch.full_like(idx, -1))]


class PrefixMeanLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 16, seed: int = 0, scale: float = 4.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab_size, dim, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(dim, vocab_size, generator=g, dtype=torch.float64) * scale)
        self.dropout = nn.Dropout(0.5)  # makes eval mode observable: in train mode outputs are random
        self.num_forwards = 0

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Any:
        self.num_forwards += 1
        mask = torch.ones_like(tokens, dtype=torch.bool) if padding_mask is None else padding_mask
        e = self.emb[tokens]
        real = e * mask[..., None].to(e.dtype)
        mean = real.cumsum(dim=1) / mask.cumsum(dim=1).clamp(min=1)[..., None].to(e.dtype)
        h = torch.tanh(mean + 2.0 * e)
        logits = self.dropout(h) @ self.out
        return SimpleNamespace(logits=logits, memory_indices=_memory_indices(tokens, mask))


class UnigramLM(nn.Module):
    """log p(next = v) = logprobs[v] at every position, whatever the context."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        super().__init__()
        self.logprobs = nn.Parameter(logprobs.to(torch.float64))

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Any:
        mask = torch.ones_like(tokens, dtype=torch.bool) if padding_mask is None else padding_mask
        logits = self.logprobs.expand(*tokens.shape, -1).clone()
        return SimpleNamespace(logits=logits, memory_indices=_memory_indices(tokens, mask))


class OracleLM(nn.Module):
    """After a known prompt, emits its scripted continuation one character at a time, then EOS.

    Anything else predicts EOS. Respects padding_mask (only real tokens form the text).
    """

    def __init__(self, tokenizer: CharTokenizer, scripts: dict[str, str]) -> None:
        super().__init__()
        self.tok = tokenizer
        self.scripts = scripts
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter so the device can be inferred

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Any:
        mask = torch.ones_like(tokens, dtype=torch.bool) if padding_mask is None else padding_mask
        b, t = tokens.shape
        logits = torch.zeros(b, t, self.tok.vocab_size, dtype=torch.float64)
        for i in range(b):
            real = [int(x) for x, m in zip(tokens[i], mask[i]) if m]
            for pos in range(t):
                if not mask[i, pos]:
                    continue
                n_real = int(mask[i, :pos + 1].sum())
                text = self.tok.decode(real[:n_real])
                nxt = EOS
                for prompt, answer in self.scripts.items():
                    if text.startswith(prompt):
                        done = text[len(prompt):]
                        if answer.startswith(done) and len(done) < len(answer):
                            nxt = self.tok.id_of(answer[len(done)])
                logits[i, pos, nxt] = 10.0
        return SimpleNamespace(logits=logits, memory_indices=_memory_indices(tokens, mask))


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    answers: list[str]


@dataclass(frozen=True)
class Text:
    id: str
    text: str


@dataclass(frozen=True)
class HellaSwag:
    id: str
    ctx: str
    endings: list[str]
    label: int


@dataclass(frozen=True)
class GSM8K:
    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class SimpleQA:
    id: str
    question: str
    answer: str
    metadata: dict = field(default_factory=dict)


def qa_prompt(record: Any) -> str:
    return f"Question: {record.question}\nAnswer:"
