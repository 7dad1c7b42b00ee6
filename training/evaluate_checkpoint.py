"""Evaluate any checkpoint (the library behind `recipes/evaluate.py --checkpoint DIR [--sets ...] [--out FILE.json]`).

The model is rebuilt the way the trainer builds it (meta -> LoRA if the run used it -> strategy seam ->
materialise -> `strategy.load(model_only=True)` -> values table from `values.safetensors`), with the
run's resolved `config.yaml`, and the sets are evaluated by `evaluation.evaluate_sets` — sharded over
the ranks when launched with torchrun, with the same numbers as one process. Rank 0 writes

    {"checkpoint": ".../checkpoints/step_000200", "step": 200, "metrics": {"<set>/<metric>": value}}

(non-finite values are written as null: JSON has no NaN).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write

KNOWN_SETS = ("new_facts", "known_facts", "heldout_text", "nq", "hellaswag", "gsm8k")


# what to do when the checkpoint to evaluate fails its manifest check
_REMEDY = ("evaluate another checkpoint (--checkpoint RUN/checkpoints/step_N with a COMPLETE.json) or finish "
           "the run that wrote this one")


def locate(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint dir, run dir or None) for a run directory or a checkpoint directory, verified against the
    checkpoint's manifest (COMPLETE.json: every file with its size), as the trainer verifies what it loads."""
    from training.checkpoint import list_checkpoints, verify_checkpoint

    path = Path(checkpoint)
    if (path / "trainer.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        verify_checkpoint(path, remedy=_REMEDY)
        return path, run_dir
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            verify_checkpoint(found[-1], remedy=_REMEDY)
            return found[-1], path
        raise ValueError(f"--checkpoint {path}: no complete checkpoint in it (expected checkpoints/step_*/"
                         "trainer.json, or a checkpoint directory); has the run saved one yet?")
    raise ValueError(f"--checkpoint {path}: no such directory")


def _as_override(value: Any) -> Any:
    # resolve_config literal-evals strings (CLI words); quote the config file's strings so they stay strings
    return repr(value) if isinstance(value, str) else value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.overrides" and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = _as_override(value)
    return out


def resolve_eval_config(ckpt: Path, run_dir: Path | None, *, config_path: str | None,
                        overrides: dict[str, Any], deepspeed_configs: str | Path | None = None):
    """The run's config.yaml (or `config_path`) + CLI overrides, validated like the trainer's; a zero* run
    that names no DeepSpeed JSON gets DEEPSPEED_CONFIGS/zero{N}.json (config.with_deepspeed_default)."""
    from training.config import load_yaml, resolve_config, with_deepspeed_default

    if config_path is None:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            where = run_dir / "config.yaml" if run_dir is not None else f"a run directory above {ckpt}"
            raise ValueError(f"no resolved config at {where}; pass --config CONFIG.yaml with the model and data "
                             "settings the checkpoint was trained with")
        config_path = str(run_dir / "config.yaml")
    data = load_yaml(config_path)
    data.pop("fingerprint", None)        # written next to the resolved config; not a config key
    flat = _flatten(data)
    if not flat.get("init_from") and "init_from" not in overrides:
        # background/finetune configs require init_from; evaluation never reads it
        flat["init_from"] = repr(str(ckpt))
    if data.get("stage") == "pretrain" and not data.get("max_steps") and "max_steps" not in overrides:
        # a 0-step pretrain run (a converted pretrained model, recipes/retrofit.py); evaluation never reads it
        flat["max_steps"] = 1
    config = resolve_config(None, {**flat, **overrides})
    return with_deepspeed_default(config, deepspeed_configs) if deepspeed_configs else config


def _requested_sets(sets: Any) -> list[str] | None:
    if sets is None:
        return None
    names = [s.strip() for s in (sets.split(",") if isinstance(sets, str) else map(str, sets)) if s.strip()]
    if not names:
        raise ValueError("--sets is empty; name at least one set")
    unknown = [s for s in names if s not in KNOWN_SETS]
    if unknown:
        raise ValueError(f"--sets: unknown set '{unknown[0]}' (choose from {', '.join(KNOWN_SETS)})")
    return names


def build_sets(config, tokenizer, *, explicit: bool) -> dict[str, tuple[str, list]]:
    """`training.data.eval_sets` for config.eval.sets; an explicitly requested but empty set is an error."""
    from training.data import eval_sets, finetune_stream, load_facts

    facts = load_facts(config)
    stream = None
    if config.data.documents and "new_facts" in config.eval.sets:
        stream = finetune_stream(config, tokenizer, facts)    # document learning: its questions are the set
    sets = eval_sets(config, facts, stream)
    missing = [s for s in config.eval.sets if s not in sets]
    if missing and explicit:
        raise ValueError(f"--sets: set '{missing[0]}' is empty in this config (known_facts needs "
                         "data.num_known_facts > 0)")
    return sets


def load_model(config, ckpt: Path, dist_info):
    """Build on meta, parallelize through the strategy seam, materialise, load the checkpoint's weights.

    Returns the strategy (its `.module` is what to evaluate). Everything is frozen: evaluation only.
    """
    from training import checkpoint as C
    from training.build import build_parallel_model

    def freeze(model, lora: set[str]) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
    strategy, lora_names = build_parallel_model(config, dist_info, set_trainable=freeze)
    if dist_info.distributed:
        # Nothing trains; the strategy builds what its forward needs (ZeRO-3: the engine that gathers
        # the partitions materialize left on each rank), as the trainer does before loading.
        strategy.setup_optimizer([], lambda params: None)
    if lora_names:   # a LoRA config on a base checkpoint: the adapters start as the identity (B = 0)
        strategy.load(str(ckpt / "sharded"), model_only=True, allow_missing=lambda k: k in lora_names)
    else:
        strategy.load(str(ckpt / "sharded"), model_only=True)
    if strategy.values is not None:
        C.load_values(ckpt, strategy.values, None)
    return strategy


def evaluate_module(config, module, tokenizer, sets, device, items: dict[str, list] | None = None) -> dict[str, float]:
    """The trainer's evaluation call: config.eval sizes, greedy QA of eval.max_new_tokens tokens (`items`: see
    evaluation.evaluate_sets)."""
    from evaluation import evaluate_sets

    return evaluate_sets(module, tokenizer, sets, batch_size=config.eval.batch_size,
                         max_items=config.eval.max_items, device=device,
                         options={n: {"max_new_tokens": config.eval.max_new_tokens}
                                  for n, (kind, _) in sets.items() if kind == "qa"}, items=items)


def evaluate_checkpoint(checkpoint: str, *, sets: Any = None, out: str | None = None,
                        max_items: int | None = None, config: str | None = None,
                        overrides: dict[str, Any] | None = None, memory_off: bool = False,
                        deepspeed_configs: str | Path | None = None) -> dict[str, Any]:
    from training import distributed as D
    from training.checkpoint import read_trainer_state
    from training.data import load_tokenizer

    if out is not None:
        from training.paths import output_path_problem
        problem = output_path_problem(out, want_dir=False)
        if problem is not None:
            raise ValueError(f"--out {out} {problem}; name the JSON file to write")
    ckpt, run_dir = locate(checkpoint)
    requested = _requested_sets(sets)
    overrides = dict(overrides or {})
    if requested is not None:
        overrides["eval.sets"] = requested
    if max_items is not None:
        if int(max_items) < 1:
            raise ValueError(f"--max_items must be >= 1, got {max_items}")
        overrides["eval.max_items"] = int(max_items)
    cfg = resolve_eval_config(ckpt, run_dir, config_path=config, overrides=overrides,
                              deepspeed_configs=deepspeed_configs)
    step = int(read_trainer_state(ckpt).get("step", 0))
    out_path = Path(out) if out else ckpt / ("eval_memory_off.json" if memory_off else "eval.json")

    dist_info = D.init_distributed(cfg.device)
    try:
        strategy = load_model(cfg, ckpt, dist_info)
        tokenizer = load_tokenizer(cfg, cfg.model_config().vocab_size)
        eval_sets = build_sets(cfg, tokenizer, explicit=requested is not None)
        from evaluation.memory_diagnostics import memory_off as switch_off
        with switch_off(strategy.module) if memory_off else contextlib.nullcontext():
            metrics = evaluate_module(cfg, strategy.module, tokenizer, eval_sets, dist_info.device)
        result = {"checkpoint": str(ckpt), "step": step, "memory_off": bool(memory_off),
                  "metrics": {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}}
        if dist_info.is_main:
            atomic_write(out_path, json.dumps(result, indent=1) + "\n")
            print(f"wrote {out_path}: " + ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan"
                                                    for k, v in result["metrics"].items()), flush=True)
        D.barrier()
    finally:
        D.close()
    return result

