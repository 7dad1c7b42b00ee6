"""TF-IDF scoring and top-t selection against an independent, pure-Python computation."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from sparse_update import (
    SparseMemoryFinetuner,
    SparseMemoryFinetuningArgs,
    count_slot_accesses,
    select_top_t,
    tfidf_scores,
)


def hand_scores(indices: list[int], df: dict[int, int], num_batches: int, use_idf: bool) -> dict[int, float]:
    """The paper's formula written out slot by slot (natural log, +1 smoothing, padding < 0 dropped)."""
    counts = Counter(i for i in indices if i >= 0)
    total = sum(counts.values())
    if not use_idf:
        return {i: float(c) for i, c in counts.items()}
    return {i: c / total * math.log((num_batches + 1) / (df.get(i, 0) + 1)) for i, c in counts.items()}


def hand_select(scores: dict[int, float], top_t: int) -> list[int]:
    order = sorted(scores, key=lambda i: (-scores[i], i))  # higher score first, then lower index
    return sorted(order[:top_t])


def make_finetuner(num_slots: int, *, top_t: int, use_idf: bool = True, mode: str = "top_t") -> SparseMemoryFinetuner:
    values = torch.nn.Parameter(torch.zeros(num_slots, 4))
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=top_t, use_idf=use_idf, mode=mode)
    return SparseMemoryFinetuner(args, values)


def load_df(finetuner: SparseMemoryFinetuner, df: dict[int, int], num_batches: int) -> None:
    tensor = torch.zeros(finetuner.num_slots, dtype=torch.int64)
    for i, v in df.items():
        tensor[i] = v
    finetuner.background_tracker.set_statistics(tensor, num_batches)


# Hand-made case, N=12, |B|=4 background batches.
#   slot: count, df  -> score = c/Σc · ln(5/(df+1)),  Σc = 16
#   0: 6, 4 -> 0            (in every background batch: generic, never preferred)
#   1: 1, 0 -> ln5/16  = 0.1006
#   2: 3, 1 -> 3ln2.5/16 = 0.1718
#   3: 2, 0 -> 2ln5/16 = 0.2012
#   4: 2, 3 -> 2ln1.25/16 = 0.0279
#   7: 1, 0 -> ln5/16  (ties slot 1; slot 1 wins on index)
#   9: 1, 2 -> ln(5/3)/16 = 0.0319
HAND_INDICES = [0] * 6 + [1] + [2] * 3 + [3] * 2 + [4] * 2 + [7] + [9]
HAND_DF = {0: 4, 2: 1, 4: 3, 9: 2, 10: 4}
PADDING = [-1] * 5


def test_formula_matches_hand_computation_with_padding() -> None:
    idx = torch.tensor(HAND_INDICES + PADDING)[torch.randperm(len(HAND_INDICES) + 5)].view(3, 7)
    counts = count_slot_accesses(idx, 12)
    assert counts.dtype == torch.int32
    assert counts.tolist() == [6, 1, 3, 2, 2, 0, 0, 1, 0, 1, 0, 0]
    df = torch.zeros(12, dtype=torch.int64)
    for i, v in HAND_DF.items():
        df[i] = v
    scores = tfidf_scores(counts, df, 4, use_idf=True)
    expected = hand_scores(HAND_INDICES, HAND_DF, 4, use_idf=True)
    for i in range(12):
        assert scores[i].item() == pytest.approx(expected.get(i, 0.0), rel=1e-12, abs=1e-15)
    assert scores[3].item() == pytest.approx(2 * math.log(5) / 16)


