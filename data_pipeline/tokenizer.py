"""SentencePiece tokenizer wrapper, deterministic BPE training, and package-file lookup.

- ``load_tokenizer(spec)`` is what callers use: a sentencepiece ``.model`` -> :class:`Tokenizer`;
  ``"gguf:<path>"`` (or any GGUF file) -> the tokenizer in the GGUF's metadata, ``tokenizer.json`` or a
  local HF model directory -> HF ``tokenizers`` (:class:`data_pipeline.hf_tokenizer.HFTokenizer`, same interface).
- ``Tokenizer(path)`` loads any sentencepiece ``.model``. ``path`` may also be ``"pkg:<package>/<relpath>"``
  (e.g. ``"pkg:mistral_common/data/tokenizer.model.v1"``, the Llama-2-style 32k BPE the paper configs
  use), resolved with :func:`find_package_file` without importing the package.
- ``train_tokenizer(...)`` trains BPE with ``split_digits=True``, ``byte_fallback=True``, identity
  normalisation (so ``decode(encode(s)) == s`` for any string) and ids unk=0, bos=1, eos=2, pad=3.
  Training is deterministic: same input and options -> byte-identical ``.model`` (the model proto
  carries no input path or model prefix because we write through ``model_writer``).
- The tiny preset's tokenizer is committed at ``data_pipeline/tokenizers/tiny_bpe.model``
  (:data:`TINY_TOKENIZER`); ``python -m data_pipeline.make_data --samples ...`` rebuilds it from the
  committed prose sample.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data_pipeline.atomic import atomic_write
from data_pipeline.prompt_split import split_after_prompt

__all__ = ["Tokenizer", "load_tokenizer", "split_tokenizer_spec", "split_after_prompt", "train_tokenizer", "find_package_file", "resolve_path", "TINY_TOKENIZER"]

TINY_TOKENIZER = Path(__file__).resolve().parent / "tokenizers" / "tiny_bpe.model"
# sentencepiece silently drops training "sentences" longer than max_sentence_length bytes, so long
# documents are cut into pieces of at most this many characters (at whitespace) before training.
_MAX_PIECE_CHARS = 2000


def find_package_file(package: str, relpath: str) -> Path:
    """Path of ``relpath`` inside installed ``package``, found without importing the package.

    Raises FileNotFoundError (one line, saying to run ``make data``) when the package or file is missing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for {relpath}); run `make data` to install the pinned data packages")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relpath
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{relpath} not found in package {package!r}; run `make data` to install the pinned data packages")


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve ``"pkg:<package>/<relpath>"`` to an installed package file; other paths pass through."""
    s = str(path)
    if s.startswith("pkg:"):
        package, _, rel = s[len("pkg:"):].partition("/")
        if not package or not rel:
            raise ValueError(f"bad package path {s!r}; expected 'pkg:<package>/<relative path>'")
        return find_package_file(package, rel)
    return Path(path)


class Tokenizer:
    """A loaded sentencepiece model.

    ``encode(text, bos=True, eos=False) -> list[int]``; ``decode(ids) -> str`` (special and pad ids are
    dropped). ``pad_id`` is always a valid id >= 0: the model's own pad piece if it defines one,
    otherwise ``eos_id`` (Llama-2 models have no pad; padded positions are masked anyway).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} not found (the tiny one is committed at {TINY_TOKENIZER}; data/ ones come from `make data`)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path} is not a sentencepiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "use a .model file, gguf:<path>, a tokenizer.json or a HF model directory") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        if min(self.bos_id, self.eos_id, self.pad_id) < 0:
            raise ValueError(f"tokenizer {self.path} must define bos and eos pieces (bos={self.bos_id}, eos={self.eos_id})")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        head = [self.bos_id] if bos else []
        tail = [self.eos_id] if eos else []
        return [head + ids + tail for ids in self.sp.encode(texts)]

    def encode_pair(self, prompt: str, continuation: str, bos: bool = True) -> tuple[list[int], list[int]]:
        """Ids of ``prompt + continuation`` split into (prompt part, continuation part).

        Tokenises the joined string once (so the ids are what a model sees in training) and splits
        after the prompt's own tokens; if the boundary merged into one piece, the shared prefix is
        used. For ``eval_prompt(q)`` + ``" " + answer`` the split is exact with both shipped tokenizers.
        """
        return split_after_prompt(self.encode(prompt + continuation, bos=bos), self.encode(prompt, bos=bos))

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special and int(i) >= 0])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def split_tokenizer_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"gguf:<path>"`` -> ``("gguf", "<path>")``; anything else -> ``(None, spec)`` (kind found from the file)."""
    s = str(spec)
    if s.startswith("gguf:"):
        rest = s[len("gguf:"):]
        if not rest:
            raise ValueError("bad tokenizer spec 'gguf:'; expected gguf:<path to .gguf> or gguf:pkg:<package>/<relpath>")
        return "gguf", rest
    return None, s


def load_tokenizer(spec: str | os.PathLike, *, kind: str | None = None):
    """The tokenizer a spec names: :class:`Tokenizer` or :class:`~data_pipeline.hf_tokenizer.HFTokenizer`.

    ``spec``: ``"gguf:<path or pkg:package/relpath>"`` -> the GGUF's own tokenizer; a directory -> its
    ``tokenizer.json`` (a local HF model); a ``.json`` file -> that ``tokenizer.json``; a file starting
    with the GGUF magic -> GGUF; anything else (``.model``, ``pkg:...model.v1``) -> sentencepiece.
    ``kind="gguf"`` forces GGUF for a path whose prefix was already split off (:func:`split_tokenizer_spec`).
    Errors are one line (FileNotFoundError / ValueError) naming the file.
    """
    if kind is None:
        kind, rest = split_tokenizer_spec(spec)
        path = resolve_path(rest)
    else:
        path = resolve_path(spec)
    if kind not in (None, "gguf"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; use gguf:<path>, a tokenizer.json, a HF model directory or a .model")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} not found (gguf:pkg:<package>/<file> for a GGUF in an installed package; "
                                "data/ tokenizers come from `make data`)")
    from data_pipeline.hf_tokenizer import HFTokenizer, is_gguf_file

    if kind == "gguf" or (path.is_file() and path.suffix != ".json" and is_gguf_file(path)):
        return HFTokenizer.from_gguf(path)
    if path.is_dir() or path.suffix == ".json":
        return HFTokenizer.from_tokenizer_json(path)
    return Tokenizer(path)


def _split_long(text: str, max_chars: int = _MAX_PIECE_CHARS) -> Iterator[str]:
    for line in text.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def _training_lines(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[str]:
    """Lines from text files (.txt: lines; .jsonl[.zst|.zstd|.gz]: the "text" field) or from strings.

    A single ``str``/``Path`` argument is one file; inside an iterable, ``Path`` items are files and
    ``str`` items are texts (so a list of file names must be a list of ``Path``).
    """
    from data_pipeline.sources import load_source

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [Path(inputs)]
    for item in inputs:
        if not isinstance(item, os.PathLike):
            yield from _split_long(str(item))
        elif ".jsonl" in Path(item).name:
            for rec in load_source("text", item):
                yield from _split_long(rec.text)
        else:
            with open(item, encoding="utf-8") as f:
                for line in f:
                    yield from _split_long(line.rstrip("\n"))


def train_tokenizer(
    text_files_or_iter: Iterable[str | os.PathLike] | str | os.PathLike,
    out_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
) -> Path:
    """Train a sentencepiece model and write ``<out_prefix>.model``; returns that path.

    ``split_digits=True``, ``byte_fallback=True``, identity normalisation, no whitespace collapsing,
    ids unk=0 bos=1 eos=2 pad=3. All input sentences are used in input order (no sampling, no shuffle),
    so the output is byte-identical for the same input. Measured: 8k-vocab BPE on ~3 MB of prose ~3 s.
    """
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(text_files_or_iter),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=4 * _MAX_PIECE_CHARS + 16,
        num_threads=num_threads,
        minloglevel=2,
    )
    return atomic_write(out, model.getvalue())
