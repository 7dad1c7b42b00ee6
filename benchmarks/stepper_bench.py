"""The trainer's own step (training/step.py `Stepper.step`), timed against minimal hand loops. One process.

The Stepper is built on the trainer's own set-up, training/trainer.py `_setup` (`make_plan`,
`build_parallel_model` with the recipe's strategy -- fsdp2, which in one process without a process group shards
nothing --, the finetuner, the values lane, `strategy.setup_optimizer`; it also loads the recipe's tokenizer and
data, about 0.1 s, unused here), from the recipe's YAML, so the timed code is what `python -m recipes.train`
runs for one step (minus data loading and logging). `logging.memory_diagnostics` is off: its gradient tap
(a diagnostics hook on the values) is not part of the method. benchmarks/dist_worker.py builds the same
parts under a 2-rank gloo group (`build_stepper(..., dist_info=...)`, `finetune_config`, `hand_and_reimpl`,
`finetune_variants`, `view_stepper`) for the 2-rank figures.

smf_overhead_ratio_stepper (`run_finetune`): `recipes/configs/tiny_fact_learning.yaml`, method sparse (TF-IDF
top-t, SGD on the values only; synthetic background statistics), the profile's model (N = 1024²) and batch,
interleaved rep by rep with
  plain  - a hand loop on the same model and table (a second nn.Parameter over the same storage, so the
           finetuner's hooks do not see it): forward, cross-entropy, backward, SGD on every accessed row
           (the non-values weights are frozen: the plain step of item smf_overhead);
  reimpl - benchmarks/finetune_step.smf_step (what smf_overhead_ratio times), on a third view, as a
           cross-check that the re-implementation costs what the trainer's step costs.

trainer_vs_plain_loop_ratio (`run_pretrain`): `recipes/configs/tiny_pretrain.yaml` (stage pretrain: full AdamW
on every weight and the values, grad clip 1.0, warm-up/cosine lr, the finetuner in all_accessed mode with a
dense values gradient), its model and batch (32 x 64), interleaved with a minimal hand loop on a copy of the
same weights: forward, cross-entropy, backward, one fused AdamW (same lr, betas, weight decay) over every
parameter. The hand loop's model is built with memory.sparse_grad=False (AdamW needs a dense gradient); the
trainer's Stepper switches its memory layers to the dense gradient itself (training/step.py
dense_values_gradient; before that, a sparse COO of every lookup was densified by the finetuner's hook). Figure: hand-loop time / trainer time per rep
(= trainer tokens/s over hand-loop tokens/s), median over reps.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import REPO, interleaved, paired_ratio, ratio_clock, summary, synthetic_background, token_batches
from benchmarks.finetune_step import Setup, cycler, smf_step


def _config(yaml: str, overrides: dict):
    from training.config import resolve_config
    return resolve_config(str(REPO / "recipes" / "configs" / yaml), overrides)


def _model_overrides(model: dict) -> dict:
    return {f"model.{k}": list(v) if isinstance(v, tuple) else v for k, v in model.items()}


def _cli_overrides(args: tuple) -> dict:
    """--section.key=value strings (Profile.train_overrides) as a resolve_config dict."""
    out = {}
    for a in args:
        key, value = a.lstrip("-").split("=", 1)
        out[key] = [int(x) for x in value.split(",")] if key == "model.memory_layers" else value
    return out


def build_stepper(config, *, background: bool, dist_info=None):
    """The trainer's set-up (training/trainer.py `_setup`) and a Stepper over it, as `trainer._loop` makes it.
    `dist_info`: training.distributed.init_distributed's under torchrun; default one process, no group.
    `background`: synthetic background statistics (the same on every rank). Returns (stepper, model, values,
    finetuner)."""
    from training import trainer
    from training.distributed import DistInfo
    from training.step import Stepper

    dist_info = dist_info or DistInfo(0, 1, 0, torch.device("cpu"))
    parts = trainer._setup(config, dist_info)
    assert parts.grad_tap is None, "benchmarks run with logging.memory_diagnostics=False"
    if background:
        synthetic_background(parts.finetuner)
    parts.strategy.module.train(config.stage == "pretrain")
    stepper = Stepper(config=config, strategy=parts.strategy, finetuner=parts.finetuner, values_lane=parts.lane,
                      device=dist_info.device, total_steps=max(config.max_steps, 1))
    return stepper, parts.strategy.module, parts.values, parts.finetuner


def view_stepper(config, stepper, view: nn.Parameter):
    """A Stepper of `config`'s method over `stepper`'s model and strategy, training `view` (a second
    nn.Parameter over the same table storage): its own finetuner and values lane, made as trainer._setup makes
    them. The caller sets model.memory_values = view around its steps (and back after)."""
    from sparse_update import SparseMemoryFinetuner
    from training.step import Stepper, make_plan, optimizer_factory
    from training.values_lane import ValuesLane

    plan = make_plan(config)
    finetuner = SparseMemoryFinetuner(plan.sparse_args, view)
    lane = ValuesLane(view, optimizer_factory(config, sgd=plan.values_sgd, values=True)([view]), finetuner,
                      lr_mult=config.optim.values_lr_mult, max_row_norm=config.optim.values_max_row_norm)
    return Stepper(config=config, strategy=stepper.strategy, finetuner=finetuner, values_lane=lane,
                   device=stepper.device, total_steps=stepper.total_steps)


def finetune_config(profile, *, method: str = "sparse"):
    """tiny_fact_learning.yaml with the profile's model (N = 1024²), batch (the global one), t; loss on every
    token (random-token batches have no answer span); no memory diagnostics. Returns (config, overrides)."""
    overrides = {"init_from": "x", "method": method, "sparse.top_t": profile.top_t, "optim.loss_on": "all",
                 "logging.memory_diagnostics": False, "data.batch_size": profile.batch,
                 "data.seq_len": profile.seq, **_model_overrides(profile.model)}
    return _config("tiny_fact_learning.yaml", overrides), overrides


def hand_and_reimpl(model: nn.Module, values: nn.Parameter, *, top_t: int, lr: float):
    """The plain hand loop's view of the table (no hooks) with its SGD, and benchmarks/finetune_step's
    re-implemented step on a third view with its own finetuner (count exchange and row sync on the process
    group, if any). Returns (plain, opt_plain, reimpl Setup)."""
    from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs
    plain = nn.Parameter(values.data)
    opt_plain = torch.optim.SGD([plain], lr=lr)
    view = nn.Parameter(values.data)
    ft2 = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=top_t), view)
    synthetic_background(ft2)
    opt2 = torch.optim.SGD([view], lr=lr)
    ft2.attach(opt2)
    return plain, opt_plain, Setup(model, view, plain, ft2, opt2, opt_plain, [])


def finetune_variants(stepper, model: nn.Module, values: nn.Parameter, plain: nn.Parameter, opt_plain,
                      reimpl, batches: list) -> dict:
    """The interleaved finetune steps, each over its own cycler of `batches` (every variant sees the same
    batch sequence): stepper (the trainer's Stepper.step), plain (hand loop: forward, cross-entropy, backward,
    SGD on every accessed row of the same table; no selection, mask or values collective), reimpl
    (finetune_step.smf_step)."""
    nxt = {k: cycler(batches) for k in ("stepper", "plain", "reimpl")}
    step_no = {"i": 0}

    def trainer_step():
        model.memory_values = values
        stepper.step(nxt["stepper"](), step_no["i"])
        step_no["i"] += 1

    def plain_step():
        model.memory_values = plain
        hand_loss(model, nxt["plain"]()).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        model.memory_values = values

    def reimpl_step():
        smf_step(reimpl, nxt["reimpl"]().tokens)
        model.memory_values = values

    return {"stepper": trainer_step, "plain": plain_step, "reimpl": reimpl_step}


def lm_batches(count: int, batch: int, seq: int, vocab: int, *, seed: int) -> list:
    """Random-token Batches (next-token labels, no padding): cost does not depend on the text."""
    from data_pipeline import IGNORE_INDEX, Batch
    out = []
    for tokens in token_batches(count, batch, seq + 1, vocab, seed=seed):
        out.append(Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                         padding_mask=torch.ones(batch, seq, dtype=torch.bool)))
    assert IGNORE_INDEX < 0
    return out


def hand_loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(batch.tokens, padding_mask=batch.padding_mask)
    return F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)


def _figures(times_num: dict, times_den: dict, num: str, den: str) -> dict:
    return {"samples": [round(a / b, 4) for a, b in zip(times_num[num], times_den[den])],
            "ratio": paired_ratio(times_num[num], times_den[den])}


def run_finetune(profile) -> dict:
    config, _ = finetune_config(profile)
    stepper, model, values, finetuner = build_stepper(config, background=True)
    plain, opt_plain, reimpl = hand_and_reimpl(model, values, top_t=profile.top_t, lr=config.optim.lr)
    batches = lm_batches(profile.reps + profile.warmup, profile.batch, profile.seq, model.config.vocab_size, seed=1)
    steps = finetune_variants(stepper, model, values, plain, opt_plain, reimpl, batches)

    cpu: dict = {}
    wall = interleaved(steps, reps=profile.reps, warmup=profile.warmup, cpu=cpu)
    clock = ratio_clock()
    times = cpu if clock == "cpu" else wall
    cfg = model.config
    return {
        "ratio": paired_ratio(times["stepper"], times["plain"]),
        "clock": clock,
        "ratio_samples": _figures(times, times, "stepper", "plain")["samples"],
        "ratio_wall": paired_ratio(wall["stepper"], wall["plain"]),
        "stepper_vs_reimpl_ratio": paired_ratio(times["stepper"], times["reimpl"]),
        "reimpl_vs_plain_ratio": paired_ratio(times["reimpl"], times["plain"]),
        "inputs": {"N": cfg.memory.num_slots, "d": cfg.memory.value_dim, "t": profile.top_t,
                   "batch": profile.batch, "seq": profile.seq, "reps": profile.reps, "ranks": 1,
                   "threads": torch.get_num_threads(), "config": "recipes/configs/tiny_fact_learning.yaml",
                   "method": "sparse", "strategy": f"{config.strategy} (one process, no process group)",
                   "setup": "training.trainer._setup (logging.memory_diagnostics=False)",
                   "optimizer": f"SGD lr={config.optim.lr} (values only)", "grad_clip": config.optim.grad_clip,
                   "model": "tiny preset, " + ", ".join(f"{k}={v}" for k, v in profile.model.items())},
        "step_s": {k: summary(v) for k, v in wall.items()},
        "step_cpu_s": {k: summary(v) for k, v in cpu.items()},
        "selected_rows": int(finetuner.trainable_indices.numel()) if finetuner.trainable_indices is not None else None,
    }


def run_pretrain(profile) -> dict:
    overrides = _cli_overrides(profile.train_overrides)
    config = _config("tiny_pretrain.yaml", overrides)
    stepper, model, values, _ = build_stepper(config, background=False)
    from model import build_model
    # the same model with a dense values gradient (AdamW needs one), the trainer's initial weights
    hand_cfg = dataclasses.replace(model.config, memory=dataclasses.replace(model.config.memory, sparse_grad=False))
    hand = build_model(hand_cfg, seed=config.seed)
    hand.load_state_dict({**model.state_dict(), "memory_values": values})   # the table is outside the module
    hand.train(True)
    o = config.optim
    params = [p for p in hand.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)

    batch, seq = config.data.batch_size, config.data.seq_len
    batches = lm_batches(profile.trainer_reps + profile.warmup, batch, seq, model.config.vocab_size, seed=2)
    nxt_a, nxt_b = cycler(batches), cycler(batches)
    step_no = {"i": 0}

    def trainer_step():
        stepper.step(nxt_a(), step_no["i"])
        step_no["i"] += 1

    def hand_step():
        hand_loss(hand, nxt_b()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cpu: dict = {}
    wall = interleaved({"trainer": trainer_step, "hand_loop": hand_step},
                       reps=profile.trainer_reps, warmup=profile.warmup, cpu=cpu)
    clock = ratio_clock()
    times = cpu if clock == "cpu" else wall
    tokens = batch * seq
    return {
        # tokens/s of the trainer over tokens/s of the hand loop = hand-loop time / trainer time
        "ratio": paired_ratio(times["hand_loop"], times["trainer"]),
        "clock": clock,
        "ratio_samples": _figures(times, times, "hand_loop", "trainer")["samples"],
        "ratio_wall": paired_ratio(wall["hand_loop"], wall["trainer"]),
        "tokens_per_s": {k: tokens / summary(v)["median"] for k, v in wall.items()},
        "inputs": {"batch": batch, "seq": seq, "reps": profile.trainer_reps, "ranks": 1,
                   "threads": torch.get_num_threads(), "config": "recipes/configs/tiny_pretrain.yaml",
                   "overrides": overrides, "N": model.config.memory.num_slots, "d": model.config.memory.value_dim,
                   "strategy": f"{config.strategy} (one process, no process group)",
                   "optimizer": f"AdamW lr={o.lr} betas={tuple(o.betas)} wd={o.weight_decay} fused",
                   "trainer_extras": f"grad_clip={o.grad_clip}, {o.schedule} lr with {o.warmup_steps} warm-up "
                                     "steps, all_accessed finetuner (dense values gradient from the memory layers), metrics",
                   "hand_loop": "forward, cross-entropy, backward, AdamW step; memory.sparse_grad=False"},
        "step_s": {k: summary(v) for k, v in wall.items()},
        "step_cpu_s": {k: summary(v) for k, v in cpu.items()},
    }
