"""Retrofit a memory layer into a pretrained dense model (the library behind `recipes/retrofit.py`).

    retrofit("smollm2-135m", "runs/retrofit", layer=15, mode="parallel", memory={"num_slots": 256 ** 2},
             recovery_steps=0)

1. The base (a named base, a .gguf file or a HF model directory; model/pretrained.py) is converted into the
   project's Transformer with one memory layer at block `layer`: "parallel" beside the block's FFN with a zero
   values table, so the model computes exactly the base's function; "replace" instead of the FFN (needs recovery).
2. The result is written as an ordinary run directory, the format recipes/train.py writes: config.yaml (a
   pretrain stage of 0 steps whose model section is the retrofitted model: model.preset + model.overrides,
   data.tokenizer = the base's own tokenizer) and checkpoints/step_000000 (DCP model weights + the values table +
   trainer.json + COMPLETE.json). Every stage accepts it as --init_from; recipes/evaluate.py evaluates it.
3. Recovery (recovery_steps > 0) is a recipes/train.py pretrain stage started from that run directory with
   optim.trainable=memory (only the memory layer and its values table train; the base stays frozen) on the
   config's prose (data.text): the converted run then lives in OUTPUT_DIR/converted and OUTPUT_DIR is the
   recovery run (its latest checkpoint is the retrofitted model). It runs in this process through the trainer,
   so checkpoints, metrics.jsonl, summary.json and resuming work as for any stage.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

CONVERTED = "converted"
"""The converted (step 0) run inside OUTPUT_DIR when a recovery run follows."""
MODEL_YAML = "model.yaml"
"""OUTPUT_DIR/model.yaml: the model and tokenizer sections every later stage of this model needs (a config file
for --config, or to copy into one)."""


RECORDED_DEFAULTS = {"data.fact_offset": 100, "data.num_background_facts": 100}
"""Run-config defaults of a retrofit (overridable): the fact ranges fit the committed TriviaQA sample (300 facts),
so the recorded config validates and evaluates (recovery itself reads prose only: no known facts)."""


def job_config(pretrained, model_config, *, output_dir: str, max_steps: int, init_from: str = "",
               overrides: dict[str, Any] | None = None):
    """The pretrain-stage JobConfig of a retrofitted model (validated; max_steps may be 0: a conversion)."""
    from model.pretrained import model_section
    from training.config import resolve_config

    section = model_section(model_config, pretrained.preset)
    flat = {**RECORDED_DEFAULTS, "stage": "pretrain", "max_steps": max(1, max_steps), "output_dir": repr(output_dir),
            "init_from": repr(init_from), "optim.trainable": "memory",
            "model.preset": section["preset"], "model.overrides": section["overrides"],
            "data.tokenizer": repr(pretrained.tokenizer_spec)}
    from training.config import SparseSection
    if model_config.memory.num_slots < SparseSection.top_t:     # a small memory: t cannot exceed N
        flat["sparse.top_t"] = model_config.memory.num_slots
    for key in (overrides or {}):
        if key.startswith("model.") or key in ("model", "stage", "output_dir", "init_from", "max_steps"):
            raise ValueError(f"--{key}: the retrofit sets it (use --layer, --mode, --memory.KEY, --output_dir, "
                             "--recovery_steps)")
    config = resolve_config(None, {**flat, **(overrides or {})})
    return dataclasses.replace(config, max_steps=max_steps)


def write_run(run_dir: Path, model, config, *, info: dict[str, Any]) -> Path:
    """run_dir/config.yaml + checkpoints/step_000000 in the trainer's format (FSDP2 layout, one process)."""
    import yaml

    from training import checkpoint as C
    from training.distributed import DistInfo
    from training.parallel.fsdp2 import FSDP2Strategy

    run_dir.mkdir(parents=True, exist_ok=True)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    values = model.memory_values
    model.use_values(values)          # the table is saved beside the strategy's checkpoint, as the trainer's
    strategy = FSDP2Strategy(model, values=values, dist_info=dist_info)   # no process group: no sharding
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"fingerprint": config.fingerprint(), **config.to_dict()},
                                                        sort_keys=False))
    ckpt = C.save_checkpoint(run_dir, 0, strategy=strategy, values=values, values_optimizer=None,
                             sparse_state=None,
                             trainer_state={"stage": "pretrain", "method": "-", "fingerprint": config.fingerprint(),
                                            "natural_steps": None, "metrics_offset": 0, "retrofit": info},
                             rank_state={}, dist_info=dist_info, keep_latest=1)
    (run_dir / "retrofit.json").write_text(json.dumps(info, indent=1) + "\n")
    return ckpt


