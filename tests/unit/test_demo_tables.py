"""recipes/demo.py's per-stream aggregation and best-run lines, on hand-written summaries."""
from __future__ import annotations

import importlib.util

from tests.launch import REPO

spec = importlib.util.spec_from_file_location("demo", REPO / "recipes" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def summary(method, new, known, prose):
    """new/known/prose: (before, after)."""
    def entry(b, a):
        return {"before": b, "after": a, "rel_change": (a - b) / b if b else None}
    return {"method": method, "metrics": {"new_facts/f1": entry(*new), "known_facts/f1": entry(*known),
                                          "heldout_text/nll": entry(*prose)}}


RUNS = [
    ("sparse_lr10_t20", summary("sparse", (0.1, 0.4), (1.0, 0.96), (6.0, 6.0))),
    ("sparse_lr10_t20_stream900", summary("sparse", (0.1, 0.5), (1.0, 0.98), (6.0, 6.0))),
    ("sparse_lr10_t20_stream1020", summary("sparse", (0.0, 0.3), (1.0, 0.94), (6.0, 6.0))),
    ("sparse_lr30_t20", summary("sparse", (0.1, 0.6), (1.0, 0.8), (6.0, 6.01))),
    ("full_lr0.0001", summary("full", (0.1, 0.2), (1.0, 0.9), (6.0, 6.02))),
    ("full_lr0.0001_stream900", summary("full", (0.1, 0.1), (1.0, 0.8), (6.0, 6.04))),
    ("lora_lr0.0003_rank32", summary("lora", (0.1, 0.15), (1.0, 0.5), (6.0, 6.1))),
    ("memory_all_lr300", summary("memory_all", (0.1, 0.7), (1.0, 0.1), (6.0, 6.2))),
]


def test_stream_groups_pair_each_point_with_its_variants_only():
    groups = demo.stream_groups(RUNS)
    assert set(groups) == {"sparse_lr10_t20", "full_lr0.0001"}
    assert [label for label, _ in groups["sparse_lr10_t20"]] == ["config's", "900", "1020"]


def test_stream_table_mean_and_sample_sd():
    table = demo.stream_table(RUNS)
    row = next(line for line in table.splitlines() if line.startswith("| sparse_lr10_t20 "))
    # gains 0.3, 0.4, 0.3 -> mean 0.333, sample sd 0.0577; known rel -0.04, -0.02, -0.06 -> -0.04 +- 0.02
    assert "| 3 | +0.333 ± 0.058 | -4.0% ± 2.0% | +0.000 ± 0.000 |" in row
    full = next(line for line in table.splitlines() if line.startswith("| full_lr0.0001 "))
    assert "| 2 | +0.050 ± 0.071 |" in full
    assert demo.stream_table(RUNS[3:5] + RUNS[6:]) == "(no point was run on several streams)"


def test_headline_compares_sparse_at_comparable_learning_per_regime():
    lines = demo.headline(RUNS)
    assert lines[0].startswith("- best full run: full_lr0.0001: new F1 0.200, known F1 -10.0%")  # not the stream-900 variant
    assert lines[1].startswith("- best lora run: lora_lr0.0003_rank32: new F1 0.150")
    # within 0.1 of the best baseline's 0.2: no sparse run (0.4, 0.6) -> said so
    assert lines[2] == "- no sparse run learns within 0.1 of the best full/LoRA run's new F1 0.200"
    assert lines[3].startswith("- best sparse run (highest new F1): sparse_lr30_t20: new F1 0.600, known F1 -20.0%")
    near = RUNS + [("sparse_lr3_t20", summary("sparse", (0.1, 0.25), (1.0, 0.98), (6.0, 6.0)))]
    lines = demo.headline(near)
    i = next(i for i, line in enumerate(lines) if line.startswith("- sparse at comparable learning"))
    assert "sparse_lr3_t20: new F1 0.250, known F1 -2.0%" in lines[i]
    # known drop -0.02 / -0.10 (full) = 0.20, / -0.50 (lora) = 0.04; prose 0 / 0.02 = 0
    assert lines[i + 1] == "  - against best full: known-F1 drop ratio sparse/full 0.20, prose-NLL rise ratio 0.00"
    assert lines[i + 2] == "  - against best lora: known-F1 drop ratio sparse/lora 0.04, prose-NLL rise ratio 0.00"


def test_headline_keeps_regimes_apart():
    two = [(n, dict(s, _passes=1)) for n, s in RUNS] + \
          [("full_lr0.0001_passes4", dict(summary("full", (0.1, 0.55), (1.0, 0.6), (6.0, 6.3)), _passes=4)),
           ("sparse_lr5_t20_passes4", dict(summary("sparse", (0.1, 0.6), (1.0, 0.95), (6.0, 6.0)), _passes=4))]
    lines = demo.headline(two)
    assert lines[0] == "**1 pass over the stream (each fact once):**"
    j = lines.index("**4 passes over the stream (each fact 4 times):**")
    assert lines[j + 1].startswith("- best full run: full_lr0.0001_passes4: new F1 0.550")
    assert lines[j + 2].startswith("- sparse at comparable learning") and "sparse_lr5_t20_passes4" in lines[j + 2]
    assert "drop ratio sparse/full 0.13" in lines[j + 3]
