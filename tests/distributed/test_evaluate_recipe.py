"""recipes/evaluate.py on a real (tiny, 2-step) pretrain checkpoint: one process and 2-rank torchrun write
the same JSON, equal to the metrics computed in-process from the checkpoint files; bad input fails in
one line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, SMALL, env, train

pytestmark = pytest.mark.distributed

EVALUATE = REPO / "recipes" / "evaluate.py"
SETS = ["new_facts", "known_facts", "heldout_text"]
PRETRAIN = ["--config", "recipes/configs/tiny_pretrain.yaml", "--max_steps=2", *SMALL]


def evaluate(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(EVALUATE), *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("evaluate") / "pre"
    train(*PRETRAIN, f"--output_dir={run}", nproc=1)
    return run


def in_process_metrics(run: Path, *, memory_off: bool = False) -> dict[str, float]:
    """The same metrics from the checkpoint files directly: a plain (unsharded) model, no recipe code."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from evaluation import evaluate_sets
    from model import build_model
    from training.config import resolve_config
    from training.data import eval_sets, load_facts, load_tokenizer

    overrides = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in PRETRAIN[2:]}
    config = resolve_config("recipes/configs/tiny_pretrain.yaml", {**overrides, "eval.sets": SETS})
    ckpt = run / "checkpoints" / "step_000002"
    model = build_model(config.model_config(), device="cpu")
    state = {k: v for k, v in model.state_dict().items() if k != "memory_values"}
    dcp.load({"model": state}, checkpoint_id=str(ckpt / "sharded"))
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.memory_values.copy_(load_file(str(ckpt / "values.safetensors"))["values"])
    tokenizer = load_tokenizer(config, model.config.vocab_size)
    sets = eval_sets(config, load_facts(config))
    if memory_off:   # the ablation by hand: zero output projections of every memory layer
        with torch.no_grad():
            for block in model.layers:
                if block.memory is not None:
                    block.memory.out.weight.zero_()
    return evaluate_sets(model, tokenizer, sets, batch_size=config.eval.batch_size, max_items=4,
                         device="cpu", options={n: {"max_new_tokens": config.eval.max_new_tokens}
                                                for n in ("new_facts", "known_facts")})


def test_evaluate_writes_the_in_process_metrics(pretrain_run: Path, tmp_path: Path) -> None:
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    # a run directory resolves to its latest checkpoint; --sets as a comma list, max_items from the flag
    evaluate("--checkpoint", str(pretrain_run), "--sets", ",".join(SETS), "--max_items", "4", "--out", str(out1))
    one = json.loads(out1.read_text())
    assert one["checkpoint"] == str(pretrain_run / "checkpoints" / "step_000002") and one["step"] == 2
    expected = {f"{s}/{m}" for s in ("new_facts", "known_facts") for m in ("f1", "em", "answer_nll")} | {"heldout_text/nll"}
    assert set(one["metrics"]) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in one["metrics"].values())
    assert one["metrics"]["heldout_text/nll"] > 1.0       # a 2-step model is far from the data: not vacuous
    assert one["metrics"] == in_process_metrics(pretrain_run)

    # a checkpoint directory, 2 ranks (the run had 1): the sharded evaluation gives the same numbers
    evaluate("--checkpoint", str(pretrain_run / "checkpoints" / "step_000002"), f"--sets={','.join(SETS)}",
             "--eval.max_items=4", "--out", str(out2), nproc=2)
    assert json.loads(out2.read_text()) == one


def test_evaluate_with_the_memory_switched_off(pretrain_run: Path) -> None:
    """--memory_off: the model without its memory layers' output, next to the checkpoint by default."""
    evaluate("--checkpoint", str(pretrain_run), "--sets", ",".join(SETS), "--max_items", "4", "--memory_off")
    out = json.loads((pretrain_run / "checkpoints" / "step_000002" / "eval_memory_off.json").read_text())
    assert out["memory_off"] is True
    assert out["metrics"] == pytest.approx(in_process_metrics(pretrain_run, memory_off=True), rel=1e-6)
    assert out["metrics"]["heldout_text/nll"] != pytest.approx(in_process_metrics(pretrain_run)["heldout_text/nll"],
                                                              rel=1e-7)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "{tmp}/nowhere"], "no such directory"),
    (["--checkpoint", "{tmp}"], "no complete checkpoint"),
    (["--checkpoint", "{run}", "--sets", "new_facts,bogus"], "unknown set 'bogus'"),
    (["--sets", "new_facts"], "--checkpoint"),
])
def test_bad_input_fails_in_one_line(pretrain_run: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    args = [a.format(tmp=tmp_path, run=pretrain_run) for a in args]
    proc = evaluate(*args, "--out", str(tmp_path / "x.json"), check=False)
    assert needle in one_line_error(proc)
    assert not (tmp_path / "x.json").exists()