@pytest.mark.parametrize(
    ("top_t", "expected"),
    [
        (1, [3]),
        (2, [2, 3]),
        (3, [1, 2, 3]),  # slots 1 and 7 tie: the lower index wins
        (4, [1, 2, 3, 7]),
        (6, [1, 2, 3, 4, 7, 9]),
        (7, [0, 1, 2, 3, 4, 7, 9]),  # slot 0 scores 0 but is accessed
        (100, [0, 1, 2, 3, 4, 7, 9]),  # top_t > accessed: only accessed slots, never 5, 6, 8, 10, 11
    ],
)
def test_selection_hand_case(top_t: int, expected: list[int]) -> None:
    ft = make_finetuner(12, top_t=top_t)
    load_df(ft, HAND_DF, 4)
    stats = ft.update_trainable_indices(torch.tensor(HAND_INDICES + PADDING))
    assert ft.trainable_indices.tolist() == expected
    assert ft.trainable_indices.dtype == torch.long
    assert expected == hand_select(hand_scores(HAND_INDICES, HAND_DF, 4, True), top_t)
    assert stats["accessed"] == 7
    assert stats["selected"] == len(expected)


def test_tf_only_ranks_by_counts_and_breaks_ties_by_index() -> None:
    ft = make_finetuner(12, top_t=3, use_idf=False)  # no background needed
    stats = ft.update_trainable_indices(torch.tensor(HAND_INDICES + PADDING))
    # counts: 0:6, 2:3, then 3 and 4 tie at 2 -> 3 wins
    assert ft.trainable_indices.tolist() == [0, 2, 3]
    assert stats["score_max"] == 6.0
    assert hand_select(hand_scores(HAND_INDICES, {}, 0, False), 3) == [0, 2, 3]


def test_random_cases_match_hand_computation() -> None:
    rng = random.Random(0)
    for trial in range(20):
        n = rng.choice([16, 64, 300])
        num_batches = rng.randint(1, 40)
        df = {i: rng.randint(0, num_batches) for i in range(n) if rng.random() < 0.7}
        indices = [rng.randrange(-1, n) for _ in range(rng.randint(1, 400))]
        top_t = rng.randint(1, n)
        use_idf = trial % 3 != 0
        ft = make_finetuner(n, top_t=top_t, use_idf=use_idf)
        load_df(ft, df, num_batches)
        layers = [torch.tensor(indices[: len(indices) // 2]), torch.tensor(indices[len(indices) // 2 :])]
        ft.update_trainable_indices(layers)  # a list: one tensor per memory layer
        scores = hand_scores(indices, df, num_batches, use_idf)
        expected = hand_select(scores, top_t)
        got = ft.trainable_indices.tolist()
        if use_idf:
            # Mathematically equal scores (e.g. ln 4 vs 2 ln 2) may differ in the last bit between math.log
            # and torch.log: compare the selected score multisets, and the sets where no near-tie exists.
            assert len(got) == len(expected)
            assert sorted(scores[i] for i in got) == pytest.approx(sorted(scores[i] for i in expected), rel=1e-12)
            cut = sorted(scores.values(), reverse=True)
            if len(cut) > top_t and abs(cut[top_t - 1] - cut[top_t]) > 1e-9:
                assert got == expected
        else:
            assert got == expected


def test_all_accessed_mode_selects_the_union() -> None:
    ft = make_finetuner(12, top_t=1, mode="all_accessed", use_idf=True)  # no background needed here
    stats = ft.update_trainable_indices([torch.tensor([[3, -1], [5, 3]]), torch.tensor([11, -1, 0])])
    assert ft.trainable_indices.tolist() == [0, 3, 5, 11]
    assert stats["selected"] == 4 and stats["accessed"] == 4


def test_stats_overlap_and_quantiles() -> None:
    ft = make_finetuner(10, top_t=2, use_idf=False)
    s1 = ft.update_trainable_indices(torch.tensor([1, 1, 1, 2, 2, 3]))
    assert ft.trainable_indices.tolist() == [1, 2]
    assert s1["overlap_prev"] == 0.0
    assert (s1["score_p50"], s1["score_p90"], s1["score_max"]) == pytest.approx((2.5, 2.9, 3.0))
    ft.update_trainable_indices(torch.tensor([2, 2, 5]))
    s3 = ft.update_trainable_indices(torch.tensor([2, 2, 2, 7, 7]))
    assert ft.trainable_indices.tolist() == [2, 7]
    assert s3["overlap_prev"] == 0.5  # 2 was selected last step (with 5), 7 was not


def test_all_padding_batch_selects_nothing() -> None:
    ft = make_finetuner(8, top_t=3)
    load_df(ft, {1: 1}, 2)
    stats = ft.update_trainable_indices(torch.full((2, 3), -1))
    assert ft.trainable_indices.tolist() == []
    assert stats["accessed"] == 0 and stats["selected"] == 0


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="out of range"):
        count_slot_accesses(torch.tensor([0, 8]), 8)
    with pytest.raises(TypeError, match="integer"):
        count_slot_accesses(torch.tensor([0.0, 1.0]), 8)
    ft = make_finetuner(8, top_t=3, use_idf=True)
    with pytest.raises(RuntimeError, match="load_background_indices"):
        ft.update_trainable_indices(torch.tensor([1, 2]))


def test_select_top_t_is_exact_under_massive_ties() -> None:
    n = 1000
    counts = torch.ones(n, dtype=torch.int32)
    counts[::7] = 0
    scores = tfidf_scores(counts, None, 0, use_idf=False)
    sel = select_top_t(scores, counts, 50)
    accessed = [i for i in range(n) if i % 7]
    assert sel.tolist() == accessed[:50]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_t": 0}, "top_t must be > 0"),
        ({"top_t": 2.5}, "top_t must be a positive integer"),
        ({"top_t": True}, "top_t must be a positive integer"),
        ({"mode": "topk"}, "mode must be one of"),
        ({"use_idf": "yes"}, "use_idf must be true or false"),
        ({"enabled": 1}, "enabled must be true or false"),
    ],
)
def test_args_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseMemoryFinetuningArgs(**kwargs)


