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


def test_headline_picks_the_best_new_f1_per_method_on_the_configs_stream():
    lines = demo.headline(RUNS)
    assert lines[0].startswith("- best sparse run: sparse_lr30_t20: new F1 0.600, known F1 -20.0%")
    full = next(line for line in lines if line.startswith("- best full run"))
    # the stream-900 variant is not a candidate; drop ratio -0.20 / -0.10 = 2.00, prose 0.01 / 0.02
    assert "full_lr0.0001:" in full and "+0.400" in full and "drop ratio 2.00" in full and "(ratio 0.50)" in full
    matched = next(line for line in lines if line.startswith("- least forgetting sparse run"))
    # the best baseline learns 0.2 (full): both sparse runs learn more; lr10 forgets less (-4% vs -20%)
    assert "0.200: sparse_lr10_t20: new F1 0.400, known F1 -4.0%" in matched
    lora = next(line for line in lines if line.startswith("- best lora run"))
    assert "drop ratio 0.40" in lora