def _existing(run_dir: Path, fingerprint: str) -> bool:
    """True when run_dir already holds this conversion; ValueError when it holds something else."""
    from training import checkpoint as C
    found = C.list_checkpoints(run_dir)
    if not found and not (run_dir / "config.yaml").exists():
        return False
    if found and C.read_trainer_state(found[0]).get("fingerprint") == fingerprint:
        return True
    raise ValueError(f"output_dir {run_dir} holds another run (see {run_dir / 'config.yaml'}); use a new "
                     "--output_dir or delete it")


def function_gap(model, vocab_size: int, *, seq_len: int = 16, seed: int = 0) -> float:
    """Max |logit difference| between the model and the model with its memory switched off, on random tokens:
    0.0 exactly when the memory adds nothing (a parallel retrofit before training computes the base's function)."""
    from evaluation.memory_diagnostics import memory_off
    tokens = torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        on = model(tokens).logits
        with memory_off(model):
            off = model(tokens).logits
    return float((on - off).abs().max())


def retrofit(base: str, output_dir: str, *, layer: int | None = None, mode: str = "parallel",
             memory: dict[str, Any] | None = None, recovery_steps: int = 0, seed: int = 0,
             overrides: dict[str, Any] | None = None, deepspeed_configs: str | Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert `base`, insert the memory, write the run directory, optionally recover. Returns what it did
    (output_dir, the converted run, the model section, the function gap, the recovery summary).
    `overrides`: run-config keys (--optim.lr, --data.text, --device, ...) for the recorded config and recovery;
    `deepspeed_configs`: the folder of zero{N}.json for a zero* recovery (recipes/train.py's)."""
    from model.pretrained import build_pretrained, load_pretrained, model_section, retrofit_config
    from training.paths import output_path_problem

    if not isinstance(recovery_steps, int) or isinstance(recovery_steps, bool) or recovery_steps < 0:
        raise ValueError(f"--recovery_steps must be an integer >= 0, got {recovery_steps!r}")
    if mode not in ("parallel", "replace"):
        raise ValueError(f"--mode={mode!r} is not one of parallel, replace")
    problem = output_path_problem(output_dir, want_dir=True)
    if problem is not None:
        raise ValueError(f"--output_dir {output_dir!r} {problem}; pass a new directory")
    out = Path(output_dir)
    converted = out / CONVERTED if recovery_steps else out
    pretrained = load_pretrained(base)
    model_config = retrofit_config(pretrained, layer=layer, mode=mode, memory=memory)
    overrides = dict(overrides or {})
    overrides.setdefault("seed", seed)
    config = job_config(pretrained, model_config, output_dir=str(converted), max_steps=0, overrides=overrides)
    section = model_section(model_config, pretrained.preset)
    info = {"base": str(base), "source": str(pretrained.source), "layer": model_config.memory_layers[0],
            "mode": mode, "model": section, "tokenizer": config.data.tokenizer, "seed": config.seed}
    result: dict[str, Any] = {"output_dir": str(out), "converted": str(converted), **info}
    if _existing(converted, config.fingerprint()):
        log(f"{converted}: this conversion is already there; reusing it")
    else:
        model = build_pretrained(pretrained, model_config, seed=config.seed)
        gap = function_gap(model, model_config.vocab_size)
        info["function_gap"] = result["function_gap"] = gap
        counts = model.num_params()
        info["params"] = counts
        log(f"{pretrained.source.name}: {counts['dense'] / 1e6:.1f}M dense parameters; memory at block "
            f"{info['layer']} ({mode}): {counts['memory_values'] / 1e6:.1f}M values + "
            f"{counts['memory_other'] / 1e6:.2f}M keys/projections; max |logit change| from the memory = {gap:.3g}")
        if mode == "parallel" and model_config.memory.value_init_std == 0.0 and gap != 0.0:
            raise AssertionError(f"a parallel retrofit with a zero values table changed the logits by {gap}")
        ckpt = write_run(converted, model, config, info=info)
        del model
        log(f"wrote {ckpt}")
    import yaml
    stage_keys = {"model": section, "data": {"tokenizer": config.data.tokenizer}}
    (out / MODEL_YAML).write_text(yaml.safe_dump(stage_keys, sort_keys=False))
    if recovery_steps:
        from training.config import with_deepspeed_default
        from training.trainer import run
        recovery = job_config(pretrained, model_config, output_dir=str(out), max_steps=recovery_steps,
                              init_from=str(converted), overrides=overrides)
        log(f"recovery: {recovery_steps} pretrain steps on {', '.join(recovery.data.text)} training only the "
            f"memory (optim.trainable=memory, lr {recovery.optim.lr})")
        if deepspeed_configs is not None:
            recovery = with_deepspeed_default(recovery, deepspeed_configs)
        result["recovery"] = run(recovery)
    log(f"done: --init_from={out} with the model section of {out / MODEL_YAML} "
        f"(model.preset={section['preset']}" + (f", model.overrides={section['overrides']}" if section["overrides"]
                                                else "") + f"; data.tokenizer={config.data.tokenizer})")
    return result