def test_args_from_dict_rejects_unknown_keys() -> None:
    assert SparseMemoryFinetuningArgs.from_dict({"enabled": True, "top_t": 7}).top_t == 7
    with pytest.raises(ValueError, match="unknown sparse_update option"):
        SparseMemoryFinetuningArgs.from_dict({"topt": 7})


# ---------------------------------------------------------------- the ranking variants (--sparse.ranking)
def background_finetuner(num_slots: int, *, top_t: int, ranking: str, batches: list[torch.Tensor]):
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=top_t, ranking=ranking),
                               torch.nn.Parameter(torch.zeros(num_slots, 4)))
    ft.background_tracker.start_collection()
    for b in batches:
        ft.background_tracker.add_batch_indices(b)
    ft.background_tracker.stop_collection()
    return ft


def hand_kl(indices: list[int], background: list[list[int]], num_slots: int) -> dict[int, float]:
    """arXiv 2604.05248's KL ranking slot by slot: p = batch access share, q = add-one smoothed background
    access share over all N slots, score p·ln((p+1e-8)/(q+1e-8))."""
    c = Counter(i for i in indices if i >= 0)
    total = sum(c.values())
    bg = Counter(i for b in background for i in b if i >= 0)
    denom = sum(bg.get(i, 0) + 1 for i in range(num_slots))
    return {i: (n / total) * math.log((n / total + 1e-8) / ((bg.get(i, 0) + 1) / denom + 1e-8)) for i, n in c.items()}


def test_kl_ranking_matches_hand_computation() -> None:
    rng = random.Random(3)
    num_slots = 40
    background = [[rng.randrange(12) for _ in range(30)] + [rng.randrange(num_slots) for _ in range(5)] for _ in range(8)]
    ft = background_finetuner(num_slots, top_t=5, ranking="kl", batches=[torch.tensor(b) for b in background])
    assert ft.background_tracker.access_counts.tolist() == [
        sum(b.count(i) for b in background) for i in range(num_slots)]
    for trial in range(20):
        batch = [rng.randrange(num_slots) for _ in range(25)] + [-1, -1]
        scores = hand_kl(batch, background, num_slots)
        ft.update_trainable_indices(torch.tensor(batch))
        assert ft.trainable_indices.tolist() == hand_select(scores, 5), trial


