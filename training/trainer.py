"""One stage of a run: set-up, checkpoint restore, the loop, evaluation, summary.

`recipes/train.py` calls `run(config, callbacks=...)`; this module reads top to bottom in the order of
DESIGN.md 7.2: init distributed -> build on meta -> parallelize -> init weights -> optimizer + hooks -> load
checkpoint -> loop -> close. The background stage (training/background_stage.py), the cached evaluation
before finetuning (training/eval_cache.py) and the checkpoint restore (training/checkpoint.py) are modules
of their own; callers observe or perturb a stage through callbacks (training/callbacks.py).
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from evaluation import build_summary, write_summary
from sparse_update import SparseMemoryFinetuner
from training import checkpoint as C
from training import eval_cache, signals
from training import distributed as D
from training.background_stage import run_background
from training.callbacks import Callback, Callbacks, as_callbacks
from training.checkpoint import Progress
from training.diagnostics import FactDiagnostics, GradTap
from training.evaluate_checkpoint import evaluate_module
from training.data import eval_sets, finetune_stream, load_facts, load_tokenizer, lm_stream, shard_rows
from training.metrics import MetricsLogger, memory_scalars, print_main, progress_bar
from training.build import build_parallel_model
from training.replicas import check_replicas
from training.step import Stepper, make_plan, optimizer_factory, set_trainable
from training.values_lane import ValuesLane


class StopRequest:
    """SIGUSR1/SIGTERM (preemption) -> checkpoint at the next step boundary and exit cleanly."""

    def __init__(self) -> None:
        signals.install()       # idempotent; recipes/train.py installs it before the heavy imports

    def agreed(self) -> bool:
        """Ranks receive the signal at different steps: stop when any rank has it."""
        return D.all_reduce_max(1.0 if signals.received() else 0.0) > 0


LOCK_FILE = "run.lock"
LOCK_WAIT_S = 5.0      # a restarted rank 0 (torchrun --max-restarts) may start while its predecessor exits
_held_locks: list[int] = []   # rank 0 holds its run directory's lock until the process ends


def check_output_dir(output_dir: str) -> Path:
    """One-line errors for an output_dir that cannot be a run directory (every rank checks the same path)."""
    from training.paths import output_path_problem
    problem = output_path_problem(output_dir, want_dir=True)
    if problem is not None:
        raise ValueError(f"output_dir {output_dir!r} {problem}; pass --output_dir=DIR (a new or this stage's "
                         "run directory)")
    return Path(output_dir)


def lock_run_dir(run_dir: Path) -> int:
    """Exclusive fcntl lock on RUN/run.lock (released by the kernel when the process dies, so never stale)."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.time() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.time() > deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"output_dir {run_dir} is in use by another run (pid {holder}, lock {path}); "
                                 "wait for it to end or pass another --output_dir") from None
            time.sleep(0.2)


