"""A pretrained model's own tokenizer, backed by HF ``tokenizers``: from a GGUF file's metadata or a ``tokenizer.json``.

:class:`HFTokenizer` has exactly the interface of the sentencepiece :class:`~data_pipeline.tokenizer.Tokenizer`
(``encode``, ``encode_batch``, ``encode_pair``, ``decode``, ``vocab_size``, ``bos_id``/``eos_id``/``pad_id``/
``unk_id``, ``path``), so every stream and evaluation takes either. Build it with
:func:`data_pipeline.tokenizer.load_tokenizer` (``data.tokenizer=gguf:<path or pkg:...>``, a ``tokenizer.json``
or a local HF model directory), not directly.

**From a GGUF** (:meth:`HFTokenizer.from_gguf`): llama.cpp's ``tokenizer.ggml.*`` metadata, read with ``gguf``,
becomes a byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the vocabulary is ``tokens`` (id = position),
the merges are ``merges`` (ranked in file order), tokens typed CONTROL (3) are special added tokens and
USER_DEFINED (4) plain added tokens (matched whole in text, as llama.cpp does), and the decoder is byte-level.
The pre-tokenizer follows ``tokenizer.ggml.pre``, as llama.cpp does: ``"gpt2"`` is GPT-2's split regex; the
digit-isolating family (``"smollm"``, ``"starcoder"``, ``"refact"``, ...) first cuts every digit out on its own
(llama.cpp's ``\\p{N}`` split; HF's ``Digits(individual_digits=True)``), then applies GPT-2's regex — this is
SmolLM2's own ``tokenizer.json`` pre-tokenizer, and its vocabulary has no multi-digit token. (transformers'
GGUF conversion ignores ``pre = "smollm"`` and so differs on e.g. ``"  1"``; on ordinary text both agree,
which ``tests/unit/test_hf_tokenizer.py`` checks.) Other ``pre`` values and other ``tokenizer.ggml.model``
kinds are refused with a one-line error: point ``data.tokenizer`` at the model's ``tokenizer.json`` instead.

**Special ids.** ``bos_id``/``eos_id``/``unk_id`` are the GGUF's ``*_token_id`` (for a ``tokenizer.json``:
``tokenizer_config.json``'s ``bos_token``/``eos_token``/``unk_token``, else ``config.json``'s ids). Pad rule:
the model's own padding id (``tokenizer.ggml.padding_token_id`` / ``pad_token``) if it has one, else
``eos_id`` — padded positions are masked by ``padding_mask`` and labelled -100 whatever id they hold, so
the choice never reaches a loss. A model without a bos token (Qwen) uses ``eos_id`` as bos: the pipeline
always starts a row with ``bos_id``, and a pretraining document follows the end-of-text separator.
``add_bos`` records the file's ``add_bos_token`` flag (SmolLM2: False); the pipeline's ``bos=True`` still
prepends ``bos_id``, as for sentencepiece.

**Text stays text.** Special-token strings in the input (``"<|endoftext|>"`` in a web page) are encoded as
ordinary text, never as control ids (as sentencepiece does), so ``decode(encode(s)) == s`` for any string
(``decode`` drops special ids). Byte-level ``decode`` keeps a leading space: the answer ids of
``encode_pair(prompt, " Paris")`` decode to ``" Paris"`` (sentencepiece gives ``"Paris"``); answer scoring
normalises whitespace.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_pipeline.prompt_split import split_after_prompt

__all__ = ["HFTokenizer", "GGUF_PRE_TOKENIZERS", "is_gguf_file"]

# tokenizer.ggml.pre values (llama.cpp's names) whose split we rebuild exactly. "digits": llama.cpp's
# {"\p{N}", gpt2 regex} family (LLAMA_VOCAB_PRE_TYPE_STARCODER/REFACT/SMOLLM/CODESHELL/...).
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    "gpt2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
}
_CONTROL, _USER_DEFINED = 3, 4   # gguf.TokenType


def _require(module: str):
    """Import an optional dependency, or a one-line ValueError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the model's own tokenizer needs the `{module.split('.')[0]}` package; "
                         "run `make setup` (it installs the pinned gguf and tokenizers)") from None