def test_kl_scores_direct() -> None:
    counts = torch.tensor([3, 0, 1, 6], dtype=torch.int32)
    access = torch.tensor([10, 0, 0, 2])
    from sparse_update.tfidf import background_access_probability, kl_scores
    q = background_access_probability(access)
    assert q.tolist() == pytest.approx([11 / 16, 1 / 16, 1 / 16, 3 / 16])
    p = [0.3, 0.0, 0.1, 0.6]
    want = [pi * math.log((pi + 1e-8) / (qi + 1e-8)) for pi, qi in zip(p, q.tolist())]
    assert kl_scores(counts, q).tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


def hand_seq_tfidf(rows: list[list[int]], df: dict[int, int], num_batches: int, top_t: int) -> list[int]:
    """seq_tfidf as the README defines it: R = rows that read something, share = max(1, t // R); each row votes
    for the `share` slots of highest TF-IDF within the row; slots ranked by (votes, batch TF-IDF, lower index)."""
    read = [[i for i in r if i >= 0] for r in rows]
    share = max(1, top_t // max(1, sum(1 for r in read if r)))
    votes: Counter = Counter()
    for r in read:
        if r:
            votes.update(hand_select(hand_scores(r, df, num_batches, True), share))
    batch = hand_scores([i for r in read for i in r], df, num_batches, True)
    order = sorted(batch, key=lambda i: (-votes[i], -batch[i], i))
    return sorted(order[:top_t])


@pytest.mark.parametrize("top_t", [2, 6, 9, 40])
def test_seq_tfidf_matches_hand_computation(top_t: int) -> None:
    rng = random.Random(top_t)
    num_slots = 30
    background = [torch.tensor([rng.randrange(num_slots) for _ in range(12)]) for _ in range(10)]
    ft = background_finetuner(num_slots, top_t=top_t, ranking="seq_tfidf", batches=background)
    df = {i: int(v) for i, v in enumerate(ft.background_tracker.document_frequency.tolist())}
    for trial in range(10):
        rows = [[rng.randrange(num_slots) for _ in range(8)] for _ in range(4)]
        rows[1][:3] = [-1, -1, -1]
        if trial % 3 == 0:
            rows[2] = [-1] * 8      # a row of padding: votes for nothing and does not count in R
        stats = ft.update_trainable_indices(torch.tensor(rows).view(4, 2, 4))
        assert ft.trainable_indices.tolist() == hand_seq_tfidf(rows, df, 10, top_t), (trial, top_t)
        assert stats["seq_share"] == max(1, top_t // (3 if trial % 3 == 0 else 4))


def test_ranking_options() -> None:
    assert SparseMemoryFinetuningArgs(use_idf=False).ranking == "tf"
    assert SparseMemoryFinetuningArgs(ranking="tf").use_idf is False
    assert SparseMemoryFinetuningArgs(ranking="kl").use_idf is True
    with pytest.raises(ValueError, match="ranking must be one of"):
        SparseMemoryFinetuningArgs(ranking="bm25")
    with pytest.raises(ValueError, match="contradicts ranking='kl'"):
        SparseMemoryFinetuningArgs(use_idf=False, ranking="kl")


def test_kl_without_background_access_counts_says_what_to_do(tmp_path) -> None:
    from sparse_update import save_background_file
    path = tmp_path / "old_background.safetensors"      # as written before access counts were recorded
    save_background_file(path, document_frequency=torch.tensor([2, 0, 1, 0]), num_batches=2)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=2, ranking="kl"),
                               torch.nn.Parameter(torch.zeros(4, 2)))
    ft.load_background_indices(path)
    with pytest.raises(RuntimeError, match="re-run the background stage"):
        ft.update_trainable_indices(torch.tensor([0, 2, 2]))
    ok = background_finetuner(4, top_t=2, ranking="kl", batches=[torch.tensor([0, 0, 2])])
    ok.save_background_indices(tmp_path / "new.safetensors")
    ft.load_background_indices(tmp_path / "new.safetensors")
    assert ft.background_tracker.access_counts.tolist() == [2, 0, 1, 0]
    ft.update_trainable_indices(torch.tensor([0, 2, 2]))
    assert ft.trainable_indices.tolist() == [0, 2]
