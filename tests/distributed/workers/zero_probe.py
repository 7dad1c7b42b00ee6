"""torchrun worker for tests/distributed/test_zero.py: recipes/train.py, plus per-rank facts at every save.

Runs the real entry point (recipes/train.py's main) with the same arguments; the only addition is a wrapper
around the strategy's `save` that, on every rank, appends one JSON line to OUTPUT_DIR/probe/rank{r}.jsonl:
the SHA-256 of this rank's live values table, whether the table is a parameter of what the loop calls
(it must not be: it lives outside the engine) or a ZeRO-3 parameter, and how many of the engine's
parameter elements this rank holds locally versus in full (ZeRO-3 partitions, FSDP2 shards, ZeRO-1/2
replicate), at the save and right after the strategy materialised the model, before any engine existed
(a wrapper around `materialize`).

    torchrun --standalone --nproc_per_node=2 tests/distributed/workers/zero_probe.py --config ... [--key=value ...]
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repository root

import torch  # noqa: E402

from training import build  # noqa: E402

_spec = importlib.util.spec_from_file_location("smf_train_recipe", Path(__file__).resolve().parents[3] / "recipes" / "train.py")
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)   # defines main; runs nothing (its __name__ is not __main__)
main = _recipe.main
from training.parallel import build_strategy  # noqa: E402


def _local_and_full_numel(module: torch.nn.Module) -> tuple[int, int]:
    from torch.distributed.tensor import DTensor
    local = full = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):                       # ZeRO-3: this rank's partition
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        elif isinstance(p, DTensor):                      # FSDP2: this rank's shard
            local, full = local + p.to_local().numel(), full + p.numel()
        else:
            local, full = local + p.numel(), full + p.numel()
    return local, full


def probed_build_strategy(name, model, *, values, dist_info, config):
    strategy = build_strategy(name, model, values=values, dist_info=dist_info, config=config)
    save, materialize = strategy.save, strategy.materialize
    out = Path(config.output_dir) / "probe"
    materialized: dict[str, int] = {}

    def materialize_and_record(*args, **kwargs) -> None:
        materialize(*args, **kwargs)          # before any engine exists: what this rank holds now
        materialized["local"], materialized["full"] = _local_and_full_numel(strategy.module)

    def save_and_record(path: str) -> None:
        save(path)
        table = strategy.values
        engine_params = list(strategy.module.parameters())
        local, full = _local_and_full_numel(strategy.module)
        row = {
            "step": int(Path(path).parent.name.split("_")[1].split(".")[0]),
            "rank": dist_info.rank,
            "strategy": name,
            "values_sha256": hashlib.sha256(table.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "values_in_module": any(p is table for p in engine_params),
            "values_is_zero_param": hasattr(table, "ds_id"),
            "values_requires_grad": bool(table.requires_grad),
            "local_numel": local,
            "full_numel": full,
            "materialized_local_numel": materialized["local"],
            "materialized_full_numel": materialized["full"],
        }
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"rank{dist_info.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    strategy.save = save_and_record
    strategy.materialize = materialize_and_record
    return strategy


build.build_strategy = probed_build_strategy   # where the trainer builds its strategy

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