def is_gguf_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of every byte-level BPE token)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file (``tokenizer.ggml.`` stripped), plus ``architecture``."""
    del mtime_ns, size   # cache key only
    gguf = _require("gguf")

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct.error/IndexError on a broken file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})".splitlines()[0]) from None
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml."):]] = field.contents()
        elif key == "general.architecture":
            out["architecture"] = field.contents()
    return out


def _special_content(value: Any) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (tokenizer_config.json's two spellings) -> ``"<s>"``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A pretrained model's tokenizer (HF ``tokenizers``) with the sentencepiece wrapper's interface.

    ``encode(text, bos=True, eos=False) -> list[int]``; ``decode(ids) -> str`` (special and pad ids are
    dropped). See the module docstring for how it is built and the bos/pad rules.
    """

    def __init__(self, backend: Any, *, path: Path, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False, kind: str = "tokenizer.json") -> None:
        self.tk = backend
        self.path = Path(path)
        self.kind = kind
        if eos_id is None or not 0 <= eos_id < vocab_size:
            raise ValueError(f"tokenizer {self.path} defines no eos token; use the model's own tokenizer "
                             "(a GGUF with tokenizer.ggml.eos_token_id, or tokenizer.json beside tokenizer_config.json)")
        self.vocab_size: int = int(vocab_size)
        self.eos_id: int = int(eos_id)
        self.bos_id: int = int(bos_id) if bos_id is not None and 0 <= bos_id < vocab_size else self.eos_id
        self.pad_id: int = int(pad_id) if pad_id is not None and 0 <= pad_id < vocab_size else self.eos_id
        self.unk_id: int = int(unk_id) if unk_id is not None and 0 <= unk_id < vocab_size else -1
        self.add_bos: bool = bool(add_bos)
        # Special-token strings in input text are text (like sentencepiece), never control ids.
        self.tk.encode_special_tokens = True
        self._special = {self.bos_id, self.eos_id, self.pad_id} | {
            int(i) for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer in a GGUF file's metadata (byte-level BPE, ``tokenizer.ggml.model = "gpt2"``)."""
        tk = _require("tokenizers")
        AddedToken, Tokenizer, decoders, models, pre_tokenizers = (
            tk.AddedToken, tk.Tokenizer, tk.decoders, tk.models, tk.pre_tokenizers)

        path = Path(path)
        if not is_gguf_file(path):
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic); gguf:<path> must name a .gguf model file")
        st = path.stat()
        meta = _gguf_tokenizer_metadata(str(path), st.st_mtime_ns, st.st_size)
        model = meta.get("model")
        if model is None or "tokens" not in meta:
            raise ValueError(f"{path} has no tokenizer metadata (tokenizer.ggml.model/tokens); use a GGUF that "
                             "embeds its tokenizer, or point data.tokenizer at the model's tokenizer.json")
        if model != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE, 'gpt2'); "
                             "point data.tokenizer at the model's tokenizer.json or sentencepiece .model instead")
        pre = meta.get("pre")
        split = GGUF_PRE_TOKENIZERS.get(pre)
        if split is None:
            raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: {sorted(GGUF_PRE_TOKENIZERS)}); "
                             "point data.tokenizer at the model's tokenizer.json instead")
        tokens: list[str] = list(meta["tokens"])
        types: list[int] = [int(t) for t in meta.get("token_type", [])] or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
                tok = "".join(spelling[b] for b in tok.encode("utf-8"))   # a token stored as raw text
            if tok in vocab:
                raise ValueError(f"{path}: token {tok!r} appears twice in tokenizer.ggml.tokens (ids {vocab[tok]} and {i})")
            vocab[tok] = i
        merges: list[tuple[str, str]] = []
        for m in meta.get("merges", []):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b or " " in b:
                raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
            merges.append((a, b))
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if split == "digits" else byte_level)
        backend.decoder = decoders.ByteLevel()
        added = [AddedToken(t, special=typ == _CONTROL, normalized=False)
                 for t, typ in zip(tokens, types) if typ in (_CONTROL, _USER_DEFINED)]
        backend.add_tokens(added)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"{path}: built {backend.get_vocab_size(with_added_tokens=True)} ids from {len(tokens)} tokens")

        def tid(key: str) -> int | None:
            v = meta.get(key)
            return int(v) if v is not None else None

        return cls(backend, path=path, vocab_size=len(tokens), bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
                   pad_id=tid("padding_token_id"), unk_id=tid("unknown_token_id"),
                   add_bos=bool(meta.get("add_bos_token", False)), kind=f"gguf:{pre}")

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> HFTokenizer:
        """A ``tokenizer.json`` (or a HF model directory holding one); special tokens from the
        ``tokenizer_config.json`` / ``config.json`` beside it."""
        Tokenizer = _require("tokenizers").Tokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; a HF model directory must hold tokenizer.json")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{file} is not a HF tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        tc, mc = _read_json(directory / "tokenizer_config.json"), _read_json(directory / "config.json")

        def special(name: str, config_key: str) -> int | None:
            content = _special_content(tc.get(name))
            if content is not None and backend.token_to_id(content) is not None:
                return int(backend.token_to_id(content))
            value = mc.get(config_key)
            if isinstance(value, list):
                value = value[0] if value else None
            return int(value) if isinstance(value, int) else None

        count = backend.get_vocab_size(with_added_tokens=True)
        model_vocab = mc.get("vocab_size") or mc.get("text_config", {}).get("vocab_size")
        # The embedding table the model was built for may be padded past the tokenizer's ids (Qwen2.5).
        vocab_size = int(model_vocab) if isinstance(model_vocab, int) and model_vocab >= count else count
        return cls(backend, path=file, vocab_size=vocab_size, bos_id=special("bos_token", "bos_token_id"),
                   eos_id=special("eos_token", "eos_token_id"), pad_id=special("pad_token", "pad_token_id"),
                   unk_id=special("unk_token", "unk_token_id"), add_bos=bool(tc.get("add_bos_token", False)))

    # -- the sentencepiece wrapper's interface -----------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        # One text at a time: encode_batch would start the Rust thread pool, which a later fork
        # (data loader workers) must then disable with a warning; rows here are short.
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def encode_pair(self, prompt: str, continuation: str, bos: bool = True) -> tuple[list[int], list[int]]:
        """Ids of ``prompt + continuation`` split into (prompt part, continuation part).

        Tokenises the joined string once (the ids a model sees in training) and splits after the
        prompt's own tokens; if the boundary merged into one piece, the shared prefix is used. With a
        byte-level BPE the leading space of ``" " + answer`` belongs to the answer's first token
        (``"ĠParis"``), and punctuation, letters and digits never merge across a space, so for
        ``eval_prompt(q)`` + ``" " + answer`` the prompt part is exactly ``encode(prompt)``.
        """

        return split_after_prompt(self.encode(prompt + continuation, bos=bos), self.encode(prompt, bos=bos))

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special]
        return self.tk.decode(keep, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"
