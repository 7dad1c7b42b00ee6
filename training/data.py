"""What each stage reads: streams for training and the sets for evaluation, built from the job config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import Tokenizer, load_source, resolve_path
from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.tokenizer import load_tokenizer as load_tokenizer_spec
from data_pipeline.tokenizer import split_tokenizer_spec
from data_pipeline.documents import DocumentStream, load_documents
from data_pipeline.facts import FactStream
from data_pipeline.lm_stream import LMStream, MixedStream, StatementStream, load_texts

REPO_ROOT = Path(__file__).resolve().parent.parent
HELDOUT_DOCS = 64   # the last documents of data.text are never trained on: held-out text NLL
HELDOUT_CHARS = 2000   # each held-out document is scored on its first characters (bounded eval cost)


def data_path(path: str, *, key: str) -> Path:
    """A configured path: absolute, relative to the working directory, or relative to the repo root."""
    if not path:
        raise ValueError(f"config key '{key}' is empty; set it to a data file")
    resolved = resolve_path(path)
    if resolved.is_absolute() or resolved.exists():
        return resolved
    candidate = REPO_ROOT / resolved
    if candidate.exists():
        return candidate
    raise ValueError(f"config key '{key}': {path} does not exist (run `make data` for data/ files)")


def load_tokenizer(config, vocab_size: int) -> Tokenizer | HFTokenizer:
    """The tokenizer ``data.tokenizer`` names (a sentencepiece ``.model``, ``gguf:<path or pkg:...>``, a
    ``tokenizer.json`` or a HF model directory; see :func:`data_pipeline.tokenizer.load_tokenizer`), checked
    against the model's vocab_size. Errors are one line naming the key."""
    try:
        kind, rest = split_tokenizer_spec(config.data.tokenizer)
    except ValueError as e:
        raise ValueError(f"config key 'data.tokenizer': {e}") from None
    path = data_path(rest, key="data.tokenizer")
    try:
        tok = load_tokenizer_spec(path, kind=kind)
    except (ValueError, OSError) as e:
        raise ValueError(f"config key 'data.tokenizer': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}; set --model.vocab_size={tok.vocab_size} or use the matching tokenizer")
    return tok


@dataclass
class Facts:
    known: list
    new: list
    background: list


def load_facts(config) -> Facts:
    d = config.data
    records = load_source("triviaqa", data_path(d.facts, key="data.facts"))
    end_new = d.fact_offset + d.num_new_facts
    start_bg = end_new if d.background_offset < 0 else d.background_offset
    need = max(d.num_known_facts, end_new, start_bg + d.num_background_facts)
    if len(records) < need:
        raise ValueError(f"config key 'data.facts': {d.facts} has {len(records)} facts, the config needs {need} "
                         "(num_known_facts, fact_offset + num_new_facts, background_offset + num_background_facts)")
    if d.num_known_facts > d.fact_offset:
        raise ValueError("config key 'data.fact_offset' must be >= data.num_known_facts (new facts must be "
                         "disjoint from known ones)")
    if d.num_background_facts and (start_bg < d.num_known_facts
                                   or (start_bg < end_new and start_bg + d.num_background_facts > d.fact_offset)):
        raise ValueError(f"config key 'data.background_offset'={d.background_offset}: the background facts "
                         f"[{start_bg}, {start_bg + d.num_background_facts}) overlap the known [0, {d.num_known_facts}) "
                         f"or new [{d.fact_offset}, {end_new}) facts; they must be disjoint")
    return Facts(known=records[:d.num_known_facts], new=records[d.fact_offset:end_new],
                 background=records[start_bg:start_bg + d.num_background_facts])


def _texts(config) -> list[str]:
    texts = load_texts([data_path(p, key="data.text") for p in config.data.text])
    if len(texts) <= 2 * HELDOUT_DOCS:
        return texts   # too small to hold anything out (tests); held-out NLL then reuses them
    return texts[:-HELDOUT_DOCS]


def _text_paths(config) -> list[Path]:
    return [data_path(p, key="data.text") for p in config.data.text]


def _text_stream(config, tokenizer: Tokenizer, *, batch_size: int, rank: int, world_size: int):
    """data.text packed into windows: in RAM (LMStream), or streamed from the files (data.streaming)."""
    d = config.data
    if d.streaming:
        from data_pipeline.hf_stream import StreamingLMStream
        return StreamingLMStream(_text_paths(config), tokenizer, seq_len=d.seq_len, batch_size=batch_size,
                                 rank=rank, world_size=world_size, seed=config.seed, shuffle_buffer=d.shuffle_buffer,
                                 skip_docs=HELDOUT_DOCS)
    return LMStream(_texts(config), tokenizer, seq_len=d.seq_len, batch_size=batch_size, rank=rank,
                    world_size=world_size, seed=config.seed)