def _stored_fingerprints(run_dir: Path) -> list[tuple[str, Path]]:
    """(fingerprint, where) of the run already in run_dir: its config.yaml and its latest checkpoint."""
    out = []
    resolved = run_dir / "config.yaml"
    found = C.list_checkpoints(run_dir)
    has_results = bool(found) or (run_dir / "summary.json").is_file()   # else a failed start left only config.yaml
    if has_results and resolved.is_file():
        try:
            old = yaml.safe_load(resolved.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            old = {}
        if isinstance(old, dict) and old.get("fingerprint") is not None:
            out.append((old["fingerprint"], resolved))
    if found:
        state = C.read_trainer_state(found[-1])
        if state.get("fingerprint") is not None:
            out.append((state["fingerprint"], found[-1] / "trainer.json"))
    return out


def _stage_complete(config, run_dir: Path) -> bool:
    """summary.json written and the latest checkpoint covers every step this command asks for."""
    if not (run_dir / "summary.json").is_file():
        return False
    found = C.list_checkpoints(run_dir)
    if not found:
        return True
    state = C.read_trainer_state(found[-1])
    done = int(state.get("step", 0))
    natural = config.sparse.background_batches if config.stage == "background" else state.get("natural_steps")
    if config.max_steps:
        wanted = min(natural, config.max_steps) if natural is not None else config.max_steps
    else:
        wanted = natural if natural is not None else done
    return done >= wanted


def _record_start(config, run_dir: Path) -> None:
    """config.yaml of this command; a PREEMPTED marker of an earlier attempt is consumed. On a resume this
    waits until the checkpoint has loaded, so a refused resume (corrupted or crafted checkpoint) leaves the
    run directory as it was."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"fingerprint": config.fingerprint(), **config.to_dict()},
                                                        sort_keys=False))
    (run_dir / "PREEMPTED").unlink(missing_ok=True)


def prepare_run_dir(config, dist_info) -> Path | None:
    """Create and lock the run dir; refuse one whose checkpoints/summary come from a different config (never
    mix runs). None when this stage is already complete there: the directory is left exactly as it was."""
    run_dir = check_output_dir(config.output_dir)
    outcome: Any = "run"
    if dist_info.is_main:
        try:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"output_dir {run_dir}: cannot create it ({err.strerror or err})") from None
            fd = lock_run_dir(run_dir)
            _held_locks.append(fd)
            for fingerprint, where in _stored_fingerprints(run_dir):
                if fingerprint != config.fingerprint():
                    raise ValueError(f"output_dir {run_dir} holds a run with a different config (see {where}); "
                                     "use a new --output_dir or delete that run")
            if _stage_complete(config, run_dir):
                outcome = "complete"
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                if not C.list_checkpoints(run_dir):     # a resume records itself once its checkpoint loaded
                    _record_start(config, run_dir)
        except ValueError as err:
            outcome = err
    shared = D.broadcast_object(outcome if not isinstance(outcome, ValueError) else "error")
    if isinstance(outcome, ValueError):
        raise outcome
    if shared == "error":          # rank 0 reports it; the other ranks leave quietly
        D.close()
        raise SystemExit(2)
    return None if shared == "complete" else run_dir


def run(config, callbacks: Iterable[Callback] | None = None) -> dict[str, Any]:
    """Run the stage `config` describes; `callbacks` (training/callbacks.py) are called at its hook points."""
    callbacks = as_callbacks(callbacks)
    dist_info = D.init_distributed(config.device)
    callbacks.on_start(dist_info)
    torch.manual_seed(config.seed)
    stop = StopRequest()
    t_start = time.time()
    run_dir = prepare_run_dir(config, dist_info)
    if run_dir is None:
        print_main(dist_info, f"stage already complete in {config.output_dir}")
        D.close(together=True)
        return {"complete": True}
    log = MetricsLogger(run_dir, enabled=dist_info.is_main)
    try:
        return _run(config, dist_info, run_dir, log, stop, t_start, callbacks)
    finally:
        log.close()


@dataclasses.dataclass
class _Parts:
    """What a stage is built from (set-up): the parallel model, its data, and the values lane."""
    plan: Any
    strategy: Any
    lora_names: set
    values: torch.nn.Parameter | None
    trainable: list
    tokenizer: Any
    facts: Any
    stream: Any
    finetuner: SparseMemoryFinetuner | None
    lane: ValuesLane | None
    grad_tap: GradTap | None
    fact_diagnostics: bool


def _run(config, dist_info, run_dir: Path, log: MetricsLogger, stop: StopRequest, t_start: float,
         callbacks: Callbacks) -> dict:
    parts = _setup(config, dist_info)
    step, resumed_state, message = C.restore(
        run_dir, config, dist_info, strategy=parts.strategy, values=parts.values,
        values_optimizer=parts.lane.optimizer if parts.lane is not None else None, finetuner=parts.finetuner,
        stream=parts.stream, log=log, lora_names=parts.lora_names)
    if message:
        print_main(dist_info, message)
    if resumed_state is not None and dist_info.is_main:
        _record_start(config, run_dir)
    _load_background_options(config, parts, resumed=resumed_state is not None)
    if config.stage == "background":
        return run_background(config, dist_info, run_dir, log, parts, t_start, callbacks=callbacks)
    total = _total_steps(config, parts.stream)
    sets = eval_sets(config, parts.facts, parts.stream) if config.stage == "finetune" else {}
    progress = _start_progress(config, parts, dist_info, log, step, resumed_state)
    before = _before(config, run_dir, parts, sets, dist_info, log, step)
    stopped = _loop(config, dist_info, run_dir, log, stop, parts, progress, total, sets, callbacks)
    if stopped is not None:
        return stopped
    return _finish(config, dist_info, run_dir, log, parts, progress, sets, before, t_start, callbacks)


def _setup(config, dist_info) -> _Parts:
    """Build on meta, choose what trains, parallelize, materialise; data; the values lane and hooks."""
    plan = make_plan(config)
    strategy, lora_names = build_parallel_model(
        config, dist_info, set_trainable=lambda model, lora: set_trainable(model, plan, lora))
    model = strategy.module
    values = strategy.values          # build.py's table: the model, the strategy and the finetuner share it
    trainable = [p for p in strategy.module.parameters() if p.requires_grad and p is not values]

    tokenizer = load_tokenizer(config, model.config.vocab_size)
    facts = load_facts(config)
    if config.stage == "finetune":
        stream = finetune_stream(config, tokenizer, facts)
    else:
        mixed = facts.known if config.stage == "pretrain" else facts.background
        stream = lm_stream(config, tokenizer, mixed, rank=dist_info.rank, world_size=dist_info.world_size)

    fact_diagnostics = (config.stage == "finetune" and not config.data.documents and config.logging.memory_diagnostics)
    # before the finetuner: its backward hook masks the gradient, the tap must see it unmasked
    grad_tap = GradTap(values) if fact_diagnostics and plan.values_sgd and values is not None else None
    finetuner = SparseMemoryFinetuner(plan.sparse_args, values) if values is not None else None
    lane = None
    if plan.train_values and values is not None:
        lane = ValuesLane(values, optimizer_factory(config, sgd=plan.values_sgd, values=True)([values]), finetuner,
                          lr_mult=config.optim.values_lr_mult, max_row_norm=config.optim.values_max_row_norm)
    strategy.setup_optimizer(trainable, optimizer_factory(config, sgd=config.optim.optimizer == "sgd"))
    return _Parts(plan, strategy, lora_names, values, trainable, tokenizer, facts, stream, finetuner, lane,
                  grad_tap, fact_diagnostics)


def _load_background_options(config, parts: _Parts, *, resumed: bool) -> None:
    """sparse.background_file, and one-line errors when the ranking lacks the statistics it needs."""
    finetuner, args = parts.finetuner, parts.plan.sparse_args
    if config.sparse.background_file and finetuner is not None and not resumed:
        finetuner.load_background_indices(config.sparse.background_file)
    if config.stage != "finetune" or not args.enabled or args.mode != "top_t":
        return
    if args.use_idf and finetuner.background_tracker.num_batches == 0:
        raise ValueError(f"init_from={config.init_from} has no background statistics; run the background stage "
                         "and finetune from its run directory (or use --method=tf_only)")
    if args.ranking == "kl" and finetuner.background_tracker.access_counts is None:
        raise ValueError(f"init_from={config.init_from}: its background statistics lack the access counts "
                         "--sparse.ranking=kl needs (written before they were recorded); re-run the background stage")


def _start_progress(config, parts: _Parts, dist_info, log, step: int, resumed_state: dict | None) -> Progress:
    """What this stage accumulates, with a resumed run's state put back (checkpoint.restore_progress); the
    memory diagnostics' 'before' is measured now unless the checkpoint holds it."""
    values = parts.values
    progress = Progress(step=step)
    if parts.fact_diagnostics:
        progress.diagnostics = FactDiagnostics(
            model=parts.strategy.module, tokenizer=parts.tokenizer, facts=parts.facts, finetuner=parts.finetuner,
            device=dist_info.device, max_known=config.eval.max_items, grad_tap=parts.grad_tap,
            eval_options={"batch_size": config.eval.batch_size, "max_new_tokens": config.eval.max_new_tokens})
    progress.updated = torch.zeros(values.shape[0], dtype=torch.bool) if values is not None else None
    if config.stage == "finetune" and parts.plan.train_values and values is not None:
        progress.selections = []
    C.restore_progress(progress, resumed_state)
    if progress.diagnostics is not None and progress.diag_before is None:
        progress.diag_before = progress.diagnostics.before()
        log.log(step, progress.diag_before, kind="diagnostics", console=False)
    return progress


def _before(config, run_dir: Path, parts: _Parts, sets, dist_info, log, step: int) -> dict | None:
    """The evaluation before finetuning: this run's (resumed), a cached one of the same base and sets, or new."""
    before = eval_cache.load_run(run_dir) if step > 0 else None
    if config.stage != "finetune" or before is not None:
        return before
    cache = eval_cache.cache_path(config, sets, parts.strategy.module.config, dist_info.world_size)
    before = eval_cache.read_cached(cache)
    if before is not None:
        log.log(0, {f"eval/{k}": v for k, v in before.items()}, kind="eval", extra={"tag": "before", "cached": str(cache)})
        print_main(dist_info, f"[eval] before: reused {cache}")
    else:
        before = _evaluate(config, parts.strategy, parts.tokenizer, sets, dist_info, log, 0, "before")
        if dist_info.is_main and cache is not None:
            eval_cache.write_cached(cache, before)
    if dist_info.is_main:
        eval_cache.save_run(run_dir, before)
    return before


def _save(config, dist_info, run_dir: Path, log, parts: _Parts, progress: Progress, at: int,
          callbacks: Callbacks) -> None:
    C.save_checkpoint(run_dir, at, strategy=parts.strategy, values=parts.values,
                      values_optimizer=parts.lane.optimizer if parts.lane is not None else None,
                      sparse_state=parts.finetuner.state_dict() if parts.finetuner is not None else None,
                      trainer_state={"stage": config.stage, "method": config.method,
                                     "fingerprint": config.fingerprint(),
                                     "natural_steps": len(parts.stream) if config.stage == "finetune" else None,
                                     "metrics_offset": log.offset()},
                      rank_state={"stream": parts.stream.state_dict()}, dist_info=dist_info,
                      keep_latest=config.checkpoint.keep_latest, run_state=C.progress_state(progress),
                      callbacks=callbacks)


def _loop(config, dist_info, run_dir: Path, log, stop: StopRequest, parts: _Parts, progress: Progress, total: int,
          sets, callbacks: Callbacks) -> dict | None:
    """Train until `total` steps; None when done, the preemption result when a signal stopped it."""
    stepper = Stepper(config=config, strategy=parts.strategy, finetuner=parts.finetuner, values_lane=parts.lane,
                      device=dist_info.device, total_steps=total, callbacks=callbacks)
    bar = progress_bar(config, dist_info, total, progress.step)
    # Finetuning keeps the model in eval mode: the model has no dropout, and train mode would let
    # BatchNorm (memory.query_batchnorm) renormalise queries with one fact's statistics and move its
    # running statistics -- parameters outside the selected value rows would change.
    parts.strategy.module.train(config.stage == "pretrain")
    while progress.step < total:
        batch = next(parts.stream)
        if config.stage == "finetune":
            batch = shard_rows(batch, dist_info.rank, dist_info.world_size)
        metrics = stepper.step(batch, progress.step)
        progress.metrics = metrics
        callbacks.on_step_end(progress.step + 1, values=parts.values, metrics=metrics)
        if progress.diagnostics is not None:
            metrics.update(progress.diagnostics.step(batch.fact_id, progress.step + 1))
        if not torch.isfinite(torch.tensor(metrics["train/loss"])):
            raise FloatingPointError(f"the loss is not finite at step {progress.step + 1}; stopped before updating. "
                                     f"The last good checkpoint is kept in {run_dir / 'checkpoints'}; lower optim.lr "
                                     "and resume")
        progress.step += 1
        step = progress.step
        _record_selection(parts, progress, batch)
        if config.sparse.consistency_interval and step % config.sparse.consistency_interval == 0:
            check_replicas(parts.values, step=step)
        if step % config.logging.interval == 0 or step == total:
            extra = {"fact_id": batch.fact_id} if batch.fact_id is not None else {}
            log.log(step, {**metrics, **memory_scalars()}, extra=extra)
        if bar is not None:
            bar.update(1)
        if config.stage == "finetune" and config.eval.interval and step % config.eval.interval == 0 and step < total:
            _evaluate(config, parts.strategy, parts.tokenizer, sets, dist_info, log, step, "during")
        if config.checkpoint.interval and step % config.checkpoint.interval == 0 and step < total:
            _save(config, dist_info, run_dir, log, parts, progress, step, callbacks)
        if stop.agreed():
            _save(config, dist_info, run_dir, log, parts, progress, step, callbacks)
            if dist_info.is_main:
                (run_dir / "PREEMPTED").write_text(f"stopped by signal at step {step}\n")
            print_main(dist_info, f"preempted: checkpoint at step {step} written; re-run to resume")
            D.close(together=True)
            return {"preempted": True, "step": step}
    if bar is not None:
        bar.close()
    return None


def _record_selection(parts: _Parts, progress: Progress, batch) -> None:
    finetuner = parts.finetuner
    if progress.updated is None or not parts.plan.train_values or finetuner.trainable_indices is None:
        return
    rows = finetuner.trainable_indices.cpu()
    progress.updated[rows] = True
    if progress.selections is not None:
        progress.selections.append((progress.step, str(batch.fact_id), rows.to(torch.int32)))


def _finish(config, dist_info, run_dir: Path, log, parts: _Parts, progress: Progress, sets, before,
            t_start: float, callbacks: Callbacks) -> dict:
    """Last replica check and checkpoint, the row files, the evaluation after, summary.json."""
    step = progress.step
    check_replicas(parts.values, step=step)
    _save(config, dist_info, run_dir, log, parts, progress, step, callbacks)
    updated_rows = progress.updated.nonzero().flatten() if progress.updated is not None else None
    if updated_rows is not None and dist_info.is_main:
        C.save_tree(run_dir / "updated_rows.safetensors", {"rows": updated_rows})
        if progress.selections is not None:
            C.save_tree(run_dir / "selections.safetensors", C.selections_tree(progress.selections))
    items: dict[str, list] | None = {"new_facts": []} if progress.diagnostics is not None else None
    after = _evaluate(config, parts.strategy, parts.tokenizer, sets, dist_info, log, step, "after",
                      items=items) if sets else {}
    trainable_per_step = _trainable_per_step(config, parts.plan, parts.trainable, parts.values)
    summary = build_summary(stage=config.stage, method=config.method if config.stage == "finetune" else "-",
                            steps=step, wall_time_s=time.time() - t_start,
                            trainable_params_per_step=trainable_per_step, before=before, after=after)
    summary["final_train_loss"] = progress.metrics.get("train/loss")
    summary["values_replicas_identical"] = True   # check_replicas above raised otherwise
    if progress.diagnostics is not None:
        rows = updated_rows if parts.plan.train_values else None
        summary["diagnostics"] = {**progress.diag_before, **progress.diagnostics.after(
            rows, step=step, new_fact_items=(items or {}).get("new_facts"))}
        log.log(step, {k: v for k, v in summary["diagnostics"].items() if isinstance(v, (int, float))},
                kind="diagnostics", console=False)
    if dist_info.is_main:
        write_summary(run_dir / "summary.json", summary)
    log.flush()
    D.close(together=True)
    return summary


def _total_steps(config, stream) -> int:
    natural = len(stream) if config.stage == "finetune" else config.max_steps
    return min(natural, config.max_steps) if config.max_steps else natural


def _trainable_per_step(config, plan, trainable, values) -> int:
    dense = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)   # ZeRO-3 holds only a partition
    if not plan.train_values or values is None:
        return dense
    if plan.sparse_args.mode == "top_t":
        return dense + config.sparse.top_t * values.shape[1]
    return dense + values.numel()    # upper bound: every accessed row may move


def _evaluate(config, strategy, tokenizer, sets, dist_info, log, step, tag, items: dict | None = None) -> dict:
    if not sets:
        return {}
    results = evaluate_module(config, strategy.module, tokenizer, sets, dist_info.device, items=items)
    log.log(step, {f"eval/{k}": v for k, v in results.items()}, kind="eval", extra={"tag": tag})
    return results
