"""A look inside a finetune run's memory (the library behind `recipes/inspect.py RUN [--top_slots N] [--background_batches N]`).

Reads what the run wrote (`selections.safetensors`: every step's selected rows and its fact; `summary.json`)
and its base (the `init_from` background run: document frequencies, background lookup counts, weights), and
writes into the run directory

- `inspect.md`: per new fact the rows it updated and their background document frequency; the overlap
  (Jaccard) of the facts' row sets; the share of the known facts' answer-position lookups that land in
  updated rows (from the run's diagnostics); for the rows most facts updated, the tokens that read them most
  often on background text (the paper's qualitative analysis, re-read with the base model); the base's
  slot-usage histogram;
- `inspect_overlap.png`: the fact × fact Jaccard heatmap.

One process (no torchrun); the base model is loaded only for the token analysis (`--background_batches=0`
skips it).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from data_pipeline.atomic import atomic_write

LOW_DF = 0.05      # "low document frequency": read by < 5% of the background batches (the health gate's cut)


def jaccard_matrix(sets: list[torch.Tensor], num_slots: int) -> torch.Tensor:
    """|A∩B| / |A∪B| for every pair of row sets (float64 [F, F]; 1 on the diagonal, 0 for two empty sets)."""
    member = torch.zeros(len(sets), num_slots, dtype=torch.float64)
    for i, rows in enumerate(sets):
        member[i, rows.long()] = 1.0
    inter = member @ member.T
    size = member.sum(1)
    union = size[:, None] + size[None, :] - inter
    out = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    out.fill_diagonal_(1.0)
    return out


def _load_selections(run: Path) -> tuple[list[str], list[torch.Tensor]]:
    from training.checkpoint import load_tree

    path = run / "selections.safetensors"
    if not path.is_file():
        raise ValueError(f"{run} has no selections.safetensors: it is not a finished finetune run of a value-row "
                         "method (sparse, tf_only, memory_all), or it predates per-step selections; re-run it")
    tree = load_tree(path)
    off = tree["offsets"].tolist()
    facts: dict[str, list[torch.Tensor]] = {}
    for i, fact in enumerate(tree["fact_ids"]):
        facts.setdefault(fact, []).append(tree["rows"][off[i]:off[i + 1]].long())
    names = list(facts)
    return names, [torch.unique(torch.cat(parts)) for parts in facts.values()]


def _background_readers(base_ckpt: Path, base_run: Path | None, slots: list[int], batches: int,
                        ) -> dict[int, Counter]:
    """For each slot: which tokens read it (Counter of token ids) over `batches` background batches."""
    from training import distributed as D
    from training.data import load_facts, load_tokenizer, lm_stream
    from training.evaluate_checkpoint import load_model, resolve_eval_config

    cfg = resolve_eval_config(base_ckpt, base_run, config_path=None, overrides={})
    readers: dict[int, Counter] = {s: Counter() for s in slots}
    dist_info = D.init_distributed(cfg.device)
    try:
        strategy = load_model(cfg, base_ckpt, dist_info)
        tokenizer = load_tokenizer(cfg, cfg.model_config().vocab_size)
        stream = lm_stream(cfg, tokenizer, load_facts(cfg).background, rank=0, world_size=1)
        wanted = torch.tensor(slots, dtype=torch.long)
        strategy.module.eval()
        with torch.no_grad():
            for _ in range(batches):
                batch = next(stream)
                out = strategy.module(batch.tokens.to(dist_info.device),
                                      padding_mask=batch.padding_mask.to(dist_info.device), reads_only=True)
                tokens = batch.tokens.cpu()
                for layer in out.memory_indices:
                    idx = layer.cpu()                                    # (B, T, heads*k)
                    hit = torch.isin(idx, wanted)
                    b, t, j = hit.nonzero(as_tuple=True)
                    for slot, token in zip(idx[b, t, j].tolist(), tokens[b, t].tolist()):
                        readers[slot][token] += 1
    finally:
        D.close()
    return {s: Counter({tokenizer.decode([tok]) or f"<{tok}>": n for tok, n in c.items()}) for s, c in readers.items()}


def _usage_histogram(access: torch.Tensor | None, df: torch.Tensor) -> list[tuple[str, int]]:
    """Slots by background lookups (or document frequency when the base predates lookup counts)."""
    counts = access if access is not None else df
    bins = [("0", int((counts == 0).sum()))]
    lo = 1
    top = int(counts.max()) if counts.numel() else 0
    while lo <= top:
        hi = lo * 10
        bins.append((f"{lo}–{hi - 1}", int(((counts >= lo) & (counts < hi)).sum())))
        lo = hi
    return bins


def _heatmap(matrix: torch.Tensor, names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = min(12.0, 3.0 + 0.08 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_title("Jaccard overlap of the rows each new fact updated")
    ax.set_xlabel("fact (training order)")
    ax.set_ylabel("fact (training order)")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), names, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)


def inspect_run(run: str | Path, *, top_slots: int = 10, background_batches: int = 20) -> dict[str, Any]:
    """Write RUN/inspect.md and RUN/inspect_overlap.png; returns the numbers they show."""
    from training.checkpoint import load_sparse_state, resolve_checkpoint
    from training.config import load_yaml

    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory")
    if top_slots < 1 or background_batches < 0:
        raise ValueError("--top_slots must be >= 1 and --background_batches >= 0")
    names, sets = _load_selections(run)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} has no config.yaml; inspect a run directory written by recipes/train.py")
    config = load_yaml(str(run / "config.yaml"))
    if not config.get("init_from"):
        raise ValueError(f"{run}/config.yaml has no init_from: inspect needs the run's base (its background run)")
    base_ckpt = resolve_checkpoint(config["init_from"])
    sparse = load_sparse_state(base_ckpt)
    if sparse is None:
        raise ValueError(f"base {base_ckpt} holds no background statistics; inspect a finetune from a background run")
    df = sparse["document_frequency"]
    num_batches = max(1, int(sparse["num_batches"]))
    access = sparse.get("access_counts")
    num_slots = df.numel()
    df_frac = df.double() / num_batches

    per_fact = []
    for name, rows in zip(names, sets):
        f = df_frac[rows]
        per_fact.append({"fact": name, "rows": int(rows.numel()),
                         "df_median": float(f.median()) if rows.numel() else float("nan"),
                         "low_df_share": float((f < LOW_DF).double().mean()) if rows.numel() else float("nan")})
    jac = jaccard_matrix(sets, num_slots)
    off_diag = jac[~torch.eye(len(sets), dtype=torch.bool)] if len(sets) > 1 else torch.zeros(0, dtype=torch.float64)
    for i, entry in enumerate(per_fact):
        others = torch.cat([jac[i, :i], jac[i, i + 1:]])
        entry["jaccard_max"] = float(others.max()) if others.numel() else 0.0
    facts_per_row = Counter(r for rows in sets for r in rows.tolist())
    top = [slot for slot, _ in sorted(facts_per_row.items(), key=lambda kv: (-kv[1], kv[0]))[:top_slots]]
    readers = (_background_readers(base_ckpt, base_ckpt.parent.parent if base_ckpt.parent.name == "checkpoints"
                                   else None, top, background_batches) if background_batches and top else {})
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    diag = summary.get("diagnostics", {})
    result = {
        "facts": len(sets), "num_slots": num_slots, "rows_updated": len(facts_per_row),
        "jaccard_mean": float(off_diag.mean()) if off_diag.numel() else 0.0,
        "jaccard_max": float(off_diag.max()) if off_diag.numel() else 0.0,
        "known_answer_lookups_in_updated_rows": diag.get("memory/known_answer_lookups_in_updated_rows"),
        "per_fact": per_fact,
        "top_slots": [{"slot": s, "facts": facts_per_row[s], "df_frac": float(df_frac[s]),
                       "readers": readers.get(s, Counter()).most_common(5)} for s in top],
        "usage_histogram": _usage_histogram(access, df),
    }
    _heatmap(jac, names, run / "inspect_overlap.png")
    (run / "inspect.md").write_text(_markdown(run, summary, result, access is not None))
    return result


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _markdown(run: Path, summary: dict, r: dict, have_access: bool) -> str:
    m = summary.get("metrics", {})
    lines = [f"# Inside the memory of `{run.name}`", "",
             f"method `{summary.get('method', '?')}`, {r['facts']} facts, {r['rows_updated']} of {r['num_slots']} "
             f"value rows updated ({r['rows_updated'] / max(1, r['num_slots']):.1%}).", ""]
    if m:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v.get('before'))} | {_fmt(v.get('after'))} |" for k, v in m.items()
                  if isinstance(v, dict)]
        lines.append("")
    lines += ["## Overlap between facts",
              f"Jaccard of the row sets of two facts: mean {_fmt(r['jaccard_mean'])}, max {_fmt(r['jaccard_max'])} "
              "(heatmap: `inspect_overlap.png`). Share of the known facts' answer-position lookups that land in "
              f"updated rows: {_fmt(r['known_answer_lookups_in_updated_rows'])}.", "",
              "## Per fact", f"Background document frequency (DF) as a share of the background batches; "
              f"low DF = < {LOW_DF:.0%}.", "",
              "| fact | rows | median DF | low-DF share | max Jaccard with another fact |", "|---|---|---|---|---|"]
    lines += [f"| {e['fact']} | {e['rows']} | {_fmt(e['df_median'])} | {_fmt(e['low_df_share'])} | "
              f"{_fmt(e['jaccard_max'])} |" for e in r["per_fact"]]
    lines += ["", "## The rows most facts updated, and who reads them on background text",
              "| row | facts that updated it | DF | tokens that read it most (count) |", "|---|---|---|---|"]
    for t in r["top_slots"]:
        who = ", ".join(f"`{tok.strip() or repr(tok)}` ({n})" for tok, n in t["readers"]) or "–"
        lines.append(f"| {t['slot']} | {t['facts']} | {_fmt(t['df_frac'])} | {who} |")
    what = "background lookups" if have_access else "background document frequency (the base predates lookup counts)"
    lines += ["", f"## Slot usage of the base ({what})", "| per slot | slots |", "|---|---|"]
    lines += [f"| {b} | {n} |" for b, n in r["usage_histogram"]]
    return "\n".join(lines) + "\n"