def heldout_texts(config) -> list:
    if config.eval.heldout_text:
        return list(load_source("text", data_path(config.eval.heldout_text, key="eval.heldout_text")))
    if config.data.streaming:   # the first documents, which the streaming training path skips
        import itertools

        from data_pipeline.hf_stream import stream_text_dataset
        from data_pipeline import TextRecord
        rows = itertools.islice(stream_text_dataset(_text_paths(config)), HELDOUT_DOCS)
        return [TextRecord(id=f"heldout-{i}", text=row["text"][:HELDOUT_CHARS]) for i, row in enumerate(rows)]
    texts = load_texts([data_path(p, key="data.text") for p in config.data.text])
    from data_pipeline import TextRecord
    tail = texts[-HELDOUT_DOCS:]
    return [TextRecord(id=f"heldout-{i}", text=t[:HELDOUT_CHARS]) for i, t in enumerate(tail)]


def _split(total: int, world_size: int, key: str) -> int:
    if total % world_size:
        raise ValueError(f"config key '{key}'={total} must be divisible by the number of ranks ({world_size})")
    return total // world_size


def lm_stream(config, tokenizer: Tokenizer, facts: list, *, rank: int, world_size: int):
    """Prose windows mixed with fact statements (known facts for pretraining, others for background)."""
    d = config.data
    per_rank = _split(d.batch_size, world_size, "data.batch_size")
    num_fact_rows = round(per_rank * d.fact_ratio) if facts else 0
    streams = [_text_stream(config, tokenizer, batch_size=per_rank - num_fact_rows, rank=rank, world_size=world_size)
               ] if per_rank > num_fact_rows else []
    if num_fact_rows:
        streams.append(StatementStream(facts, tokenizer, seq_len=d.seq_len, batch_size=num_fact_rows, rank=rank,
                                       world_size=world_size, seed=config.seed,
                                       paraphrase_file=d.paraphrase_file or None,
                                       variation_prefixes=d.statement_prefixes, pack=d.pack_statements))
    return MixedStream(streams)


def finetune_stream(config, tokenizer: Tokenizer, facts: Facts):
    """One step = one fact's P paraphrases (or one chunk's P augmentations); every rank builds the full
    batch and trains on its rows [rank::world] (see `shard_rows`)."""
    d = config.data
    if d.documents:
        docs = load_documents(data_path(d.documents, key="data.documents"))
        if d.num_documents:
            if d.num_documents > len(docs):
                raise ValueError(f"config key 'data.num_documents'={d.num_documents}: {d.documents} holds only "
                                 f"{len(docs)} documents; lower it (0 = all)")
            docs = docs[:d.num_documents]
        return DocumentStream(docs, tokenizer, num_augmentations=d.num_paraphrases, seq_len=d.seq_len,
                              seed=config.seed, num_passes=d.passes)
    return FactStream(facts.new, tokenizer, num_paraphrases=d.num_paraphrases, seq_len=d.seq_len,
                      paraphrase_file=d.paraphrase_file or None, seed=config.seed, num_passes=d.passes)


def shard_rows(batch, rank: int, world_size: int):
    from data_pipeline import Batch
    if batch.tokens.shape[0] < world_size:
        raise ValueError(f"config key 'data.num_paraphrases'={batch.tokens.shape[0]} is smaller than the number "
                         f"of ranks ({world_size})")
    sl = slice(rank, None, world_size)
    return Batch(tokens=batch.tokens[sl], padding_mask=batch.padding_mask[sl], labels=batch.labels[sl],
                 fact_id=batch.fact_id, num_truncated=batch.num_truncated,
                 answer_mask=batch.answer_mask[sl] if batch.answer_mask is not None else None)


def eval_sets(config, facts: Facts, stream: Any = None) -> dict[str, tuple[str, list]]:
    """`<set name> -> (kind, records)` for evaluation.sets."""
    out: dict[str, tuple[str, list]] = {}
    for name in config.eval.sets:
        if name == "new_facts":
            questions = getattr(stream, "questions", None) if config.data.documents else None
            out[name] = ("qa", list(questions) if questions else facts.new)
        elif name == "known_facts":
            if facts.known:
                out[name] = ("qa", facts.known)
        elif name == "heldout_text":
            out[name] = ("text_nll", heldout_texts(config))
        elif name == "nq":
            out[name] = ("qa", load_source("nq_open", data_path(config.eval.nq, key="eval.nq")))
        elif name == "hellaswag":
            out[name] = ("hellaswag", load_source("hellaswag", data_path(config.eval.hellaswag, key="eval.hellaswag")))
        elif name == "gsm8k":
            out[name] = ("gsm8k", load_source("gsm8k", data_path(config.eval.gsm8k, key="eval.gsm8k")))
        else:
            raise ValueError(f"config key 'eval.sets': unknown set '{name}' (new_facts, known_facts, heldout_text, "
                             "nq, hellaswag, gsm8k)")
    return out
